"""The research loop's bookkeeping: setup, run, keep, discard, log, status, noise.

Every method checks its rules before it changes anything, and raises Refusal with what to
do next. The order of writes is what makes it lose nothing: the ledger row is appended
(and fsynced) before any reset, and state.json is replaced atomically.
"""
import filecmp
import json
import math
import os
import shutil
import time
from pathlib import Path

from mcp_server import ledger, logparse, noise
from mcp_server.models import (
    DecisionResult, LoggedRow, Metrics, NoiseEstimate, Refusal, Row, RunResult, SetupResult,
    StatusResult,
)
from mcp_server.runner import Run, kill_group
from mcp_server.state import State, process_alive, process_start_time
from mcp_server.workspace import (
    BRANCH_PREFIX, EDITABLE, PROTECTED_BRANCHES, Workspace, cache_dir, prepared_info, time_budget,
    validate_commit_arg, validate_tag,
)

RUN_LOG = "run.log"
RUNS_DIR = "runs"
RECENT_ROWS = 5
TIMEOUT_FACTOR = 2.0
# A budget counts training time only: start-up, compilation and evaluation come on top,
# which on a CPU can exceed the budget itself, so the default timeout has a floor.
MIN_TIMEOUT_MARGIN_S = 120.0
DEFAULT_TRAIN_COMMAND = ["uv", "run", "train.py"]


