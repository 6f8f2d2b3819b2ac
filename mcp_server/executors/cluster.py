"""Runs on a cluster engine (Ray, SLURM): what the two executors share.

A run is one job of the engine. Its code is the candidate commit's tree (git archive) with this
package's node scripts beside it; on the node, node.py prepares data and environment (once per
node), trains under worker.py's hard timeout and process-tree kill, and ends with one result
line carrying a token only this server and that job know. The server follows each job through
the engine: it copies the job's output into the run's log (live progress for read_metrics),
keeps its own watchdog on top of the node's timeout, and turns the result line into the run's
report file, so the loop reads a cluster run exactly as it reads a local one. The engine
schedules; the executor only keeps at most `capacity` jobs submitted.
"""
import hashlib
import io
import json
import os
import secrets
import shutil
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mcp_server.core import budget_settings, integrity
from mcp_server.scripts import compile_programs, export_copy, harness_copy, harness_eval, inotify_events, node, \
    process_tree, sandbox
from mcp_server.executors.executor import WORKER, Outcome, RunSpec
from mcp_server.core.models import Refusal
from mcp_server.scripts.worker import write_report
from mcp_server.core.workspace import EDITABLE, cache_dir, prepared_info

POLL_SECONDS = 0.5
LOG_POLL_PER_MB_S = 0.5  # a long log is fetched less often: each fetch brings all of it
LOST_AFTER_S = 300.0  # the engine unreachable this long while a job runs: the run is given up
PREPARE_ALLOWANCE_S = 3600.0  # a first job on a node may download data and sync an environment
WATCHDOG_GRACE_S = 60.0  # beyond the node's own timeout and kill, before the server stops the job
# The server's settings that a job needs on the node: the harness's overrides, uv's, the node's.
PASSED_ENV_PREFIXES = ("AUTORESEARCH_", "UV_", "RESEARCH_LOOP_NODE_")
PENDING, RUNNING, DONE = "pending", "running", "done"


class EngineUnreachable(Exception):
    """The engine did not answer (network, head down); the job may still be running."""


@dataclass
class Job:
    spec: RunSpec
    on_done: object
    token: str
    id: str = ""
    handle: object = None  # the engine's own object for the job, where it has one
    text: str = ""  # the job's output so far
    synced: int = 0  # characters of it already in the run's log
    running_since: float | None = None  # monotonic
    training_since: float | None = None
    watchdog: bool = False
    stop_requested: bool = False  # by this server (cancel, watchdog), as opposed to someone else
    lost: str | None = None
    next_log_fetch: float = 0.0


def workspace_id(root: Path) -> str:
    """A short id of the workspace, so runs of two workspaces on one cluster never share a name."""
    return hashlib.sha256(str(root).encode()).hexdigest()[:8]


def package(ws, commit: str, dest: Path, token: str) -> None:
    """The candidate's tree (tracked files only, as committed) plus the node scripts and token."""
    # the server's git (HarnessGit): the blobs' bytes, no export-subst or export-ignore the agent asked for
    archive = ws.repo.git.archive("--format=tar", commit, stdout_as_string=False, strip_newline_in_stdout=False)
    # made afresh: a folder left there (or a symlink to one) could hold a planted sitecustomize.py or .pth
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    ship_node_scripts(dest / node.NODE_DIR)
    (dest / node.NODE_DIR / node.TOKEN_FILE).write_text(token)


def ship_node_scripts(folder: Path) -> None:
    """node.py and what it runs, standard library only, into a code folder's node folder."""
    folder.mkdir(exist_ok=True)
    for module in (node, sandbox, harness_eval, export_copy, harness_copy, inotify_events, process_tree,
                   compile_programs):
        shutil.copy(module.__file__, folder / Path(module.__file__).name)
    shutil.copy(WORKER, folder / "worker.py")
    shutil.copy(harness_eval.TRUSTED_IMPORT, folder / "trusted_import.py")  # the node's evaluator imports through it


def node_args(spec: RunSpec, root: Path) -> list[str]:
    """node.py's arguments: the timeout, the user's opt-in to runs without a sandbox, the workspace's folders its
    sandbox hides (a node on a shared file system sees the workspace), an environment sync for uv commands, the data
    preparation with the profile and data set this workspace was prepared with, and the harness's evaluation."""
    args = ["--timeout", str(spec.timeout)] + (["--unsandboxed"] if spec.unsandboxed else [])
    args += [a for path in integrity.workspace_hidden(root) for a in ("--hide", path)]
    if spec.command[:1] == ["uv"]:
        args.append("--sync")
    info = prepared_info()
    if info is not None and "train.py" in spec.command:
        prepare = {"command": ["prepare.py" if part == "train.py" else part for part in spec.command]}
        prepare |= {k: info[k] for k in ("profile", "dataset") if info.get(k)}
        seed = offline_seed() if info.get("dataset") == "offline" else None
        if seed:  # the node draws the server's validation files, so the numbers compare
            prepare["offline_seed"] = seed
        args += ["--prepare", json.dumps(prepare)]
    if spec.after_seconds:  # the harness exports the model: the node evaluates it as a slot here does
        verify = {"evaluator": integrity.EVALUATOR, "editable": EDITABLE,
                  "eval_tokens": spec.eval_tokens or integrity.eval_tokens(),  # the research run's (budget_settings)
                  "profile": (info or {}).get("profile"), "timeout": spec.after_seconds}
        args += ["--verify", json.dumps(verify)]
    return [*args, *spec.worker_args, "--", *spec.command]  # the compile cache's programs (dispatch.py)


