"""The research loop's bookkeeping: setup, submit and run, keep, discard, cancel, re-apply, log.

A run is a candidate commit: train.py as the agent wrote it, on top of the kept commit (the
best), stored under refs/research-loop/runs/<n> so its code is never lost. Runs wait in a queue
and execute in the executor's slots; the agent's working tree is never checked out or reset
under a run. A finished run is a pending result until keep or discard writes its ledger row;
keep advances the branch to the candidate, and only when the candidate was measured on the
current best.

Every method checks its rules before it changes anything and raises Refusal with what to do
next. State changes happen in State.transaction (exclusive across threads and processes); a
decision's ledger row is recorded in the state in the same transaction (results.tsv is written
from the state), so a refused or interrupted decision records nothing, and its retry logs once.
"""
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import git

from mcp_server import history, integrity, ledger, limits, logparse, noise, sandbox
from mcp_server.executor import (LocalPool, RunSpec, compile_bytecode, default_slots, kill_session, read_report,
                                  training_env)
from mcp_server.models import (
    CancelResult, DecisionResult, HistoryResult, LiveRun, LoggedRow, Metrics, NoiseEstimate, Refusal, Row,
    RunResult, SetupResult, StatusResult, StopResult,
)
from mcp_server.state import State, process_alive
from mcp_server.workspace import (
    BRANCH_PREFIX, EDITABLE, PROTECTED_BRANCHES, RUN_REF_PREFIX, Workspace, budget_clock, cache_dir,
    prepared_info, time_budget, validate_commit_arg, validate_tag,
)

RUN_LOG = "run.log"
RUNS_DIR = "runs"
RECENT_ROWS = 5
# MFU of a run against its best's run: beyond this share apart, the machine's speed may explain the
# delta (on a 2-core CPU, one busy process beside a wall-clock run cost it 35% of its steps)
THROUGHPUT_TOLERANCE = 0.15
CONFIRM_WIDTHS = 3.0  # a gain within this many noise thresholds is confirmed before keep accepts it
TIMEOUT_FACTOR = 3.0
# A budget counts training time only: start-up, a cold compile and evaluation come on top (on a
# loaded 2-core CPU: a 2-minute compile, and a CPU-clock budget that stretches the wall time), so
# the default timeout has a floor above the budget. A timeout is for hung runs, not slow ones.
MIN_TIMEOUT_MARGIN_S = 300.0
MAX_TIMEOUT_S = 86400.0
ENV_SYNC_TIMEOUT_S = 900  # the first `uv run` of a workspace may install torch
DEFAULT_TRAIN_COMMAND = ["uv", "run", "train.py"]
ENV_PROBE = "import sys, sysconfig; print(sys.executable); print(sysconfig.get_paths()['purelib'])"
LOG_TAIL_BYTES = 256 * 1024  # what is parsed of a log: the summary block and a crash's tail live at its end
MAX_NOTE_CHARS = 140  # of a keep note or discard reason in the row: the description keeps the rest
RUN_ARG_RE = re.compile(r"[0-9]{1,9}|[0-9a-fA-F]{7,40}")
MAX_COMMIT_ATTEMPTS = 20  # candidates whose 7-character hash collides with a logged one are re-made
# An entry of state["runs"] is a run nobody has decided yet: queued, running, pending or interrupted.
IN_FLIGHT = ("queued", "running")
UNVERIFIED_MARKER = " (unverified)"  # a kept row whose number is train.py's own, kept on request
UNDECIDED = ("pending", "interrupted")


def run_name(run: int, commit: str) -> str:
    return f"{run:04d}-{commit[:7]}"


