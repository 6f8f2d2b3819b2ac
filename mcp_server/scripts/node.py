"""The node side of a cluster run (Ray, SLURM): the worker prepares itself, trains, reports.

    python3 node.py --timeout SECONDS [--unsandboxed] [--sync] [--prepare JSON] [--verify JSON] -- COMMAND...

Shipped with the candidate's code (beside worker.py) and run in it, with the standard library
only. It

- reads the run's token from the file the server shipped and deletes it before the training
  starts, so the training cannot forge the result line;
- with --sync, makes the project's Python environment once per node (`uv sync` into a folder
  keyed by pyproject.toml and uv.lock, under a file lock: two jobs starting together sync once);
- with --prepare, makes sure the data and tokenizer are prepared for the workspace's profile and
  data set, once per node and under a file lock as well (prepare.py checks and repairs);
- runs the training under worker.py (hard timeout, every descendant killed at the end), its
  output on this process's stdout, which the engine keeps as the job's log;
- with --verify, has the harness evaluate the run as on the server's own machine: a copy of the
  harness made before the training starts (outside the code folder, checked file by file after the
  evaluation), the exported model evaluated by it in an isolated interpreter, the validation shard
  watched;
- trains in a sandbox (bubblewrap) whatever the harness: where the node can run none, the worker
  refuses to start the training unless the server passed --unsandboxed (the user's opt-in);
- ends with one line, RESULT_MARK + JSON: the worker's report plus val_bpb, the GPU and the host.
"""
import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from mcp_server.scripts import harness_copy, harness_eval, sandbox, worker
except ImportError:  # on the node, worker.py, harness_eval.py and sandbox.py are shipped beside this file
    import harness_copy
    import harness_eval
    import sandbox
    import worker

RESULT_MARK = "RESEARCH_LOOP_RESULT "
TRAINING_MARK = f"{worker.MARK} training on "  # the server's watchdog counts the timeout from here
NODE_DIR = "research-loop-node"  # the folder the server ships these scripts in, inside the code
TOKEN_FILE = "token"
SYNC_TIMEOUT_S = 1800
PREPARE_TIMEOUT_S = 3600
PROBE_TIMEOUT_S = 300
EVALUATOR_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH",
                 "AUTORESEARCH_DEVICE")
# The training command's interpreter: the separate evaluation runs on it, isolated.
PROBE = ("import json, sys, sysconfig; p = sysconfig.get_paths(); "
         "print(json.dumps([sys.executable, sys.prefix, sorted({p['purelib'], p['platlib']})]))")
REPORT_TAIL_BYTES = 8192
OUTPUT_TAIL_CHARS = 2000  # of a failed sync or prepare, in the log
EDITABLE = "train.py"  # the one file a run may write in its code folder (mcp_server/core/workspace.py)


class NodeProblem(Exception):
    """This node cannot run the training: the message says why and what to do."""


def say(text: str) -> None:
    print(f"{worker.MARK} {text}", flush=True)


def node_dir() -> Path:
    """Where this node keeps its environments and locks (per user, outlives the jobs)."""
    return Path(os.environ.get("RESEARCH_LOOP_NODE_DIR") or Path.home() / ".cache" / "research-loop")


def cache_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