def offline_seed() -> str | None:
    """The secret of the server's offline selection, or None where its cache has none."""
    try:
        return (cache_dir() / harness_eval.OFFLINE_SEED_FILE).read_text().strip() or None
    except OSError:
        return None


def job_env(spec: RunSpec) -> dict:
    env = {k: v for k, v in os.environ.items()  # the budget's variables: the research run's, in spec.env
           if k.startswith(PASSED_ENV_PREFIXES) and k not in budget_settings.ENV.values()}
    return env | {"PYTHONUNBUFFERED": "1", "RESEARCH_LOOP_RUN": str(spec.run)} | spec.env


def read_result(text: str, token: str) -> dict | None:
    """The job's result line: the last one with the run's token (anything else printed it)."""
    for line in reversed(text.splitlines()):
        if line.startswith(node.RESULT_MARK):
            try:
                result = json.loads(line[len(node.RESULT_MARK):])
            except ValueError:
                continue
            if isinstance(result, dict) and token and secrets.compare_digest(str(result.get("token")), token):
                return result
    return None


class ClusterExecutor:
    """The executor interface over an engine; subclasses say how to submit, poll, read, stop."""
    engine = "cluster"
    stopped_states: tuple[str, ...] = ()  # the engine's final states for a job someone stopped
    split_cpu = False  # each job has a GPU (or a node's share) of its own

    def __init__(self, workspace, capacity: int, train_command: list[str]):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.ws = workspace
        self.capacity = capacity
        self.train_command = train_command
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()
        self.closing = False

    # --- what an engine provides ---------------------------------------------------
    def submit(self, job: Job, code: Path) -> None:
        """Submits the job (code in `code`), setting job.id and job.handle; raises Refusal."""
        raise NotImplementedError

    def poll(self, job: Job) -> tuple[str, str]:
        """(PENDING, RUNNING or DONE, the engine's message); raises EngineUnreachable."""
        raise NotImplementedError

    def output(self, job: Job) -> str:
        """All of the job's output so far; raises EngineUnreachable."""
        raise NotImplementedError

    def stop(self, job: Job) -> None:
        raise NotImplementedError

    def find(self, record: dict) -> Job | None:
        """The job of a run recorded by an earlier server, if the engine still knows it."""
        raise NotImplementedError

    def code_dir(self, job: Job) -> Path:
        raise NotImplementedError

    def release_code(self, job: Job, code: Path) -> None:
        """The code folder once the engine no longer needs it."""
        shutil.rmtree(code, ignore_errors=True)

    # --- the executor interface ----------------------------------------------------
    def environment_position(self, pythons: list[str]) -> dict:
        return {}  # each node's environment is its own, made by the job (scripts/node.py)

    def free(self) -> int:
        with self.lock:
            return self.capacity - len(self.jobs)

    def job_name(self, spec: RunSpec) -> str:
        return f"research-loop-{workspace_id(self.ws.root)}-{spec.run}-{spec.commit[:7]}"

    def start(self, spec: RunSpec, on_done) -> str:
        job = Job(spec=spec, on_done=on_done, token=secrets.token_hex(16))
        with self.lock:
            if len(self.jobs) >= self.capacity:
                raise Refusal(f"All {self.capacity} {self.engine} slots are taken.")
            self.jobs[spec.run] = job
        code = None
        try:
            code = self.code_dir(job)
            package(self.ws, spec.commit, code, job.token)
            spec.log.parent.mkdir(parents=True, exist_ok=True)
            spec.log.write_bytes(b"")
            self.submit(job, code)
        except BaseException:
            with self.lock:
                self.jobs.pop(spec.run, None)
            if code is not None:
                shutil.rmtree(code, ignore_errors=True)
            raise
        self._follow_in_background(job, code)
        return self.describe(job)

    def describe(self, job: Job, result: dict | None = None) -> str:
        if result:
            gpus = f" GPU {result['gpus']}" if result.get("gpus") else ""
            return f"{self.engine} job {job.id} on {result.get('host')}{gpus}"
        return f"{self.engine} job {job.id}"

    def worker_record(self, run: int) -> dict:
        job = self.jobs.get(run)
        return {"engine": self.engine, "job": job.id, "token": job.token} if job else {}

    def cancel(self, run: int) -> bool:
        with self.lock:
            job = self.jobs.get(run)
        if job is None:
            return False
        self._stop_quietly(job)
        return True

    def reattach(self, record: dict, on_done) -> bool:
        """Follows a job that an earlier server submitted; False if the engine does not know it."""
        if record.get("engine") != self.engine or not record.get("job"):
            return False
        spec = RunSpec(run=record["run"], commit=record["commit"], command=self.train_command,
                       timeout=record["timeout"], log=self.ws.root / record["log"],
                       report=self.ws.root / record["report"],
                       after_seconds=integrity.evaluation_allowance(record))
        job = self.find(record)
        if job is None:
            return False
        job.spec, job.on_done, job.token = spec, on_done, record.get("token", "")
        spec.log.write_bytes(b"")  # written again from the engine's copy
        with self.lock:
            self.jobs[spec.run] = job
        self._follow_in_background(job, None)
        return True

    def shutdown(self) -> None:
        """On server exit: the jobs go on; the next server reattaches to them."""
        self.closing = True

    # --- following a job -----------------------------------------------------------
    def _follow_in_background(self, job: Job, code: Path | None) -> None:
        threading.Thread(target=self._follow, args=(job, code), daemon=True, name=f"{self.engine}-{job.spec.run}").start()

    def _follow(self, job: Job, code: Path | None) -> None:
        message = ""
        unreachable_since = None
        while not self.closing:
            try:
                state, message = self.poll(job)
                self._sync_log(job, force=state == DONE)
                unreachable_since = None
            except EngineUnreachable as exc:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > LOST_AFTER_S:
                    job.lost = f"no answer from {self.engine} for {LOST_AFTER_S:.0f}s ({exc}); the job may still run"
                    break
                time.sleep(POLL_SECONDS)
                continue
            if state == DONE or read_result(job.text, job.token):
                break
            if state == RUNNING and job.running_since is None:
                job.running_since = time.monotonic()
            self._watchdog(job)
            time.sleep(POLL_SECONDS)
        if self.closing:
            return  # the next server reattaches
        self._finish(job, code, message)

    def _sync_log(self, job: Job, force: bool = False) -> None:
        """The job's new output appended to the run's log."""
        now = time.monotonic()
        if not force and now < job.next_log_fetch:
            return
        text = self.output(job)
        job.next_log_fetch = now + LOG_POLL_PER_MB_S * (len(text) >> 20)
        if len(text) > job.synced:
            with open(job.spec.log, "ab") as log:
                log.write(text[job.synced:].encode("utf-8", errors="replace"))
            job.synced = len(text)
        job.text = text
        if job.training_since is None and node.TRAINING_MARK in text:
            job.training_since = now

    def _watchdog(self, job: Job) -> None:
        """The server's own limit on top of the node's: a job past it is stopped as a timeout."""
        if job.watchdog or job.running_since is None:
            return
        start, allowance = ((job.training_since, 0.0) if job.training_since is not None
                            else (job.running_since, PREPARE_ALLOWANCE_S))
        if time.monotonic() - start > job.spec.timeout + job.spec.after_seconds + allowance + WATCHDOG_GRACE_S:
            job.watchdog = True
            self._stop_quietly(job)

    def _stop_quietly(self, job: Job) -> None:
        job.stop_requested = True
        try:
            self.stop(job)
        except (EngineUnreachable, Refusal):
            pass  # the follower gives the run up if the engine stays away

    def _finish(self, job: Job, code: Path | None, message: str) -> None:
        try:
            self._sync_log(job, force=True)
        except EngineUnreachable:
            pass
        result = read_result(job.text, job.token)
        report = self._report(job, result, message)
        try:
            write_report(job.spec.report, report)
        except OSError:
            pass  # the loop records a run without a report as a crash
        if code is not None:
            self.release_code(job, code)
        with self.lock:
            self.jobs.pop(job.spec.run, None)
        if not self.closing:
            job.on_done(job.spec.run, Outcome(report=report, slot=self.describe(job, result)))

    def _final_state(self, job: Job, wait_s: float = 10.0) -> str:
        """The engine's last word on a job that has printed its result (it ends a moment later)."""
        deadline, message = time.monotonic() + wait_s, "no reason given"
        while time.monotonic() < deadline:
            try:
                state, message = self.poll(job)
            except EngineUnreachable:
                break
            if state == DONE:
                break
            time.sleep(POLL_SECONDS)
        return message

    def _report(self, job: Job, result: dict | None, message: str) -> dict:
        """The worker's report from the result line; without one, why the job ended."""
        if result is not None:
            report = {k: v for k, v in result.items() if k not in ("token", "val_bpb")}
            if report.get("stopped") and not job.stop_requested:  # the node heard a stop this server never sent
                report["stopped"] = f"the {self.engine} job was stopped outside this server ({self._final_state(job)})"
            return report
        base = {"exit_code": None, "started_at": None, "wall_seconds": None, "host": None, "device": None}
        if job.watchdog:
            return base | {"timed_out": True, "stopped": None}
        if job.lost:
            return base | {"timed_out": False, "stopped": job.lost}
        # stopped by someone else before the node could print its result (a queued job, a hard kill)
        if not job.stop_requested and message.startswith(self.stopped_states):
            why = f"the {self.engine} job was stopped outside this server ({message}) before its node reported"
        else:
            why = f"the {self.engine} job ended without a result" + (f" ({message})" if message else "")
        return base | {"timed_out": False, "stopped": why}
