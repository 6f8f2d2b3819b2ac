"""Where a run executes: the executor interface and the local pool of slots.

The loop decides (rules, ledger, keep and discard); an executor only runs a RunSpec and says how
it ended. The interface is small: `capacity`, `start(spec, on_done)` (a slot is free), `cancel(run)`,
`reattach(record, on_done)` (after a server restart; False where runs cannot outlive the server)
and `shutdown()`. `on_done(run, outcome)` is called once, from the executor's own thread.

LocalPool runs N runs at once on this machine: slot k is a git worktree of its own (reused,
cleaned between runs) pinned to GPU k, or to its share of the CPUs when there is no GPU. Each run
is mcp_server/scripts/worker.py leading a new session, with a socket from the server on stdin (not a
pipe: no other process can open a socket's /proc/PID/fd/0 to write into it): when the server dies,
however it dies, the worker kills the training. Where the harness evaluates, each slot
keeps a warm evaluator (harness_eval.WarmEvaluator) that its runs' workers ask, so a run's start-up
no longer shares the CPU with a second interpreter importing torch.

Warm start (issue 27): where the harness evaluates, as soon as a slot's run has trained (its
worker reports the evaluation started) or ended, the slot's next worker is started ahead
(`worker.py --warm`) with that run's sandbox, CPUs, environment and command, its interpreter
importing torch and torch.compile's stack (mcp_server/scripts/warm_train.py, from the server's own
compile of them, executors/bytecode.py: no .pyc from a __pycache__ the agent can write) while the run is
evaluated and the agent decides. The next run
in the slot is handed to it (its options, environment and commit's files on the worker's stdin) where it was
started with exactly what that run would get; else it is thrown away and the run starts cold. The
sandbox's writable export folder is the pre-started worker's own (exports/slot-K-*), as no run
number is known ahead. RESEARCH_LOOP_WARM_START=0 turns it off.
"""
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mcp_server.core import budget_settings, envpin, envwatch, integrity
from mcp_server.core.integrity import EXPORTS_DIR
from mcp_server.core.ledger import read_plain
from mcp_server.executors import bytecode
from mcp_server.core.workspace import EDITABLE, cache_dir
from mcp_server.core.state import process_start_time
from mcp_server.scripts.harness_eval import WARM_ENV, WarmEvaluator, on_this_device
from mcp_server.scripts import sandbox
from mcp_server.scripts.worker import REPORT_DIGEST_MARK, write_report

WORKER = Path(__file__).resolve().parent.parent / "scripts" / "worker.py"
WORKER_GRACE_SECONDS = 30  # beyond the worker's own timeout and grace: the server's safety net
SLOTS_ENV = "RESEARCH_LOOP_SLOTS"
WARM_START_ENV = "RESEARCH_LOOP_WARM_START"  # "0": every run's interpreter starts cold (bench/bench_startup.py)
PER_RUN_ENV = ("RESEARCH_LOOP_RUN",)  # what differs between a slot's runs: these variables, and the options below
PER_RUN_OPTIONS = ("--log", "--report", "--timeout", "--evaluate", "--data-order", "--compile-program", "--compile-seed")
POLL_S = 0.5  # how often a run's waiting thread looks whether the run has trained (to start the next worker)
DISCARD_WAIT_S = 10  # for a pre-started worker to end its sandbox once its stdin closed
TOLD_WAIT_S = 5  # for the rest of what an ended worker said on its socket (all of it is there: its end closed)
TOLD_MAX_BYTES = 4096
MAX_REPORT_BYTES = 64 * 2**20  # a worker's report is kB; what the server reads of the file at most


@dataclass
class RunSpec:
    run: int
    commit: str
    command: list[str]
    timeout: float
    log: Path  # the run's own log file (absolute)
    report: Path  # where the worker writes how the run ended (absolute)
    env: dict = field(default_factory=dict)
    worker_args: list = field(default_factory=list)  # sandbox, export, evaluation (core/integrity.py); a cluster's: programs
    after_seconds: float = 0.0  # what the worker may spend once training ended (the harness's evaluation)
    unsandboxed: bool = False  # the user accepts a run without a sandbox where none can run (mcp_server/scripts/sandbox.py)
    environment: dict | None = None  # where the environments' watches stood at the run's check (core/envwatch.py)
    files: dict | None = None  # the commit's files the run's interpreter copies and runs from (integrity.commit_files)
    eval_tokens: int | None = None  # the harness evaluation's size the run was submitted with (a cluster node's)


