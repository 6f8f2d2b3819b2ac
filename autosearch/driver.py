"""The search agent: drives the research loop through the MCP server over stdio, as any agent would.

One experiment = edit train.py's constants (the strategy's proposal on top of the last kept
train.py), `run_experiment`, then `keep` if val_bpb beats the best kept result, else `discard`.
Everything the search needs to resume (what was tried, what is best) is read back from the
workspace: the ledger and the train.py of each logged commit.
"""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from autosearch.constants import ConstantError, evaluate_constants, rewrite_constants
from autosearch.report import read_ledger
from autosearch.space import SpaceError, applicable, sweep_space, validate_space
from autosearch.strategies import SWEEPS, describe, make_strategy
from mcp_server.core import trackers
from mcp_server.core.history import find_constants

BASELINE_DESCRIPTION = "baseline"
INTERRUPTED_MARK = "(interrupted)"  # the server's description suffix for a run cut short by Ctrl-C
EXTRA_NAMES = ("DEVICE_BATCH_SIZE",)  # read alongside the space: the batch constraint needs it


class SearchError(RuntimeError):
    """A fault the user must fix; the message says how."""


USER_FACING_ERRORS = (SearchError, ConstantError, SpaceError)


RERUN_PREFIXES = ("noise repeat ", "control ", "confirmation ")  # the server's descriptions of its reruns
SWEEP_TRIALS_PER_SLOT = 4  # with --hours, one sweep call spends this many trials per slot, then decides its best


@dataclass
class SearchPlan:
    workspace: Path
    tag: str
    strategy: str
    experiments: int | None
    hours: float | None
    seed: int
    space: tuple
    env: dict
    harness: dict
    slots: int = 1
    dashboard: int | None = None  # serve the dashboard on this port (0: a free one)
    tracking: tuple = ()  # the server's tracking options: --track mlflow [--mlflow-uri URI]
    timings: list = field(default_factory=list)
    chart: str | None = None
    report: str | None = None  # the morning report's Markdown file


