"""A run's process tree: its processes found by their parent links in /proc, signalled and reaped
until none is left, and prctl for the worker's own standing (a subreaper adopts the tree's orphans;
a death signal ends a child with its parent). Standard library only, beside worker.py."""
from __future__ import annotations  # a node's Python may be older than 3.10

import collections
import ctypes
import os
import signal
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
REAP_ROUNDS = 50  # kill-and-reap passes over the descendants, 0.1 s apart
SETTLE_S = 2.0  # for a run's tree to end by itself once the run ended, before what is left is counted (left_behind)


def prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: process groups only
        return False


def descendants(root: int) -> list[int]:
    """Live processes below `root` (by parent links in /proc); empty where /proc is missing."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            children[int(fields[1])].append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def left_behind(run: int, settle: bool) -> list[int]:
    """The processes below this one, the run's own (ended and reaped) aside, that are still there SETTLE_S after it
    ended (settle: a bubblewrap run's), else at once. bubblewrap's outer process exits with the run's code as soon as
    its namespace's init reports it, and that init (--die-with-parent) and whatever is left in its namespace end just
    after: looked at once, a busy machine's ordinary end of a sandbox read as a run that left processes running.
    Without that sandbox what is left is the run's own, which the wait let go on writing into the run's output: a
    daemon that escaped the run printed a summary there 1.5 s after its end, and its number was taken for the run's."""
    deadline = time.monotonic() + (SETTLE_S if settle else 0.0)
    while True:
        left = [pid for pid in descendants(os.getpid()) if pid != run]
        if not left or time.monotonic() >= deadline:
            return left
        reap()
        time.sleep(0.02)


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def signal_tree(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_everything(pgid: int) -> int:
    """SIGKILL the command's group and every descendant until none is left; returns how many
    could not be killed (another user's, or stuck in the kernel)."""
    for _ in range(REAP_ROUNDS):
        signal_tree(pgid, signal.SIGKILL)
        reap()
        if not descendants(os.getpid()):
            return 0
        time.sleep(0.1)
    return len(descendants(os.getpid()))
