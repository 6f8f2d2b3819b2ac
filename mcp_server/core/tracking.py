"""Experiment tracking (the `mlflow` extra): each run of the research run becomes an MLflow run, in one
experiment per research branch, so `mlflow ui` (or a team's server) shows the night.

A tracked run holds the train.py constants the run changed (params), its loss curve, val_bpb (named
val_bpb_unverified where the harness did not evaluate it: train.py's own), steps,
MFU, memory and times (metrics), its status, decision, evidence and ledger row (tags), and the
train.py diff, the log and the run's record (artifacts).

The records are the truth; tracking follows them. A thread of its own (Tracker) looks at runs/*.json
and the server's own copy of state.json every few seconds and syncs what changed, so the loop never
calls the tracker and a tracker that is down or slow delays only itself. A record is tracked only
when the server's state vouches for it (its run in flight, or its ledger row): an earlier research
run's records, or a record edited by hand, are not. Each MLflow run carries the run's name
(<number>-<commit>) in a tag, and the stage synced (pending, or the decision) in a tag set last, so
a pass interrupted halfway is redone and a pass repeated changes nothing. mlflow is imported in
that thread, when first needed.
"""
import argparse
import importlib.util
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import git

from mcp_server.core import history, integrity, ledger, limits, logparse
from mcp_server.core.state import STATE_DIR, STATE_FILE, records_dir
from mcp_server.core.workspace import HarnessGit

TRACKERS = ("mlflow", "wandb")  # wandb: mcp_server/core/wandb_tracking.py
TRACK_ENV, MLFLOW_URI_ENV = "RESEARCH_LOOP_TRACK", "RESEARCH_LOOP_MLFLOW_URI"
LOCAL_DB = "mlflow.db"  # the default store, in the workspace's .research-loop/
LOCAL_ARTIFACTS = "mlflow-artifacts"
KEY_TAG = "research_loop.run"  # <number>-<commit7>: the run's name, also its records' file name
STAGE_TAG = "research_loop.synced"  # "pending" or the decision; set last, when all else is logged
POLL_S = 2.0
NICENESS = 19
FLUSH_S = 10.0  # the most a server's exit waits for the last pass
RETRY_S = (5.0, 60.0)  # the wait after a failed pass: doubles from the first to the last
# MLflow's HTTP client retries 7 times with growing waits (minutes in all) before it fails a call:
# this thread retries by itself, so a call gives up soon (a user's own settings win)
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow prints each finished run's address on stdout, which is the MCP protocol's channel over stdio
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
METRICS = ("val_bpb", "memory_gb", "num_steps", "mfu_percent", "tokens_per_second", "training_seconds",
           "timed_seconds", "total_seconds", "eval_seconds", "compile_seconds", "recompiles", "wall_seconds",
           "delta", "best_val_bpb")
UNVERIFIED = "_unverified"  # the suffix of a number the harness did not measure: train.py's own, or a best logged by hand
RESULT_TAGS = ("status", "slot", "device", "noise", "integrity", "verified", "comparable", "confirm_first",
               "unsandboxed", "best_commit")
BATCH = 1000  # metrics per log_batch: MLflow's limit
MAX_TAG_CHARS = 5000
MISSING = ("--track {0} needs the `{0}` extra: `uv sync --extra {0}` in this project "
           "(or pip install 'research-loop[{0}]')")


def default_uri(root: Path) -> str:
    """MLflow's local store in the workspace: `mlflow ui --backend-store-uri <this>` shows the night."""
    return f"sqlite:///{root / STATE_DIR / LOCAL_DB}"


DATABASES = ("postgresql", "mysql", "sqlite", "mssql")  # MLflow's database engines, whose stores keep artifacts here