def git(workspace: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SearchError(f"git {' '.join(args)} failed in {workspace}: {proc.stderr.strip()}")
    return proc.stdout


def train_source(workspace: Path, commit: str = "HEAD") -> str:
    return git(workspace, "show", f"{commit}:train.py")


class Search:
    """The search over one workspace: the server session, the strategy and the stop rules."""

    def __init__(self, plan: SearchPlan, session: ClientSession, say):
        self.plan, self.session, self.say = plan, session, say
        self.harness = plan.harness
        names = [dim.name for dim in plan.space]
        self.names = names + [n for n in EXTRA_NAMES if n not in names]
        self.strategy = make_strategy(plan.strategy, plan.space, plan.seed, self.harness)
        self.started = time.monotonic()
        self.progress_line_open = False
        self.noise_threshold = None  # measure_noise's: a gain inside it is discarded, as the skill says

    async def call(self, tool: str, progress=None, **arguments) -> dict:
        """One tool call; a tool error becomes a SearchError carrying the server's message."""
        result = await self.session.call_tool(tool, arguments, progress_callback=progress)
        text = "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")
        if result.is_error:
            raise SearchError(f"{tool} refused: {text}")
        return result.structured_content or {}

    def current_config(self, commit: str = "HEAD") -> dict:
        source = train_source(self.plan.workspace, commit)
        present = [n for n in self.names if n in find_constants(source)]
        return evaluate_constants(source, present, self.harness)

    def history(self, rows: list[dict]) -> list[dict]:
        """The configuration of every ledger row, oldest first, read from the train.py of its commit.
        An interrupted run says nothing about its configuration, so it is left out and tried again."""
        configs = []
        for row in rows:
            if was_interrupted(row):
                continue
            try:
                configs.append(self.current_config(row["commit"]))
            except SearchError:
                continue  # a commit gone from the repository can't be repeated by accident either
        return configs

    async def resume(self, status: dict) -> None:
        """Settle what a previous, interrupted call left: interrupted runs and undecided results."""
        undecided = status.get("undecided") or []
        pending = {r["run"]: r for r in (await self.call("wait"))["results"]} if status.get("pending") else {}
        self.noise_threshold = (status.get("noise") or {}).get("threshold")
        if status.get("interrupted"):
            self.say(f"resuming: {status['interrupted']}")
        for run in undecided:
            self.say(f"resuming: deciding run {run}, left undecided")
            await self.decide(pending.get(run) or {"run": run, "status": "interrupted"})

    async def run_one(self, description: str) -> dict:
        """run_experiment with live progress, timed from the client's side."""
        start = time.monotonic()
        result = await self.call("run_experiment", progress=self.progress, description=description)
        self.say_progress_done()
        self.plan.timings.append(timing_split(description, result, time.monotonic() - start))
        return result

    async def decide(self, result: dict) -> str:
        """keep if it beats the best kept val_bpb by more than the noise, once confirmed where the
        server asks; discard otherwise (crashes included). A result measured on an older best that
        beats the current one is measured again on it (reapply)."""
        if result.get("repeat_of"):  # an earlier run's answer (the same train.py): decided already
            return "decided before"
        best = best_kept_bpb(read_ledger(self.plan.workspace))
        run = {"run": result["run"]} if "run" in result else {}
        improved = result.get("status") == "ok" and result.get("val_bpb") is not None and (
            best is None or result["val_bpb"] < best) and not (  # another GPU model's number: never compared
            result.get("delta") is None and result.get("best_val_bpb") is not None)
        stale = result.get("parent") is not None and result.get("best_commit") is not None and \
            result["parent"] != self.kept_commit()
        if improved and stale:
            again = await self.call("reapply", **run)
            self.say(f"  run {result['run']} beat the best but was measured on an older one: "
                     f"re-measuring it as run {again['run']}")
            return "reapply"
        inside_noise = improved and best is not None and self.noise_threshold is not None \
            and result.get("comparable") is not False and best - result["val_bpb"] <= self.noise_threshold
        if inside_noise:  # the skill's rule: no keep, and no runs spent confirming it
            await self.call("discard", reason=f"a gain inside the noise ({self.noise_threshold:.6f})", **run)
            return "discard"
        if improved and result.get("confirm_first"):  # marginal, or measured at another speed
            self.say(f"  run {result['run']}: confirming beside a rerun of the best ({result['confirm_first']})")
            confirmation = await self.call("confirm", **run)
            stood = ", the best's earlier rerun standing as control" if confirmation.get("reused") else ""
            self.say(f"  {'held' if confirmation['confirmed'] else 'did not hold'}: paired deltas "
                     f"{', '.join(f'{d:+.6f}' for d in confirmation['paired_deltas']) or 'none'} "
                     f"({confirmation['extra_runs']} run(s){stood})")
            if not confirmation["confirmed"]:
                await self.call("discard", reason="the gain did not hold beside a rerun of the best", **run)
                return "discard"
        if improved:
            await self.call("keep", **run)
            return "keep"
        if result.get("status") == "interrupted":  # the server marks the row itself
            await self.call("discard", **run)
            return "discard"
        reason = "crashed" if result.get("status") != "ok" else f"not better than {best:.6f}"
        await self.call("discard", reason=reason, **run)
        return "discard"

    def kept_commit(self) -> str:
        return git(self.plan.workspace, "rev-parse", "--short=7", "HEAD").strip()

    async def baseline(self) -> None:
        self.say("running the baseline (train.py unchanged)")
        result = await self.run_one(BASELINE_DESCRIPTION)
        if result.get("status") != "ok":
            await self.call("discard", reason="baseline crashed")
            tail = "\n".join(str(result.get("tail", "")).splitlines()[-10:])
            raise SearchError(f"the baseline run ended with {result.get('status')}, so there is nothing to "
                              f"improve on. Its log: {self.plan.workspace / result.get('log', 'run.log')}; "
                              f"it ends with:\n{tail}\nFix the cause, then run the same command again.")
        await self.call("keep")
        self.say(f"baseline val_bpb {result['val_bpb']:.6f} ({self.plan.timings[-1]['wall_s']:.0f}s)")
        self.say("measuring the noise: the baseline once more")
        noise = (await self.call("measure_noise", repeats=1))["noise"]
        self.noise_threshold = noise["threshold"]
        self.say(f"  noise threshold {noise['threshold']:.6f}: smaller gains are discarded, gains of up to 3 times "
                 "it are confirmed beside a rerun of the best before they are kept")

    def budget_left(self, rows: list[dict], in_flight: int = 0) -> bool:
        walls = [t["wall_s"] for t in self.plan.timings if t["wall_s"] is not None]
        typical = sum(walls) / len(walls) if walls else 0.0
        return budget_left(experiments_done(rows) + in_flight, self.plan.experiments, self.plan.hours,
                           time.monotonic() - self.started, typical)

    async def loop(self) -> None:
        """Keeps every slot busy with a proposal on top of the best, decides each result as it comes."""
        if self.plan.strategy in SWEEPS:
            return await self.sweeps()
        rows = read_ledger(self.plan.workspace)
        in_flight: dict[int, dict] = {}  # run -> the change it tries, when it was submitted
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < self.plan.slots and self.budget_left(rows, len(in_flight)):
                current = self.current_config()
                tried = self.history(rows) + [current | info["change"] for info in in_flight.values()]
                change = self.strategy.propose(current, tried)
                if change is None:
                    self.say("the search space around the best configuration is exhausted; stopping")
                    exhausted = True
                    break
                (self.plan.workspace / "train.py").write_text(rewrite_constants(train_source(self.plan.workspace), change))
                number = experiments_done(rows) + len(in_flight) + 1
                total = f"/{self.plan.experiments}" if self.plan.experiments is not None else ""
                self.say(f"experiment {number}{total}: {describe(change)}")
                if self.plan.slots == 1:
                    result = await self.run_one(describe(change))
                    await self.report(number, result)
                    rows = read_ledger(self.plan.workspace)
                    continue
                submitted = await self.call("run_experiment", description=describe(change), wait=False)
                if submitted.get("repeat_of"):
                    await self.report(number, submitted)
                    continue
                in_flight[submitted["run"]] = {"change": change, "number": number, "at": time.monotonic()}
            if not in_flight:
                return
            waited = await self.call("wait", progress=self.progress)
            self.say_progress_done()
            for result in waited["results"]:
                info = in_flight.pop(result["run"], None) or {"number": "?", "at": None}
                self.plan.timings.append(timing_split(result["description"], result, None))
                decision = await self.report(info["number"], result)
                if decision == "reapply":
                    again = self.latest_run()
                    in_flight[again] = info
            rows = read_ledger(self.plan.workspace)

    async def sweeps(self) -> None:
        """The server's sweep tool proposes (an Optuna study, resumed on every call): trials until
        the budget is spent, the best of each call decided like any result."""
        rows = read_ledger(self.plan.workspace)
        first_kept = next(row["commit"] for row in rows if row["status"] == "keep")
        space = sweep_space(self.plan.space, self.current_config(first_kept), self.harness)
        while self.budget_left(rows):
            trials = self.sweep_trials(rows)
            self.say(f"sweep of {trials} trial(s) with Optuna's {self.plan.strategy} sampler")
            before = self.latest_run()
            answer = await self.call("sweep", progress=self.progress, space=space, trials=trials,
                                     sampler=self.plan.strategy, seed=self.plan.seed)
            self.say_progress_done()
            for row in sorted(answer["table"], key=lambda r: r["trial"]):
                if row.get("run", 0) > before and row["status"] != "repeat":
                    self.say_trial(row)
            if answer.get("pending_run"):
                pending = next(r for r in (await self.call("wait"))["results"] if r["run"] == answer["pending_run"])
                self.say(f"  the sweep's best, run {pending['run']}: -> {await self.decide(pending)}")
            if answer.get("stopped") or answer["trials_run"] == 0:
                self.say(f"sweep stopped: {answer.get('stopped') or 'every trial repeated an earlier one'}")
                return
            rows = read_ledger(self.plan.workspace)

    def sweep_trials(self, rows: list[dict]) -> int:
        """The next sweep call's trials: what is left of --experiments, and what fits in what is left of
        --hours at the typical wall time so far, at most SWEEP_TRIALS_PER_SLOT per slot."""
        trials = self.plan.slots * SWEEP_TRIALS_PER_SLOT
        if self.plan.experiments is not None:
            trials = min(trials, self.plan.experiments - experiments_done(rows))
        walls = [t["wall_s"] for t in self.plan.timings if t["wall_s"] is not None]
        if self.plan.hours is not None and walls:
            left = self.plan.hours * 3600 - (time.monotonic() - self.started)
            trials = min(trials, self.plan.slots * int(left / (sum(walls) / len(walls))))
        return max(trials, 1)

    def say_trial(self, row: dict) -> None:
        """One trial's line, and its timing from the run's record."""
        record = next(iter(sorted((self.plan.workspace / "runs").glob(f"{row['run']:04d}-*[0-9a-f].json"))), None)
        result = json.loads(record.read_text()).get("result", {}) if record else {}
        self.plan.timings.append(timing_split(result.get("description", f"trial {row['trial']}"), result, None))
        shown = f"val_bpb {row['val_bpb']:.6f}" if row.get("val_bpb") is not None else row["status"]
        self.say(f"trial {row['trial']} (run {row['run']}): {describe(row['params'])}: {shown}")

    async def report(self, number, result: dict) -> str:
        decision = await self.decide(result)
        shown = f"val_bpb {result['val_bpb']:.6f}" if result.get("status") == "ok" else result.get("status")
        self.say(f"experiment {number}: {shown} -> {decision}"
                 + (f" ({result['wall_seconds']:.0f}s)" if result.get("wall_seconds") else ""))
        if result.get("status") not in ("ok", None):
            self.say("  end of its log:\n" + "\n".join(str(result.get("tail", "")).splitlines()[-3:]))
        return decision

    def latest_run(self) -> int:
        refs = git(self.plan.workspace, "for-each-ref", "--format=%(refname)", "refs/research-loop/runs/")
        return max(int(ref.rsplit("/", 1)[-1]) for ref in refs.split())

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        """A line per training step; on a terminal the step line is rewritten in place."""
        line = message or f"{progress:.0f}/{total or '?'}"
        if sys.stdout.isatty():
            print(f"\r    {line[:100]:<100}", end="", flush=True)
            self.progress_line_open = True
        else:
            print(f"    {line}", flush=True)

    def say_progress_done(self) -> None:
        if self.progress_line_open:
            print()
            self.progress_line_open = False


