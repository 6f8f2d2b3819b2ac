"""A run's own copy of its commit, made at the hand-over inside the run's sandbox, which it then runs from.

The server checks a commit out into the slot's worktree, but the agent (the same user, outside the
sandbox) can rewrite the worktree's files afterwards: what train.py imports from it is checked
(trusted_import.expect), but a file read as text and run (`exec(open(...).read())`, `runpy.run_path`)
or read as data (a config) would be whatever the agent put there. So the run's interpreter
(warm_train.py) copies every file the commit holds from the worktree into a folder of its own, checking
each against the SHA-256 the server took from the commit's blobs (integrity.commit_files, which the
worker receives on the server's socket, never in an argument: no size limit), and runs train.py there.
Under bubblewrap that folder is in the sandbox's private /tmp (sandbox.RUN_COPY), which no process
outside the sandbox sees by any path (but through /proc/PID/root, as ptrace does: docs/trust.md); a
file that differs from its commit's is never copied, and the run does not start.

Standard library only, as warm_train.py.
"""
import hashlib
import os
import stat

SYMLINK = 0o120000  # git's mode of a symbolic link, whose blob is its target
EXECUTABLE = 0o100755


def copy(source: str, files: dict, into: str) -> str:
    """Each of files ({path inside the commit: [git mode, SHA-256, size]}) read from the folder source and written
    into the folder into (made where missing), checked as it is read: a file that is not its commit's (changed,
    removed or replaced after checkout, or no plain file) raises ChangedAfterCheckout, naming it. Returns into."""
    os.makedirs(into, exist_ok=True)
    for path, (mode, digest, size) in sorted(files.items()):
        if os.path.isabs(path) or ".." in path.split("/"):
            raise ChangedAfterCheckout(path, "a path outside the commit's folder")
        there, here = os.path.join(source, path), os.path.join(into, path)
        os.makedirs(os.path.dirname(here), exist_ok=True)
        if mode == SYMLINK:
            target = _read_link(there, path)
            _check(path, os.fsencode(target), digest)
            os.symlink(target, here)
            continue
        data = _read_plain(there, path, size)
        _check(path, data, digest)
        fd = os.open(here, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if mode == EXECUTABLE else 0o644)
        with open(fd, "wb") as f:
            f.write(data)
    return into


class ChangedAfterCheckout(Exception):
    def __init__(self, path: str, why: str):
        super().__init__(f"{path} is not the run's commit's ({why}, after the server checked the run's worktree "
                         "out): the run was not started")


def _check(path: str, data: bytes, digest: str) -> None:
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChangedAfterCheckout(path, "other contents than the commit holds")


def _read_link(there: str, path: str) -> str:
    try:
        return os.readlink(there)
    except OSError as exc:
        raise ChangedAfterCheckout(path, f"not the commit's symbolic link: {exc.strerror}") from None


def _read_plain(there: str, path: str, size: int) -> bytes:
    """The file's bytes, where it is a plain file of its blob's size: opened without following a link and
    without blocking (a FIFO in its place would hang the run's start), and never read past that size (a
    sparse terabyte in its place would fill the run's memory, and the machine's, before its digest differed)."""
    try:
        fd = os.open(there, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ChangedAfterCheckout(path, f"not readable as the commit's file: {exc.strerror}") from None
    with open(fd, "rb") as f:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise ChangedAfterCheckout(path, "no plain file")
        if found.st_size != size:
            raise ChangedAfterCheckout(path, f"other contents than the commit holds: {found.st_size} bytes, not {size}")
        return f.read(size + 1)  # one more: a file that grew since fstat differs