def local_paths(uri: str, root: Path) -> list[tuple[Path, bool]]:
    """Where an MLflow store the user named (not the workspace's own, in its hidden .research-loop) keeps the runs'
    records, logs and tags on this machine, each (path, whether a folder): a SQLite database and MLflow's default
    artifact folder for it (`./mlruns`, against the server's folder: the workspace, where Claude Code starts it), or a
    file store's folder. A run's log and record hold the harness's reason for a run that is no result (a value computed
    from validation batches, review 88), so runs must not read them (review 92: MLflow's own quick start's
    `sqlite:///mlflow.db` put both in the workspace). Every database store (`postgresql://`, `mysql+pymysql://`: MLflow
    matches the scheme's start) keeps its artifacts in `./mlruns` here, wherever the database is, and a path with no
    scheme (`mlruns`) is a file store, `databricks` alone excepted (review 94). A tracking server's are on its own
    machine: none that this server knows."""
    if uri == default_uri(root):
        return []
    scheme, _, rest = uri.partition(":")
    if not rest or len(scheme) == 1:  # a bare path (a Windows drive letter is no scheme)
        return [] if uri.strip() == "databricks" else [(Path(os.path.abspath(uri)), True)]
    if scheme == "file":
        return [(Path(os.path.abspath(urlsplit(uri).path)), True)]
    if not scheme.lower().startswith(DATABASES):
        return []
    db = rest[3:].split("?", 1)[0] if scheme == "sqlite" and rest.startswith("///") else ""
    return ([(Path(os.path.abspath(db)), False)] if db and db != ":memory:" else []) + \
        [(Path(os.path.abspath("mlruns")), True)]


def experiment_name(root: Path, branch: str) -> str:
    """Unique on a team's server, where every researcher's clone may be called autoresearch and
    every tag a date."""
    return f"{branch} ({socket.gethostname()}:{Path(root).resolve()})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--track and --mlflow-uri: the server's and the overnight runner's (which hands them to its sessions' server)."""
    parser.add_argument("--track", default=os.environ.get(TRACK_ENV) or None,
                        help="track every run in MLflow (extra `mlflow`), one experiment per research branch, or in "
                             "W&B (extra `wandb`; offline in the workspace's .research-loop/wandb/ unless WANDB_MODE "
                             "or WANDB_API_KEY is set), one group per branch; a tracker that is down never stops the "
                             f"loop, it catches up (default: env {TRACK_ENV}, else none)")
    parser.add_argument("--mlflow-uri", default=os.environ.get(MLFLOW_URI_ENV) or None,
                        help="the MLflow tracking server, e.g. http://HOST:5000; implies --track mlflow (default: "
                             f"env {MLFLOW_URI_ENV}, else env MLFLOW_TRACKING_URI, else the workspace's own "
                             f"store, sqlite:///<workspace>/{STATE_DIR}/{LOCAL_DB})")


