"""Runs the training command and kills its whole process group when the server dies.

Started by the runner as the leader of a new process group, with a pipe from the server
on stdin. When the server exits for any reason, SIGKILL included, the pipe reaches EOF
and this kills the group (the training and anything it started, e.g. `uv run`'s child).
Runs as a plain script: it imports nothing from the package, so it starts fast.

    python watchdog.py COMMAND [ARGS...]
"""
import os
import signal
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 3  # SIGTERM first so the training can flush its log, then SIGKILL


def kill_group() -> None:
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)  # also reaches this process: ignored below
    time.sleep(GRACE_SECONDS)
    os.killpg(group, signal.SIGKILL)


def watch_server() -> None:
    while sys.stdin.buffer.read(1):
        pass  # the server never writes; any byte is ignored
    kill_group()


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # survive our own SIGTERM to send SIGKILL
    child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    threading.Thread(target=watch_server, daemon=True).start()
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    # os._exit: a normal exit would wait on the daemon thread blocked reading stdin
    os._exit(main())
