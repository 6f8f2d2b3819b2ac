"""The server's bytecode archive for each training interpreter (scripts/bytecode_archive.py).

A sandboxed run's interpreter reads no bytecode from a `__pycache__` the agent can write: it would
compile torch's compile stack from source at every start (about 8 CPU-seconds on the 2-core CPU).
The warm interpreters get the server's own compile of those modules instead: built once per training
interpreter, in the background (the slot's first warm worker may start without it), and kept in a
sealed memory file, which the warm workers inherit and no process can write.
"""
import shutil
import subprocess
import threading
from pathlib import Path

from mcp_server.core import envpin
from mcp_server.scripts import harness_eval
from mcp_server.scripts.bytecode_archive import read

BUILDER = Path(__file__).resolve().parent.parent / "scripts" / "bytecode_archive.py"
BUILD_TIMEOUT_S = 600  # importing torch's compile stack from source took ~13 s on the 2-core CPU
BUILDING = "building"


def build(python: str, env: dict) -> bytes:
    """The archive of an interpreter: the builder run with it, over its site folders. Raises OSError
    or subprocess.SubprocessError where it cannot be built."""
    site, _ = envpin.folders(python)
    done = subprocess.run([python, *harness_eval.ISOLATED, str(BUILDER), *site], capture_output=True, env=env,
                          timeout=BUILD_TIMEOUT_S, check=True)
    return done.stdout


def sealed(archive: bytes):
    """The archive in a memory file sealed against writes and read back, or None where this system
    cannot seal one (then the runs compile their own bytecode)."""
    copy = harness_eval.unnamed_file()
    try:
        copy.write(archive)
        copy.flush()
        harness_eval.seal(copy)
        if not harness_eval.is_sealed(copy) or read(copy.fileno()) != archive:
            raise OSError("not sealed")
    except OSError:
        copy.close()
        return None
    return copy


class Archives:
    """One archive per training interpreter, built once, in the background."""

    def __init__(self):
        self.files: dict = {}  # python -> its sealed archive, BUILDING, or None (it could not be built)
        self.lock = threading.Lock()

    def fileno(self, python: str, env: dict) -> int | None:
        """The descriptor of python's archive; None while it is built (the first call starts that) or
        where it could not be."""
        python = shutil.which(python, path=env.get("PATH")) or python
        with self.lock:
            if python not in self.files:
                self.files[python] = BUILDING
                threading.Thread(target=self._build, args=(python, env), daemon=True, name="bytecode").start()
            found = self.files[python]
        return None if found in (None, BUILDING) else found.fileno()

    def _build(self, python: str, env: dict) -> None:
        try:
            archive = sealed(build(python, env))
        except (OSError, subprocess.SubprocessError):
            archive = None
        with self.lock:
            self.files[python] = archive

    def close(self) -> None:
        with self.lock:
            files, self.files = list(self.files.values()), {}
        for each in files:
            if each not in (None, BUILDING):
                each.close()
