"""The training environment's pin: what a run's interpreter loads before and with train.py.

The agent can write the workspace environment between runs (a run cannot: the sandbox mounts it
read-only): a `.pth`, a sitecustomize.py or an edited package file there changes what a run trains
with while train.py's diff stays empty. Setup pins the environment; each run is checked against
that pin before it is queued. The pin is a stat walk (path, size, mtime_ns) of the environment's
site-packages, one digest per top-level entry so a change can be named, plus the content of every
`.pth` and *customize.py there and in the interpreter's start-up folders (the standard library's).
A check's pins share one walk of each folder tree (Walk): a run's checks stat each file once.
"""
import functools
import hashlib
import json
import os
import shutil
import subprocess

from mcp_server.core.models import Refusal
from mcp_server.scripts import trusted_import

# run with -S, so nothing planted runs in the server: a venv's prefix (which site would set) from
# its pyvenv.cfg, beside or above the interpreter
PROBE = ("import json, os, sys, sysconfig; v = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable))); "
         "b = v if os.path.isfile(os.path.join(v, 'pyvenv.cfg')) else sys.prefix; "
         "p = sysconfig.get_paths(vars={'base': b, 'platbase': b}); "
         "print(json.dumps({'site': sorted({p['purelib'], p['platlib']}), 'path': [d for d in sys.path if d]}))")
PROBE_TIMEOUT_S = 60
STARTUP_NAMES = ("sitecustomize.py", "usercustomize.py", "sitecustomize", "usercustomize")
SHOWN = 5
# written by any import outside the sandbox (the agent's own `uv run python`, a test's pytest): a
# run's interpreter checks each against its source's size and mtime, which the walk pins
BYTECODE_DIR = "__pycache__"
# left out of the standard library's pin and watch: bytecode, and the base install's own packages, which
# a virtual environment does not import
STDLIB_SKIPPED = (BYTECODE_DIR, "site-packages", "dist-packages")
ABSENT = "absent"
SOURCE_SUFFIXES = (".py", ".pth")