class ResearchLoop:
    def __init__(self, root: Path, train_command: list[str] | None = None, slots: int | None = None,
                 executor=None, unsandboxed: bool = False):
        """executor: makes the executor from the Workspace (a Ray or SLURM one); default the local pool.
        unsandboxed: the user accepts runs without a sandbox where none can run (--unsandboxed)."""
        self.root = Path(root).resolve()
        self.unsandboxed = unsandboxed
        self.train_command = train_command or DEFAULT_TRAIN_COMMAND
        self.slots = slots or default_slots()
        self.state = State(self.root)
        self.done: dict[int, threading.Event] = {}  # set when a run of this server has a result
        self.finished = threading.Condition()  # notified whenever one of them is set
        self.closing = False  # set on server exit: unfinished runs are left to the next owner
        self.dashboard: str | None = None  # the dashboard's address, when this server serves it
        self._ws: Workspace | None = None
        self._pool: LocalPool | None = None
        self._python: str | None = None  # the workspace environment's interpreter, once found
        self.make_executor = executor
        try:
            self.take_over()
        except Refusal:
            pass  # not a repository, or a corrupt state file: every tool says what to do

    # --- helpers -------------------------------------------------------------------
    @property
    def ws(self) -> Workspace:
        if self._ws is None:
            self._ws = Workspace(self.root)
        return self._ws

    @property
    def pool(self) -> LocalPool:
        if self._pool is None:
            self._pool = self.make_executor(self.ws) if self.make_executor else LocalPool(self.ws, self.slots)
        return self._pool

    @property
    def ledger_path(self) -> Path:
        return self.root / ledger.LEDGER_NAME

    def rows(self) -> list[Row]:
        """The server's own rows (results.tsv is written from them, never read back)."""
        return ledger.rows_of(self.state.load())

    def event(self, run: int) -> threading.Event:
        return self.done.setdefault(run, threading.Event())

    def _finished(self, run: int) -> None:
        self.event(run).set()
        with self.finished:
            self.finished.notify_all()

    def wait_for(self, runs: list[int], until_all: bool, timeout: float) -> bool:
        """Blocks until one of the runs (or all) has a result, or the timeout; True if they have."""
        events = [self.event(n) for n in runs]
        done = lambda: (all if until_all else any)(e.is_set() for e in events)  # noqa: E731
        with self.finished:
            return self.finished.wait_for(done, timeout)

    @staticmethod
    def runs_of(state: dict, *statuses: str) -> list[dict]:
        return sorted((e for e in (state.get("runs") or {}).values() if not statuses or e["status"] in statuses),
                      key=lambda e: e["run"])

    def _research_state(self, state: dict) -> dict:
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

    def _check_branch_holds_best(self, state: dict) -> None:
        """The branch is the chain of kept commits: its tip is the best, and only the tools move it."""
        kept, tip = state["kept_commit"], self.ws.branch_tip(state["branch"])
        if tip == kept:
            return
        if tip and self.ws.is_ancestor(kept, tip):
            raise Refusal(f"{state['branch']} has commits after the kept commit {kept[:7]} that no run measured "
                          f"(its tip is {tip[:7]}); the tools move the branch themselves. `git reset --soft "
                          f"{kept[:7]}` moves it back and keeps your edits in the working tree.")
        raise Refusal(f"{state['branch']} no longer contains the kept commit {kept[:7]} (a git reset?), so the "
                      f"ledger and the branch disagree. `git reset --hard {kept[:7]}` restores it (commit or stash "
                      "your edits first).")

    # --- ownership and recovery -------------------------------------------------------
    def take_over(self) -> bool:
        """Become the server that runs this workspace's experiments if no live server is, and
        settle what a previous one left. True if this server is the owner."""
        if self.state.owned:
            return True
        if not self.state.try_own():
            return False
        with self.state.transaction() as state:
            for entry in self.runs_of(state, "running"):
                if not self.pool.reattach(entry, self._on_done):  # a cluster's jobs outlive their server
                    self._settle_orphan(entry)
        self._dispatch()
        return True

    def _require_owner(self) -> None:
        if not self.take_over():
            owner = self.state.owner() or {}
            raise Refusal(f"Another research-loop server (pid {owner.get('pid', '?')}) runs the experiments of "
                          "this workspace, so this one is read-only: use that server's session, or stop it. This "
                          "server takes over at the next call after it has gone.")

    def _settle_orphan(self, entry: dict) -> None:
        """A run whose server died: its worker's report, or a log that proves the run finished,
        gives its result; otherwise it was interrupted."""
        worker = entry.get("worker_pid")
        if worker and process_alive(worker, entry.get("worker_start")):
            kill_session(worker)  # its server is gone: the pipe will end it, this makes sure
        report = read_report(self.root / entry["report"])
        note = "recorded after a server restart"
        if report is None or report.get("running") or report.get("stopped"):
            text = logparse.read_tail_bytes(self.root / entry["log"], LOG_TAIL_BYTES) \
                if (self.root / entry["log"]).exists() else ""
            if not logparse.complete_summary(text):
                entry["status"] = "interrupted"
                return
            report = {"exit_code": 0, "timed_out": False, "stopped": None}
            note = "recovered from its log: the server stopped after the training had finished"
        entry["result"] = self._record(entry, report, entry.get("slot"), note).model_dump()
        entry["status"] = "pending"

    def shutdown(self) -> None:
        """On server exit: the training must not outlive the server; the next owner recovers."""
        self.closing = True
        if self._pool is not None:
            self._pool.shutdown()
        self.state.release()

    # --- setup -----------------------------------------------------------------------
    def setup(self, tag: str, hours: float | None = None, max_experiments: int | None = None,
              target_val_bpb: float | None = None,
              max_failures_in_row: int | None = limits.DEFAULT_MAX_FAILURES_IN_ROW) -> SetupResult:
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
        start = self._kept_row(ws.head()) if self.ledger_path.exists() else None
        try:
            chosen = limits.make_limits(hours, max_experiments, target_val_bpb, max_failures_in_row,
                                        best=start.val_bpb if start else None)
        except ValueError as exc:
            raise Refusal(f"{exc}. Nothing was set up.") from None
        self._require_owner()
        with self.state.transaction() as state:
            unsettled = self.runs_of(state)
            if unsettled:
                listed = ", ".join(f"run {e['run']} ({e['status']})" for e in unsettled)
                raise Refusal(f"Busy: {listed} of {state.get('branch')} not decided yet. Decide each "
                              "(keep/discard, or cancel one in flight) before a new setup, so no result is dropped.")
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
            seq = state.get("seq", 0) or self._last_run_number()
            state.clear()
            state.update({"tag": tag, "branch": branch, "kept_commit": ws.head(), "fingerprint": fingerprint,
                          "cache_fingerprint": integrity.cache_fingerprint(), "seq": seq, "runs": {}, "rows": [], "noise": None,
                          "limits": chosen, "started_at": time.time()})
        return SetupResult(branch=branch, base_commit=ws.head()[:7], ledger=ledger.LEDGER_NAME,
                           fingerprint=fingerprint, archived_ledger=archived,
                           limits=limits.left({"limits": chosen}, []),
                           next="run_experiment('baseline') with train.py unchanged, then keep()")

    def _last_run_number(self) -> int:
        """Run numbers never repeat, even across setups: they name the run's files and ref."""
        runs = self.root / RUNS_DIR
        numbers = [int(p.name[:4]) for p in runs.glob("[0-9][0-9][0-9][0-9]-*")] if runs.is_dir() else []
        return max(numbers, default=0)

    def _archive_ledger(self) -> str | None:
        """A ledger from an earlier research run is moved aside, never overwritten."""
        if not self.ledger_path.exists() or not self.rows():
            return None
        archive = self.state.dir / "archive"
        archive.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1000):
            target = archive / (f"results-{stamp}.tsv" if k == 0 else f"results-{stamp}-{k}.tsv")
            try:
                os.link(self.ledger_path, target)  # fails if the name is taken: never overwrites
            except FileExistsError:
                continue
            self.ledger_path.unlink()
            return str(target.relative_to(self.root))
        raise Refusal(f"Too many ledger archives named results-{stamp}*.tsv in {archive}.")

    # --- submitting and running ---------------------------------------------------------
    def default_timeout(self) -> float:
        budget = time_budget(self.root)
        return max(TIMEOUT_FACTOR * budget, budget + MIN_TIMEOUT_MARGIN_S)

    def submit(self, description: str, timeout_seconds: float | None = None, source: bytes | None = None,
               parent_note: str = "", replacing: int | None = None, rerun_of: int | None = None,
               data_order: int = 0) -> dict:
        """Queues a candidate: train.py from the working tree (or `source`) on top of the kept
        commit. Returns its state entry; it starts as soon as a slot is free. `replacing`: an
        undecided run that this one supersedes (not counted against the slots). `rerun_of`: an
        undecided run this one re-measures (a control or a confirmation): not counted either, and
        its discard never touches train.py. `data_order`: another stretch of the training data
        (a rerun's; 0 is the usual one; local slots only)."""
        replacing = rerun_of if rerun_of is not None else replacing
        description = ledger.validate_description(description)
        if timeout_seconds is not None and not (isinstance(timeout_seconds, (int, float))
                                                and 0 < timeout_seconds <= MAX_TIMEOUT_S):
            raise Refusal(f"timeout_seconds must be between 0 and {MAX_TIMEOUT_S:.0f} (one day).")
        self._require_owner()
        self._require_sandbox()
        try:
            self.run_command()  # found once, outside the state lock: the first sync can take minutes
        except (OSError, subprocess.SubprocessError) as exc:
            raise Refusal(f"{exc}. Fix the environment (`uv sync` in {self.root}), then retry.") from None
        with self.state.transaction() as state:
            self._research_state(state)
            over = self.ended(state)
            if over:
                raise Refusal(f"The research run has ended ({over}): no new runs. Decide any result still pending "
                              "(status()), then stop; setup(tag) starts a new research run.")
            undecided = [e for e in self.runs_of(state, *UNDECIDED) if e["run"] != replacing]
            if len(undecided) >= self.slots:
                raise Refusal(self._decide_first(undecided))
            kept = state["kept_commit"]
            if source is None:
                source = self._checked_working_train(state)
            self._check_branch_holds_best(state)
            self._check_prepared_cache(state)
            n = state.get("seq", 0) + 1
            commit = self._new_candidate(n, kept, source, description, parent_note)
            entry = {"run": n, "commit": commit, "parent": kept, "description": description, "status": "queued",
                     "verifies": integrity.supports_export(self.ws, commit),
                     "timeout": float(timeout_seconds or self.default_timeout()), "submitted_at": time.time(),
                     "log": f"{RUNS_DIR}/{run_name(n, commit)}.log",
                     "report": f"{RUNS_DIR}/{run_name(n, commit)}.report.json"}
            if rerun_of is not None:
                entry["rerun_of"] = rerun_of
            if data_order:
                entry["data_order"] = data_order
            state.setdefault("runs", {})[str(n)] = entry
            state["seq"] = n
            self.event(n)
        self._dispatch()
        return self.entry(n) or entry

    def _require_sandbox(self) -> None:
        """No run without a sandbox unless the user asked for it (a cluster's nodes check their own)."""
        if self.make_executor is None and not self.unsandboxed and sandbox.usable()[0] is None:
            raise Refusal(sandbox.missing())

    def runs_unsandboxed(self) -> str | None:
        """Why this server's runs go without a sandbox (the user opted in, and none runs here), or None."""
        if self.make_executor is None and self.unsandboxed and sandbox.usable()[0] is None:
            return f"runs here are unsandboxed (--unsandboxed; {sandbox.usable()[2]}): {sandbox.RISK}"
        return None

    def _unsandboxed_marker(self, entry: dict) -> str:
        """The row's word for a run without a sandbox: this server's own knowledge first (such a run
        could have rewritten the state and its report), then the run's record."""
        return sandbox.MARKER if self.runs_unsandboxed() else unsandboxed_marker(entry)

    def _decide_first(self, undecided: list[dict]) -> str:
        if len(undecided) == 1:
            e = undecided[0]
            if e["status"] == "interrupted":
                return f"Unresolved {self._interrupted_note(e)} before the next run."
            return (f"Run {e['run']} ({e['commit'][:7]}, {e['result']['status']}) is not resolved yet: "
                    "call keep() or discard() first.")
        runs = ", ".join(str(e["run"]) for e in undecided)
        return (f"{len(undecided)} results are not decided yet (runs {runs}), as many as there are slots: "
                "keep(run=N) or discard(run=N) first.")

    def _check_prepared_cache(self, state: dict) -> None:
        recorded = state.get("cache_fingerprint")
        if recorded and integrity.cache_fingerprint() != recorded:
            raise Refusal(f"The prepared data, tokenizer or their record in {cache_dir()} changed since setup "
                          "(prepared.json edited, a shard added or removed?): every run of a research run must see "
                          "the same harness. Restore the cache, or prepare it again and call setup(tag) for a new run.")

    def _checked_working_train(self, state: dict) -> bytes:
        kept = state["kept_commit"]
        hidden = integrity.hidden_index_changes(self.ws)
        if hidden:
            raise Refusal(f"git is told not to look at changes to {', '.join(hidden[:5])} (assume-unchanged or "
                          "skip-worktree), so a diff would not show them: `git update-index --no-assume-unchanged "
                          "--no-skip-worktree <file>`, then retry.")
        offenders = [p for p in self.ws.changed_since(kept) if p != EDITABLE]
        if offenders:
            raise Refusal(f"Only train.py may change, but these differ from the last kept commit "
                          f"{kept[:7]}: {', '.join(offenders)}. Revert them (git checkout {kept[:7]} -- <file>).")
        if self.ws.fingerprint(kept) != state["fingerprint"]:
            raise Refusal("The harness (tracked files other than train.py) changed since setup: "
                          f"git reset to {kept[:7]}'s harness, or call setup(tag) for a new research run.")
        if not self.ws.train_is_regular_file():
            raise Refusal("train.py is not a regular file (a symlink or missing): write the code into "
                          f"train.py itself (git checkout {kept[:7]} -- train.py restores it).")
        return self.ws.working_train()

    def _new_candidate(self, n: int, parent: str, source: bytes, description: str, parent_note: str) -> str:
        """The run's commit, under its own ref; its 7-character hash differs from every logged row's
        and every undecided run's, so each run has its own identity in results.tsv."""
        taken = {r.commit for r in self.rows()}
        taken |= {e["commit"][:7] for e in (self.state.load().get("runs") or {}).values()}
        message = f"{description}\n\n{parent_note}Research-Loop-Run: {n}"
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            suffix = f"\nResearch-Loop-Attempt: {attempt}" if attempt else ""
            commit = self.ws.create_candidate(parent, source, message + suffix, f"{RUN_REF_PREFIX}{n}")
            if commit[:7] not in taken:
                return commit
        raise Refusal("Could not give this run a commit hash distinct from the ledger's; retry.")

    def _dispatch(self) -> None:
        """Starts queued runs, oldest first, while slots are free."""
        if self.closing or not self.state.owned:
            return
        while True:
            with self.state.transaction() as state:
                queued = self.runs_of(state, "queued")
                if not queued or self.pool.free() == 0:
                    return
                entry = queued[0]
                try:
                    extras = []
                    if self.make_executor is None:  # a cluster's node makes its own (mcp_server/node.py)
                        harness = integrity.harness_copy(self.ws, entry["parent"], state["fingerprint"]) \
                            if entry.get("verifies") else None
                        extras = integrity.worker_args(self.ws, self.root, entry["run"], entry["commit"],
                                                       entry["timeout"], harness,
                                                       self.ws.worktree_head(harness) if harness else "",
                                                       self.pool.capacity, entry.get("data_order", 0))
                    spec = RunSpec(run=entry["run"], commit=entry["commit"], command=self.run_command(),
                                   timeout=entry["timeout"], log=self.root / entry["log"],
                                   report=self.root / entry["report"], worker_args=extras,
                                   after_seconds=integrity.evaluation_allowance(entry),
                                   unsandboxed=self.unsandboxed)
                    slot = self.pool.start(spec, self._on_done)
                except (Refusal, git.GitCommandError, OSError, subprocess.SubprocessError) as exc:
                    entry["status"] = "pending"
                    entry["result"] = self._unrecordable(entry, f"the run could not start: {exc}").model_dump()
                    self._finished(entry["run"])
                    continue
                entry.update(status="running", slot=slot, started_at=time.time(), server_pid=os.getpid(),
                             **self.pool.worker_record(entry["run"]))
                if self.runs_unsandboxed():
                    entry["unsandboxed"] = True  # for status and the dashboard while it runs

    def run_command(self) -> list[str]:
        """What a slot runs. The default, upstream's `uv run train.py`, becomes the workspace
        environment's own interpreter, found (and the environment synced) once per server: every
        slot then shares that one environment, and no run has to write to it. A cluster's nodes
        get the command as it is: each node syncs its own environment (mcp_server/node.py)."""
        if self.train_command != DEFAULT_TRAIN_COMMAND or self.make_executor is not None:
            return self.train_command
        if self._python is None:
            for sync in ([], ["--no-sync"])[::-1]:  # the environment as it is, else synced
                found = subprocess.run(["uv", "run", "--project", str(self.root), *sync, "python", "-c",
                                        ENV_PROBE], cwd=self.root, capture_output=True,
                                       text=True, env=training_env(self.root), timeout=ENV_SYNC_TIMEOUT_S)
                if found.returncode == 0:
                    python, site_packages = found.stdout.strip().splitlines()[-2:]
                    compile_bytecode(python, site_packages)
                    self._python = python
                    break
            else:
                raise OSError(f"`uv run` could not prepare the workspace's environment: "
                              f"{found.stderr.strip()[-500:]}")
        return [self._python, "train.py"]

    def _on_done(self, run: int, outcome) -> None:
        """On the executor's thread once the run is over: parse, record, make it pending."""
        try:
            with self.state.transaction() as state:
                entry = (state.get("runs") or {}).get(str(run))
                if entry is None or entry["status"] != "running":
                    return  # cancelled meanwhile: already decided
                entry["ended_at"] = time.time()
                try:
                    result = self._record(entry, outcome.report, outcome.slot)
                except Exception as exc:  # disk full, log deleted...: still a result the agent can discard
                    result = self._unrecordable(entry, f"the server could not record this run: "
                                                       f"{type(exc).__name__}: {exc}")
                entry.update(status="pending", result=result.model_dump())
                self._file_measurement(state, entry, result)
        finally:
            try:
                self._dispatch()  # the next queued run takes the slot before anyone hears of this one
            finally:
                self._finished(run)

    def _unrecordable(self, entry: dict, why: str) -> RunResult:
        return RunResult(run=entry["run"], commit=entry["commit"][:7], description=entry["description"],
                         status="crash", parent=entry["parent"][:7], log=entry["log"], tail=why,
                         next="discard(), then fix the cause")

    def _record(self, entry: dict, report: dict | None, slot: str | None, note: str | None = None) -> RunResult:
        """The run's result from its log and its worker's report, written beside the log and
        copied to run.log (upstream's name for the latest run's log)."""
        log = self.root / entry["log"]
        text = logparse.read_tail_bytes(log, LOG_TAIL_BYTES) if log.exists() else ""
        result = self._result(entry, text, report, slot)
        if note:
            result.warnings = (result.warnings or []) + [note]
        shutil.rmtree(self.root / integrity.EXPORTS_DIR / str(entry["run"]), ignore_errors=True)  # the model: large
        self._write_record(entry, result)
        if log.exists():
            shutil.copyfile(log, self.root / RUN_LOG)
        return result

    def _write_record(self, entry: dict, result: RunResult, decision: dict | None = None) -> None:
        """runs/<n>-<commit>.json: the result, where and how the run ran, and once decided, the
        decision and what the run changed in train.py (for history)."""
        path = self.root / entry["log"].removesuffix(".log")
        report = read_report(self.root / entry["report"]) or {}
        record = {"result": result.model_dump(exclude_none=True),
                  "run": {k: entry.get(k) for k in ("run", "commit", "parent", "description", "slot", "submitted_at",
                                                     "started_at", "ended_at", "timeout")}
                  | {k: report.get(k) for k in ("host", "device", "wall_seconds")}}
        if decision:
            try:
                decision["changes"] = history.describe_change(
                    self.ws.train_at(entry["parent"]).decode(errors="replace"),
                    self.ws.train_at(entry["commit"]).decode(errors="replace"))
            except (git.GitCommandError, ValueError, KeyError):
                pass
            record["decision"] = decision
        tmp = path.with_name(path.name + ".json.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path.with_name(path.name + ".json"))
        except OSError:
            if not decision:
                raise
            # a decision is in the ledger already; its copy in runs/ is a convenience



    def _result(self, entry: dict, text: str, report: dict | None, slot: str | None) -> RunResult:
        summary = logparse.parse_summary(text)
        result = RunResult(run=entry["run"], commit=entry["commit"][:7], description=entry["description"],
                           status="crash", parent=entry["parent"][:7], slot=slot, log=entry["log"],
                           timeout_seconds=entry["timeout"], next="")
        if summary is not None:
            for key in ("training_seconds", "timed_seconds", "total_seconds", "eval_seconds", "num_steps",
                        "compile_seconds", "compile_cache", "recompiles", "budget_clock", "mfu_percent"):
                setattr(result, key, getattr(summary, key))
        report = report or {}
        result.exit_code = report.get("exit_code")
        result.wall_seconds = report.get("wall_seconds")
        result.warnings = worker_warnings(report) or None
        if report.get("sandbox") is False or self.runs_unsandboxed():
            result.unsandboxed = sandbox.RUN_NOTE
        if self._pool is not None and self._pool.split_cpu:
            result.warnings = (result.warnings or []) + [
                f"{self.slots} slots share this machine's CPUs, so each run trains on a part of them: "
                "compare only with runs made with the same number of slots"]
        problem = None
        if not report:
            problem = "the run's worker left no report (killed from outside?)"
        elif report.get("timed_out"):
            result.status = "timeout"
            problem = f"killed after the {entry['timeout']:.0f}s timeout"
        elif report.get("stopped"):
            problem = f"stopped: {report['stopped']}"
        elif report.get("exit_code") != 0:
            problem = None  # the log's tail says why
        elif logparse.failed(text):
            problem = None
        elif summary is None:
            problem = "the run exited 0 but printed no summary block (val_bpb: ...)"
        else:
            problem, value = self._measured(entry, summary, report, result, text)
            if problem is None:
                problem = self._invalid(entry, value, summary)
            if problem is None:
                result.status = "ok"
        if result.status != "ok":
            result.tail = ((f"[{problem}]\n" if problem else "") + logparse.tail(text)).strip()
            result.next = (f"read the tail; discard() logs a crash and restores train.py (the code stays in "
                           f"commit {entry['commit'][:7]}); then fix and rerun")
            return result
        result.val_bpb = value
        result.memory_gb = round((summary.peak_vram_mb or 0.0) / 1024, 1)
        result.device = report.get("device")
        base = self._kept_row(entry["parent"])
        if base:
            result.best_val_bpb, result.best_commit = base.val_bpb, base.commit
            base_device = self._device_of(entry["parent"])
            if result.device and base_device and base_device != result.device:
                # another GPU model gives another val_bpb for the same code: no silent delta
                result.noise = f"not compared: measured on {result.device}, the best {base.commit} on {base_device}"
                result.warnings = (result.warnings or []) + [
                    f"{result.noise}; results on different GPU models are not comparable: keep the research run "
                    "on one GPU model (a SLURM --constraint, a Ray node label), or judge this one by hand"]
            else:
                result.delta = round(value - base.val_bpb, 6)
                self._compare_throughput(result, summary, base.commit)
        state = self.state.load()
        estimate = noise.for_device(state, result.device)
        if result.noise is None:  # naming the model only matters once estimates are kept per model
            result.noise = noise.verdict(result.delta, estimate, result.device if state.get("noise_by_device") else None)
        result.next = "keep() if it is better beyond noise, else discard()"
        if result.delta is None and base and result.noise.startswith("not compared"):
            result.next = (f"not comparable with the best: rerun it on {base_device} (reapply), or keep() or "
                           "discard() on your own judgement")
            return result
        result.confirm_first = self.confirmation_needed(result.model_dump(), estimate)
        if result.confirm_first:
            result.next = (f"confirm(run={entry['run']}) before keep ({result.confirm_first}); "
                           "or discard() if the gain does not matter")
        return result

    def _measured(self, entry: dict, summary, report: dict, result: RunResult,
                  text: str) -> tuple[str | None, float | None]:
        """(why the run is no result, or None; the val_bpb the ledger gets). The harness's own
        evaluation of the exported model where the harness has one, else train.py's number, marked."""
        last = logparse.last_progress(text)
        problem = integrity.time_problem(summary, report, time_budget(self.root),
                                         last.dt_ms / 1000 if last and last.dt_ms else None)
        if problem:
            return problem, None
        if not entry.get("verifies"):
            result.integrity = "this harness does not export its model: val_bpb is the one train.py printed"
            return None, summary.val_bpb
        problem, value, note = integrity.evaluation_verdict(report)
        rate = report.get("flops_per_budget_second") or (prepared_info() or {}).get("flops_per_budget_second")
        problem = problem or integrity.flops_problem(summary, report.get("evaluation") or {}, rate,
                                                     time_budget(self.root))  # a cluster node's rate is its own
        result.integrity = note
        if problem:
            return f"not a result: {problem}", None
        result.verified = value is not None
        if value is None:
            return None, summary.val_bpb
        if summary.val_bpb is not None and abs(summary.val_bpb - value) > 1e-3 * max(value, 1.0):
            result.warnings = (result.warnings or []) + [
                f"train.py printed val_bpb {summary.val_bpb:.6f}; the harness measured {value:.6f}, which is recorded"]
        return None, value

    def _compare_throughput(self, result: RunResult, summary, best_commit: str) -> None:
        """Steps and MFU beside the best's run's: a val_bpb delta between runs that trained at
        different speeds may be the machine's, not the change's."""
        timed = summary.timed_seconds or summary.training_seconds
        if summary.total_tokens_M and timed:
            result.tokens_per_second = round(summary.total_tokens_M * 1e6 / timed)
        best = self._record_of(best_commit).get("result")
        if not isinstance(best, dict) or not best.get("mfu_percent") or not summary.mfu_percent:
            return
        result.best_num_steps, result.best_mfu_percent = best.get("num_steps"), best["mfu_percent"]
        if best.get("budget_clock") != summary.budget_clock:
            result.comparable = False
            why = (f"this run's budget was on the {summary.budget_clock or 'wall'} clock, the best's on the "
                   f"{best.get('budget_clock') or 'wall'} clock")
        elif summary.budget_clock == "flops":
            result.comparable = True  # the same FLOPs whatever the machine's speed: MFU is the code's business
        else:
            change = summary.mfu_percent / best["mfu_percent"] - 1
            result.comparable = abs(change) <= THROUGHPUT_TOLERANCE
            why = (f"this run trained at {abs(change):.0%} {'higher' if change > 0 else 'lower'} MFU than the best's "
                   f"({summary.mfu_percent:.2f}% vs {best['mfu_percent']:.2f}%, {summary.num_steps} vs "
                   f"{best.get('num_steps')} steps)")
        if not result.comparable:
            result.warnings = (result.warnings or []) + [
                f"not comparable: {why}. Unless the change itself explains it (a faster or slower model), the "
                "machine's speed changed: rerun the best beside it (measure_noise) before believing the delta"]

    @staticmethod
    def _invalid(entry: dict, value, summary) -> str | None:
        """Why a summary cannot be a result: every ok result must make a valid ledger row."""
        memory = (summary.peak_vram_mb or 0.0) / 1024
        try:
            ledger.make_row(entry["commit"][:7], value, round(memory, 1) if math.isfinite(memory) else memory,
                            "keep", entry["description"])
        except Refusal as exc:
            return f"the summary is not a valid result: {exc}"
        return None

    def _record_of(self, commit: str) -> dict:
        """The record of the run that measured a commit (found by its file name), or {}."""
        runs = self.root / RUNS_DIR
        for path in runs.glob(f"[0-9]*-{commit[:7]}.json") if runs.is_dir() else ():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                return {}
            return record if isinstance(record, dict) else {}
        return {}

    def _device_of(self, commit: str) -> str | None:
        """The GPU model (or CPU) that measured a commit, from its run's record."""
        run = self._record_of(commit).get("run")
        return run.get("device") if isinstance(run, dict) else None

    def _kept_row(self, commit: str) -> Row | None:
        """The ledger row of a kept commit (the base a candidate is compared with)."""
        for row in reversed(self.rows()):
            if row.status == "keep" and row.commit == commit[:7]:
                return row
        return None

    def entry(self, run: int) -> dict | None:
        return (self.state.load().get("runs") or {}).get(str(run))

    def answer_for(self, run: int) -> RunResult:
        """What run_experiment answers about a run: its result once it has one, else where it is."""
        state = self.state.load()
        entry = (state.get("runs") or {}).get(str(run))
        if entry is None:
            record = self._read_record(run)
            if record:
                return RunResult(**record["result"])
            raise Refusal(f"Run {run} is not known here (status() lists the runs in flight).")
        return self._result_of(state, entry)

    def _result_of(self, state: dict, entry: dict) -> RunResult:
        if entry.get("result"):
            return RunResult(**entry["result"])
        run = entry["run"]
        if entry["status"] == "interrupted":
            return RunResult(run=run, commit=entry["commit"][:7], description=entry["description"],
                             status="interrupted", parent=entry["parent"][:7], log=entry["log"],
                             next="discard() logs it as a crash")
        queued = self.runs_of(state, "queued")
        position = next((i + 1 for i, e in enumerate(queued) if e["run"] == run), None)
        return RunResult(run=run, commit=entry["commit"][:7], description=entry["description"],
                         status=entry["status"], parent=entry["parent"][:7], slot=entry.get("slot"),
                         queue_position=position, timeout_seconds=entry["timeout"], log=entry["log"],
                         next="wait() for its result (read_metrics() shows progress); then keep() or discard()")

    def _read_record(self, run: int) -> dict | None:
        runs = self.root / RUNS_DIR
        for path in runs.glob(f"{run:04d}-*.json") if runs.is_dir() else ():
            if not path.name.endswith(".report.json"):
                try:
                    return json.loads(path.read_text())
                except (OSError, ValueError):
                    return None
        return None

    # --- decisions -------------------------------------------------------------------
    def _undecided(self, state: dict, run: int | None, verb: str) -> dict:
        runs = state.get("runs") or {}
        if run is None:
            undecided = self.runs_of(state, *UNDECIDED)
            if len(undecided) == 1:
                return undecided[0]
            if len(undecided) > 1:
                listed = ", ".join(f"{e['run']} ({e['status'] if e['status'] == 'interrupted' else e['result']['status']})"
                                   for e in undecided)
                raise Refusal(f"Several results wait for a decision (runs {listed}): {verb}(run=N) for each.")
            in_flight = self.runs_of(state, *IN_FLIGHT)
            if in_flight:
                raise Refusal(f"No result yet: run {in_flight[0]['run']} is {in_flight[0]['status']}. wait() for it "
                              f"(read_metrics() shows progress), then {verb}().")
            raise Refusal(f"Nothing to {verb}: no pending result. Call run_experiment(description) first.")
        if isinstance(run, bool) or not isinstance(run, int):
            raise Refusal(f"run must be a run number (status() lists them), got {run!r}.")
        entry = runs.get(str(run))
        if entry is None:
            record = self._read_record(run)
            if record and record.get("decision"):
                raise Refusal(f"Run {run} is already decided ({record['decision'].get('status')} row in "
                              f"{ledger.LEDGER_NAME}); each run is logged once.")
            raise Refusal(f"There is no undecided run {run}: status() lists the runs in flight and pending.")
        if entry["status"] in IN_FLIGHT:
            raise Refusal(f"Run {run} is still {entry['status']}: wait() for its result, or cancel(run={run}).")
        return entry

    def keep(self, note: str | None = None, run: int | None = None, unverified: bool = False,
             unconfirmed: bool = False) -> DecisionResult:
        note = self._checked_note(note, "note")
        self._require_owner()
        with self.state.transaction() as state:
            self._research_state(state)
            entry = self._undecided(state, run, "keep")
            if entry["status"] == "interrupted":
                raise Refusal(f"{self._interrupted_note(entry)}; it has no result to keep.")
            result = entry["result"]
            if result["status"] != "ok":
                raise Refusal(f"Run {entry['run']} ended with {result['status']}, so it cannot be kept: "
                              "discard() logs it as a crash; fix train.py and rerun.")
            if result.get("verified") is False and not unverified:
                raise Refusal(f"Run {entry['run']}'s val_bpb is train.py's own, not the harness's ({result.get('integrity')}): "
                              f"keep(run={entry['run']}, unverified=true) keeps it anyway; or discard it.")
            evidence = self._keep_evidence(entry, state.get("noise"), unconfirmed)
            kept = state["kept_commit"]
            if entry["parent"] != kept:
                raise Refusal(f"Run {entry['run']} was measured on {entry['parent'][:7]}, but {kept[:7]} has been kept "
                              "since: its gain was not measured on the current best, and an untested combination "
                              f"never becomes the best. reapply(run={entry['run']}) re-applies its change onto "
                              f"{kept[:7]} as a new run (or discard(run={entry['run']})).")
            tip = self.ws.branch_tip(state["branch"])
            if tip != entry["commit"]:  # a retried keep finds the branch already advanced
                self._check_branch_holds_best(state)
            row = ledger.make_row(entry["commit"][:7], result["val_bpb"], result["memory_gb"] or 0.0, "keep",
                                  self._described(entry["description"], note, self._unsandboxed_marker(entry) +
                                                  (UNVERIFIED_MARKER if result.get("verified") is False else "")))
            self._append_once(state, row)
            if tip != entry["commit"]:
                self.ws.advance_branch(state["branch"], entry["commit"], kept)
            state["kept_commit"] = entry["commit"]
            del state["runs"][str(entry["run"])]
            self._write_record(entry, RunResult(**result), {"status": "keep", "at": time.time(), "evidence": evidence})
        note_out = None
        if self.ws.branch() == state["branch"] and self.ws.working_train() != self.ws.train_at(entry["commit"]):
            note_out = (f"your train.py differs from the new best {entry['commit'][:7]} (`git diff` shows how): "
                        "build the next idea on the kept code")
        best = self._kept_row(entry["commit"])
        return DecisionResult(row=row, branch=state["branch"], kept_commit=entry["commit"][:7],
                              best_val_bpb=best.val_bpb if best else None, evidence=evidence, note=note_out,
                              warning=self._worse_warning(entry),
                              unsandboxed=sandbox.RUN_NOTE if self._unsandboxed_marker(entry) else None)

    @staticmethod
    def _worse_warning(entry: dict) -> str | None:
        """A keep of a worse result is the agent's call (equal or worse code may be simpler), never a silent one."""
        result = entry["result"]
        if result.get("delta") is None or result["delta"] <= 0:
            return None
        return (f"run {entry['run']} ({result['val_bpb']:.6f}) is worse than the best it replaced "
                f"({result['best_val_bpb']:.6f}, +{result['delta']:.6f}): the branch now holds the worse result, and "
                "the next runs are compared with it. Keep only what improves val_bpb (or equals it with simpler "
                "code); to go back, restore the better train.py from git and run it again.")

    # --- confirmation: a marginal or incomparable gain against a contemporaneous control ----
    @staticmethod
    def confirmation_needed(result: dict, noise: dict | None) -> str | None:
        """Why a gain must be re-measured beside the best before it is kept, or None."""
        delta = result.get("delta")
        if delta is None or delta >= 0:
            return None
        if result.get("comparable") is False:
            return "it trained at a different speed than the best's run, so the machine may explain the gain"
        if noise and -delta <= CONFIRM_WIDTHS * noise["threshold"]:
            return (f"its gain {-delta:.6f} is within {CONFIRM_WIDTHS:g} noise thresholds "
                    f"({CONFIRM_WIDTHS * noise['threshold']:.6f})")
        return None

    def _keep_evidence(self, entry: dict, noise: dict | None, unconfirmed: bool) -> str:
        result, n = entry["result"], entry["run"]
        confirmation = entry.get("confirmation")
        if confirmation:
            deltas = ", ".join(f"{d:+.6f}" for d in confirmation["paired_deltas"]) or "none finished"
            if confirmation["confirmed"]:
                return f"confirmed: rerun beside a rerun of the best, the candidate won each pair ({deltas})"
            if not unconfirmed:
                raise Refusal(f"Run {n}'s gain did not hold beside a rerun of the best (paired deltas {deltas}): "
                              f"discard(run={n}), or keep(run={n}, unconfirmed=true) against that evidence.")
            return f"kept unconfirmed on request, though its confirmation failed ({deltas})"
        need = self.confirmation_needed(result, noise)
        if need and not unconfirmed:
            raise Refusal(f"Run {n} needs confirming before keep: {need}. confirm(run={n}) reruns the best and the "
                          f"candidate, interleaved (2 runs), and keep() then accepts it if the gain holds; "
                          f"keep(run={n}, unconfirmed=true) keeps it as it is.")
        if need:
            return f"kept unconfirmed on request: {need}"
        if result.get("delta") is None:
            return "the first result of the research run"
        if not noise:
            return "noise not measured: measure_noise() tells whether gains like this are real"
        return "beyond the noise" if result["delta"] < 0 else "not better than the best: kept on request"

    def confirmation_plan(self, run: int | None) -> tuple[dict, bytes, bytes]:
        """The undecided ok result to confirm, the best's train.py (the control) and the candidate's."""
        state = self.state.load()
        self._research_state(state)
        entry = self._undecided(state, run, "confirm")
        result = entry.get("result") or {}
        if result.get("status") != "ok":
            raise Refusal(f"Run {entry['run']} has no result to confirm ({result.get('status') or entry['status']}).")
        if entry["parent"] != state["kept_commit"]:
            raise Refusal(f"Run {entry['run']} was measured on {entry['parent'][:7]}, no longer the best: "
                          f"reapply(run={entry['run']}) first.")
        return entry, self.ws.train_at(state["kept_commit"]), self.ws.train_at(entry["commit"])

    def record_confirmation(self, run: int, confirmation: dict, spent: int) -> int:
        """Stores the verdict on the candidate's entry; returns the research run's extra runs so far."""
        with self.state.transaction() as state:
            entry = (state.get("runs") or {}).get(str(run))
            if entry is not None:
                entry["confirmation"] = confirmation
            state["extra_runs"] = state.get("extra_runs", 0) + spent
            return state["extra_runs"]

    def discard(self, reason: str | None = None, run: int | None = None) -> DecisionResult:
        reason = self._checked_note(reason, "reason")
        self._require_owner()
        with self.state.transaction() as state:
            if not state.get("branch"):
                raise Refusal("This workspace is not set up for a research run: call setup(tag) first.")
            entry = self._undecided(state, run, "discard")
            result = entry.get("result") or {}
            if entry["status"] == "interrupted":
                status, val_bpb, memory, suffix = "crash", 0.0, 0.0, " (interrupted)"
            else:
                status = "discard" if result["status"] == "ok" else "crash"
                val_bpb, memory, suffix = result.get("val_bpb") or 0.0, result.get("memory_gb") or 0.0, ""
            description = self._described(entry["description"], reason, suffix + self._unsandboxed_marker(entry))
            row = ledger.make_row(entry["commit"][:7], val_bpb, memory, status, description)
            self._append_once(state, row)  # saved with the state: a failure below records neither
            note = self._restore_train(state, entry)
            del state["runs"][str(entry["run"])]
            self._write_record(entry, self._result_of(state, entry), {"status": status, "at": time.time()})
        best = self._kept_row(state["kept_commit"])
        return DecisionResult(row=row, branch=state["branch"], kept_commit=state["kept_commit"][:7],
                              best_val_bpb=best.val_bpb if best else None, note=note,
                              unsandboxed=sandbox.RUN_NOTE if self._unsandboxed_marker(entry) else None)

    def _restore_train(self, state: dict, entry: dict) -> str | None:
        """train.py back to the kept code, if it still holds the discarded run's code; the agent's
        newer edits are never overwritten."""
        if self.ws.branch() != state["branch"] or not (self.root / EDITABLE).is_file() or "rerun_of" in entry:
            return None
        working = self.ws.working_train()
        if working == self.ws.train_at(state["kept_commit"]):
            return None
        if working == self.ws.train_at(entry["commit"]):
            self.ws.restore_train(state["kept_commit"])
            return None
        return (f"train.py holds edits newer than run {entry['run']}; they were left in place (the discarded code "
                f"stays in commit {entry['commit'][:7]})")

    def _append_once(self, state: dict, row: Row) -> list[Row]:
        """keep/discard retried after a failure past the append (e.g. git) do not log twice."""
        rows = ledger.rows_of(state)
        if any(r.commit == row.commit and r.status == row.status for r in rows):
            return rows
        return ledger.add_row(state, row)

    @staticmethod
    def _checked_note(note: str | None, what: str) -> str | None:
        if note is None or (isinstance(note, str) and not note.strip()):
            return None
        return ledger.validate_description(note, what)

    @staticmethod
    def _described(description: str, note: str | None, marker: str = "") -> str:
        """The row's description: the run's, then a marker such as " (interrupted)", then the agent's
        note; the run's own words are shortened to fit, never the marker."""
        if note:
            marker += f" ({ledger.fit_description(note, limit=MAX_NOTE_CHARS)})"
        return ledger.fit_description(description, marker)

    def cancel(self, run: int) -> CancelResult:
        """A queued run leaves the queue (no row: it never ran); a running one is stopped and logged
        as a crash. Its code stays under its ref either way."""
        if isinstance(run, bool) or not isinstance(run, int):
            raise Refusal(f"run must be a run number (status() lists them), got {run!r}.")
        self._require_owner()
        with self.state.transaction() as state:
            entry = (state.get("runs") or {}).get(str(run))
            if entry is None or entry["status"] not in IN_FLIGHT:
                what = "has a result: keep or discard it" if entry else "is not queued or running (status() lists them)"
                raise Refusal(f"Run {run} {what}.")
            was = entry["status"]
            row = None
            if was == "running":
                row = ledger.make_row(entry["commit"][:7], 0.0, 0.0, "crash",
                                      ledger.fit_description(entry["description"],
                                                             " (cancelled)" + self._unsandboxed_marker(entry)))
                self._append_once(state, row)
                self.pool.cancel(run)
                self._write_record(entry, self._result_of(state, entry), {"status": "crash", "at": time.time()})
            del state["runs"][str(run)]
            self._restore_train(state, entry)
        self._finished(run)
        self._dispatch()
        return CancelResult(run=run, was=was, row=row,
                            note=f"its code stays in commit {entry['commit'][:7]} ({RUN_REF_PREFIX}{run})")

    def ended(self, state: dict) -> str | None:
        return limits.ended(state, [(r.status, r.val_bpb) for r in self.rows()])

    def stop(self, reason: str, now: bool = False) -> StopResult:
        """Ends the research run on purpose: no new runs start. Runs in flight finish and wait for a
        decision, or with now=True are cancelled (running ones are logged as crashes)."""
        reason = ledger.validate_description(reason, "reason")
        self._require_owner()
        with self.state.transaction() as state:
            if not state.get("branch"):
                raise Refusal("No research run is set up, so there is nothing to stop.")
            state["stopped"] = {"reason": reason, "at": time.time()}
            in_flight = [e["run"] for e in self.runs_of(state, *IN_FLIGHT)]
        cancelled = [self.cancel(run).run for run in in_flight] if now else []
        status = self.status()
        return StopResult(stopped=reason, cancelled=cancelled or None, running=status.running,
                          undecided=status.undecided, next=status.next)

    def reapply(self, run: int) -> dict:
        """A stale candidate's change re-applied onto the current best, as a new run; the stale one
        is logged as a discard that names its successor. Check, submit and discard happen in one
        transaction (they nest), so of two calls at once the second finds the run decided and
        changes nothing."""
        self._require_owner()
        with self.state.transaction() as state:
            self._research_state(state)
            entry = self._undecided(state, run, "reapply")
            kept = state["kept_commit"]
            if entry["parent"] == kept:
                raise Refusal(f"Run {run} was measured on the current best {kept[:7]}: keep(run={run}) or "
                              f"discard(run={run}); there is nothing to re-apply.")
            merged = self.ws.merged_train(entry["parent"], entry["commit"], kept)
            if merged is None:
                raise Refusal(f"Run {run}'s change to train.py conflicts with what was kept since ({kept[:7]}): "
                              f"apply it by hand (git diff {entry['parent'][:7]} {entry['commit'][:7]} -- train.py), "
                              f"then run_experiment; discard(run={run}) logs the stale result.")
            description = ledger.fit_description(entry["description"], f" (re-applied on {kept[:7]})")
            new = self.submit(description, entry["timeout"], source=merged, replacing=run,
                              parent_note=f"Re-applies run {run} ({entry['commit'][:7]}).\n")
            self.discard(f"stale: re-applied as run {new['run']}", run=run)
        return new

    def log_result(self, commit: str, val_bpb: float, memory_gb: float, status: str,
                   description: str) -> LoggedRow:
        commit = validate_commit_arg(commit)
        row = ledger.make_row(commit[:7], val_bpb, memory_gb, status, description)
        full = self.ws.resolve_commit(commit)
        if full is None:
            raise Refusal(f"Commit {commit} does not exist in this repository: pass the hash of the "
                          "commit that was trained (git log --oneline).")
        self._require_owner()
        with self.state.transaction() as state:
            mine = [e for e in (state.get("runs") or {}).values() if e["commit"] == full]
            refs = self.ws.repo.git.for_each_ref("--format=%(refname)", "--points-at", full, RUN_REF_PREFIX)
            if mine or refs:
                number = mine[0]["run"] if mine else refs.splitlines()[0].rsplit("/", 1)[-1]
                raise Refusal(f"Commit {full[:7]} is run {number} of this server: its result is recorded by "
                              "keep() or discard(), not log_result.")
            branch = state.get("branch")
            tip = self.ws.branch_tip(branch) if branch else None
            for protected in PROTECTED_BRANCHES:
                protected_tip = self.ws.branch_tip(protected)
                if status == "keep" and protected_tip and self.ws.is_ancestor(full, protected_tip):
                    raise Refusal(f"Commit {full[:7]} is on {protected}: only a research branch's commits can be kept.")
            if status == "keep":
                self._check_external_keep(state, full, tip)
            elif tip and self.ws.is_ancestor(full, tip):
                raise Refusal(f"Commit {full[:7]} is on {branch}, whose commits are the kept ones: a {status} row for "
                              "it would contradict the branch.")
            rows = ledger.add_row(state, row)  # in the server's records: results.tsv is written from them
            if status == "keep":
                state["kept_commit"] = full
        return LoggedRow(row=row, rows_in_ledger=len(rows))

    def _check_external_keep(self, state: dict, full: str, tip: str | None) -> None:
        """A keep row logged by hand must leave the ledger and the branch agreeing: the commit is
        the research branch's tip, on top of the kept commit, with only train.py changed."""
        if not state.get("branch"):
            raise Refusal("No research run is set up: setup(tag) first, so a kept commit has a branch to be on.")
        kept = state["kept_commit"]
        if full != tip or not self.ws.is_ancestor(kept, full):
            raise Refusal(f"A keep row must be for the tip of {state['branch']}, on top of the kept commit "
                          f"{kept[:7]}; {full[:7]} is not. Log it as discard or crash, or commit it on the branch first.")
        changed = [p for p in self.ws.repo.git.diff("--name-only", kept, full).splitlines() if p != EDITABLE]
        if changed:
            raise Refusal(f"Commit {full[:7]} changes {', '.join(changed)}, not only train.py: it cannot be kept.")

    # --- reading ---------------------------------------------------------------------
    def read_metrics(self, run: str | None = None) -> Metrics:
        if run is None:
            state = self.state.load()
            in_flight = self.runs_of(state, *IN_FLIGHT)
            if in_flight:
                return self._live_metrics(in_flight)
            return self._metrics_of(self.root / RUN_LOG, RUN_LOG, self._result_of_run_log(state))
        path = self._find_run_log(run)
        record_path = path.with_suffix(".json")
        try:
            meta = json.loads(record_path.read_text())["result"]
        except (OSError, ValueError, KeyError):
            meta = None
        return self._metrics_of(path, f"{RUNS_DIR}/{path.name}", meta)

    def live(self, entry: dict) -> LiveRun:
        progress = None
        if entry["status"] == "running":
            log = self.root / entry["log"]
            progress = logparse.last_progress(logparse.read_tail_bytes(log)) if log.exists() else None
        started = entry.get("started_at")
        return LiveRun(run=entry["run"], commit=entry["commit"][:7], description=entry["description"],
                       status=entry["status"], slot=entry.get("slot"), progress=progress,
                       elapsed_s=int(time.time() - started) if started else None, timeout_s=int(entry["timeout"]))

    def _live_metrics(self, in_flight: list[dict]) -> Metrics:
        live = [self.live(e) for e in in_flight]
        first = next((r for r in live if r.status == "running"), live[0])
        note = f"run {first.run} ({first.commit}) {first.description}: {first.status}"
        if first.elapsed_s is not None:
            note += f", {first.elapsed_s}s of at most {first.timeout_s}s"
        return Metrics(source=in_flight[0]["log"], status="running", progress=first.progress,
                       runs=live if len(live) > 1 else None, note=note,
                       unsandboxed=sandbox.RUN_NOTE if any(map(unsandboxed_marker, in_flight)) else None)

    def _metrics_of(self, path: Path, source: str, meta: dict | None) -> Metrics:
        if not path.exists():
            return Metrics(source=source, status="missing", note=self._interrupted_summary() or
                           "no run log yet: call run_experiment(description)")
        text = logparse.read_tail_bytes(path, LOG_TAIL_BYTES)
        if not text.strip():
            return Metrics(source=source, status="empty", note="the log is empty: the run printed nothing")
        summary = logparse.parse_summary(text)
        status = meta["status"] if meta else ("ok" if summary and not logparse.failed(text) else "crash")
        metrics = Metrics(source=source, status=status, summary=summary,
                          progress=logparse.last_progress(text[-logparse.TAIL_BYTES_FOR_PROGRESS:]),
                          note=self._interrupted_summary(), unsandboxed=(meta or {}).get("unsandboxed"))
        if status != "ok":
            metrics.tail = (meta or {}).get("tail") or logparse.tail(text)
        return metrics

    def _result_of_run_log(self, state: dict) -> dict | None:
        """The recorded result of the run whose log run.log is a copy of, if it still is."""
        runs = self.root / RUNS_DIR
        run_log = self.root / RUN_LOG
        if not runs.is_dir() or not run_log.exists():
            return None
        size = run_log.stat().st_size
        for log in sorted(runs.glob("*.log"), reverse=True)[:50]:
            if log.stat().st_size == size and _same_bytes(log, run_log):
                try:
                    return json.loads(log.with_suffix(".json").read_text())["result"]
                except (OSError, ValueError, KeyError):
                    return None
        return None

    def _find_run_log(self, run: str) -> Path:
        run = run.strip() if isinstance(run, str) else str(run)
        if not RUN_ARG_RE.fullmatch(run):
            raise Refusal(f"Run {run!r} is not a run number or a commit hash (see status()).")
        runs = self.root / RUNS_DIR
        logs = sorted(runs.glob("*.log")) if runs.is_dir() else []
        for log in logs:
            seq, _, commit = log.stem.partition("-")
            if len(run) < 7 and seq.isdigit() and int(seq) == int(run):
                return log
            if len(run) >= 7 and commit.startswith(run[:7].lower()):
                return log
        raise Refusal(f"No log for run {run!r} in {RUNS_DIR}/: pass a run number or a 7+ character "
                      "commit from status() or results.tsv.")

    def _interrupted_note(self, entry: dict) -> str:
        return (f"interrupted run {entry['commit'][:7]} ({entry['description']}) has no ledger row: call "
                f"discard({'' if self.slots == 1 else 'run=' + str(entry['run'])}) to log it as a crash")

    def _interrupted_summary(self, state: dict | None = None) -> str | None:
        state = state if state is not None else self.state.load()
        notes = [self._interrupted_note(e) for e in self.runs_of(state, "interrupted")]
        return "; ".join(notes) or None

    def status(self) -> StatusResult:
        state = self.state.load()
        rows, bad = ledger.rows_of(state), ledger.read_rows(self.ledger_path)[1]
        counts = {s: sum(r.status == s for r in rows) for s in ledger.STATUSES}
        kept = state.get("kept_commit") or ""
        best = self._kept_row(kept) if kept else None
        result = StatusResult(workspace=str(self.root), branch=self.ws.branch(), set_up=bool(state.get("branch")),
                              best_val_bpb=best.val_bpb if best else None, best_commit=best.commit if best else None,
                              kept_commit=kept[:7] or None, counts=counts, slots=self.slots,
                              recent=rows[-RECENT_ROWS:], malformed_ledger_lines=bad,
                              interrupted=self._interrupted_summary(state), extra_runs=state.get("extra_runs", 0),
                              dashboard=self.dashboard, records_changed=self.state.found or None, next="")
        if not self.state.owned and not self.take_over():
            owner = self.state.owner() or {}
            result.read_only = f"server pid {owner.get('pid', '?')} runs this workspace's experiments"
        if state.get("noise"):
            result.noise = NoiseEstimate(**state["noise"])
        running = [self.live(e) for e in self.runs_of(state, "running")]
        if running:
            result.running = "; ".join(f"run {r.run} ({r.commit}) {r.description}"
                                       + (f" on {r.slot}" if r.slot and self.slots > 1 else "")
                                       + (f": {r.elapsed_s}s of at most {r.timeout_s}s" if r.elapsed_s is not None else "")
                                       for r in running)
            result.progress = running[0].progress
        queued = self.runs_of(state, "queued")
        if queued:
            result.queued = ", ".join(f"run {e['run']} ({e['description'][:40]})" for e in queued)
        pending = self.runs_of(state, "pending")
        if pending:
            result.pending = "; ".join(
                f"run {e['run']} ({e['commit'][:7]}) {e['result']['status']}"
                + (f" val_bpb {e['result']['val_bpb']:.6f}" if e["result"].get("val_bpb") is not None else "")
                + (f" measured on {e['parent'][:7]}, not the current best" if e["parent"] != kept else "")
                for e in pending)
        result.undecided = [e["run"] for e in self.runs_of(state, *UNDECIDED)] or None
        unsandboxed = [e["run"] for e in self.runs_of(state, *IN_FLIGHT, *UNDECIDED) if unsandboxed_marker(e)]
        result.unsandboxed = self.runs_unsandboxed() or (
            f"runs {', '.join(map(str, unsandboxed))} ran unsandboxed: {sandbox.RISK}" if unsandboxed else None)
        result.limits = limits.left(state, [(r.status, r.val_bpb) for r in rows])
        result.ended = limits.ended(state, [(r.status, r.val_bpb) for r in rows])
        result.next = self._next_step(state, result)
        return result

    def _next_step(self, state: dict, s: StatusResult) -> str:
        if not s.set_up:
            return "setup(tag)"
        undecided = self.runs_of(state, *UNDECIDED)
        in_flight = self.runs_of(state, *IN_FLIGHT)
        # a bare keep()/discard() is right only while no other run can finish before the call
        single = len(undecided) == 1 and not in_flight
        which = (lambda e: "") if single else (lambda e: f"run={e['run']}")
        for e in undecided:
            if e["status"] == "interrupted":
                return f"discard({which(e)}) to log the interrupted run"
        for e in undecided:
            if e["result"]["status"] != "ok":
                return f"discard({which(e)})"
            if e["parent"] != state["kept_commit"]:
                if self.ws.merged_train(e["parent"], e["commit"], state["kept_commit"]) is None:
                    return (f"discard(run={e['run']}): its change conflicts with what was kept since "
                            "(apply it by hand afterwards if it still matters)")
                return f"reapply(run={e['run']}) or discard(run={e['run']})"
        if undecided:
            return "keep() or discard()" if single else \
                f"keep(run={undecided[0]['run']}) or discard(run={undecided[0]['run']})"
        if s.ended:
            return ("wait: wait() returns the last results, then keep or discard them" if in_flight else
                    f"nothing: the research run has ended ({s.ended}); stop here")
        if in_flight and len(in_flight) >= self.slots:
            return "wait: wait() returns the next result (read_metrics() follows the runs)"
        if not s.counts["keep"] and not in_flight:
            return "run_experiment('baseline') with train.py unchanged"
        if in_flight:
            return f"edit train.py, then run_experiment(description, wait=False) ({self.slots - len(in_flight)} slot(s) free), or wait()"
        return "edit train.py, then run_experiment(description)"

    def history(self, constant: str | None = None, status: str | None = None, limit: int = 30) -> HistoryResult:
        """Every decided run, oldest first, as one line: what it changed and how it did."""
        if status is not None and status not in ledger.STATUSES:
            raise Refusal(f"status must be one of {', '.join(ledger.STATUSES)}, got {status!r}.")
        if not 1 <= limit <= 500:
            raise Refusal("limit must be between 1 and 500.")
        if constant is not None and not history.CONSTANT_NAME.match(constant):
            raise Refusal(f"constant must be an upper-case train.py constant such as MATRIX_LR, got {constant!r}.")
        lines = []
        for record in history.records(self.root / RUNS_DIR):
            decision, result, run = record["decision"], record["result"], record["run"]
            changes = decision.get("changes") or {}
            if constant and constant not in changes.get("constants", {}):
                continue
            if status and decision.get("status") != status:
                continue
            value = f"{result['val_bpb']:.6f}" if result.get("val_bpb") and decision["status"] != "crash" else "-"
            delta = f" ({result['delta']:+.6f})" if result.get("delta") is not None and value != "-" else ""
            lines.append(f"run {run['run']} {result['commit']} {decision['status']} {value}{delta} "
                         f"{history.change_text(changes)} | {result['description']}")
        return HistoryResult(total=len(lines), lines=lines[-limit:])

    # --- repeatable measurements: on the flops clock a rerun is a function of code and data ---
    def _repeatable(self) -> bool:
        """Whether a run's val_bpb depends only on its code and data order, not on when it ran or
        what ran beside it: the flops clock on local slots (a cluster node's speed and data order are
        its own). There, a rerun of the best already measured on a data order stands in for a control."""
        return self.make_executor is None and budget_clock() == "flops"

    def _measurement_shelf(self, state: dict, commit: str) -> str:
        """Where reruns of a commit's train.py are filed: its code, the harness and the slot count
        (slots sharing the CPU train with fewer threads, which changes the arithmetic)."""
        return f"{self.ws.train_blob(commit)} {state.get('fingerprint', '')} {self.slots}"

    def _file_measurement(self, state: dict, entry: dict, result: RunResult) -> None:
        """Files a rerun on another data order (noise repeats, controls, confirmations) for the
        confirmations that need the same code on the same data again."""
        order = entry.get("data_order", 0)
        if not order or result.status != "ok" or result.budget_clock != "flops" or not self._repeatable():
            return
        shelf = state.setdefault("measured", {}).setdefault(self._measurement_shelf(state, entry["commit"]), {})
        shelf[str(order)] = {"val_bpb": result.val_bpb, "run": entry["run"]}

    def _measurements_of(self, state: dict, commit: str) -> dict[int, dict]:
        """{data order: {val_bpb, run}} of the reruns of this commit's code, where the clock makes
        them repeatable; {} elsewhere."""
        if not self._repeatable():
            return {}
        shelf = (state.get("measured") or {}).get(self._measurement_shelf(state, commit)) or {}
        return {int(order): m for order, m in shelf.items()}

    def confirmation_orders(self, entry: dict, pairs: int) -> list[tuple[int, dict | None, dict | None]]:
        """(data order, the best's measurement on it, the candidate's) per pair: first the orders
        the best was already measured on, whose values stand as controls (one run instead of two),
        then fresh ones."""
        state = self.state.load()
        control = self._measurements_of(state, entry["parent"])
        candidate = self._measurements_of(state, entry["commit"])
        orders = sorted(control, reverse=True)[:pairs]
        orders += [self.fresh_data_order() for _ in range(pairs - len(orders))]
        return [(order, control.get(order), candidate.get(order)) for order in orders]

    # --- noise -----------------------------------------------------------------------
    def fresh_data_order(self) -> int:
        """A data order no rerun of this research run has used: each rerun sees new luck."""
        with self.state.transaction() as state:
            state["data_orders"] = state.get("data_orders", 0) + 1
            return state["data_orders"]

    def noise_values_from_kept(self) -> list[float]:
        """The kept commit's own value and, where the clock makes reruns repeatable, its reruns on
        other data orders so far (earlier noise repeats, its confirmation as a candidate)."""
        state = self.state.load()
        kept = state.get("kept_commit", "")
        own = [r.val_bpb for r in self.rows() if r.commit == kept[:7] and r.status == "keep"]
        reruns = self._measurements_of(state, kept) if kept else {}
        return own + [m["val_bpb"] for _, m in sorted(reruns.items())]

    def store_noise(self, values: list[float], spent: int, device: str | None = None) -> NoiseEstimate:
        """The estimate, also kept per GPU model: a result is judged against its own model's noise."""
        estimate = noise.estimate(values)
        with self.state.transaction() as state:
            state["noise"] = estimate.model_dump()
            state["extra_runs"] = state.get("extra_runs", 0) + spent
            if device:
                state.setdefault("noise_by_device", {})[device] = estimate.model_dump()
        return estimate


def unsandboxed_marker(entry: dict) -> str:
    """The ledger row's word for a run that went without a sandbox (the user's opt-in)."""
    ran_unsandboxed = entry.get("unsandboxed") or (entry.get("result") or {}).get("unsandboxed")
    return sandbox.MARKER if ran_unsandboxed else ""


def worker_warnings(report: dict) -> list[str]:
    warnings = []
    if report.get("stray_processes"):
        warnings.append(f"{report['stray_processes']} process(es) started by the run were still running when it "
                        "ended; they were killed")
    if report.get("unkillable"):
        warnings.append(f"{report['unkillable']} process(es) of the run could not be killed")
    if report.get("log_truncated"):
        warnings.append("the log was capped: the middle of its output was dropped")
    return warnings


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 16), fb.read(1 << 16)
            if x != y:
                return False
            if not x:
                return True
