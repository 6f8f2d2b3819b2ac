"""The check that the harness copy the evaluator ran from is still exactly what it was made from: its
commit's tree (a workspace's copy, in git) or the manifest of its files (a cluster node's).

Standard library only, beside worker.py and harness_eval.py wherever they run (cluster.package ships it).
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import hashlib
import os
import stat
import subprocess

READ_CHUNK = 1 << 20
SHOWN_CHANGES = 5  # the changed files a problem names
# The check of the harness copy (harness_problem) runs none of the programs .git/config names: its git
# has the server's overrides (workspace.NO_AGENT_CODE and GIT_ENV: this script imports nothing from the
# package) and is asked only for the commit's tree (ls-tree reads no index, so no fsmonitor runs, and
# hashes no file, so no attribute's filter runs); the files' bytes are compared here
NO_AGENT_GIT = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.attributesFile=/dev/null")
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_ATTR_NOSYSTEM": "1", "GIT_NO_REPLACE_OBJECTS": "1"}


def harness_problem(harness: str, commit: str | None) -> str | None:
    """The pristine harness copy must be exactly its commit: every file of the commit's tree with its
    bytes (a link as a link), nothing changed, added or hidden. Compared here, not by `git status`: the index
    and the attributes are the agent's to write (.git), status runs the fsmonitor that .git/config
    names (with this worker's descriptors) and the filters that attributes name, and index flags
    (assume-unchanged, skip-worktree) hide an edit from it. git only lists the commit's tree, with
    NO_AGENT_GIT, and no stdin."""
    try:
        listed = subprocess.run(["git", *NO_AGENT_GIT, "-C", harness, "ls-tree", "-r", "-z", "--full-tree",
                                 commit or "HEAD"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                                env=dict(os.environ, **GIT_ENV))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the harness copy could not be checked: {exc}"
    if listed.returncode:
        error = listed.stderr.decode(errors="replace").strip()[:300]
        return f"the harness copy could not be checked: git ls-tree {commit or 'HEAD'}: {error}"
    tree = {}  # path: (mode, object id)
    for entry in listed.stdout.split(b"\0"):
        if entry:
            meta, _, path = entry.partition(b"\t")
            mode, _, oid = meta.decode().split(" ")
            tree[os.fsdecode(path)] = (mode, oid)
    try:
        changed = [path for path, (mode, oid) in tree.items() if not same_as_blob(os.path.join(harness, path), mode, oid)]
        changed += untracked(harness, tree)
    except OSError as exc:
        return f"the harness copy could not be checked: {exc}"
    return changed_problem(harness, changed)


def same_as_blob(path: str, mode: str, oid: str) -> bool:
    """Whether the file at path is what the tree's entry (mode, object id) holds: a plain file with the
    blob's bytes, a link to the blob's target; a submodule's folder is not looked into."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if mode == "160000":
        return stat.S_ISDIR(st.st_mode)
    if mode == "120000":
        return stat.S_ISLNK(st.st_mode) and blob_id(os.fsencode(os.readlink(path)), oid) == oid
    if not stat.S_ISREG(st.st_mode):  # its executable bit aside: the evaluator runs no file by it
        return False
    try:  # not through a link planted since, not waiting on a FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        digest = blob_hash(size, oid)
        read = 0
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            digest.update(chunk)
            read += len(chunk)
    return read == size and digest.hexdigest() == oid


def blob_id(data: bytes, like: str) -> str:
    """git's object id of a blob with these bytes, in the hash of the id `like`."""
    digest = blob_hash(len(data), like)
    digest.update(data)
    return digest.hexdigest()


def blob_hash(size: int, like: str):
    """git's hash of a blob of `size` bytes, its header fed, in the hash of the id `like` (SHA-1 or
    SHA-256): the blob's bytes are to follow."""
    return hashlib.new("sha1" if len(like) == 40 else "sha256", b"blob %d\0" % size)


def untracked(harness: str, tree: dict) -> list[str]:
    """Files and links under the harness copy that its commit's tree does not hold (git's own .git at the
    top aside; a folder with nothing in it is nothing, as in git)."""
    found = []
    submodules = [path + "/" for path, (mode, _) in tree.items() if mode == "160000"]
    def unreadable(exc: OSError):  # a folder that cannot be listed could hide a module that can still be imported
        raise exc

    for base, dirs, files in os.walk(harness, onerror=unreadable):
        rel = os.path.relpath(base, harness)
        if rel == ".":
            dirs[:] = [d for d in dirs if d != ".git"]
            files = [f for f in files if f != ".git"]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
            path = os.path.normpath(os.path.join(rel, name))
            if path not in tree or any(path.startswith(s) for s in submodules):
                found.append(path)
    return found


def file_manifest(folder: str) -> dict:
    """Every file under a folder (links as links), by relative path: its SHA-256."""
    found = {}
    for base, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
            path = os.path.join(base, name)
            if os.path.islink(path):
                digest = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()  # the harness's files are small
            found[os.path.relpath(path, folder)] = digest
    return found


def manifest_problem(harness: str, manifest: dict) -> str | None:
    """A harness copy outside git (a cluster node's) must hold exactly the files it was made with."""
    try:
        now = file_manifest(harness)
    except OSError as exc:
        return f"the harness copy could not be checked: {exc}"
    return changed_problem(harness, [p for p in set(now) | set(manifest) if now.get(p) != manifest.get(p)])


def changed_problem(harness: str, changed: list[str]) -> str | None:
    """The problem of a harness copy whose files `changed` (the first SHOWN_CHANGES named), or None."""
    if changed:
        return f"the harness copy {harness} was changed during the run: {', '.join(sorted(changed)[:SHOWN_CHANGES])}"
    return None