class FileLock:
    """An exclusive flock on a file: released when the holder ends, however it ends."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def run_step(what: str, command: list[str], timeout: float, env: dict | None = None) -> None:
    """A preparation step with its output in the log; a failure is a NodeProblem naming it."""
    say(f"{what}: {' '.join(command)}")
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                              env=env, text=True, errors="replace")
    except FileNotFoundError:
        raise NodeProblem(f"{what} failed on {socket.gethostname()}: {command[0]!r} is not installed there "
                          "(install it on every node, e.g. `pip install uv`)") from None
    except subprocess.TimeoutExpired:
        raise NodeProblem(f"{what} on {socket.gethostname()} took more than {timeout:.0f}s") from None
    print(done.stdout, end="" if done.stdout.endswith("\n") else "\n", flush=True)
    if done.returncode != 0:
        raise NodeProblem(f"{what} failed on {socket.gethostname()} (exit {done.returncode}): "
                          f"{done.stdout[-OUTPUT_TAIL_CHARS:].strip()}")


def sync_environment() -> None:
    """The project's environment, made once per node per lock file; the training uses it."""
    if os.environ.get("UV_PROJECT_ENVIRONMENT") or not Path("pyproject.toml").is_file():
        return  # an environment was given to the job, or there is nothing to sync
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "uv.lock", ".python-version"):
        if Path(name).is_file():
            digest.update(name.encode() + b"\0" + Path(name).read_bytes())
    env_dir = node_dir() / "envs" / digest.hexdigest()[:16]
    with FileLock(env_dir.with_suffix(".lock")):
        if not (env_dir / ".synced").exists():
            frozen = ["--frozen"] if Path("uv.lock").is_file() else []
            # with bytecode: the sandboxed training cannot write it, and would compile torch's modules every run
            run_step("syncing the environment", ["uv", "sync", *frozen, "--no-install-project", "--compile-bytecode"],
                     SYNC_TIMEOUT_S, env=dict(os.environ, UV_PROJECT_ENVIRONMENT=str(env_dir)))
            (env_dir / ".synced").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    os.environ["UV_PROJECT_ENVIRONMENT"] = str(env_dir)