class ResearchLoop:
    def __init__(self, root: Path, train_command: list[str] | None = None):
        self.root = Path(root).resolve()
        self.train_command = train_command or DEFAULT_TRAIN_COMMAND
        self.state = State(self.root)
        self.active: Run | None = None
        self.closing = False  # set on server exit: an unfinished run is left to recovery
        self._ws: Workspace | None = None
        try:
            self.recover()
        except Refusal:
            pass  # a corrupt state file: the server still starts, and every tool says what to do


    # --- helpers -------------------------------------------------------------------
    @property
    def ws(self) -> Workspace:
        if self._ws is None:
            self._ws = Workspace(self.root)
        return self._ws

    @property
    def ledger_path(self) -> Path:
        return self.root / ledger.LEDGER_NAME

    def rows(self) -> list[Row]:
        return ledger.read_rows(self.ledger_path)[0]

    def _set_up_state(self) -> dict:
        state = self.state.load()
        if not state.get("branch"):
            raise Refusal("This workspace is not set up for a research run: call setup(tag) first.")
        branch = self.ws.branch()
        if branch in PROTECTED_BRANCHES:
            raise Refusal(f"You are on {branch}: experiments never run on main/master. "
                          f"git checkout {state['branch']}, or call setup(tag) for a new branch.")
        if branch != state["branch"]:
            raise Refusal(f"You are on {branch or 'a detached HEAD'}, not the research branch "
                          f"{state['branch']} set up by setup: git checkout {state['branch']}, "
                          "or call setup(tag) to start a new one.")
        return state

    def _running_elsewhere(self, state: dict) -> str | None:
        running = state.get("running")
        if self.active is not None and not self.active.done.is_set():
            return f"run {running['run']} ({running['commit'][:7]}) is still going"
        holder = self.state.lock_holder()
        if holder and holder.get("pid") != os.getpid() and process_alive(holder["pid"], holder.get("start")):
            return f"another server (pid {holder['pid']}) is running an experiment in this workspace"
        return None

    def interrupted_note(self, state: dict | None = None) -> str | None:
        interrupted = (state or self.state.load()).get("interrupted")
        if not interrupted:
            return None
        return (f"interrupted run {interrupted['commit'][:7]} ({interrupted['description']}) has no "
                "ledger row: call discard() to log it as a crash and reset train.py")

    # --- start-up recovery ---------------------------------------------------------
    def recover(self) -> None:
        """A run recorded as in progress whose server is gone was interrupted: say so, clean up."""
        with self.state.mutex:
            state = self.state.load()
            running = state.get("running")
            if not running:
                return
            if process_alive(running["server_pid"], running.get("server_start")):
                return  # another live server owns it
            if running.get("pgid") and process_alive(running["pgid"], running.get("leader_start")):
                kill_group(running["pgid"])
            log = self.root / RUN_LOG
            if log.exists():
                self._archive_log(log, running["run"], running["commit"])
            state["running"] = None
            state["interrupted"] = {k: running[k] for k in ("run", "commit", "description")}
            self.state.save(state)
            holder = self.state.lock_holder()
            if holder and not process_alive(holder["pid"], holder.get("start")):
                self.state.lock_path.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """On server exit: the training must not outlive the server."""
        self.closing = True
        if self.active is not None and not self.active.done.is_set():
            kill_group(self.active.pgid)

    # --- setup -----------------------------------------------------------------------
    def setup(self, tag: str) -> SetupResult:
        tag = validate_tag(tag)
        ws = self.ws
        branch = BRANCH_PREFIX + tag
        if not ws.repo.head.is_valid():
            raise Refusal(f"{self.root} has no commit yet: commit prepare.py and train.py (the baseline) "
                          "first, then call setup again.")
        missing = ws.missing_files()
        if missing:
            raise Refusal(f"{', '.join(missing)} not found in {self.root}: the workspace must be an "
                          "autoresearch layout (prepare.py and train.py at the root).")
        if prepared_info() is None:
            raise Refusal(f"No prepared data or tokenizer in {cache_dir()}: run `uv run prepare.py` "
                          "in the workspace first (it downloads or builds the data and trains the tokenizer).")
        state = self.state.load()
        busy = self._running_elsewhere(state)
        if busy:
            raise Refusal(f"Busy: {busy}. Wait for it (read_metrics) before a new setup.")
        if ws.branch_exists(branch):
            raise Refusal(f"Branch {branch} already exists: pick a new tag (e.g. {tag}-2), or "
                          f"git checkout {branch} to continue that run.")
        dirty = ws.dirty_tracked_files()
        if dirty:
            raise Refusal(f"Uncommitted changes to tracked files: {', '.join(dirty)}. Commit or "
                          "revert them first, so the baseline is a known commit.")
        if ws.tracked(ledger.LEDGER_NAME):
            raise Refusal(f"{ledger.LEDGER_NAME} is tracked by git, so a reset could lose rows: "
                          f"git rm --cached {ledger.LEDGER_NAME} and commit, then setup again.")
        ws.create_branch(branch)
        archived = self._archive_ledger()
        ledger.ensure_ledger(self.ledger_path)
        ws.add_excludes()
        fingerprint = ws.fingerprint()
        with self.state.mutex:
            self.state.save({"tag": tag, "branch": branch, "kept_commit": ws.head(),
                             "fingerprint": fingerprint, "seq": state.get("seq", 0),
                             "running": None, "pending": None, "interrupted": None, "noise": None})
        return SetupResult(branch=branch, base_commit=ws.head()[:7], ledger=ledger.LEDGER_NAME,
                           fingerprint=fingerprint, archived_ledger=archived,
                           next="run_experiment('baseline') with train.py unchanged, then keep()")

    def _archive_ledger(self) -> str | None:
        """A ledger from an earlier research run is moved aside, never overwritten."""
        if not self.ledger_path.exists() or not self.rows():
            return None
        archive = self.state.dir / "archive"
        archive.mkdir(parents=True, exist_ok=True)
        target = archive / f"results-{time.strftime('%Y%m%d-%H%M%S')}.tsv"
        shutil.move(self.ledger_path, target)
        return str(target.relative_to(self.root))

    # --- running ---------------------------------------------------------------------
    def check_run_rules(self, description: str) -> dict:
        description = ledger.validate_description(description)
        state = self._set_up_state()
        busy = self._running_elsewhere(state)
        if busy:
            raise Refusal(f"Busy: {busy}. One run at a time: follow it with read_metrics().")
        if state.get("pending"):
            p = state["pending"]
            raise Refusal(f"Run {p['run']} ({p['commit'][:7]}, {p['status']}) is not resolved yet: "
                          "call keep() or discard() first.")
        note = self.interrupted_note(state)
        if note:
            raise Refusal(f"Unresolved {note} before the next run.")
        kept = state["kept_commit"]
        offenders = [p for p in self.ws.changed_since(kept) if p != EDITABLE]
        if offenders:
            raise Refusal(f"Only train.py may change, but these differ from the last kept commit "
                          f"{kept[:7]}: {', '.join(offenders)}. Revert them (git checkout {kept[:7]} -- <file>).")
        if self.ws.fingerprint() != state["fingerprint"]:
            raise Refusal("The harness (tracked files other than train.py) changed since setup: "
                          f"git reset to {kept[:7]}'s harness, or call setup(tag) for a new research run.")
        state["description"] = description
        return state

    def start_run(self, description: str, timeout_seconds: float | None = None) -> Run:
        state = self.check_run_rules(description)
        description = state.pop("description")
        if timeout_seconds is not None and not (0 < timeout_seconds <= 86400):
            raise Refusal("timeout_seconds must be between 0 and 86400 (one day).")
        holder = self.state.acquire_run_lock()
        if holder:
            raise Refusal(f"Busy: process {holder['pid']} holds the run lock. Follow it with read_metrics().")
        try:
            commit = self.ws.commit_train(description)
            budget = time_budget(self.root)
            timeout = timeout_seconds or max(TIMEOUT_FACTOR * budget, budget + MIN_TIMEOUT_MARGIN_S)
            seq = state.get("seq", 0) + 1
            with self.state.mutex:
                run = Run(self.train_command, self.root, self.root / RUN_LOG, timeout,
                          on_finish=lambda r: self._finish(r, seq, commit, description))
                run.seq, run.commit, run.description = seq, commit, description
                self.active = run
                self.state.update(seq=seq, running={
                    "run": seq, "commit": commit, "description": description, "pgid": run.pgid,
                    "leader_start": run.leader_start, "server_pid": os.getpid(),
                    "server_start": process_start_time(os.getpid()), "timeout": timeout,
                    "started_at": time.time()})
        except BaseException:
            self.state.release_run_lock()
            raise
        return run

    def started(self, run: Run) -> RunResult:
        return RunResult(run=run.seq, commit=run.commit[:7], description=run.description, status="running",
                         timeout_seconds=run.timeout, log=RUN_LOG,
                         next="follow with read_metrics(); then keep() or discard()")

    def _finish(self, run: Run, seq: int, commit: str, description: str) -> None:
        """On the runner's thread once the group is gone: parse, archive, make it pending."""
        if self.closing:
            return  # the next server start reports it as interrupted
        try:
            text = logparse.read_text(self.root / RUN_LOG)
            log_copy = self._archive_log(self.root / RUN_LOG, seq, commit)
            result = self._result(text, run, seq, commit, description, log_copy)
            (self.root / log_copy).with_suffix(".json").write_text(result.model_dump_json(exclude_none=True))
        except Exception as exc:  # disk full, log deleted...: still a result the agent can discard
            result = RunResult(run=seq, commit=commit[:7], description=description, status="crash",
                               exit_code=run.exit_code, log=RUN_LOG, tail=f"the server could not record "
                               f"this run: {type(exc).__name__}: {exc}", next="discard(), then fix the cause")
        try:
            with self.state.mutex:
                self.state.update(running=None, pending=result.model_dump() | {"full_commit": commit},
                                  last_result=result.model_dump())
        finally:
            run.result = result
            self.state.release_run_lock()

    def _archive_log(self, log: Path, seq: int, commit: str) -> str:
        runs = self.root / RUNS_DIR
        runs.mkdir(exist_ok=True)
        target = runs / f"{seq:04d}-{commit[:7]}.log"
        shutil.copyfile(log, target)
        return f"{RUNS_DIR}/{target.name}"

    def _result(self, text, run, seq, commit, description, log_copy) -> RunResult:
        summary = logparse.parse_summary(text)
        ok = (run.exit_code == 0 and summary is not None and summary.val_bpb is not None
              and math.isfinite(summary.val_bpb) and not logparse.failed(text))
        status = "timeout" if run.timed_out else "ok" if ok else "crash"
        result = RunResult(run=seq, commit=commit[:7], description=description, status=status,
                           exit_code=run.exit_code, log=log_copy, next="")
        if summary is not None:
            result.training_seconds = summary.training_seconds
            result.total_seconds = summary.total_seconds
            result.eval_seconds = summary.eval_seconds
            result.compile_seconds = summary.compile_seconds
            result.compile_cache = summary.compile_cache
            result.recompiles = summary.recompiles
            result.num_steps = summary.num_steps
        if status != "ok":
            result.tail = logparse.tail(text)
            result.next = (f"read the tail; fix and rerun after discard() (which logs a crash and "
                           f"restores train.py; this code stays in commit {commit[:7]})")
            if run.timed_out:
                result.tail = f"[killed after {run.timeout:.0f}s timeout]\n" + result.tail
            return result
        result.val_bpb = summary.val_bpb
        result.memory_gb = round((summary.peak_vram_mb or 0.0) / 1024, 1)
        best = ledger.best_kept(self.rows())
        if best:
            result.best_val_bpb, result.best_commit = best.val_bpb, best.commit
            result.delta = round(summary.val_bpb - best.val_bpb, 6)
        result.noise = noise.verdict(result.delta, self.state.load().get("noise"))
        result.next = "keep() if it is better beyond noise, else discard()"
        return result

    # --- decisions -------------------------------------------------------------------
    def keep(self, note: str | None = None) -> DecisionResult:
        state = self._set_up_state()
        pending = state.get("pending")
        if not pending:
            raise Refusal(self.interrupted_note(state) or
                          "Nothing to keep: no pending result. Call run_experiment(description) first.")
        if pending["status"] != "ok":
            raise Refusal(f"Run {pending['run']} ended with {pending['status']}, so it cannot be kept: "
                          "discard() logs it as a crash; or fix train.py after discarding and rerun.")
        description = self._with_note(pending["description"], note)
        row = ledger.make_row(pending["commit"], pending["val_bpb"], pending["memory_gb"] or 0.0,
                              "keep", description)
        rows = self._append_once(row)
        full = pending.get("full_commit") or self.ws.resolve_commit(pending["commit"]) or pending["commit"]
        with self.state.mutex:
            self.state.update(pending=None, kept_commit=full)
        best = ledger.best_kept(rows)
        return DecisionResult(row=row, branch=state["branch"], kept_commit=full[:7],
                              best_val_bpb=best.val_bpb if best else None)

    def discard(self, reason: str | None = None) -> DecisionResult:
        state = self._set_up_state()
        pending, interrupted = state.get("pending"), state.get("interrupted")
        if pending:
            status = "discard" if pending["status"] == "ok" else "crash"
            description = self._with_note(pending["description"], reason)
            commit, val_bpb, memory = pending["commit"], pending["val_bpb"] or 0.0, pending["memory_gb"] or 0.0
        elif interrupted:
            status, commit, val_bpb, memory = "crash", interrupted["commit"][:7], 0.0, 0.0
            description = self._with_note(f"{interrupted['description']} (interrupted)", reason)
        else:
            raise Refusal("Nothing to discard: no pending result. Call run_experiment(description) first.")
        kept = state["kept_commit"]
        changed = self.ws.dirty_tracked_files()
        others = [p for p in changed if p != EDITABLE]
        if others:
            raise Refusal(f"Tracked files other than train.py were changed after the run: "
                          f"{', '.join(others)}. Revert them (git checkout HEAD -- <file>) and discard again.")
        row = ledger.make_row(commit, val_bpb, memory, status, description)
        rows = self._append_once(row)  # the row first: a reset never loses a result
        saved = self._save_unsaved_train(commit) if EDITABLE in changed else None
        self.ws.reset_to(kept)
        with self.state.mutex:
            self.state.update(pending=None, interrupted=None)
        best = ledger.best_kept(rows)
        note = f"your uncommitted train.py was saved to {saved}" if saved else None
        return DecisionResult(row=row, branch=state["branch"], kept_commit=kept[:7],
                              best_val_bpb=best.val_bpb if best else None, note=note)

    def _append_once(self, row: Row) -> list[Row]:
        """keep/discard retried after a failure past the append (e.g. git) do not log twice."""
        rows = self.rows()
        if any(r.commit == row.commit and r.status == row.status for r in rows):
            return rows
        return ledger.append_row(self.ledger_path, row)

    def _save_unsaved_train(self, commit: str) -> str | None:
        """train.py edited after the run would be lost by the reset: keep a copy."""
        target = self.state.dir / f"train-unsaved-after-{commit[:7]}.py"
        self.state.dir.mkdir(exist_ok=True)
        shutil.copyfile(self.root / EDITABLE, target)
        return str(target.relative_to(self.root))

    @staticmethod
    def _with_note(description: str, note: str | None) -> str:
        if not note or not note.strip():
            return description
        return f"{description} ({ledger.validate_description(note, 'note')})"

    def log_result(self, commit: str, val_bpb: float, memory_gb: float, status: str,
                   description: str) -> LoggedRow:
        commit = validate_commit_arg(commit)
        if self.ws.resolve_commit(commit) is None:
            raise Refusal(f"Commit {commit} does not exist in this repository: pass the hash of the "
                          "commit that was trained (git log --oneline).")
        pending = self.state.load().get("pending")
        if pending and pending["commit"] == commit[:7]:
            raise Refusal(f"Commit {commit[:7]} is the pending run of this server: use keep() or discard().")
        row = ledger.make_row(commit[:7], val_bpb, memory_gb, status, description)
        rows = ledger.append_row(self.ledger_path, row)
        return LoggedRow(row=row, rows_in_ledger=len(rows))

    # --- reading ---------------------------------------------------------------------
    def read_metrics(self, run: str | None = None) -> Metrics:
        if run is None:
            state = self.state.load()
            if state.get("running"):
                return self._live_metrics(state["running"])
            return self._metrics_of(self.root / RUN_LOG, RUN_LOG, self._result_of_run_log(state))
        path = self._find_run_log(run)
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        return self._metrics_of(path, f"{RUNS_DIR}/{path.name}", meta)

    def _live_metrics(self, running: dict) -> Metrics:
        log = self.root / RUN_LOG
        text = logparse.read_tail_bytes(log) if log.exists() else ""
        elapsed = time.time() - running["started_at"]
        return Metrics(source=RUN_LOG, status="running", progress=logparse.last_progress(text),
                       note=f"run {running['run']} ({running['commit'][:7]}) {running['description']}: "
                            f"{elapsed:.0f}s of at most {running['timeout']:.0f}s")

    def _metrics_of(self, path: Path, source: str, meta: dict | None) -> Metrics:
        if not path.exists():
            return Metrics(source=source, status="missing", note=self.interrupted_note() or
                           "no run log yet: call run_experiment(description)")
        text = logparse.read_text(path)
        if not text.strip():
            return Metrics(source=source, status="empty", note="the log is empty: the run printed nothing")
        summary = logparse.parse_summary(text)
        status = meta["status"] if meta else ("ok" if summary and not logparse.failed(text) else "crash")
        metrics = Metrics(source=source, status=status, summary=summary,
                          progress=logparse.last_progress(text[-logparse.TAIL_BYTES_FOR_PROGRESS:]),
                          note=self.interrupted_note())
        if status != "ok":
            metrics.tail = logparse.tail(text)
        return metrics

    def _result_of_run_log(self, state: dict) -> dict | None:
        """The recorded result of the run that wrote run.log, if run.log is still its log."""
        last = state.get("last_result")
        if not last:
            return None
        try:
            same = filecmp.cmp(self.root / last["log"], self.root / RUN_LOG, shallow=False)
        except OSError:
            return None
        return last if same else None

    def _find_run_log(self, run: str) -> Path:
        run = run.strip()
        if not run or not run.replace("-", "").isalnum() or run.startswith("-"):
            raise Refusal(f"Run {run!r} is not a run number or a commit hash (see status()).")
        runs = self.root / RUNS_DIR
        logs = sorted(runs.glob("*.log")) if runs.is_dir() else []
        for log in logs:
            seq, _, commit = log.stem.partition("-")
            if run.isdigit() and len(run) < 7 and int(seq) == int(run):
                return log
            if len(run) >= 7 and commit.startswith(run[:7].lower()):
                return log
        raise Refusal(f"No log for run {run!r} in {RUNS_DIR}/: pass a run number or a 7+ character "
                      "commit from status() or results.tsv.")

    def status(self) -> StatusResult:
        state = self.state.load()
        rows, bad = ledger.read_rows(self.ledger_path)
        counts = {s: sum(r.status == s for r in rows) for s in ledger.STATUSES}
        best = ledger.best_kept(rows)
        result = StatusResult(workspace=str(self.root), branch=self.ws.branch(), set_up=bool(state.get("branch")),
                              best_val_bpb=best.val_bpb if best else None, best_commit=best.commit if best else None,
                              kept_commit=(state.get("kept_commit") or "")[:7] or None, counts=counts,
                              recent=rows[-RECENT_ROWS:], malformed_ledger_lines=bad,
                              interrupted=self.interrupted_note(state), next="")
        if state.get("noise"):
            result.noise = NoiseEstimate(**state["noise"])
        if state.get("running"):
            live = self._live_metrics(state["running"])
            result.running, result.progress = live.note, live.progress
        if state.get("pending"):
            p = state["pending"]
            result.pending = (f"run {p['run']} ({p['commit']}) {p['status']}"
                              + (f" val_bpb {p['val_bpb']:.6f}" if p.get("val_bpb") is not None else ""))
        result.next = self._next_step(result)
        return result

    @staticmethod
    def _next_step(s: StatusResult) -> str:
        if not s.set_up:
            return "setup(tag)"
        if s.running:
            return "wait: read_metrics() follows the run"
        if s.interrupted:
            return "discard() to log the interrupted run"
        if s.pending:
            return "keep() or discard()"
        if not s.counts["keep"]:
            return "run_experiment('baseline') with train.py unchanged"
        return "edit train.py, then run_experiment(description)"

    # --- noise -----------------------------------------------------------------------
    def noise_values_from_kept(self) -> list[float]:
        kept = self.state.load().get("kept_commit", "")[:7]
        return [r.val_bpb for r in self.rows() if r.commit == kept and r.status == "keep"]

    def store_noise(self, values: list[float]) -> NoiseEstimate:
        estimate = noise.estimate(values)
        self.state.update(noise=estimate.model_dump())
        return estimate