@dataclass
class Ahead:
    """A slot's next worker, started ahead (worker.py --warm), and what it was started with."""
    proc: subprocess.Popen
    key: str
    staging: Path  # the sandbox's writable export folder
    since: dict  # the environments' watches when its interpreter started


@dataclass
class Outcome:
    report: dict | None  # the worker's report; None if it left none
    slot: str
    cwd: Path | None = None  # where the command ran


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    configured = os.environ.get("CUDA_VISIBLE_DEVICES")
    if configured is not None:
        return [g.strip() for g in configured.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def default_slots() -> int:
    configured = os.environ.get(SLOTS_ENV)
    if configured:
        return int(configured)
    return max(1, len(visible_gpus()))


def cpu_shares(slots: int) -> list[list[int]]:
    """The CPUs this process may use, dealt out to `slots` slots as evenly as they go."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if slots > len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(slots)]
    per = len(cpus) // slots
    return [cpus[i * per:(i + 1) * per] for i in range(slots)]


class LocalPool:
    def __init__(self, workspace, slots: int, env: dict | None = None):
        """workspace: a Workspace (git); env: the training's environment (the server's, cleaned)."""
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.ws = workspace
        self.capacity = slots
        self.gpus = visible_gpus()
        self.cpus = None if self.gpus else (cpu_shares(slots) if slots > 1 else None)
        self.env = env if env is not None else training_env(workspace.root)
        self.busy: dict[int, int] = {}  # slot -> run
        self.evaluators: dict[int, WarmEvaluator] = {}  # slot -> its warm evaluator
        self.evaluators_since: dict[int, dict] = {}  # slot -> the environments' watches when its evaluator started
        self.procs: dict[int, subprocess.Popen] = {}  # run -> worker
        self.ahead: dict[int, Ahead] = {}  # slot -> its next worker, started ahead
        self.lock = threading.Lock()
        self.closing = False

    def describe(self, slot: int) -> str:
        if self.gpus:
            return f"slot {slot} (GPU {self.gpus[slot % len(self.gpus)]})"
        if self.cpus:
            share = self.cpus[slot]
            return f"slot {slot} (CPU {share[0]}-{share[-1]}, {len(share)} of {sum(map(len, self.cpus))} cores)" \
                if len(share) > 1 else f"slot {slot} (CPU {share[0]}, 1 of {sum(map(len, self.cpus))} cores)"
        return f"slot {slot}"

    @property
    def split_cpu(self) -> bool:
        return bool(self.cpus)

    def environment_position(self, pythons: list[str]) -> dict:
        """Where the watches of these interpreters' environments stand now (a run's check)."""
        return envwatch.position(pythons)

    def free(self) -> int:
        with self.lock:
            return self.capacity - len(self.busy)

    def start(self, spec: RunSpec, on_done) -> str:
        """Checks the commit out in a free slot and starts the worker; returns the slot's name.
        A failure to prepare the slot is raised (nothing is left running)."""
        with self.lock:
            slot = next(k for k in range(self.capacity) if k not in self.busy)
            self.busy[slot] = spec.run
        try:
            cwd = self.ws.checkout_slot(slot, spec.commit)
            env = self._env(slot, spec)
            if warmable(spec):
                bytecode.build_once(spec.command[0], env)  # built while this run trains, for the next one
            since = envwatch.since(interpreters(spec), spec.environment)
            warm = self._warm_evaluator(slot, spec.worker_args, env)
            spec.log.parent.mkdir(parents=True, exist_ok=True)
            ahead = self._hand_over(slot, spec, env, warm)
            proc, staging = (ahead.proc, ahead.staging) if ahead else (None, None)
            since = envwatch.earliest(since, ahead.since if ahead else None)
            if warm is not None:  # it imported torch when it started, maybe long before this run
                since = envwatch.earliest(since, self.evaluators_since.get(slot))
            if proc is None:
                proc = self._start_cold(slot, spec, cwd, env, warm)
        except BaseException:
            with self.lock:
                self.busy.pop(slot, None)
            raise
        with self.lock:
            self.procs[spec.run] = proc
        name = self.describe(slot)
        threading.Thread(target=self._wait, args=(spec, slot, proc, cwd, on_done, staging, since), daemon=True,
                         name=f"run-{spec.run}").start()
        return name

    def _start_cold(self, slot: int, spec: RunSpec, cwd: Path, env: dict, warm: "WarmEvaluator | None"):
        """The run's worker, started now; the harness's runs through the server's importer (worker.py
        --trusted-import, with the bytecode archive once it is built)."""
        args, fds = self._worker_args(slot, spec, warm), [warm.fileno()] if warm is not None else []
        if warmable(spec):
            archive = bytecode.fileno(spec.command[0])
            args += ["--trusted-import"] + (["--bytecode-fd", str(archive)] if archive is not None else [])
            fds += [archive] if archive is not None else []
        with open(spec.log, "ab") as log:
            proc = with_socket_stdin([*worker_argv(), *args, "--", *spec.command], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, pass_fds=fds)
        send_files(proc, spec)
        return proc

    def _env(self, slot: int, spec: RunSpec) -> dict:
        env = dict(self.env, **spec.env, RESEARCH_LOOP_RUN=str(spec.run), RESEARCH_LOOP_SLOT=str(slot))
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return env

    def _worker_args(self, slot: int, spec: RunSpec, warm: WarmEvaluator | None, staging: Path | None = None) -> list:
        """worker.py's options for the run; with staging, the export folder is that one (a pre-started worker's)."""
        args = ["--log", str(spec.log), "--report", str(spec.report), "--timeout", str(spec.timeout), "--watch-stdin"]
        if self.cpus:
            args += ["--cpus", ",".join(map(str, self.cpus[slot]))]
        args += spec.worker_args + (["--unsandboxed"] if spec.unsandboxed else [])
        args += ["--files-on-stdin"] if spec.files is not None and warmable(spec) else []
        if warm is not None:
            args += ["--warm-evaluator-fd", str(warm.fileno())]
        return args if staging is None else staged(args, self.ws.root / EXPORTS_DIR / str(spec.run), staging)

    def _warm_key(self, slot: int, spec: RunSpec, env: dict, warm: WarmEvaluator | None, staging: Path) -> tuple:
        """What a pre-started worker holds from its start: its options but the run's own, the command,
        the environment torch imports with, the harness files the sandbox binds (all of the commit
        but train.py), the worktree's folder and the warm evaluator whose socket it inherited;
        (key, its options)."""
        args = self._worker_args(slot, spec, warm, staging)
        options = [a for i, a in enumerate(args) if a not in PER_RUN_OPTIONS and args[i - 1] not in PER_RUN_OPTIONS]
        harness = sorted((item.name, item.hexsha) for item in self.ws.repo.commit(spec.commit).tree
                         if item.name != EDITABLE)
        shared_env = {k: v for k, v in env.items() if k not in PER_RUN_ENV}
        folder = os.stat(self.ws.slot_path(slot)).st_ino  # a rebuilt worktree is another folder than the one bound
        key = json.dumps([options, spec.command, shared_env, harness, folder, warm.proc.pid if warm else None])
        return key, options

    def _start_ahead(self, slot: int, spec: RunSpec, cwd: Path) -> None:
        """The slot's next worker, started now with what this run had (worker.py --warm); once the
        bytecode archive is built where it is being built (without it the worker would compile torch's
        sources itself, some 18 CPU-seconds beside the build's)."""
        if self.closing or not warm_start_on() or not warmable(spec):
            return
        if bytecode.building(spec.command[0]):
            threading.Thread(target=self._start_ahead_once_built, args=(slot, spec, cwd), daemon=True,
                             name=f"ahead-{slot}").start()
            return
        env = self._env(slot, spec)
        warm = self._warm_evaluator(slot, spec.worker_args, env)
        (self.ws.root / EXPORTS_DIR).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"slot-{slot}-", dir=self.ws.root / EXPORTS_DIR))
        key, options = self._warm_key(slot, spec, env, warm, staging)
        archive = bytecode.fileno(spec.command[0])
        since = envwatch.since(interpreters(spec))
        archived = ["--bytecode-fd", str(archive)] if archive is not None else []
        fds = [f for f in (warm.fileno() if warm is not None else None, archive) if f is not None]
        try:
            proc = with_socket_stdin([*worker_argv(), "--warm", *options, *archived, "--", *spec.command],
                                     cwd=cwd, env={k: v for k, v in env.items() if k not in PER_RUN_ENV},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, pass_fds=fds)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            return
        ahead = Ahead(proc, key, staging, since)
        with self.lock:
            if not self.closing:
                ahead, self.ahead[slot] = self.ahead.get(slot), ahead
        if ahead is not None:  # the server is closing, or one was left from before
            discard(ahead)

    def _start_ahead_once_built(self, slot: int, spec: RunSpec, cwd: Path) -> None:
        bytecode.wait(spec.command[0])
        with self.lock:  # another run started cold in the slot meanwhile: it starts the next worker as it ends
            taken = self.busy.get(slot, spec.run) != spec.run or slot in self.ahead
        if not taken:
            self._start_ahead(slot, spec, cwd)

    def _hand_over(self, slot: int, spec: RunSpec, env: dict, warm: WarmEvaluator | None) -> "Ahead | None":
        """The slot's pre-started worker, running this run now, or None where there is none, or it was
        started with anything else than this run has (thrown away)."""
        with self.lock:
            ahead = self.ahead.pop(slot, None)
        if ahead is None:
            return None
        key, _ = self._warm_key(slot, spec, env, warm, ahead.staging)
        if key == ahead.key and ahead.proc.poll() is None and warm_start_on():
            argv = [*self._worker_args(slot, spec, warm, ahead.staging), "--", *spec.command]
            try:
                ahead.proc.stdin.write(json.dumps({"argv": argv, "env": env}).encode() + b"\n")
                send_files(ahead.proc, spec)
                return ahead
            except OSError:
                pass
        discard(ahead)
        return None

    def _warm_evaluator(self, slot: int, worker_args: list, env: dict) -> WarmEvaluator | None:
        """The slot's warm evaluator for this run's evaluation spec (--evaluate, with the slot's device),
        started again where the spec changed or it died; None where the harness does not evaluate or
        RESEARCH_LOOP_WARM_EVALUATOR=0. One that cannot start leaves the run a cold evaluator."""
        if "--evaluate" not in worker_args or os.environ.get(WARM_ENV, "1") == "0":
            return None
        spec = on_this_device(json.loads(worker_args[worker_args.index("--evaluate") + 1]), env)
        warm = self.evaluators.get(slot)
        if warm is not None and warm.key == WarmEvaluator.key_of(spec) and warm.alive():
            return warm
        if warm is not None:
            warm.close()
        try:
            self.evaluators_since[slot] = envwatch.since([spec["argv"][0]])
            warm = self.evaluators[slot] = WarmEvaluator(spec)
        except OSError:
            self.evaluators.pop(slot, None)
            return None
        return warm

    def worker_record(self, run: int) -> dict:
        proc = self.procs.get(run)
        return {"worker_pid": proc.pid, "worker_start": process_start_time(proc.pid)} if proc else {}

    def _wait(self, spec: RunSpec, slot: int, proc: subprocess.Popen, cwd: Path, on_done,
              staging: Path | None, since: dict) -> None:
        deadline = time.monotonic() + spec.timeout + spec.after_seconds + WORKER_GRACE_SECONDS
        ahead = False
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:  # the worker itself hangs: end its whole session
                    kill_session(proc.pid)
                    proc.wait()
                    break
            if not ahead and (read_report(spec.report) or {}).get("evaluating"):
                ahead = True  # trained: the next worker's start-up overlaps the evaluation, not the training
                self._start_ahead(slot, spec, cwd)
        kill_session(proc.pid)  # anything still in the worker's own group
        told = told_digest(proc)
        proc.stdin.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        report = believed_report(spec.report, told)
        changed = envwatch.changes(since) + (checked_imports(spec.report, report, self.evaluators.get(slot),
                                                             self._harness_sources(spec))
                                             if report is not None else [])
        if changed:  # the slot's warm interpreter and evaluator may hold what changed: the next run starts its own
            self._drop_warm(slot)
        elif not ahead:
            self._start_ahead(slot, spec, cwd)
        with self.lock:
            self.procs.pop(spec.run, None)
            self.busy.pop(slot, None)
        if self.closing:
            return  # the next owner finds the run in the state and recovers it
        if report is not None and changed:
            report["environment_changed"] = changed
        on_done(spec.run, Outcome(report=report, slot=self.describe(slot), cwd=cwd))

    def _harness_sources(self, spec: RunSpec) -> tuple[str, dict] | None:
        """(the harness copy the run's evaluation compiles from, its commit's sources: integrity.commit_sources);
        the slot's warm evaluator has the same (its key holds the evaluator's path and the commit)."""
        evaluation = evaluation_spec(spec)
        if not evaluation or not evaluation.get("harness"):
            return None
        commit = evaluation.get("harness_commit") or self.ws.worktree_head(Path(evaluation["harness"]))
        return evaluation["harness"], integrity.commit_sources(self.ws, commit)

    def _drop_warm(self, slot: int) -> None:
        with self.lock:
            if self.closing:  # shutdown ends them all
                return
            ahead, warm = self.ahead.pop(slot, None), self.evaluators.pop(slot, None)
        if ahead is not None:
            discard(ahead)
        if warm is not None:
            warm.close()

    def cancel(self, run: int) -> bool:
        """Asks the run's worker to stop it (the worker kills the whole tree); False if not running here."""
        with self.lock:
            proc = self.procs.get(run)
        if proc is None:
            return False
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
        return True

    def reattach(self, record: dict, on_done) -> bool:
        return False  # local runs die with their server: the loop recovers them from their files

    def shutdown(self) -> None:
        """On server exit: every worker stops its training (their stdin closes); those started ahead end."""
        with self.lock:
            self.closing = True
            procs = list(self.procs.values())
            ahead, self.ahead = list(self.ahead.values()), {}
        for each in ahead:
            discard(each)
        for proc in procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_session(proc.pid)
        for warm in self.evaluators.values():
            warm.close()
        self.evaluators.clear()