def arguments_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --track and --mlflow-uri, or None; --mlflow-uri alone sets --track mlflow."""
    if args.track and args.track not in TRACKERS:
        return f"--track (or {TRACK_ENV}) must be one of {', '.join(TRACKERS)}, got {args.track!r}"
    if args.mlflow_uri and args.track == "wandb":
        return f"--mlflow-uri (or {MLFLOW_URI_ENV}) is for --track mlflow, not wandb: drop one of them"
    if args.mlflow_uri:
        args.track = "mlflow"
    return None


def server_env(args: argparse.Namespace) -> dict:
    """The environment that gives a server started elsewhere (an overnight session's) the same tracking."""
    env = {TRACK_ENV: args.track} if args.track else {}
    return env | ({MLFLOW_URI_ENV: args.mlflow_uri} if args.mlflow_uri else {})


def missing_extra(tracker: str) -> str | None:
    """Why the tracker cannot run here (its package, named as its extra, is not installed), or None;
    imports nothing."""
    return MISSING.format(tracker) if importlib.util.find_spec(tracker) is None else None


def say(message: str) -> None:
    print(f"research-loop-mcp: tracking: {message}", file=sys.stderr, flush=True)


class Tracker:
    """Syncs the workspace's records to a tracker (MLflow unless told) on a daemon thread, never on
    the loop's."""

    def __init__(self, root: Path, uri: str | None = None, owned=lambda: True, poll_s: float = POLL_S,
                 retry_s: tuple[float, float] = RETRY_S, sink=None):
        """owned: whether this server owns the workspace now (only the owner tracks: two servers
        tracking at once would each create the same run). sink: makes the tracker's side
        (its track(branch, key, stage, describe) writes a run); default MLflow's at `uri`. `uri`
        names the tracker in messages."""
        self.root = Path(root).resolve()
        self.uri = uri or default_uri(self.root)
        self.make_sink = sink or (lambda: MlflowSink(self.root, self.uri))
        if sink is None:  # where MLflow writes on this machine, hidden from the runs
            integrity.hide_tracker_store(self.root, local_paths(self.uri, self.root))
        self.owned, self.poll_s, self.retry_s = owned, poll_s, retry_s
        self.stopping = threading.Event()
        self.problem: str | None = None  # why the last pass failed, while it did
        self.untracked: set[str] = set()  # records the state does not vouch for, told once each
        self.was_owner = False
        self._sink = None
        self._thread: threading.Thread | None = None

    def start(self) -> "Tracker":
        self._thread = threading.Thread(target=self._follow, name="research-loop-tracking", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = FLUSH_S) -> None:
        """Ends the thread after one last pass (the night's last decision), waiting for it at most
        `timeout` seconds: what it leaves undone, the next server's tracker does."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _follow(self) -> None:
        try:  # this thread only (Linux): on a CPU box the runs train beside it, and come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        except (AttributeError, OSError):
            pass
        seen, wait, failures, last = None, 0.0, 0, False
        while not last:
            last = self.stopping.wait(wait)
            now = self._fingerprint()
            wait = self.poll_s
            if now == seen and not failures:
                continue
            try:
                self.sync()
            except Exception as exc:  # the tracker's own failure: told, then retried; the loop never sees it
                failures += 1
                wait = min(self.retry_s[1], self.retry_s[0] * 2 ** (failures - 1))
                self._sink = None  # what it knew of the store may be stale
                if self.problem is None:
                    say(f"{self.uri} failed ({type(exc).__name__}: {str(exc)[:300]}); the runs are kept in runs/ "
                        f"and tracked when it answers (retrying every {self.retry_s[0]:g}-{self.retry_s[1]:g} s)")
                self.problem = str(exc)
                continue
            if self.problem is not None:
                say(f"{self.uri} answers again: caught up")
            seen, failures, self.problem = now, 0, None

    def _fingerprint(self) -> tuple:
        """What a pass depends on: the records' files and the server's copy of its state."""
        files = [records_dir(self.root) / STATE_FILE, *self._record_paths()]
        stats = []
        for path in files:
            try:
                stat = path.stat()
            except OSError:
                continue
            stats.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(stats)

    def _record_paths(self) -> list[Path]:
        runs = self.root / "runs"
        return sorted(p for p in runs.glob("[0-9][0-9][0-9][0-9]-*.json") if not p.name.endswith(".report.json")) \
            if runs.is_dir() else []

    def sync(self) -> int:
        """One pass: every record the state vouches for, tracked up to its stage. Returns how many
        runs it wrote; raises if the tracker fails (nothing is lost: the next pass redoes it)."""
        # the last pass runs as the server exits, after it let go of the workspace
        owner = self.owned() or (self.stopping.is_set() and self.was_owner)
        self.was_owner = owner
        if not owner:
            return 0
        state = self._server_state()
        digests = state.get(history.DIGESTS) if isinstance(state.get(history.DIGESTS), dict) else {}
        written, strangers = 0, []
        for path in self._record_paths():
            try:
                raw = limits.read_record(path)  # bounded: a planted FIFO or giant stalls nothing
                # only the bytes the server wrote (history.checked): an edit the ledger row cannot see
                # (an evidence, a description) is not tracked either
                record = json.loads(raw) if history.digest(raw) == digests.get(path.name) else None
            except (OSError, ValueError, RecursionError):
                record = None  # not a record the server wrote (yet: its state is saved next): not tracked
            key = path.stem
            vouched = vouched_stage(state, record)
            if vouched is None:
                if key not in self.untracked and not in_flight(state, key):  # in flight: the state is saved next
                    self.untracked.add(key)
                    strangers.append(path.name)
                continue
            if self._sink is None:
                self._sink = self.make_sink()
            if self._sink.track(state["branch"], key, vouched, lambda r=record, v=vouched: self.describe(r, v, state)):
                written += 1
        if strangers and state.get("branch"):
            say(f"{len(strangers)} record(s) in runs/ (runs/{strangers[0]} first) are not runs of {state['branch']} "
                "as the server recorded them (an earlier research run's, or edited by hand): not tracked")
        return written

    def _server_state(self) -> dict:
        """The server's own copy of state.json (what it last wrote; an edited state.json is not believed)."""
        for path in (records_dir(self.root) / STATE_FILE, self.root / STATE_DIR / STATE_FILE):
            try:
                data = json.loads(limits.read_record(path))
            except (OSError, ValueError, RecursionError):
                continue
            return data if isinstance(data, dict) else {}
        return {}

    def describe(self, record: dict, stage: str, state: dict) -> dict:
        """What the tracker is told about a run: name, times, params, metrics, tags, artifacts."""
        result, run = record["result"], record["run"]
        decision = record.get("decision") or {}
        old, new = self._train_at(run["parent"]), self._train_at(run["commit"])
        changes = decision.get("changes") or history.describe_change(old or "", new or "")
        started = run.get("started_at") or run.get("submitted_at") or time.time()
        ended = run.get("ended_at") or started
        # the log's bytes, read once: what is parsed for the curve is what is uploaded, never a file
        # that a symbolic link planted in its place points to
        log, why_not = logparse.read_for_upload(self.root / result["log"]) if result.get("log") else (None, None)
        if log is not None and not history.is_recorded_log(state, result["log"], log):  # review 63: edited since
            log, why_not = None, "it is not the log the server recorded for the run (changed since, or never recorded)"
        text = (log or b"").decode("utf-8", errors="replace")
        curve = [(p.step, p.loss, int(1000 * (started + (ended - started) * p.percent / 100)))
                 for p in logparse.all_progress(text)]
        tags = {"mlflow.note.content": result["description"], "mlflow.source.git.commit": run["commit"],
                "commit": run["commit"], "parent": run["parent"], "branch": state["branch"], "decision": stage,
                "changes": history.change_text(changes), "host": run.get("host")}
        tags |= {f"result.{k}": result.get(k) for k in RESULT_TAGS}
        tags["warnings"] = "; ".join(result.get("warnings") or []) or None
        if decision.get("evidence"):
            tags["evidence"] = decision["evidence"]
        if why_not:
            tags["log_note"] = f"{result['log']} was not uploaded: {why_not}"
        row = ledger_row(state, result["commit"], stage)
        if row:
            tags["ledger"] = row[4]
        entry = (state.get("runs") or {}).get(str(run["run"])) or {}
        if "rerun_of" in entry:
            tags["rerun_of"] = str(entry["rerun_of"])
        metrics = {k: result[k] for k in METRICS if isinstance(result.get(k), (int, float))
                   and not isinstance(result.get(k), bool)}
        # train.py's own number, never under the harness's metric, where a sort by val_bpb ranks it first (review
        # 59); nor a best the harness did not measure (a number logged by hand: review 62), nor a delta from either
        unmeasured = {"val_bpb", "delta"} if result.get("verified") is False else set()
        best = ledger_row(state, str(result.get("best_commit") or "")[:7], "keep")
        if best and not limits.measured(str(best[4])):
            unmeasured |= {"best_val_bpb", "delta"}
        metrics = {f"{k}{UNVERIFIED}" if k in unmeasured else k: v for k, v in metrics.items()}
        if stage != "pending":
            metrics["kept"] = float(stage == "keep")
        return {"name": f"{run['run']:04d} {result['description'][:60]}", "description": result["description"],
                "start_ms": int(started * 1000),
                "end_ms": int(ended * 1000), "failed": result["status"] != "ok",
                "params": {name: "(removed)" if value is None else shown(value)
                           for name, (_, value) in changes.get("constants", {}).items()}
                | {"other_lines": str(changes.get("other_lines", 0))},
                "metrics": metrics, "curve": curve,
                "tags": {k: shown(v) for k, v in tags.items() if v is not None},
                "diff": shown(self._diff(run["parent"], run["commit"])), "record": record,
                "log": (Path(result["log"]).name, log) if log else None}

    def _train_at(self, commit: str) -> str | None:
        try:
            return HarnessGit(self.root).show(f"{commit}:train.py")
        except git.GitCommandError:
            return None

    def _diff(self, parent: str, commit: str) -> str:
        try:
            return HarnessGit(self.root).diff("--no-ext-diff", "--no-textconv", parent, commit, "--", "train.py")
        except git.GitCommandError as exc:
            return f"(no diff: {exc.stderr.strip()})"


def vouched_stage(state: dict, record: dict) -> str | None:
    """The stage a record is at, if the server's state holds the same run: its entry in flight with
    this result (pending), or its ledger row (the decision); None for anything else."""
    try:
        result, run = record["result"], record["run"]
        number, commit, decision = run["run"], run["commit"], record.get("decision")
    except (KeyError, TypeError):
        return None
    if not isinstance(result, dict) or not state.get("branch"):
        return None
    if decision:
        row = ledger_row(state, commit[:7], decision.get("status"))
        if row is None or (row[3] != "crash" and abs(row[1] - (result.get("val_bpb") or 0.0)) > 1e-6):
            return None
        return row[3]
    entry = (state.get("runs") or {}).get(str(number))
    if entry and entry.get("commit") == commit and entry.get("status") == "pending" and \
            (entry.get("result") or {}).get("val_bpb") == result.get("val_bpb"):
        return "pending"
    return None


def in_flight(state: dict, key: str) -> bool:
    """The run named by a record's file is in the state, not decided yet (its record may be newer)."""
    number, _, commit7 = key.partition("-")
    entry = (state.get("runs") or {}).get(str(int(number))) or {}
    return entry.get("commit", "")[:7] == commit7


def ledger_row(state: dict, commit7: str, status: str | None) -> list | None:
    return next((row for row in state.get("rows") or [] if row[0] == commit7 and row[3] == status), None)


def shown(value) -> str:
    """A value from train.py as text that reads as it runs: a right-to-left override or another hidden character
    written as <U+XXXX>, as the report and the dashboard write them (ledger.written_out)."""
    return ledger.written_out(str(value))[0]


def artifacts(what: dict) -> dict:
    """{name: bytes} of the files a tracked run holds, from what describe() read: its record, its diff
    and, where it has one to upload, its log (the bytes read once, never a file a link planted in its
    place points to). Both sinks store these."""
    files = {"record.json": json.dumps(what["record"], indent=1).encode(), "train.py.diff": what["diff"].encode()}
    if what["log"] is not None:
        name, data = what["log"]
        files[name] = data
    return files


class MlflowSink:
    """The MLflow side: one experiment per branch, each run found again by its key tag."""

    def __init__(self, root: Path, uri: str):
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        os.environ.update(QUIET)
        from mlflow import MlflowClient
        self.root, self.uri = root, uri
        self.local = uri == default_uri(root)
        self.artifacts = (root / STATE_DIR / LOCAL_ARTIFACTS).as_uri() if self.local else None
        if self.local:
            (root / STATE_DIR).mkdir(exist_ok=True)
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
            SqlAlchemyStore(uri, self.artifacts)  # a new store's tables, its Default experiment's artifacts here too
        self.client = MlflowClient(tracking_uri=uri)
        self.experiments: dict[str, str] = {}  # branch -> experiment id
        self.runs: dict[str, dict[str, tuple[str, str | None]]] = {}  # experiment id -> key -> (run id, stage)

    def experiment(self, branch: str) -> str:
        if branch not in self.experiments:
            name = experiment_name(self.root, branch)
            found = self.client.get_experiment_by_name(name)
            if found is not None and found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            if found is None:
                exp_id = self.client.create_experiment(name, artifact_location=self.artifacts, tags={
                    "research_loop.workspace": str(self.root), "research_loop.branch": branch})
            else:
                exp_id = found.experiment_id
            self.experiments[branch] = exp_id
            self.runs[exp_id] = self._tracked(exp_id)
        return self.experiments[branch]

    def _tracked(self, exp_id: str) -> dict[str, tuple[str, str | None]]:
        tracked, token = {}, None
        while True:
            page = self.client.search_runs([exp_id], max_results=1000, page_token=token)
            for run in page:
                key = run.data.tags.get(KEY_TAG)
                if key:
                    tracked[key] = (run.info.run_id, run.data.tags.get(STAGE_TAG))
            token = page.token
            if not token:
                return tracked

    def track(self, branch: str, key: str, stage: str, describe) -> bool:
        """The run at this stage in the store; False if it was already."""
        exp_id = self.experiment(branch)
        run_id, synced = self.runs[exp_id].get(key, (None, None))
        if synced == stage:
            return False
        what = describe()
        if run_id is not None and synced is None:  # a pass that failed halfway: done again from the start
            self.client.delete_run(run_id)
            run_id = None
        if run_id is None:
            run_id = self._create(exp_id, key, what)
        else:
            self.client.log_batch(run_id, metrics=self._metrics(what, only=("kept",)),
                                  tags=self._tags(what, only=("decision", "evidence", "ledger")))
            self._artifacts(run_id, {"record.json": artifacts(what)["record.json"]})  # it now holds the decision
        self.client.set_tag(run_id, STAGE_TAG, stage)
        self.runs[exp_id][key] = (run_id, stage)
        return True

    def _create(self, exp_id: str, key: str, what: dict) -> str:
        from mlflow.entities import Param
        run = self.client.create_run(exp_id, start_time=what["start_ms"], run_name=what["name"], tags={KEY_TAG: key})
        run_id = run.info.run_id
        self.runs[exp_id][key] = (run_id, None)
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in what["params"].items()],
                              tags=self._tags(what))
        metrics = self._metrics(what)
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + BATCH])
        self._artifacts(run_id, artifacts(what))
        self.client.set_terminated(run_id, "FAILED" if what["failed"] else "FINISHED", end_time=what["end_ms"])
        return run_id

    def _artifacts(self, run_id: str, files: dict) -> None:
        """{name: bytes} (artifacts) logged as the run's artifacts, through files written afresh in the workspace's
        .research-loop, which runs cannot read: a record and a log hold the harness's reason, and the temporary folder
        (`$TMPDIR`, where it is not /tmp) was one runs read (review 94)."""
        (self.root / STATE_DIR).mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root / STATE_DIR, prefix="artifacts-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
                self.client.log_artifact(run_id, str(Path(tmp) / name))

    @staticmethod
    def _metrics(what: dict, only: tuple = ()) -> list:
        from mlflow.entities import Metric
        found = [Metric(k, float(v), what["end_ms"], 0) for k, v in what["metrics"].items() if not only or k in only]
        if not only:
            found += [Metric("train_loss", loss, ms, step) for step, loss, ms in what["curve"]]
        return found

    @staticmethod
    def _tags(what: dict, only: tuple = ()) -> list:
        from mlflow.entities import RunTag
        return [RunTag(k, v[:MAX_TAG_CHARS]) for k, v in what["tags"].items() if not only or k in only]