def budget_left(done: int, experiments: int | None, hours: float | None, elapsed: float, typical: float) -> bool:
    """Another experiment fits: under the experiment count, and expected to end within the hours
    (judged by the typical wall time of this call's runs so far)."""
    if experiments is not None and done >= experiments:
        return False
    return hours is None or elapsed + typical <= hours * 3600


def was_interrupted(row: dict) -> bool:
    return row["status"] == "crash" and INTERRUPTED_MARK in row["description"]


def is_rerun(row: dict) -> bool:
    """A row of the server's own reruns (noise, a control, a confirmation): evidence, not an idea."""
    return row["description"].startswith(RERUN_PREFIXES)


def experiments_done(rows: list[dict]) -> int:
    """Rows after the kept baseline, not counting failed baselines before it, interrupted runs or reruns."""
    first_keep = next((i for i, row in enumerate(rows) if row["status"] == "keep"), None)
    if first_keep is None:
        return 0
    return sum(not was_interrupted(row) and not is_rerun(row) for row in rows[first_keep + 1:])


def best_kept_bpb(rows: list[dict]) -> float | None:
    kept = [row["val_bpb"] for row in rows if row["status"] == "keep"]
    return min(kept) if kept else None


def timing_split(description: str, result: dict, client_seconds: float | None) -> dict:
    """Wall time of one experiment (measured by the run's worker): training, evaluation, start-up
    (the rest of train.py's own total) and, when the client waited for it alone, tool overhead
    (what the client waited beyond train.py's total)."""
    wall = client_seconds if client_seconds is not None else result.get("wall_seconds")
    total, evaluation = result.get("total_seconds"), result.get("eval_seconds")
    training = result.get("timed_seconds") or result.get("training_seconds")  # on the flops clock: seconds, not budget
    startup = None if None in (training, total, evaluation) else total - training - evaluation
    overhead = None if total is None or client_seconds is None else client_seconds - total
    return dict(experiment=description[:40], wall_s=wall, training_s=training, eval_s=evaluation,
                startup_s=startup, overhead_s=overhead)


