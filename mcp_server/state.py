"""The server's own memory, in <workspace>/.research-loop/: state.json and two locks.

- state.json is changed only inside `transaction()`: a thread lock plus an exclusive flock on
  state.lock, so two servers on one workspace (two sessions, stdio plus HTTP) never interleave a
  load-modify-save, and each write goes through a temporary file of its own (pid and thread in
  its name), fsync and rename: a server killed at any moment leaves the old state or the new one.
- owner.lock is held (flock) by the one server that runs experiments in the workspace, for as
  long as it lives. The kernel drops a flock when its process dies, however it dies, so "is the
  owner alive" needs no pid bookkeeping: a server that can take the lock knows the previous
  owner is gone and takes over its runs.
"""
import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path

from mcp_server.models import Refusal

STATE_DIR = ".research-loop"
STATE_FILE = "state.json"
STATE_LOCK = "state.lock"
OWNER_LOCK = "owner.lock"


def process_start_time(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    current = process_start_time(pid)
    return start_time is None or current is None or current == start_time


class State:
    def __init__(self, workspace: Path):
        self.dir = workspace / STATE_DIR
        self.path = self.dir / STATE_FILE
        self.mutex = threading.RLock()
        self._depth = 0  # transactions nest within a thread: only the outermost takes the flock
        self._lock_fd: int | None = None
        self._owner_fd: int | None = None

    # --- state.json ------------------------------------------------------------------
    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise Refusal(f"{self.path} is not valid JSON (edited by hand?): move it away and call "
                          "setup(tag) for a new research branch; results.tsv is untouched.")
        return data

    def save(self, data: dict) -> None:
        self.dir.mkdir(exist_ok=True)
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def transaction(self):
        """Exclusive across threads and processes; yields the state, saved on exit if changed.
        A refusal raised inside leaves the file as it was."""
        with self.mutex:
            self._depth += 1
            try:
                if self._depth == 1:
                    self.dir.mkdir(exist_ok=True)
                    self._lock_fd = os.open(self.dir / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                data = self.load()
                before = json.dumps(data, sort_keys=True)
                yield data
                if json.dumps(data, sort_keys=True) != before:
                    self.save(data)
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing drops the flock
                    self._lock_fd = None

    def update(self, **changes) -> dict:
        with self.transaction() as data:
            data.update(changes)
            return data

    # --- ownership -------------------------------------------------------------------
    def try_own(self) -> bool:
        """Takes the owner lock if no live server holds it; True if this process holds it now."""
        with self.mutex:
            if self._owner_fd is not None:
                return True
            self.dir.mkdir(exist_ok=True)
            fd = os.open(self.dir / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "start": process_start_time(os.getpid())}).encode())
            self._owner_fd = fd
            return True

    @property
    def owned(self) -> bool:
        return self._owner_fd is not None

    def owner(self) -> dict | None:
        """The owning server's pid record, as it wrote it (None if unreadable)."""
        try:
            data = json.loads((self.dir / OWNER_LOCK).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        with self.mutex:
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None
