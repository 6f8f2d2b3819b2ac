"""The harness's copy of a run's exported program: where it finds it, and what it copies.

Standard library only, beside worker.py wherever it runs (cluster.package ships it to the nodes).

A bubblewrap run exports into its sandbox's private /tmp (sandbox.RUN_EXPORT), which the worker reaches through
the sandbox's own root (/proc/PID/root: sandbox.private_root). Every path there is the run's to make: a link at
/tmp/export pointing at an absolute path resolves, through /proc/PID/root, against the machine's root, so the harness
read the program the link named (one the agent trained by hand for ten budgets and left anywhere on the machine) as
the run's, verified, and wrote its answer there. The folder is reached one component at a time, through no link,
and held from the run's first moments on (harness_eval.HarnessEvaluation.inside).
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import errno
import json
import os
import stat
from pathlib import Path

COPY_CHUNK = 1 << 20
# The largest exported program the harness copies: 16 GiB of fp32 weights is 4e9 parameters, 80 times
# the h100 profile's model and more than one GPU can train in a run (weights, gradients and Adam's
# moments alone take 64 GB); anything larger is padding (a sparse file would fill this disk).
MAX_EXPORT_BYTES = 16 * 2**30
# ...and it copies it into memory (a sealed memfd): an export with more than this in holes (a sparse
# file, which takes the run no disk) is refused before the copy, which would cost the worker as much RAM
SPARSE_SLACK_BYTES = 64 * 2**20


def copy_regular_file(path, into, folder: int | None = None) -> None:
    """path's bytes (in the folder of that descriptor, where given) into the open file `into` (from its start):
    only a plain file, opened without following a link and without waiting (a FIFO planted there would block), at
    most MAX_EXPORT_BYTES, not sparse (the copy is the worker's memory, a hole is no disk of the run's), and no
    more than it held when checked."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    with os.fdopen(fd, "rb") as f:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise OSError(f"{path} is not a plain file")
        if found.st_size > MAX_EXPORT_BYTES:
            raise OSError(f"{path} is over {MAX_EXPORT_BYTES >> 30} GiB, more than a real export of the "
                          "model can be: that is padding, not a model")
        holes = hole_bytes(fd, found)
        if holes > SPARSE_SLACK_BYTES:
            raise OSError(f"{path} is a sparse file (at least {holes >> 20} MiB of its {found.st_size >> 20} MiB are holes, "
                          "on no disk): the harness copies the export into memory, and a model's export is written "
                          "whole (torch.export.save); export the model as export.py does")
        into.seek(0)
        into.truncate()
        while True:  # bounded while it copies too: a file that grows after the checks is refused
            chunk = f.read(COPY_CHUNK)
            if into.tell() + len(chunk) > found.st_size:
                raise OSError(f"{path} grew while the harness copied it: the export is complete before its "
                              "note (.json) is written, and is not written to afterwards")
            if not chunk:
                break
            into.write(chunk)
        into.flush()
        into.seek(0)


def hole_bytes(fd: int, found: os.stat_result) -> int:
    """How many of a file's bytes are holes (none stored on disk), counted only as far as needed to
    tell more than SPARSE_SLACK_BYTES: where its blocks cover it, none; else by SEEK_DATA/SEEK_HOLE
    (a filesystem that has not yet allocated what was just written, ZFS, reports it as data); where
    those are missing, what its blocks leave uncovered."""
    uncovered = found.st_size - found.st_blocks * 512
    if uncovered <= SPARSE_SLACK_BYTES:
        return 0
    holes, offset = 0, 0
    try:
        while offset < found.st_size and holes <= SPARSE_SLACK_BYTES:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                return holes + found.st_size - offset  # holes to its end
            holes += data - offset
            offset = os.lseek(fd, data, os.SEEK_HOLE)
    except (OSError, AttributeError):  # no SEEK_DATA here: the blocks say it
        return uncovered
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return holes


def export_seconds(folder: int, export: str) -> float | None:
    """How long export.py took, as it noted beside the program (export: its name in that folder's descriptor; for
    the answer's note only)."""
    try:  # the run wrote it: not a FIFO's wait, and json nested past the parser's depth is no note either
        with os.fdopen(os.open(export + ".json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder), "rb") as f:
            seconds = json.loads(f.read(4096)).get("export_seconds")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return seconds if isinstance(seconds, (int, float)) else None


def export_folder(path: Path, root: int | None = None) -> int:
    """A descriptor of the folder of path (the export, or the answer beside it). With root (a descriptor of a
    bubblewrap sandbox's root, as the machine sees it), of that folder inside the sandbox, each component opened
    without following a link; a link or a file in place of one is an OSError that says so."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK  # O_DIRECTORY: a FIFO there fails at once, unopened
    if root is None:
        return os.open(path.parent, flags)
    fd = os.open(".", flags, dir_fd=root)
    try:
        for part in path.parent.relative_to(path.anchor).parts:
            inner = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise OSError(exc.errno, f"{path.parent} in the run's sandbox is not the folder the sandbox made (a link or a "
                                 "file in its place): the harness reads the export only from the run's own files; "
                                 "export the model where RESEARCH_LOOP_EXPORT says (nanochat/export.py)") from None
    return fd


def exported(folder: int, name: str) -> bool:
    """Whether the program and its note (export.py's last file) are in that folder, links counted as there."""
    for each in (name, name + ".json"):
        try:
            os.stat(each, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return False
    return True