def interpreters(spec: RunSpec) -> list[str]:
    """The interpreters a run loads packages with: its command's and, where the harness evaluates, the
    evaluator's."""
    evaluation = evaluation_spec(spec)
    return [spec.command[0], *([evaluation["argv"][0]] if evaluation else [])]


def evaluation_spec(spec: RunSpec) -> dict | None:
    """The worker's --evaluate (harness_eval.HarnessEvaluation's spec), or None."""
    if "--evaluate" not in spec.worker_args:
        return None
    return json.loads(spec.worker_args[spec.worker_args.index("--evaluate") + 1])


def checked_imports(path: Path, report: dict, warm: WarmEvaluator | None = None,
                    harness: tuple[str, dict] | None = None) -> list[str]:
    """The sources the run's interpreter, its evaluator and the slot's warm evaluator compiled (or read:
    the interpreter's .pth files) from other contents than the last check verified (the worker's report
    and the warm evaluator's stream, from scripts/trusted_import.py), and those they compiled from the
    harness copy other than its commit's (harness: the copy and its commit's sources); the report's
    digests are then left out of it and its file (a few hundred kB a run that nothing else reads)."""
    imported = report.pop("imported", None)
    if imported is not None:
        try:
            write_report(path, report)
        except OSError:
            pass
    imported = dict(imported) if isinstance(imported, dict) else {}
    if warm is not None and warm.imported.forged:
        return ["(the slot's warm evaluator's digest stream held a line its importer did not write)"]
    if warm is not None:
        imported["warm evaluator"] = dict(warm.imported.digests)
    found = {}
    for digests in imported.values():
        found.update(envpin.imported_changes(digests))
        if harness:
            found.update(envpin.harness_changes(digests, *harness))
    return [f"{path} {why}" for path, why in sorted(found.items())]


