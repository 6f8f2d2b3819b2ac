"""The server's bytecode archive for each training interpreter (scripts/bytecode_archive.py).

A sandboxed run's interpreter reads no bytecode from a `__pycache__` the agent can write: it would
compile torch's compile stack from source at every start (about 8 CPU-seconds on the 2-core CPU).
The warm interpreters get the server's own compile of those modules instead: built once per training
interpreter and process, in the background (a slot's warm worker waits for it: without it, it would
compile torch itself, beside the build), and kept in a sealed memory file, which the warm workers
inherit and no process can write.
"""
import subprocess
import sys
import threading
from pathlib import Path

from mcp_server.core import envpin
from mcp_server.scripts import harness_eval, sandbox
from mcp_server.scripts.bytecode_archive import read

BUILDER = Path(__file__).resolve().parent.parent / "scripts" / "bytecode_archive.py"
BUILD_TIMEOUT_S = 600  # listing and compiling torch's compile stack took ~20 s on the 2-core CPU
# The list step's interpreter: isolated, without site, writing no bytecode, but reading the environment's
# (5 s instead of 11 s where it has some). It runs the environment's code in any case (it imports torch
# from sources the agent could edit), and a crafted .pyc there can change no more than what it prints:
# a list of paths, each compiled from its own source by the step that reads no bytecode, and checked
# against its source's hash again at import. Nothing it runs enters a run's bytecode or its number.
LISTER = ("-I", "-S", "-B")


def build(python: str, env: dict) -> bytes:
    """The archive of an interpreter: the modules the warm interpreter preloads, listed by one run of
    the builder with that interpreter over its site folders and compiled by another that imports
    nothing from them. Raises OSError or subprocess.SubprocessError where it cannot be built."""
    site, _ = envpin.folders(python)
    run = dict(capture_output=True, env=env, timeout=BUILD_TIMEOUT_S, check=True)
    listed = subprocess.run(["nice", python, *LISTER, str(BUILDER), "--list", *site], **run)
    sources = (listed.stdout.strip().splitlines() or [b"[]"])[-1]  # the list is the last line: imports may print
    return subprocess.run(["nice", python, *harness_eval.ISOLATED, str(BUILDER), "--compile"], input=sources,
                          **run).stdout


def sealed(archive: bytes):
    """The archive in a memory file sealed against writes and read back, or None where this system
    cannot seal one (then the runs compile their own bytecode)."""
    copy = harness_eval.unnamed_file("research-loop-bytecode")
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


# One archive per training interpreter for the whole process, however many pools it holds (the tests'
# in-process servers): the build costs ~20 CPU-seconds. python -> its sealed archive; None: building or failed
_FILES: dict = {}
_BUILT: dict = {}  # python -> an Event set once its build ended, built or not
_LOCK = threading.Lock()


def build_once(python: str, env: dict) -> None:
    """Starts building python's archive in the background unless it was asked for before; only where
    bubblewrap runs the runs (its private /tmp holds the bytecode folder the archive is unpacked into)."""
    with _LOCK:
        if python in _FILES:
            return
        _FILES[python] = None
        _BUILT[python] = threading.Event()
    if sandbox.usable()[0] == sandbox.BUBBLEWRAP:
        threading.Thread(target=_build, args=(python, env), daemon=True, name="bytecode").start()
    else:
        _BUILT[python].set()


def building(python: str) -> bool:
    """Whether python's archive is being built now."""
    with _LOCK:
        built = _BUILT.get(python)
    return built is not None and not built.is_set()


def wait(python: str) -> None:
    """Until python's build (if one was started) has ended, at most its time limit."""
    with _LOCK:
        built = _BUILT.get(python)
    if built is not None:
        built.wait(2 * BUILD_TIMEOUT_S)  # its two steps


def fileno(python: str) -> int | None:
    """The descriptor of python's archive; None until it is built, or where it cannot be."""
    with _LOCK:
        found = _FILES.get(python)
    return found.fileno() if found is not None else None


def _build(python: str, env: dict) -> None:
    try:
        archive = sealed(build(python, env))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        print(f"research-loop: no bytecode archive for {python} (its warm runs compile torch themselves): {exc} "
              f"{detail.decode(errors='replace')[-500:]}", file=sys.stderr)
        archive = None
    with _LOCK:
        _FILES[python] = archive
        _BUILT[python].set()


def compile_bytecode(python: str, site_packages: str, timeout: float = 900) -> None:
    """Bytecode for the training environment's packages, written once by the server, for runs that
    read it from beside the sources (sandbox-exec's, unsandboxed ones; bubblewrap's read only their
    own, bytecode_archive.py). A run imports torch (and torch.compile's dynamo and inductor) in a
    sandbox that keeps the environment read-only, where Python cannot cache bytecode itself, and uv
    installs none: every run would compile ~1,700 of torch's modules from source again, 6 s of its
    start-up on a 2-core Zen 4. Already compiled files are only checked (4 s for 12,700 files); any
    failure costs runs that time, nothing else."""
    try:
        subprocess.run([python, "-m", "compileall", "-q", "-j", "0", site_packages],
                       capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        pass