@functools.lru_cache(maxsize=8)
def folders(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The interpreter's site folders and its start-up path without site (-S: nothing planted runs),
    entries that do not exist included (the zip of the standard library Python would look in first)."""
    found = subprocess.run([python, "-I", "-S", "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    if found.returncode != 0:
        return (), ()
    paths = json.loads(found.stdout.strip().splitlines()[-1])
    return tuple(paths["site"]), tuple(paths["path"])


def is_startup(name: str) -> bool:
    return name.endswith(".pth") or name in STARTUP_NAMES


class Walk:
    """The folder trees of one check, each walked once for both digests the pins take of it: every
    file's name, size and mtime (take, take_startup), and its Python sources' contents (take_sources).
    A tree walked for one pin is reused by the next, so the pins of a check see the same moment."""

    def __init__(self):
        self.trees: dict[str, tuple[str, str]] = {}
        self.sources: dict[str, str] = {}  # each source's path -> SHA-256 (hex), as this walk found it
        self.files: set = set()  # every other file's path (compiled libraries, bytecode without a source)

    def tree(self, path: str) -> tuple[str, str]:
        """A folder's (stat digest, sources digest)."""
        if path not in self.trees:
            stats, sources = hashlib.sha256(), hashlib.sha256()
            _walk(path, stats, sources, self)
            self.trees[path] = stats.hexdigest()[:16], sources.hexdigest()[:16]
        return self.trees[path]


def _walk(path: str, stats, sources, walk: Walk) -> None:
    """Every file under path into stats: its relative name, size and mtime, symlinks as their targets;
    and every Python source into sources: its path and content digest, a folder's own sources before its
    subfolders' (os.walk's order: a symlink to a folder is neither a source nor walked); every other
    file's path into walk.files."""
    with os.scandir(path) as found:
        entries = sorted((e for e in found if e.name != BYTECODE_DIR), key=lambda e: e.name)
    for entry in entries:
        if entry.name.endswith(SOURCE_SUFFIXES) and not entry.is_dir():
            st = None if entry.is_symlink() else entry.stat(follow_symlinks=False)
            found = _content_digest(entry.path, st)
            walk.sources[entry.path] = found.hex()
            sources.update(f"{entry.path}\n".encode() + found)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            stats.update(f"{entry.name}/\n".encode())
            _walk(entry.path, stats, sources, walk)
            continue
        if not entry.name.endswith(SOURCE_SUFFIXES):
            walk.files.add(entry.path)
        st = entry.stat(follow_symlinks=False)
        target = os.readlink(entry.path) if entry.is_symlink() else ""
        stats.update(f"{entry.path}\t{st.st_size}\t{st.st_mtime_ns}\t{target}\n".encode())


def _entry_digest(entry: os.DirEntry, walk: Walk) -> str:
    if entry.is_dir(follow_symlinks=False):
        return walk.tree(entry.path)[0]
    digest = hashlib.sha256()
    st = entry.stat(follow_symlinks=False)
    digest.update(f"{st.st_size}\t{st.st_mtime_ns}\n".encode())
    if is_startup(entry.name) and entry.is_file():
        with open(entry.path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def take(python: str | None, walk: Walk | None = None) -> dict | None:
    """{path: digest} for each top-level entry of the site folders and each start-up file of the
    interpreter's other start-up folders; None where python is no Python interpreter."""
    walk = walk or Walk()
    if not python:
        return None
    try:
        site, path = folders(python)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not site:
        return None
    pin = {}
    for folder in dict.fromkeys(site + path):
        if not os.path.isdir(folder):
            continue
        whole = folder in site  # the standard library: only what runs at start-up
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name == BYTECODE_DIR:  # the top-level modules' bytecode, as in every package
                    continue
                if whole or is_startup(entry.name):
                    pin[entry.path] = _entry_digest(entry, walk)
    return pin


def take_startup(pythons, walk: Walk | None = None) -> dict:
    """{path: digest} of what the interpreters load beyond their site folders: each top-level entry of
    their standard library folders (their start-up path but the site folders) and each start-up path
    entry that is no folder (a zip of bytecode there runs before the standard library's sources, so its
    absence is pinned too); the interpreter itself (the link and the file) and the venv's pyvenv.cfg
    (which can add the base install's packages); and the start-up files in each folder a .pth file adds
    to the path (an editable install's project). A base install the user can write (pyenv's, uv's)
    would take planted modules that every run and the evaluator import."""
    walk, pin = walk or Walk(), {}
    for python in dict.fromkeys(pythons):
        site, path = folders(python)
        for folder in path:
            if folder in site:
                continue
            if not os.path.isdir(folder):
                pin[folder] = _file_digest(folder)
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name not in STDLIB_SKIPPED:
                        pin[entry.path] = _entry_digest(entry, walk)
        for each in interpreter_files(python) + [os.path.join(f, n) for f in pth_folders(site) for n in STARTUP_NAMES]:
            pin[each] = _file_digest(each)
    return pin


def take_sources(pythons, walk: Walk | None = None, packages=None) -> dict:
    """{folder entry: SHA-256 of its Python sources' contents} for each top-level entry of the
    interpreters' site folders and standard library folders: the stat walk above cannot see an edit
    that keeps a file's size and puts its mtime back (os.utime), nor one written through a memory
    mapping or a hard link, which inotify misses too. Hashing torch's 300 MB of sources takes 0.6 s;
    after the first time, only the files whose stat moved are read again. packages: the interpreters
    whose site folders count (None: all), see source_folders."""
    walk, pin = walk or Walk(), {}
    for folder in dict.fromkeys(f for python in pythons for f in source_folders(python, packages)):
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name in STDLIB_SKIPPED:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pin[entry.path] = walk.tree(entry.path)[1]
                elif entry.name.endswith(SOURCE_SUFFIXES):
                    pin[entry.path] = _sources_digest(entry.path, walk.sources)
                else:
                    walk.files.add(entry.path)
    return pin


def _sources_digest(path: str, seen: dict) -> str:
    """A top-level source's digest (a folder's is its Walk.tree's); seen: each source's path -> SHA-256 (hex)."""
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [],
                                                                                    [os.path.basename(path)])]:
        subfolders[:] = sorted(d for d in subfolders if d != BYTECODE_DIR)
        for name in sorted(f for f in files if f.endswith(SOURCE_SUFFIXES)):
            each = os.path.join(folder, name)
            found = _content_digest(each)
            seen[each] = found.hex()
            digest.update(f"{each}\n".encode() + found)
    return digest.hexdigest()[:16]


# path -> (its inode, size, mtime and change time, the SHA-256 of its content): hashed again only when
# one of those moved. No write keeps them all (the change time cannot be set back, and a write through
# a hard link or a mapping moves it too), so a check costs a stat per source, not 300 MB of hashing.
_CONTENT: dict = {}


def _content_digest(path: str, st: os.stat_result | None = None) -> bytes:
    """path's SHA-256; st: its stat where the caller has it (no symlink: the same as os.stat's)."""
    try:
        st = st or os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = _CONTENT.get(path)
        if known is not None and known[0] == key:
            return known[1]
        with open(path, "rb") as f:
            found = hashlib.sha256(f.read()).digest()
    except OSError:
        return b"unreadable"
    _CONTENT[path] = (key, found)
    return found