def warm_start_on() -> bool:
    return os.environ.get(WARM_START_ENV, "1") != "0"


def warmable(spec: RunSpec) -> bool:
    """A run a warm interpreter serves: a Python interpreter on a script (`python train.py ...`) with a
    harness that exports the model for its separate evaluation (this project's, which imports torch;
    a stand-in trainer that never imports it would only wait for torch's imports)."""
    command = spec.command
    return (len(command) >= 2 and Path(command[0]).name.startswith("python") and command[1].endswith(".py")
            and "--evaluate" in spec.worker_args)


def staged(args: list, run_dir: Path, staging: Path) -> list:
    """A run's worker options with its export folder replaced by a pre-started worker's own."""
    args = list(args)
    for i, option in enumerate(args[:-1]):
        if option == "--sandbox":
            spec = json.loads(args[i + 1])
            spec["writable"] = [str(staging) if p == str(run_dir) else p for p in spec.get("writable", [])]
            args[i + 1] = json.dumps(spec)
        elif option == "--export":
            args[i + 1] = str(staging / Path(args[i + 1]).name)
    return args


def with_socket_stdin(argv: list, **options) -> subprocess.Popen:
    """A worker whose stdin is one end of a socket pair, and whose .stdin (a writable file) is the
    server's end. A pipe's /proc/PID/fd/0 can be opened by any process of the same user and a forged
    hand-over written first; a socket's cannot (ENXIO). End of file still comes when the server's end
    closes, however the server ends."""
    ours, theirs = socket.socketpair()
    try:
        with theirs:
            proc = subprocess.Popen(argv, stdin=theirs, **options)
    except BaseException:
        ours.close()
        raise
    proc.stdin = os.fdopen(ours.detach(), "wb")
    return proc


