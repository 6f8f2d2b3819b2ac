"""The compile cache kept per program: what a run compiled, saved for its own program's later runs only.

Standard library only: worker.py uses it beside itself, on this machine and on a cluster's nodes. A run
compiles in a folder of its own (run_folder, for worker.py), filled before the run from its program's
folder here (`<cache>/compile/programs/<train.py's blob id>`), or, for a program not run yet, from the
program it was made from (its best's, so a constants-only edit starts warm), and saved back to its
program's folder once every process of the run is gone. So no run writes what a run of another
program loads: a cached graph's module runs as it lies (review 64, played at stop 53), and the best's
folder is written by the best's own runs alone.

A worker killed outright (SIGKILL, a node lost) neither saves nor removes its run's folder: each worker holds a lock
on its folder while it lives, and the next run's worker on that machine removes the folders (and their saves' copies)
no live worker holds.

Only plain files and folders are copied either way (never a link, a FIFO or a socket a run left), a run's
folder past the limits below is not kept (a sparse file costs a run nothing and its copy every byte: review 89),
and the folders of programs not used for the longest are removed past KEEP.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import fcntl
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

FOLDER = "programs"  # inside the compile cache: one folder per program
WORK = "work"  # inside the compile cache: each run's own folder while it runs
KEEP = 64  # program folders kept (a CPU program's graphs are ~10 MB; the best's is used at every control)
# Inductor's precompiled C++ headers (300 MB on the CPU): prepare.py's, shared read-only (nanochat/compile.py
# headers_dir); ones a run had to build itself are not kept per program
HEADERS = "precompiled_headers"
# what one program's folder may hold, headers aside: a CPU program's graphs are ~10 MB, a GPU program's kernels
# ~100s of MB, in a few hundred files, Inductor's deepest path a few folders down. Past them nothing is kept.
MAX_BYTES, MAX_ENTRIES, MAX_DEPTH = 2 << 30, 100_000, 32
PROGRAM = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # a git blob id, SHA-1 or SHA-256
HELD = ".held"  # beside each run's folder in WORK: locked by its worker while the worker lives
SAVING, OLD = ".saving-", ".old-"  # in FOLDER, with a run folder's name: a save's copy, and the folder it replaces

_held: dict[Path, int] = {}  # this worker's run folder and the descriptor of its lock


def run_folder(cache: Path | None, spec: dict, bubblewrap: bool) -> tuple[dict, Path | None]:
    """(the run's sandbox spec, its own compile folder or None), for worker.py. The compile cache (cache) is shared
    by every run and read by the next: a run that could write it could put code into what a run of another program
    loads, or leave weights. Under bubblewrap a run compiles in a folder of its own (made here, in WORK), which the
    worker fills and saves (on a cluster's node too, node.py); macOS's profile writes the shared cache as before
    (docs/trust.md, What is still open)."""
    if not (cache and spec):
        return spec, None
    writable = spec.get("writable", [])
    if not bubblewrap:
        return dict(spec, writable=[*writable, str(cache)]), None
    own = make_own(cache)
    return dict(spec, writable=[*writable, str(own)]), own


def make_own(cache: Path) -> Path:
    """A run's folder in WORK, locked by this process until released; first the folders no live worker holds are
    removed, with what their saves left in FOLDER. Nothing here waits on a lock: `work/` is read-only to runs, but a
    run can flock a file it only reads, and a lock for all (review 91: `work/.lock`) stalled every other slot's start
    for as long as a run held it."""
    work = cache / WORK
    work.mkdir(parents=True, exist_ok=True)
    sweep(work, cache / FOLDER)
    own = Path(tempfile.mkdtemp(prefix=run_prefix(), dir=work))
    fd, path = tempfile.mkstemp(prefix=".holding-", dir=work)  # a name no sweep looks at, until locked
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks, or a run took it first: this folder is neither held nor removed
        os.close(fd)
        os.unlink(path)
        return own
    os.rename(path, f"{own}{HELD}")  # named once locked: no sweep takes a live worker's folder for a dead one's
    _held[own] = fd
    return own


def sweep(work: Path, programs: Path) -> None:
    """The run folders whose lock no worker holds (killed outright before it saved or removed them), and their saves'
    copies. Only a plain file is a lock, opened without waiting (the agent's shell can put a FIFO, a folder or a link
    under such a name: review 91)."""
    for held in work.glob(f"{run_prefix()}*{HELD}"):
        try:
            fd = os.open(held, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # released meanwhile, or a link
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its worker lives
            continue
        finally:
            os.close(fd)
        name = held.name[:-len(HELD)]
        for folder in (work / name, programs / f"{SAVING}{name}", programs / f"{OLD}{name}"):
            remove(folder)
        held.unlink(missing_ok=True)


def run_prefix() -> str:
    """The start of this machine's run folders' names: a cache on a network file system is shared by a cluster's
    nodes, whose locks another node may not see (NFS mounted without locking), so each removes only its own."""
    return f"run-{re.sub(r'[^A-Za-z0-9.-]', '_', socket.gethostname())}+"


def release(own: Path) -> None:
    """The run's folder removed, and its lock let go."""
    remove(own)
    Path(f"{own}{HELD}").unlink(missing_ok=True)
    fd = _held.pop(own, None)
    if fd is not None:
        os.close(fd)


def fill(own: Path, programs: Path, program: str | None, seed: str | None) -> None:
    """The run's folder, holding a copy of its program's folder, else of the seed's, else nothing (where the copy
    fails: a folder another run's save or prune removed meanwhile, a full disk)."""
    for name in (program, seed):
        if name and PROGRAM.fullmatch(name) and (programs / name).is_dir():
            try:
                copy_plain(programs / name, own)
                os.utime(programs / name)  # used: the last to be removed
            except OSError:
                remove(own)
                own.mkdir()
            return


def save(own: Path, programs: Path, program: str | None) -> None:
    """The run's folder as its program's (a copy of what the run left, replacing the folder before), then the
    run's folder removed. Runs of one program at once each save theirs; the last stands."""
    staged = programs / f"{SAVING}{own.name}"
    try:
        if program and PROGRAM.fullmatch(program):
            programs.mkdir(parents=True, exist_ok=True)
            copy_plain(own, staged)
            replace_folder(staged, programs / program, programs / f"{OLD}{own.name}")
            prune(programs)
    except OSError:  # past the limits, a full disk: the next run of this program compiles again
        remove(staged)
    finally:
        release(own)


class PastLimits(OSError):
    """A run's folder holds more than a program's folder keeps (MAX_BYTES, MAX_ENTRIES, MAX_DEPTH)."""


def copy_plain(source: Path, target: Path) -> None:
    """The plain files and folders under source, copied into target (made where missing); nothing else, and no
    precompiled headers. PastLimits where source holds more than is kept. Walked without recursion (Python 3.11's
    os.walk recurses: a run's 1100 nested folders raised RecursionError)."""
    count = size = 0
    pending = [(str(source), target, 0)]
    while pending:
        folder, into, depth = pending.pop()
        into.mkdir(exist_ok=True)
        with os.scandir(folder) as listing:
            entries = [(entry.name, entry.path, entry.stat(follow_symlinks=False)) for entry in listing]
        count += len(entries)
        if count > MAX_ENTRIES:
            raise PastLimits(f"more than {MAX_ENTRIES} files and folders")
        for name, path, info in entries:
            if stat.S_ISDIR(info.st_mode) and not (depth == 0 and name == HEADERS):
                if depth + 1 > MAX_DEPTH:
                    raise PastLimits(f"folders more than {MAX_DEPTH} deep")
                pending.append((path, into / name, depth + 1))
            elif stat.S_ISREG(info.st_mode):
                size += info.st_size  # what the copy writes: a sparse file's holes too
                if size > MAX_BYTES:
                    raise PastLimits(f"more than {MAX_BYTES} bytes")
                shutil.copyfile(path, into / name, follow_symlinks=False)


def remove(folder: Path) -> None:
    """folder and all it holds, however deep (Python 3.11's rmtree recurses, and raises RecursionError), and however
    a run left its modes: a folder it made read-only or unlistable kept what it holds from rmtree, and the run's folder
    stayed in WORK for good, unlocked and never swept (review 91: any size, at every run)."""
    try:
        shutil.rmtree(folder, ignore_errors=True)
    except RecursionError:
        pass
    if folder.exists() and not folder.is_symlink():  # chmod -R follows no link inside
        for argv in (["chmod", "-R", "u+rwx", "--", str(folder)], ["rm", "-rf", "--", str(folder)]):
            subprocess.run(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def replace_folder(staged: Path, folder: Path, old: Path) -> None:
    """staged in folder's place, the folder before (renamed to old) removed."""
    try:
        os.rename(folder, old)
    except FileNotFoundError:
        old = None
    try:
        os.rename(staged, folder)
    except OSError:  # another run of the program saved at the same moment: its copy stands
        remove(staged)
    if old is not None:
        remove(old)


def prune(programs: Path) -> None:
    """The program folders past KEEP, the least recently used first."""
    folders = [p for p in programs.iterdir() if PROGRAM.fullmatch(p.name) and p.is_dir()]
    for folder in sorted(folders, key=lambda p: p.stat().st_mtime)[:max(0, len(folders) - KEEP)]:
        remove(folder)
