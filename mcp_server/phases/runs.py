"""The loop's core: what every phase of a run uses, and nothing that calls a phase.

LoopCore holds one workspace's research run: its state file and transaction (State), the git
workspace, the executor, the events a waiter blocks on; the rules every phase checks before it
changes anything (set up, on the research branch, the branch holds the best, a sandbox); and the
run records under runs/ and their reading (the kept row a result is compared with, the device
that measured a commit). The phases (submit, dispatch, results, measurements, report, decide) are
modules of functions over a LoopCore; they import this module and the phases below them, never
the other way round. Constants used by more than one phase live here.

An entry of state["runs"] is a run nobody has decided yet: queued, running, pending or interrupted.
"""
import json
import threading
from pathlib import Path

import git

from mcp_server.core import history, ledger, limits, notify
from mcp_server.scripts import sandbox
from mcp_server.executors.executor import LocalPool, default_slots, read_report
from mcp_server.core.models import Refusal, Row, RunResult
from mcp_server.core.state import State
from mcp_server.core.workspace import PROTECTED_BRANCHES, RUNS_DIR, Workspace

MEASURED_ON = ("host", "device", "wall_seconds")  # what a run's record keeps of its worker's report

RUN_LOG = "run.log"
DEFAULT_TRAIN_COMMAND = ["uv", "run", "train.py"]
LOG_TAIL_BYTES = 256 * 1024  # what is parsed of a log: the summary block and a crash's tail live at its end
IN_FLIGHT = ("queued", "running")
UNDECIDED = ("pending", "interrupted")


def run_name(run: int, commit: str) -> str:
    return f"{run:04d}-{commit[:7]}"


def unsandboxed_marker(entry: dict) -> str:
    """The ledger row's word for a run that went without a sandbox (the user's opt-in)."""
    ran_unsandboxed = entry.get("unsandboxed") or (entry.get("result") or {}).get("unsandboxed")
    return sandbox.MARKER if ran_unsandboxed else ""


