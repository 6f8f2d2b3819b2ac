"""The compile cache kept per program: what a run compiled, saved for its own program's later runs only.

Standard library only: worker.py uses it beside itself, on this machine and on a cluster's nodes. A run
compiles in a folder of its own (worker.py compile_folder), filled before the run from its program's
folder here (`<cache>/compile/programs/<train.py's blob id>`), or, for a program not run yet, from the
program it was made from (its best's, so a constants-only edit starts warm), and saved back to its
program's folder once every process of the run is gone. So no run writes what a run of another
program loads: a cached graph's module runs as it lies (review 64, played at stop 53), and the best's
folder is written by the best's own runs alone.

Only plain files and folders are copied either way (never a link, a FIFO or a socket a run left), and
the folders of programs not used for the longest are removed past KEEP.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

FOLDER = "programs"  # inside the compile cache: one folder per program
WORK = "work"  # inside the compile cache: each run's own folder while it runs
KEEP = 64  # program folders kept (a CPU program's graphs are ~10 MB; the best's is used at every control)
# Inductor's precompiled C++ headers (300 MB on the CPU): prepare.py's, shared read-only (nanochat/compile.py
# headers_dir); ones a run had to build itself are not kept per program
HEADERS = "precompiled_headers"
PROGRAM = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # a git blob id, SHA-1 or SHA-256


def fill(own: Path, programs: Path, program: str | None, seed: str | None) -> None:
    """The run's folder, holding a copy of its program's folder, else of the seed's, else nothing."""
    for name in (program, seed):
        if name and PROGRAM.fullmatch(name) and (programs / name).is_dir():
            copy_plain(programs / name, own)
            os.utime(programs / name)  # used: the last to be removed
            return


def save(own: Path, programs: Path, program: str | None) -> None:
    """The run's folder as its program's (a copy of what the run left, replacing the folder before), then the
    run's folder removed. Runs of one program at once each save theirs; the last stands."""
    try:
        if program and PROGRAM.fullmatch(program):
            programs.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=".saving-", dir=programs))
            copy_plain(own, staged)
            replace_folder(staged, programs / program)
            prune(programs)
    except OSError:
        pass  # a full disk: the next run of this program compiles again
    finally:
        shutil.rmtree(own, ignore_errors=True)


def copy_plain(source: Path, target: Path) -> None:
    """The plain files and folders under source, copied into target (made where missing); nothing else, and no
    precompiled headers."""
    for folder, folders, files in os.walk(source):  # never into a linked folder
        into = target / os.path.relpath(folder, source)
        into.mkdir(parents=True, exist_ok=True)
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                shutil.copyfile(path, into / name, follow_symlinks=False)
        folders[:] = [name for name in folders if stat.S_ISDIR(os.lstat(os.path.join(folder, name)).st_mode)
                      and not (folder == str(source) and name == HEADERS)]


def replace_folder(staged: Path, folder: Path) -> None:
    """staged in folder's place, the folder before removed."""
    old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, old)
    except FileNotFoundError:
        old = None
    try:
        os.rename(staged, folder)
    except OSError:  # another run of the program saved at the same moment: its copy stands
        shutil.rmtree(staged, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(programs: Path) -> None:
    """The program folders past KEEP, the least recently used first."""
    folders = [p for p in programs.iterdir() if PROGRAM.fullmatch(p.name) and p.is_dir()]
    for folder in sorted(folders, key=lambda p: p.stat().st_mtime)[:max(0, len(folders) - KEEP)]:
        shutil.rmtree(folder, ignore_errors=True)
