"""The events queued on a Linux inotify descriptor, as (watch, mask, name): one reader for the
server's environment watch (core/envwatch.py) and the worker's watch of the validation shard
(ValidationWatch, here).

Standard library only: worker.py imports it as a sibling script, on a cluster node too.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import ctypes
import os
import select
import struct
import sys
import threading
from pathlib import Path

EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length
READ_SIZE = 65536
IN_OPEN = 0x20


def queued(fd: int):
    """(wd, mask, name) of each event queued on a non-blocking inotify fd, until none is left; none
    where the fd is closed."""
    while True:
        try:
            data = os.read(fd, READ_SIZE)
        except OSError:  # nothing queued (EAGAIN), or closed
            return
        if not data:
            return
        offset = 0
        while offset + EVENT.size <= len(data):
            wd, mask, _, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0").decode(errors="replace")
            offset += EVENT.size + length
            yield wd, mask, name


class ValidationWatch(threading.Thread):
    """Counts opens of the validation shard before the harness takes its own copy of the exported
    model (Linux inotify). The boundary is the worker's own act, not a file the run can create: the
    kernel queues an open's event before the open returns, so the events read when the copy is taken
    are every open that came before it."""

    def __init__(self, val_shard: Path):
        super().__init__(daemon=True, name="val-watch")
        self.opened_before_export = 0
        self.exported = False
        self.lock = threading.Lock()  # the events are read by this thread, and once by mark_exported
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, bytes(val_shard), IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if select.select([self.fd], [], [], 0.2)[0]:
                with self.lock:
                    self._read_queued()

    def mark_exported(self) -> None:
        """The harness has its copy of the program: opens from now on cannot have trained it."""
        with self.lock:
            self._read_queued()
            self.exported = True

    def _read_queued(self) -> None:
        for _, mask, _ in queued(self.fd):
            if mask & IN_OPEN and not self.exported:
                self.opened_before_export += 1

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=2)
        if self.is_alive():
            return
        self._read_queued()  # what is still queued
        os.close(self.fd)


def start_watch(path: Path) -> ValidationWatch | None:
    """The validation shard's watch, started; None where the system has no inotify (not Linux). Where it has, a
    watch that cannot be made raises OSError: the agent's process can use up the user's inotify instances (128 by
    default) or watches, and a run left unwatched read the validation data, trained on it and was verified."""
    try:
        watch = ValidationWatch(path)
    except OSError as exc:
        if sys.platform.startswith("linux"):
            raise OSError(exc.errno, f"the validation data cannot be watched here ({exc.strerror}: "
                                     f"{os.strerror(exc.errno or 0)}): this user's "
                                     "inotify instances or watches are used up (fs.inotify.max_user_instances, "
                                     "max_user_watches), and without the watch a run could train on the validation "
                                     "data unseen; end the process that holds them or raise the limit, then run "
                                     "again") from None
        return None
    watch.start()
    return watch
