"""One training run as a child process group with a hard timeout.

The command runs under watchdog.py, the leader of a fresh process group, so the whole
group (uv, python, any workers) can be signalled at once: on timeout, on server exit,
and by the watchdog itself if the server is killed. Output goes to run.log unbuffered.
"""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mcp_server.state import process_start_time

WATCHDOG = Path(__file__).with_name("watchdog.py")
TERM_GRACE_SECONDS = 5


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Run:
    """Starts at construction; `done` is set once the group is gone and the log closed."""

    def __init__(self, command: list[str], cwd: Path, log_path: Path, timeout: float, on_finish=None):
        self.timeout = timeout
        self.log_path = log_path
        self.timed_out = False
        self.exit_code: int | None = None
        self.result = None  # set by on_finish: the parsed outcome
        self.done = threading.Event()
        self._on_finish = on_finish
        # The server's own VIRTUAL_ENV (the plugin's) is not the workspace's: uv would ignore it
        # with a warning in every run.log, so the child finds its project environment itself.
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(WATCHDOG), *command], cwd=cwd, env=env,
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.leader_start = process_start_time(self.pgid)
        threading.Thread(target=self._wait, daemon=True, name=f"run-{self.pgid}").start()

    def _wait(self) -> None:
        try:
            self.exit_code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.terminate()
            self.exit_code = self.proc.wait()
        kill_group(self.pgid)  # anything the training left behind in its group
        self.proc.stdin.close()
        self._log.close()
        try:
            if self._on_finish:
                self._on_finish(self)
        finally:
            self.done.set()

    def terminate(self) -> None:
        """SIGTERM to the group, then SIGKILL after a grace period."""
        kill_group(self.pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=TERM_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        kill_group(self.pgid)