# real path -> SHA-256 (hex) of its content when the last check of its pin passed (or pinned it): what
# a run's interpreters must report having compiled from it (scripts/trusted_import.py); the other files
# those checks found (compiled libraries, bytecode without a source: loaded, never hashed); and each
# folder they walked (real path -> the top-level names left out of it): a module under one of them that
# no check found was planted after the last check
_VERIFIED: dict = {}
_PRESENT: set = set()
_WALKED: dict = {}
# the stdlib's folders walked by another path (the site folders); its own __pycache__ is not among them
STDLIB_SKIPPED_FOLDERS = tuple(each for each in STDLIB_SKIPPED if each != BYTECODE_DIR)
NOT_CHECKED = "(not among the files its check found)"
CHANGED = "(compiled from other contents than its check found)"
READ_CHANGED = "(read from other contents than its check found)"  # a .pth file: read, never compiled


def source_folders(python: str, packages=None) -> tuple[str, ...]:
    """The folders of an interpreter whose sources the pin covers: its standard library's, and its site
    folders where packages (the interpreters whose packages are imported by what the server runs) is None
    or holds it. The server's own packages are imported only by the harness's evaluator: a worker runs
    without site (scripts/sandbox.py NO_SITE)."""
    site, path = folders(python)
    return (site if packages is None or python in packages else ()) + path


def pin_sources(pythons, walk: Walk | None = None, packages=None) -> dict:
    """take_sources, for a new pin: what it found is what the runs' imports are checked against."""
    walk = walk or Walk()
    pin = take_sources(pythons, walk, packages)
    _verified(pythons, walk, packages)
    return pin


def check_sources(pinned: dict, pythons, walk: Walk | None = None, packages=None) -> None:
    walk = walk or Walk()
    _refuse_changes(pinned, take_sources(pythons, walk, packages), "The Python sources the runs and the evaluator "
                    "import", "reinstall what changed")
    _verified(pythons, walk, packages)


def _verified(pythons, walk: Walk, packages=None) -> None:
    """walk's sources as the last passed check's, under their real paths too (an interpreter names a
    source through the spelling of its path entry: a venv's folder may be reached through a link)."""
    for python in dict.fromkeys(pythons):
        site = folders(python)[0]
        for folder in dict.fromkeys(source_folders(python, packages)):
            if not os.path.isdir(folder):
                continue
            real = os.path.realpath(folder)
            _WALKED[real] = _WALKED[folder] = () if folder in site else STDLIB_SKIPPED_FOLDERS
            if real != folder:
                _VERIFIED.update({real + p[len(folder):]: d for p, d in walk.sources.items()
                                  if p.startswith(folder + os.sep)})
                _PRESENT.update(real + p[len(folder):] for p in walk.files if p.startswith(folder + os.sep))
    _VERIFIED.update(walk.sources)
    _PRESENT.update(walk.files)


def _under_walked(*spellings: str) -> bool:
    """A module's path, as real or as imported, lies in a walked folder: a symlink to a folder outside
    them planted in a site folder is left out of the real path, not of the imported one."""
    for path in dict.fromkeys(os.path.normpath(each) for each in spellings):
        for folder, skipped in _WALKED.items():
            if path.startswith(folder + os.sep):
                parts = path[len(folder) + 1:].split(os.sep)
                if parts[0] not in skipped:  # a module under a __pycache__ too: the walk never looks there
                    return True
    return False


def _real_path(path: str, real_folders: dict) -> str:
    """path with its folder resolved, each folder once (real_folders: folder -> real path): a process
    reports hundreds of modules from a few folders."""
    folder, name = os.path.split(path)
    if folder not in real_folders:
        real_folders[folder] = os.path.realpath(folder)
    return os.path.join(real_folders[folder], name)


def imported_changes(imported) -> dict:
    """{source: why} for the sources a run's interpreter or evaluator reports having compiled from
    other contents than the last check verified (an edit made and undone between two checks through a
    hard link or a memory mapping, which neither inotify nor the content pin sees), or that no check
    found in the folders it walked (a module planted and removed between two checks, which the watch
    would see, where it could be made; a compiled one or bytecode without a source too, which are loaded
    unhashed). A source outside those folders is left out (the harness copy's: harness_changes)."""
    if not isinstance(imported, dict):
        return {}
    found, real_folders = {}, {}
    for path, digest in imported.items():
        if not isinstance(path, str):
            continue
        real = _real_path(path, real_folders)
        if digest == trusted_import.LOADED:  # a module loaded from a file that is no source
            if real not in _PRESENT and path not in _PRESENT and _under_walked(real, path):
                found[path] = NOT_CHECKED
            continue
        known = _VERIFIED.get(real, _VERIFIED.get(path))
        if known is not None and known != digest:
            found[path] = READ_CHANGED if path.endswith(".pth") else CHANGED
        elif known is None and _under_walked(real, path):
            found[path] = NOT_CHECKED
    return found


