"""The events queued on a Linux inotify descriptor, as (watch, mask, name): one reader for the
server's environment watch (core/envwatch.py) and the worker's watch of the validation shard
(worker.py's ValidationWatch).

Standard library only: worker.py imports it as a sibling script, on a cluster node too.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import os
import struct

EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length
READ_SIZE = 65536


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
