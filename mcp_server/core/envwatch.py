"""The environments a run loads (the training's, the evaluator's), watched from its check to its end
(Linux inotify).

The pin (envpin.py) is checked when a run is submitted, but the run's interpreter loads the
environment later: a queued run starts when a slot frees, and a warm interpreter (issue 27) imports
torch before its run is even submitted. A `.pth` planted after the check, or before a warm start and
removed before the next check, would run in that interpreter with the pin unchanged both times. So
the server watches what the pins cover (every folder of the site folders and of the standard library
but bytecode's, where a zip of the standard library would be, the interpreter and pyvenv.cfg, the
start-up files of the folders .pth files add) for as long as it runs, numbering each
change; a run whose window (from its check or its interpreter's start, whichever came first, to its
end) holds a change is no result. What inotify does not report, a write through a memory mapping or
through another name of the same file (a hard link: uv links its cache into every venv), goes unseen
here; the sources' content pin (envpin.take_sources) sees it at the next check, but not one made and
undone between two checks (docs/trust.md).
"""
import ctypes
import os
import sys
import threading
import uuid

from mcp_server.core import envpin
from mcp_server.scripts import inotify_events

IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x2, 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_ISDIR = 0x400, 0x800, 0x4000, 0x40000000
CHANGES = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
KEPT = 20  # changes remembered by path, for the answer


class EnvironmentWatch:
    """Every change to a training interpreter's environment since the watch began: `generation()` is
    their count, `since(n)` names those after the n-th. Raises OSError where inotify is missing or
    its watches run out (fs.inotify.max_user_watches)."""

    def __init__(self, python: str):
        site, path = envpin.folders(python)
        if not site:
            raise OSError(f"{python} is no Python interpreter with site folders")
        self.token = uuid.uuid4().hex  # a generation means something to this watch only
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        # watch -> (folder, which names count: None for all, names of folders left out below it)
        self.folders: dict[int, tuple[str, object, tuple]] = {}
        self.count, self.changes = 0, []
        self.lock = threading.Lock()
        try:
            for folder in site:
                self._add_tree(folder, (envpin.BYTECODE_DIR,))
            for folder in path:  # the standard library, and where a zip of it would be
                if folder in site:
                    continue
                if os.path.isdir(folder):
                    self._add_tree(folder, envpin.STDLIB_SKIPPED)
                else:
                    self._add_names([folder])
            self._add_names(envpin.interpreter_files(python))  # the interpreter, pyvenv.cfg
            self._add_names([os.path.join(f, n) for f in envpin.pth_folders(site) for n in envpin.STARTUP_NAMES])
        except OSError:
            os.close(self.fd)
            raise

    def _add(self, folder: str, names=None, skipped: tuple = ()) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), CHANGES)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        known = self.folders.get(wd)  # a folder watched for some names and now for others
        if known is not None and names is not None and known[1] is not None:
            names = set(known[1]) | set(names)
        self.folders[wd] = (folder, None if known is not None and known[1] is None else names, skipped)

    def _add_names(self, paths: list[str]) -> None:
        """Each path's folder, for changes to that name only."""
        for path in paths:
            if os.path.isdir(os.path.dirname(path)):
                self._add(os.path.dirname(path), {os.path.basename(path)})

    def _add_tree(self, top: str, skipped: tuple) -> None:
        for folder, subfolders, _ in os.walk(top):
            subfolders[:] = [d for d in subfolders if d not in skipped]
            self._add(folder, None, skipped)

    def generation(self) -> int:
        """The number of changes so far, the queued ones read first."""
        with self.lock:
            self._read_queued()
            return self.count

    def since(self, generation: int) -> list[str]:
        """The paths of the changes after the given generation (the last KEPT of them)."""
        with self.lock:
            self._read_queued()
            return [path for n, path in self.changes if n > generation]

    def _read_queued(self) -> None:
        for wd, mask, name in inotify_events.queued(self.fd):
            self._note(wd, mask, name)

    def _note(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            return self._changed("(too many changes to name)")
        if wd not in self.folders:
            return
        folder, names, skipped = self.folders[wd]
        if name in skipped or (names is not None and name not in names):  # bytecode: any import outside writes it
            return
        path = os.path.join(folder, name)
        # a new package, made there or moved in (a copy of torch put in its place left its files unwatched for the
        # server's life: review 67): its files are watched too
        if mask & (IN_CREATE | IN_MOVED_TO) and mask & IN_ISDIR and names is None:
            try:
                self._add_tree(path, skipped)
            except OSError:
                pass
        self._changed(path)

    def _changed(self, path: str) -> None:
        self.count += 1
        self.changes = (self.changes + [(self.count, path)])[-KEPT:]


# One watch per interpreter for the whole process, however many servers it holds (the tests' in-process
# ones): each takes thousands of the user's inotify watches (fs.inotify.max_user_watches)
_WATCHES: dict = {}
_LOCK = threading.Lock()


def watch_of(python: str) -> EnvironmentWatch | None:
    """python's watch, begun at the first call; None where it cannot be watched now (asked again next
    time; meanwhile the runs rely on the pins alone, and the server's log says why)."""
    with _LOCK:
        if _WATCHES.get(python) is None:
            try:
                _WATCHES[python] = EnvironmentWatch(python)
            except (OSError, ValueError) as exc:
                print(f"research-loop: the environment of {python} is not watched: {exc}", file=sys.stderr)
                return None
        return _WATCHES[python]


def position(pythons) -> dict:
    """Where the watches of these interpreters' environments stand now: {python: {"watch", "generation"}}."""
    return {p: {"watch": w.token, "generation": w.generation()} for p in dict.fromkeys(pythons)
            if (w := watch_of(p)) is not None}


def since(pythons, at: dict | None = None) -> dict:
    """{python: generation} from which a run's changes count: the position's (its check), where it is
    this watch's, else now."""
    found = {}
    for python in dict.fromkeys(pythons):
        watch, mark = watch_of(python), (at or {}).get(python) or {}
        if watch is not None:
            found[python] = mark["generation"] if mark.get("watch") == watch.token else watch.generation()
    return found


def changes(since_generation: dict) -> list[str]:
    """The changed paths after each python's generation."""
    return [path for python, generation in since_generation.items() if (w := watch_of(python)) is not None
            for path in w.since(generation)]


def earliest(a: dict, b: dict | None) -> dict:
    """Per python, the earlier of two generations (a warm interpreter started before its run's check)."""
    return {p: min(g, (b or {}).get(p, g)) for p, g in a.items()}