HARNESS_CHANGED = "(compiled from other contents than the harness commit holds)"
HARNESS_NOT_HELD = "(loaded from the harness copy, but no source of the harness commit)"


def harness_changes(imported, harness: str, sources: dict) -> dict:
    """{source: why} for what a process reports having compiled or loaded from the harness copy (the
    folder harness, as imported or as real path) other than the harness commit's sources ({path inside
    it: SHA-256}, integrity.commit_sources). The worker's check of the copy after the evaluation
    (harness_copy.harness_problem) misses an edit made and undone meanwhile, which a warm evaluator
    keeps for all its later runs."""
    if not isinstance(imported, dict):
        return {}
    folders = tuple(dict.fromkeys(each + os.sep for each in (os.path.normpath(harness), os.path.realpath(harness))))
    found, real_folders = {}, {}
    for path, digest in imported.items():
        if not isinstance(path, str):
            continue
        path_as_named = os.path.normpath(path)
        for spelling in dict.fromkeys((path_as_named, _real_path(path_as_named, real_folders))):
            inside = next((spelling[len(f):] for f in folders if spelling.startswith(f)), None)
            if inside is not None and sources.get(inside) != digest:
                found[path] = HARNESS_CHANGED if inside in sources else HARNESS_NOT_HELD
    return found


def interpreter_files(python: str) -> list[str]:
    """The interpreter as named and as resolved, and its venv's pyvenv.cfg."""
    found = shutil.which(python) or python
    return [found, os.path.realpath(found), os.path.join(os.path.dirname(os.path.dirname(found)), "pyvenv.cfg")]


def pth_folders(site) -> list[str]:
    """The folders the .pth files of the site folders add to the path (their lines that are no import)."""
    found = []
    for folder in site:
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".pth"))
        except OSError:
            continue
        for name in names:
            try:
                lines = open(os.path.join(folder, name), encoding="utf-8", errors="replace").read().splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    added = os.path.join(folder, line)
                    if os.path.isdir(added) and added not in found:
                        found.append(added)
    return found


def _file_digest(path: str) -> str:
    """Its size, mtime and kind (a link: its target), or ABSENT."""
    try:
        st = os.lstat(path)
    except OSError:
        return ABSENT
    target = os.readlink(path) if os.path.islink(path) else ""
    return hashlib.sha256(f"{st.st_size}\t{st.st_mtime_ns}\t{st.st_mode}\t{target}\n".encode()).hexdigest()[:16]


def check(pinned: dict, python: str | None, what: str = "The training environment",
          reinstall: str = "`uv sync --reinstall` in the workspace", walk: Walk | None = None) -> None:
    """Refuses a run whose environment is not the one setup pinned, naming what changed."""
    _refuse_changes(pinned, take(python, walk) or {}, what, reinstall)


def check_startup(pinned: dict, pythons, walk: Walk | None = None) -> None:
    """Refuses a run whose interpreters load at start-up or from their standard library anything else
    than setup pinned."""
    _refuse_changes(pinned, take_startup(pythons, walk), "What the runs' and the evaluator's Python loads beyond its "
                    "packages (the interpreter, its standard library, pyvenv.cfg, the folders .pth files add)",
                    "reinstall that Python or venv")


def _refuse_changes(pinned: dict, now: dict, what: str, reinstall: str) -> None:
    changed = sorted(p for p in pinned.keys() | now.keys() if pinned.get(p) != now.get(p))
    if not changed:
        return
    def how(p: str) -> str:
        return "added" if pinned.get(p, ABSENT) == ABSENT else "removed" if now.get(p, ABSENT) == ABSENT else "changed"
    named = ", ".join(f"{p} ({how(p)})" for p in changed[:SHOWN]) + \
        (f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else "")
    raise Refusal(f"{what} changed since setup: {named}. A run would train or be scored with it while "
                  "train.py's diff stays empty, so its result could not be reproduced from its commit. Restore "
                  f"the file (delete what was added), or {reinstall} and call setup(tag) "
                  "for a new research run if the change was meant. Nothing was lost: no run was queued.")