def server_parameters(plan: SearchPlan, repo: Path) -> StdioServerParameters:
    """The MCP server for the workspace, training with this very interpreter (the workspace, a fresh
    clone, has no virtual environment of its own for `uv run` to reuse)."""
    dashboard = ["--dashboard", str(plan.dashboard)] if plan.dashboard is not None else []
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_server", "--workspace", str(plan.workspace), "--slots", str(plan.slots),
              "--train-command", f"{sys.executable} train.py", *dashboard, *plan.tracking],
        env=plan.env, cwd=str(repo),
    )


async def run_search(plan: SearchPlan, repo: Path, say) -> None:
    """Set up (or resume) the workspace's research branch, run the baseline, then the search.
    Ctrl-C ends the session and raises KeyboardInterrupt once the server has shut down."""
    try:
        if await session_until_interrupted(plan, repo, say):
            raise KeyboardInterrupt
    except BaseExceptionGroup as group:
        # The SDK's task groups wrap what the search raised: hand the user the error itself.
        ours = group.subgroup(lambda e: isinstance(e, USER_FACING_ERRORS))
        if ours is None:
            raise
        error = ours
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None


async def session_until_interrupted(plan: SearchPlan, repo: Path, say) -> bool:
    """Run the search session; True if Ctrl-C cut it short.

    Ctrl-C cancels an anyio scope around the session rather than the asyncio task (asyncio.run's
    way): the SDK's task groups could absorb that single task cancellation and carry on with the
    search, while a scope's cancellation is redelivered until everything in it has ended, and it
    still lets the client's shielded shutdown of the server (which stops any training) finish.
    A second Ctrl-C is Python's default: an immediate KeyboardInterrupt."""
    loop = asyncio.get_running_loop()
    interrupted = False
    with anyio.CancelScope() as scope:
        def on_ctrl_c() -> None:
            nonlocal interrupted
            interrupted = True
            scope.cancel()
            loop.remove_signal_handler(signal.SIGINT)

        loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
        try:
            await search_session(plan, repo, say)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    return interrupted