def prepared_record() -> dict | None:
    """What prepare.py recorded in this node's cache, or None."""
    try:
        record = json.loads((cache_dir() / "prepared.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def prepared_as(wanted: dict) -> bool:
    """Whether this node's cache holds data prepared with the wanted profile, data set and offline selection."""
    record = prepared_record()
    if not wanted.get("profile"):  # an upstream harness records nothing: its tokenizer tells
        return record is not None or any((cache_dir() / "tokenizer").glob("*"))
    expected = {k: wanted[k] for k in ("profile", "dataset") if wanted.get(k)}
    if wanted.get("offline_seed"):  # the record keeps its SHA-256 (nanochat/datasets.py selection_digest)
        expected["offline_selection"] = hashlib.sha256(wanted["offline_seed"].encode()).hexdigest()
    return bool(record) and all(record.get(k) == v for k, v in expected.items())


def prepare_data(prepare: dict, unsandboxed: bool = False, hide: list[str] | None = None) -> None:
    """prepare.py with the workspace's profile and data set, unless this node has them already. Its
    compiler warm-up runs in the runs' sandbox, hiding what the runs' does (or, where this node has no
    sandbox, in prepare's own process only if the user opted in to runs without one)."""
    with FileLock(cache_dir().parent / f".{cache_dir().name}.prepare.lock"):
        if prepared_as(prepare):
            return
        args = [a for k in ("profile", "dataset") if prepare.get(k) for a in (f"--{k}", str(prepare[k]))]
        told = {harness_eval.OFFLINE_SEED_ENV: prepare["offline_seed"]} if prepare.get("offline_seed") else {}
        told |= {sandbox.UNSANDBOXED_ENV: "1"} if unsandboxed else {}
        told |= {sandbox.HIDE_ENV: json.dumps(hide)} if hide else {}
        run_step("preparing the data and tokenizer", [*prepare["command"], *args], PREPARE_TIMEOUT_S,
                 env=dict(os.environ, **told))


def val_shard() -> Path | None:
    """This node's validation shard: the one prepare pinned, else the last in sorted order."""
    data = cache_dir() / "data"
    try:
        pinned = ((prepared_record() or {}).get("val_shard") or {}).get("name")
    except AttributeError:
        pinned = None
    if pinned and (data / pinned).exists():
        return data / pinned
    shards = sorted(data.glob("shard_*.parquet")) if data.is_dir() else []
    return shards[-1] if shards else None


def interpreter(command: list[str]) -> tuple[str, str, list[str]]:
    """(executable, prefix, site-packages) of the Python that runs the training script."""
    script = next((i for i, part in enumerate(command) if part.endswith(".py")), None)
    if script is None:
        raise NodeProblem(f"no Python script in the command {command}")
    prefix = command[:script]
    if not (prefix and Path(prefix[-1]).name.startswith("python")):
        prefix = [*prefix, "python"]  # uv run SCRIPT
    try:
        done = subprocess.run([*prefix, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        executable, env_prefix, site = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        raise NodeProblem(f"could not find the interpreter of {' '.join(command)} on {socket.gethostname()}") from None
    return executable, env_prefix, site


def verification(verify: dict, command: list[str], scratch: Path, hide: list[str]) -> list[str]:
    """worker.py's options for the harness's own evaluation of this run, from a copy of the harness
    made now, before the training can touch it (the server checked the shipped harness's fingerprint)."""
    harness = scratch / "harness"
    shutil.copytree(".", harness, symlinks=True, ignore=lambda folder, names: [
        n for n in names if folder == "." and n in (NODE_DIR, verify["editable"])])
    executable, env_prefix, site = interpreter(command)
    export = scratch / "export" / "model.pt2"
    export.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if k in EVALUATOR_ENV} | {"AUTORESEARCH_CACHE": str(cache_dir())}
    evaluate = {"argv": [*harness_eval.evaluator_command(executable, harness / verify["evaluator"]),
                         "--profile", str(verify.get("profile")), "--eval-tokens", str(verify["eval_tokens"]),
                         "--site-packages", *site],
                "env": env, "harness": str(harness), "harness_manifest": harness_copy.file_manifest(str(harness)),
                "timeout": verify["timeout"],
                "inputs": harness_eval.evaluation_inputs(cache_dir(), val_shard(), prepared_record())}
    sandbox = {"readonly": [str(scratch), str(cache_dir()), env_prefix], "writable": [".", str(export.parent)],
               # and the node's scripts: the evaluator runs trusted_import.py from there
               "readonly_inside": sorted([*os.listdir(harness), NODE_DIR]),
               "hidden": harness_eval.hidden_from_runs(cache_dir(), prepared_record()) + hide}
    args = ["--sandbox", json.dumps(sandbox), "--export", str(export), "--evaluate", json.dumps(evaluate)]
    shard = val_shard()  # other jobs on this node may read it: only a private copy is watched (bubblewrap)
    return args + (["--val-shard", str(shard), "--val-shared"] if shard else [])


def plain_sandbox(hide: list[str]) -> list[str]:
    """worker.py's sandbox for a run the harness does not evaluate: the prepared cache and the
    harness files read-only, the rest of the code folder writable."""
    sandbox = {"readonly": [str(cache_dir())], "writable": ["."],
               "readonly_inside": sorted(n for n in os.listdir(".") if n != EDITABLE),
               "hidden": harness_eval.hidden_from_runs(cache_dir(), prepared_record()) + hide}
    return ["--sandbox", json.dumps(sandbox)]


def read_token() -> str:
    path = Path(NODE_DIR) / TOKEN_FILE
    try:
        token = path.read_text().strip()
        path.unlink()
    except OSError:
        token = ""
    return token


def val_bpb(text: str) -> float | None:
    """The last summary block's val_bpb (the server parses the whole log; this is for the line)."""
    found = re.findall(r"^val_bpb:\s*([-+0-9.eEnaif]+)\s*$", text, re.M)
    try:
        return float(found[-1]) if found else None
    except ValueError:
        return None


def compiling(program: str | None, seed: str | None) -> list[str]:
    """worker.py's options for the compile cache, read-only to runs: under bubblewrap a run compiles in a folder of
    its own, filled from its program's folder (a new program's from its best's, seed) and saved to its program's
    alone (compile_programs.py), as on the server's machine."""
    compiled = cache_dir() / "compile"
    compiled.mkdir(parents=True, exist_ok=True)
    return ["--compile-cache", str(compiled), *(["--compile-program", program] if program else []),
            *(["--compile-seed", seed] if seed else [])]


def train(timeout: float, grace: float, command: list[str], verify: dict | None, unsandboxed: bool,
          hide: list[str], programs: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="research-loop-") as tmp:
        extras = []
        if verify:
            try:
                extras = verification(verify, command, Path(tmp), hide)
            except (NodeProblem, OSError) as exc:  # the run goes on; its result is marked unverified
                say(f"no harness evaluation on this node: {exc}")
        extras = (extras or plain_sandbox(hide)) + programs + (["--unsandboxed"] if unsandboxed else [])
        report_path = Path(tmp) / "report.json"
        say(f"training on {socket.gethostname()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})")
        worker.main(["--log", "-", "--report", str(report_path), "--timeout", str(timeout), "--grace", str(grace),
                     "--report-tail", str(REPORT_TAIL_BYTES), *extras, "--", *command])
        report = json.loads(report_path.read_text())
    tail = report.pop("log_tail", "")
    report.pop("imported", None)  # the evaluator's digests: a node's are not sent back (docs/trust.md)
    return report | {"val_bpb": val_bpb(tail)}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Prepare this node, run one training, print its result line.")
    p.add_argument("--timeout", type=float, required=True, help="hard limit of the training, in seconds")
    p.add_argument("--grace", type=float, default=2.0, help="SIGTERM to SIGKILL (below the engine's own)")
    p.add_argument("--sync", action="store_true", help="make the project's uv environment once per node")
    p.add_argument("--prepare", type=json.loads, help='{"command": [...], "profile": ..., "dataset": ...}')
    p.add_argument("--unsandboxed", action="store_true",
                   help="the user accepts training without a sandbox where this node can run none")
    p.add_argument("--hide", action="append", default=[], metavar="PATH",
                   help="a folder the training must not read but for the code folder inside it (SLURM's shared "
                        "folder: submitit's job files there hold these arguments, the offline seed among them; the "
                        "workspace's runs and state, where a shared file system shows them)")
    p.add_argument("--verify", type=json.loads,
                   help='{"evaluator": PATH, "editable": NAME, "profile": NAME, "eval_tokens": N, "timeout": S}: '
                        'the harness evaluates')
    p.add_argument("--compile-program", help="the run's program (its train.py's git blob id): its compile folder")
    p.add_argument("--compile-seed", help="the program whose compile folder a new program's starts from: its best's")
    return worker.parse_with_command(p, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    token = read_token()
    started = time.time()
    os.environ["AUTORESEARCH_CACHE"] = str(cache_dir())  # the sandboxed run's HOME is its own: name the cache
    try:
        if args.sync:
            sync_environment()
        if args.prepare:
            prepare_data(args.prepare, args.unsandboxed, args.hide)
    except NodeProblem as exc:
        say(str(exc))
        report = {"exit_code": 1, "timed_out": False, "stopped": None, "problem": str(exc), "started_at": started,
                  "wall_seconds": round(time.time() - started, 3), "host": socket.gethostname(),
                  "device": worker.device_name(dict(os.environ))}
    else:
        prepared = round(time.time() - started, 3)
        report = train(args.timeout, args.grace, args.command, args.verify, args.unsandboxed, args.hide,
                       compiling(args.compile_program, args.compile_seed)) \
            | {"prepare_seconds": prepared}
        # the flops clock's rate is this node's (measured on its CPU at prepare): the server checks
        # the FLOPs a run charged against it, not against its own machine's
        rate = (prepared_record() or {}).get("flops_per_budget_second")
        if rate:
            report["flops_per_budget_second"] = rate
    report |= {"token": token, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    print(f"\n{RESULT_MARK}{json.dumps(report)}", flush=True)
    return 0


def run_job(code_dir: str, argv: list[str], env: dict) -> int:
    """For engines that run a Python function (submitit): this script, in the code, as a child that
    hears a cancel (SIGTERM from scancel, SIGINT from submitit's local jobs) and ends its tree."""
    script = Path(code_dir) / NODE_DIR / "node.py"
    child = subprocess.Popen([sys.executable, str(script), *argv], cwd=code_dir, env=dict(os.environ, **env))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: child.send_signal(signal.SIGTERM))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