def send_files(proc: subprocess.Popen, spec: RunSpec) -> None:
    """The run's commit's files (worker.py --files-on-stdin) on the worker's socket, which no other process can
    write: an argument holds 128 KiB at most (about 1,300 sources' digests)."""
    if spec.files is not None and warmable(spec):
        proc.stdin.write(json.dumps(spec.files).encode() + b"\n")
    proc.stdin.flush()


def discard(ahead: Ahead) -> None:
    """A pre-started worker never used: end of file on its stdin ends it and its sandbox."""
    try:
        ahead.proc.stdin.close()
    except OSError:
        pass
    try:
        ahead.proc.wait(timeout=DISCARD_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    kill_session(ahead.proc.pid)
    ahead.proc.wait()
    shutil.rmtree(ahead.staging, ignore_errors=True)


def kill_session(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def told_digest(proc: subprocess.Popen) -> str | None:
    """The SHA-256 of its final report that the ended worker sent back on its stdin socket (worker.py
    final_report), or None where it sent none (killed before)."""
    said, deadline = b"", time.monotonic() + TOLD_WAIT_S
    while len(said) < TOLD_MAX_BYTES and (left := deadline - time.monotonic()) > 0:
        try:  # the server's end is closed already where the server shuts down (or a test plays its death)
            fd = proc.stdin.fileno()
            if not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, TOLD_MAX_BYTES)
        except (OSError, ValueError):
            break
        if not chunk:  # the worker's end closed: all it said is here
            break
        said += chunk
    lines = [line for line in said.split(b"\n") if line.startswith(REPORT_DIGEST_MARK)]
    return lines[-1][len(REPORT_DIGEST_MARK):].decode("ascii", errors="replace") if lines else None


def believed_report(path: Path, told: str | None) -> dict | None:
    """The worker's report if it is the one the worker wrote (its digest told on the socket); the
    agent can write runs/ between the worker's exit and this read. A report without a digest (the
    worker was killed) is none; one with another digest is kept beside (.changed) and not believed."""
    try:
        data = read_plain(path, MAX_REPORT_BYTES)
    except OSError:
        data = None
    if told is None or data is None:
        return None
    if hashlib.sha256(data).hexdigest() != told:
        try:
            os.replace(path, path.with_name(path.name + ".changed"))
        except OSError:
            pass
        return {"exit_code": None, "report_changed": (f"{path.name} was changed after the run's worker wrote it "
                                                      "(another process wrote runs/): the run is no result")}
    report = json.loads(data)  # what the worker wrote: a JSON object
    return report if isinstance(report, dict) else None


def read_report(path: Path) -> dict | None:
    """A worker's report as the file holds it now; read without blocking (a FIFO planted there)."""
    try:
        report = json.loads(read_plain(path, MAX_REPORT_BYTES) or b"")
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None
    return report if isinstance(report, dict) else None


def worker_argv() -> list[str]:
    """The worker (standard library only) on the server's interpreter, without site (sandbox.NO_SITE)."""
    return [sys.executable, *sandbox.NO_SITE, str(WORKER)]


def training_env(workspace: Path) -> dict:
    """The training's environment: the server's, without its VIRTUAL_ENV (the plugin's own, which
    uv would ignore with a warning in every log), with every slot's `uv run` using the workspace's
    one environment instead of installing torch into each worktree, and the prepared cache named by
    its path (the default, ~/.cache/autoresearch, is the server's home, not the sandboxed run's); without
    the budget's variables (core/budget_settings.py)."""
    # the budget's variables come with each run (RunSpec.env): the research run's, never this server's own
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV" and k not in budget_settings.ENV.values()}
    env = env | {"PYTHONUNBUFFERED": "1"}
    env.setdefault("UV_PROJECT_ENVIRONMENT", str(workspace / ".venv"))
    env["AUTORESEARCH_CACHE"] = str(cache_dir())  # the sandbox gives the run a home of its own: no ~/.cache there
    return env