async def search_session(plan: SearchPlan, repo: Path, say) -> None:
    """The session with the server, then what its tracker left."""
    await serve_session(plan, repo, say)
    await anyio.to_thread.run_sync(catch_up_tracking, plan, say)  # the server has exited: its tracker with it


def catch_up_tracking(plan: SearchPlan, say) -> None:
    """The runs the server's tracker had not written when the session ended it (the MCP client gives a server 2 s
    to exit: on a busy machine, the night's last decisions), written here: the tracked runs the report names are
    the night's. The tracker's own failure costs the night nothing: its records stay in runs/."""
    if not plan.tracking:
        return
    uri = plan.tracking[-1] if "--mlflow-uri" in plan.tracking else None
    try:
        written = trackers.catch_up(plan.workspace, plan.tracking[1], uri)
    except Exception as exc:  # noqa: BLE001 - any failure of MLflow's or W&B's is told, never the night's end
        say(f"tracking failed ({type(exc).__name__}: {str(exc)[:200]}): the runs are kept in runs/, and a server "
            f"started on this workspace with {' '.join(plan.tracking)} tracks them")
        return
    if written:
        say(f"tracking: wrote the {written} run(s) the server had not written when it exited")


async def serve_session(plan: SearchPlan, repo: Path, say) -> None:
    async with stdio_client(server_parameters(plan, repo)) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            search = Search(plan, session, say)
            status = await search.call("status")
            if status.get("dashboard"):
                token = plan.env.get("RESEARCH_LOOP_TOKEN")
                say(f"dashboard: {status['dashboard']}" + (f"?token={token}" if token else "")
                    + " (open it in a browser on this machine to watch the run)")
            if not status.get("set_up"):
                say(f"setting up branch autoresearch/{plan.tag}")
                await search.call("setup", tag=plan.tag)
            else:
                await search.resume(status)
            if best_kept_bpb(read_ledger(plan.workspace)) is None:
                await search.baseline()
            await search.loop()
            extra = (await search.call("status")).get("extra_runs", 0)
            done = experiments_done(read_ledger(plan.workspace))
            say(f"extra runs for noise, controls and confirmations: {extra} for {done} experiments"
                + (f" ({extra / done:.0%})" if done else ""))
            chart = await search.call("plot_progress")
            plan.chart = chart.get("path")
            plan.report = (await search.call("report")).get("path")


def resolve_space(workspace: Path, space: tuple, harness: dict, strict: bool) -> tuple:
    """The space checked against the workspace's train.py before anything runs. A user's space
    (strict) must name only existing constants; the default space drops what a fork lacks."""
    source = train_source(workspace)
    names = set(find_constants(source))
    if not strict:
        space = applicable(space, names)
    present = [dim.name for dim in space if dim.name in names]
    validate_space(space, {n: None for n in names} | evaluate_constants(source, present, harness))
    return space


def child_env(budget_seconds: float | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if budget_seconds is not None:
        env["AUTORESEARCH_TIME_BUDGET"] = str(budget_seconds)
    return env
