"""A run's interpreter, started before the run (issue 27's warm start): the slot's next worker
(worker.py --warm) starts it in the sandbox with the training's own Python while the slot's
previous run is evaluated and the agent thinks; it imports what every run's train.py imports first
and then waits.

    python -S warm_train.py FD [ARCHIVE_FD]

Started without site (-S), it first installs the server's importer (trusted_import.py: it reads no
bytecode from a __pycache__ the agent can write, and keeps the digest of each source it compiles) and,
where the server gave one, takes the bytecode archive (ARCHIVE_FD: the server's own compile of these
modules, bytecode_archive.py), whose .pyc files it also writes into its bytecode folder, the sandbox's
private one, for the run's subprocesses. Then it does what site would have done at start-up (the
venv's prefix and site folders, their .pth files, sitecustomize: trusted_import.start_site), through
the importer: each .pth file's digest, and those of the modules its lines and sitecustomize import,
are in the stream like any other source's. It imports torch and torch.compile's stack (PRELOAD:
about 10 s of a run's start-up on the 2-core CPU). The importer writes the digest of each source it
compiles to the socket FD as it compiles it, before the module's code runs (that code may add lines,
never take one back), and an empty line once these imports are done; the worker hands them to the
server, which checks them against the contents it pinned (an edit made and undone while these imports
ran is seen there).
Then it reads one JSON line from the socket:
{"argv", "cwd", "env", "files", "into"}, the run's command line after the interpreter, its folder (the slot's
worktree), its environment, its commit's files ({path: [git mode, SHA-256, size]}) and where to copy them; it copies
them there, each checked (checkout_copy.py: the worktree is the agent's to rewrite once the server checked it
out; under bubblewrap the copy is in the sandbox's private /tmp), and runs argv[0] from the copy as __main__
with that argv, environment, the copy as its folder and sys.path[0], as `python train.py` would (but
sys.argv[0] and __file__ are the script's absolute path); from the copy (and the worktree), it imports only
the commit's sources (trusted_import.expect). A file that is not its commit's: the run does not start. End of file instead:
the worker threw it away, it exits. Nothing from the run's folder is imported before the hand-over
(sys.path[0] is this script's folder until then), so nothing of an earlier run's files reaches it.

Standard library only: it imports the preloaded modules by name, from whatever environment runs
it; one that is missing is left to the run, which imports it itself as a cold run does. Before the
importer is installed it imports only what is frozen into the interpreter (os, sys), so the digests
cover every source the run's interpreter compiled or read at start-up (its .pth files) but its
`encodings`. What the run sees of its start-up is a plain interpreter's (sys.path, sys.prefix, the
.pth files' effects), but sys.flags.no_site: a subprocess started with the interpreter's own flags
(multiprocessing's spawn) starts without site too (it is handed sys.path).
"""
import os
import sys

PRELOAD = ("torch", "torch._dynamo", "torch._inductor.compile_fx")
# train.py sets these before it imports torch (the OpenMP runtime reads them when torch loads it):
# the same defaults here, where torch is loaded before train.py runs
IMPORT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
DEVICE_ENV = "AUTORESEARCH_DEVICE"  # "cpu": the harness trains on the CPU (nanochat/platform.py)
KEPT_ENV = ("HOME", "PYTHONPYCACHEPREFIX")  # the sandbox's own (bubblewrap --setenv), not the server's


def preload() -> None:
    import importlib
    import logging
    for name, value in IMPORT_ENV.items():
        os.environ.setdefault(name, value)
    try:
        torch = importlib.import_module(PRELOAD[0])
    except ImportError:
        return
    if os.environ.get(DEVICE_ENV, "").strip() == "cpu" or not torch.cuda.is_available():
        # as nanochat/compile.py does on a CPU before dynamo would import Triton (GPU kernels only)
        sys.modules.setdefault("triton", None)
        logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)  # "triton not found"
    for name in PRELOAD[1:]:
        try:
            importlib.import_module(name)
        except ImportError:
            return


def main() -> int:
    import trusted_import  # beside this script, as the two below
    trusted_import.install(stream=int(sys.argv[1]))
    import json
    import runpy
    import socket
    import bytecode_archive
    if len(sys.argv) > 2:
        trusted_import.install(bytecode_archive.unpack(int(sys.argv[2])))
        os.close(int(sys.argv[2]))
    trusted_import.start_site()  # started with -S: the .pth files' imports and digests come through the importer
    preload()
    trusted_import.end_stream()
    with socket.socket(fileno=int(sys.argv[1])) as channel:
        with channel.makefile("rb") as handover:
            line = handover.readline()
    if not line:
        return 0
    run = json.loads(line)
    kept = {name: os.environ[name] for name in KEPT_ENV if name in os.environ}
    os.environ.clear()
    os.environ.update(run["env"], **kept)
    folder = run["cwd"]
    if run.get("files") is not None:  # the commit's own copy, each file checked: the slot is the agent's to rewrite
        import checkout_copy
        try:
            folder = checkout_copy.copy(run["cwd"], run["files"], run["into"])
        except checkout_copy.ChangedAfterCheckout as exc:
            print(exc, file=sys.stderr)
            return 1
    os.chdir(folder)
    script = os.path.abspath(run["argv"][0])
    sys.argv = list(run["argv"])
    sys.path[0] = os.path.dirname(script)
    if run.get("files") is None:  # a command the server gave no commit's files for
        runpy.run_path(script, run_name="__main__")
        return 0
    sources = {path: digest for path, (_, digest, _size) in run["files"].items()}
    for checkout in (folder, run["cwd"]):  # the copy; the slot, where a path names it
        trusted_import.expect(checkout, sources)
    trusted_import.run_script(script)  # from the bytes it hashed: train.py is one of the commit's files
    return 0


if __name__ == "__main__":
    sys.exit(main())