class LoopCore:
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
        self.measuring: dict[tuple, list[int]] = {}  # the codes a call of confirm or measure_noise measures: its reruns
        self.dashboard: str | None = None  # the dashboard's address, when this server serves it
        self.notifier = notify.Notifier()  # silent unless --notify gives a webhook
        self._ws: Workspace | None = None
        self._pool: LocalPool | None = None
        self.fresh_records: dict[str, str] = {}  # digests of records written, maybe not saved in the state yet
        self._refused: set[str] = set()  # records found changed, told once each
        self.python: str | None = None  # the workspace environment's interpreter, once found
        self.make_executor = executor
        self.settings_told: set[str] = set()  # budget settings of the environment's, told as differing (submit)

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
    def split_cpu(self) -> bool:
        """Whether the slots share this machine's CPUs (each run trains on a part of them)."""
        return self._pool is not None and self._pool.split_cpu

    @property
    def ledger_path(self) -> Path:
        return self.root / ledger.LEDGER_NAME

    def rows(self) -> list[Row]:
        """The server's own rows (results.tsv is written from them, never read back)."""
        return ledger.rows_of(self.state.load())

    def event(self, run: int) -> threading.Event:
        return self.done.setdefault(run, threading.Event())

    def mark_finished(self, run: int) -> None:
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

    def research_state(self, state: dict) -> dict:
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

    def check_branch_holds_best(self, state: dict) -> None:
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

    def shutdown(self) -> None:
        """On server exit: the training must not outlive the server; the next owner recovers."""
        self.closing = True
        if self._pool is not None:
            self._pool.shutdown()
        self.state.release()

    def require_sandbox(self) -> None:
        """No run without a sandbox unless the user asked for it (a cluster's nodes check their own)."""
        if self.make_executor is None and not self.unsandboxed and sandbox.usable()[0] is None:
            raise Refusal(sandbox.missing())

    def runs_unsandboxed(self) -> str | None:
        """Why this server's runs go without a sandbox (the user opted in, and none runs here), or None."""
        if self.make_executor is None and self.unsandboxed and sandbox.usable()[0] is None:
            return f"runs here are unsandboxed (--unsandboxed; {sandbox.usable()[2]}): {sandbox.RISK}"
        return None

    def sandbox_marker(self, entry: dict) -> str:
        """The row's word for a run without a sandbox: this server's own knowledge first (such a run
        could have rewritten the state and its report), then the run's record."""
        return sandbox.MARKER if self.runs_unsandboxed() else unsandboxed_marker(entry)

    def write_record(self, state: dict, entry: dict, result: RunResult, decision: dict | None = None) -> None:
        """runs/<n>-<commit>.json: the result, where and how the run ran, and once decided, the
        decision and what the run changed in train.py (for history). Its digest goes into the state
        (saved with the transaction that holds it): only a record matching it is read back."""
        path = self.root / entry["log"].removesuffix(".log")
        report = read_report(self.root / entry["report"]) or {}
        record = {"result": result.model_dump(exclude_none=True),
                  "run": {k: entry.get(k) for k in ("run", "commit", "parent", "description", "slot", "submitted_at",
                                                     "started_at", "ended_at", "timeout", "rerun_of",
                                                     "data_order", "confirmation")}
                  | {k: entry.get(k) or report.get(k) for k in MEASURED_ON}}
        if decision:
            try:
                decision["changes"] = history.describe_change(
                    self.ws.train_at(entry["parent"]).decode(errors="replace"),
                    self.ws.train_at(entry["commit"]).decode(errors="replace"))
            except (git.GitCommandError, ValueError, KeyError):
                pass
            record["decision"] = decision
        name, raw = path.name + ".json", json.dumps(record).encode()
        try:
            ledger.replace_bytes(path.with_name(name), raw)  # never through a file planted at a temp name
            history.vouch(state, name, raw)
            history.vouch_log(state, self.root, entry["log"])
            self.fresh_records[name] = history.digest(raw)
        except OSError:
            if not decision:
                raise
            # a decision is in the ledger already; its copy in runs/ is a convenience

    def records(self, state: dict | None = None, decided: bool = True) -> list[dict]:
        """The runs' records the server vouches for (history.checked), oldest first."""
        return [r for r in self.vouched(state).values() if r.get("decision") or not decided]

    def vouched(self, state: dict | None = None) -> dict[str, dict]:
        """{file name: record} of the runs' records the server vouches for; a record changed outside
        the server is left out and told once, in the next answer and in status."""
        state = self.state.load() if state is None else state
        found, refused = history.checked(self.root / RUNS_DIR, state, self.fresh_records)
        new = [name for name in refused if name not in self._refused]
        if new:
            self._refused.update(new)
            self.state.tell(f"{len(new)} record(s) in {RUNS_DIR}/ ({', '.join(new[:3])}{' ...' if len(new) > 3 else ''}) "
                            "were changed outside the server (edited, deleted, replaced or unreadable): none of "
                            "them is believed; the server's state and ledger decide, and its reports leave them out.")
        return found

    def record_of(self, commit: str, state: dict | None = None) -> dict:
        """The vouched-for record of the run that measured a commit, or {}."""
        return next((r for r in reversed(self.records(state, decided=False))
                     if str(r["run"].get("commit", "")).startswith(commit[:7])), {})

    def device_of(self, commit: str, state: dict | None = None) -> str | None:
        """The GPU model (or CPU) that measured a commit, from its run's record."""
        run = self.record_of(commit, state).get("run")
        return run.get("device") if isinstance(run, dict) else None

    def kept_row(self, commit: str) -> Row | None:
        """The ledger row of a kept commit (the base a candidate is compared with)."""
        for row in reversed(self.rows()):
            if row.status == "keep" and row.commit == commit[:7]:
                return row
        return None

    def entry(self, run: int) -> dict | None:
        return (self.state.load().get("runs") or {}).get(str(run))

    def read_record(self, run: int) -> dict | None:
        return next((r for r in self.records(decided=False) if r["run"].get("run") == run), None)

    def ended(self, state: dict) -> str | None:
        return limits.ended(state, [(r.status, r.val_bpb, r.description) for r in self.rows()])

    def interrupted_note(self, entry: dict) -> str:
        return (f"interrupted run {entry['commit'][:7]} ({entry['description']}) has no ledger row: call "
                f"discard({'' if self.slots == 1 else 'run=' + str(entry['run'])}) to log it as a crash")

    def interrupted_summary(self, state: dict | None = None) -> str | None:
        state = state if state is not None else self.state.load()
        notes = [self.interrupted_note(e) for e in self.runs_of(state, "interrupted")]
        return "; ".join(notes) or None
