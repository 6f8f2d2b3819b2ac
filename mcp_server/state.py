"""The server's own memory, in <workspace>/.research-loop/: state.json and the run lock.

state.json is replaced atomically (write a temp file, fsync, rename), so a server killed
at any moment leaves either the old state or the new one. The lock is a file created with
O_EXCL holding the owner's pid and process start time; a lock whose owner is gone (the
pid is dead, or reused by another process) is stale and is taken over.
"""
import json
import os
import threading
from pathlib import Path

from mcp_server.models import Refusal

STATE_DIR = ".research-loop"
STATE_FILE = "state.json"
LOCK_FILE = "run.lock"


def process_start_time(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    current = process_start_time(pid)
    return start_time is None or current is None or current == start_time


class State:
    """Load-modify-save of state.json under a thread lock (runs finish on a worker thread)."""

    def __init__(self, workspace: Path):
        self.dir = workspace / STATE_DIR
        self.path = self.dir / STATE_FILE
        self.lock_path = self.dir / LOCK_FILE
        self.mutex = threading.RLock()

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise Refusal(f"{self.path} is not valid JSON (edited by hand?): move it away and call "
                          "setup(tag) for a new research branch; results.tsv is untouched.") from None

    def save(self, data: dict) -> None:
        self.dir.mkdir(exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def update(self, **changes) -> dict:
        with self.mutex:
            data = self.load()
            data.update(changes)
            self.save(data)
            return data

    def acquire_run_lock(self) -> dict | None:
        """Takes the lock for this process; returns the live holder's record if it is held."""
        self.dir.mkdir(exist_ok=True)
        me = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.lock_holder()
                if holder and process_alive(holder["pid"], holder.get("start")):
                    return holder
                self.lock_path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return None
        return self.lock_holder()

    def lock_holder(self) -> dict | None:
        try:
            return json.loads(self.lock_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def release_run_lock(self) -> None:
        holder = self.lock_holder()
        if holder is None or holder.get("pid") == os.getpid():
            self.lock_path.unlink(missing_ok=True)
