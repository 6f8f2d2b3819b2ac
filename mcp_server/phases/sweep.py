"""The sweep tool: an Optuna study over train.py's constants, each trial an ordinary run of the loop.

A space maps constant names to a range (low/high, optionally on a log scale) or to a list of
choices, and is checked against the kept train.py before anything runs (sweep_space.py). A trial's
train.py is the kept one with those constants rewritten (mcp_server.core.constants), submitted through
ResearchLoop.submit like any candidate: its own commit, a free slot (trials run side by side), the
timeout, the research run's limits, the noise verdict. Optuna's samplers choose the values (TPE or
CMA-ES); nothing here optimises.

Decisions: each finished trial (its description "sweep trial N of study K: NAME=value ...") is
discarded at once, with the reason (not better than the best, beaten by another trial, or its val_bpb
train.py's own where the harness evaluates exports and got none: never told to the study), except
the best of this call that beats the kept best, which stays pending (a better trial later discards
it). The agent keeps it with keep(), whose confirmation rule applies as to any run: a gain within a
few noise widths is confirmed on fresh data orders first. While the sweep runs, that held result is
not counted against the slots, so every slot trains.

A sweep keeps by the rules an ordinary candidate follows, no looser: the noise is measured before
it starts (the best of many draws beats the best by luck alone, and only a noise estimate tells
such a gain from a real one, so keep can ask for confirmation); a trial whose values are the kept
code's own is the best unchanged, answered with the best's value and never run (a lucky draw of
the same code would otherwise be held as a gain); a trial whose train.py an earlier run on this
best measured is answered from that run (novelty.py), as run_experiment answers it.

The study lives in .research-loop/optuna.db (Optuna's RDB storage on SQLite), named after the
research branch, the space and the rest of train.py (the code apart from the swept values): a new
server process continues it, and the same space on changed code starts another study, since its
values would not be comparable.
"""
import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field

import anyio

from mcp_server.core import ledger, limits
from mcp_server.core.constants import rewrite_constants
from mcp_server.core.history import find_constants
from mcp_server.phases.runs import IN_FLIGHT, UNDECIDED
from mcp_server.phases.sweep_space import Dimension, literal, parse_space
from mcp_server.core.models import NoiseEstimate, Refusal, RunResult, SweepResult, SweepTrial

STORAGE = ".research-loop/optuna.db"
SAMPLERS = ("tpe", "cmaes")
MAX_TRIALS = 200
SEEDS = 2 ** 32  # numpy's seeds, which Optuna's samplers take: 0 to 2**32 - 1
TPE_STARTUP_TRIALS = 4  # random trials before TPE models the results (Optuna's 10 would be most of a short sweep)
STUDY_KEY_CHARS = 10
MAX_TABLE_ROWS = 40  # earlier calls' trials in the answer's table, best first; trials_in_study counts them all
UNVERIFIED = "unverified"  # a trial's status where its val_bpb is train.py's own (own_number)
REPEATABLE_FAILURES = ("crash", "timeout")  # the same values would fail again: answered without a run


def study_name(branch: str, dims: list[Dimension], source: str) -> tuple[str, str]:
    """(name, key): the branch, the names and a digest of the space and of the code apart from the
    swept values (a change elsewhere in train.py makes the trials' values incomparable)."""
    rest = rewrite_constants(source, {d.name: None for d in dims})
    spec = json.dumps([d.spec() for d in dims], sort_keys=True)
    key = hashlib.sha256(f"{spec}\0{rest}".encode()).hexdigest()[:STUDY_KEY_CHARS]
    return f"{branch} {','.join(d.name for d in dims)} {key}", key


def make_sampler(kind: str, seed: int | None):
    import optuna
    if kind == "tpe":
        with warnings.catch_warnings():  # multivariate TPE is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, multivariate=True)
    # choices are not CMA-ES's to sample: Optuna draws them at random, as documented
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


@dataclass
class Sweep:
    """One sweep call: the study, what it asked and what is in flight, and the result it holds."""
    loop: object
    dims: list[Dimension]
    trials: int
    sampler: str
    study: object
    key: str
    base: str  # the kept train.py
    best_val_bpb: float
    kept: str  # the kept commit the trials rewrite
    asked: int = 0
    ran: int = 0
    repeated: int = 0
    in_flight: dict = field(default_factory=dict)  # run -> Optuna trial
    numbers: list = field(default_factory=list)  # this call's trial numbers
    held: int | None = None  # the pending run that beats the best
    held_value: float | None = None
    held_trial: int | None = None
    stopped: str | None = None
    broken: str | None = None  # what the study's store said when it broke during this call (store_kept)
    started: list = field(default_factory=list)  # the runs this call submitted

    @property
    def done(self) -> int:
        return self.asked - len(self.in_flight)

    def next_trial(self) -> None:
        """Asks the study for a trial and submits its train.py; a repeat of a finished trial is
        answered from it, without a run. A store that breaks meanwhile asks no more (store_kept)."""
        with self.store_kept():
            self.ask_trial()

    def ask_trial(self) -> None:
        from optuna.trial import TrialState
        self.stopped = self.best_moved()
        if self.stopped:
            return
        over = self.ended_with_held()
        if over:
            self.stopped = f"the research run has ended ({over}), counting the best trial held for a decision"
            return
        trial = self.study.ask({d.name: d.distribution() for d in self.dims})
        params = dict(trial.params)
        self.asked += 1
        self.numbers.append(trial.number)
        earlier = self.finished_with(params)
        if earlier is not None:
            self.repeated += 1
            for name in ("run", "commit", "val_bpb", "delta"):
                if name in earlier.user_attrs:
                    trial.set_user_attr(name, earlier.user_attrs[name])
            trial.set_user_attr("status", "repeat")
            trial.set_user_attr("note", f"same values as trial {earlier.number}: answered from it, no run")
            if earlier.state == TrialState.COMPLETE:
                self.study.tell(trial, earlier.value)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
            return
        twin = next((t for t in self.in_flight.values() if params_key(t.params) == params_key(params)), None)
        if twin is not None:  # novelty refuses a second run of code in flight: its value comes with it
            self.repeated += 1
            trial.set_user_attr("status", "not run")
            trial.set_user_attr("note", f"same values as trial {twin.number}, in flight: not run twice")
            self.study.tell(trial, state=TrialState.FAIL)
            return
        if self.kept_values(params):
            self.repeated += 1
            trial.set_user_attr("status", "the best")
            trial.set_user_attr("note", "the kept code's own values: answered with the best's val_bpb, no run")
            self.study.tell(trial, self.best_val_bpb)
            return
        source = rewrite_constants(self.base, params)
        values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in params.items())
        description = ledger.fit_description(f"sweep trial {trial.number} of study {self.key}: {values}")
        try:
            entry = self.loop.submit(description, None, source.encode(), replacing=self.held, novel=True)
        except Refusal as exc:
            trial.set_user_attr("status", "not run")
            trial.set_user_attr("note", str(exc)[:300])
            self.study.tell(trial, state=TrialState.FAIL)
            self.stopped = f"trial {trial.number} was refused: {exc}"
            return
        if "answered" in entry:  # this train.py was measured on this best already: its result, no run
            self.answered_by(trial, RunResult(**entry["answered"]))
            return
        self.in_flight[entry["run"]] = trial  # before the store is written: a store that fails then loses no run
        self.started.append(entry["run"])
        trial.set_user_attr("run", entry["run"])
        trial.set_user_attr("commit", entry["commit"][:7])

    def best_moved(self) -> str | None:
        """Why no more trials: another call kept a result while the sweep ran (its held trial, or a run of
        its own), so the trials, the old best's code with the swept values, are measured on a best that is
        gone and compared with a value that is no longer the best's (review 63)."""
        kept = self.loop.state.load().get("kept_commit") or ""
        if kept == self.kept:
            return None
        return (f"the best changed while the sweep ran ({self.kept[:7]} -> {kept[:7]}, kept by another call), so "
                f"no more trials were asked: they are {self.kept[:7]}'s code with the swept values")

    def still_held(self) -> None:
        """Lets go of a held result another call decided meanwhile (keep or discard): it is no longer this
        sweep's to hold, to name in its answer or to discard (review 63: a trial that beat the best was then
        discarded as beaten by a run already discarded, and the answer said to keep that run)."""
        if self.held is not None and self.loop.entry(self.held) is None:
            self.held = self.held_value = self.held_trial = None

    def discard(self, reason: str | None, run: int) -> None:
        """A trial discarded, unless another call decided it first (each run is logged once)."""
        try:
            self.loop.discard(reason, run)
        except Refusal:
            if self.loop.entry(run) is not None:
                raise

    def kept_values(self, params: dict) -> bool:
        """The trial's values are the kept train.py's own: its code is the best unchanged."""
        found = find_constants(self.base)
        return all(found.get(name) is not None and literal(found[name]) == value and
                   type(literal(found[name])) is type(value) for name, value in params.items())

    def answered_by(self, trial, earlier: RunResult) -> None:
        from optuna.trial import TrialState
        self.repeated += 1
        trial.set_user_attr("run", earlier.run)
        trial.set_user_attr("commit", earlier.commit)
        trial.set_user_attr("status", "repeat")
        trial.set_user_attr("note", f"the same train.py as run {earlier.run} on this best: answered from it, no run"
                            + (f"; {own_number(earlier)}" if own_number(earlier) else ""))
        if measured(earlier):
            self.study.tell(trial, earlier.val_bpb)
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def ended_with_held(self) -> str | None:
        """The research run's limits, the held result counted as the row it will become: a sweep
        never runs more experiments than the limit allows (submit checks the rows only)."""
        if self.held is None:
            return None
        rows = [(r.status, r.val_bpb, r.description) for r in self.loop.rows()] + [("discard", self.held_value)]
        return limits.ended(self.loop.state.load(), rows)

    def finished_with(self, params: dict):
        """A trial of the study with these values that trained to the end (a crash or timeout
        included); one refused, cancelled or cut short by a server's exit is tried again."""
        from optuna.trial import TrialState
        wanted = params_key(params)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if params_key(t.params) == wanted and (t.state == TrialState.COMPLETE or
                                                   t.user_attrs.get("status") in REPEATABLE_FAILURES):
                return t
        return None

    def settle(self, run: int) -> None:
        """A finished trial: its value told to the study, then discarded unless it is this call's
        best and beats the kept best (then the one held before is discarded)."""
        from optuna.trial import TrialState
        trial = self.in_flight.pop(run)
        result = self.loop.answer_for(run)
        decided = self.loop.entry(run) is None  # the early stop ended it: its crash row is written
        self.ran += 1
        ok = measured(result)
        with self.store_kept():  # the run is decided below whatever the store does
            trial.set_user_attr("status", UNVERIFIED if own_number(result) else result.status)
            if own_number(result):
                trial.set_user_attr("note", own_number(result))
            if ok:
                trial.set_user_attr("val_bpb", result.val_bpb)
            if result.delta is not None and ok:  # a delta from train.py's own number is no measured gain
                trial.set_user_attr("delta", result.delta)
            if ok:
                self.study.tell(trial, result.val_bpb)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        if decided:
            return
        self.still_held()
        moved = self.best_moved()
        if moved:
            self.stopped = self.stopped or moved
            self.discard(f"a sweep trial measured on {self.kept[:7]}, no longer the best", run)
            return
        if ok and result.val_bpb < self.best_val_bpb and (self.held_value is None or result.val_bpb < self.held_value):
            if self.held is not None:
                self.discard(f"a sweep trial, beaten by trial {trial.number}", self.held)
            self.held, self.held_value, self.held_trial = run, result.val_bpb, trial.number
            return
        if not ok:
            reason = "a sweep trial whose val_bpb is train.py's own" if own_number(result) else None
        elif self.held is None:
            reason = f"a sweep trial, not better than the best {self.best_val_bpb:.6f}"
        else:
            reason = f"a sweep trial, trial {self.held_trial} did better"
        self.discard(reason, run)

    def cancel_in_flight(self) -> None:
        """The call was cancelled: its trials in flight are cancelled too (a running one is logged as a
        crash), so no orphan blocks the slots, and the study marks them failed."""
        from optuna.trial import TrialState
        for run, trial in list(self.in_flight.items()):
            try:
                self.loop.cancel(run)
            except Refusal:
                pass  # it ended meanwhile
            entry = self.loop.entry(run)
            if entry and entry["status"] in UNDECIDED:
                self.discard("a sweep trial, its sweep cancelled", run)
            del self.in_flight[run]
            with self.store_kept():
                trial.set_user_attr("status", "cancelled")
                self.study.tell(trial, state=TrialState.FAIL)

    @contextlib.contextmanager
    def store_kept(self):
        """Optuna's calls on the study's store. One that fails (the store overwritten or made unwritable mid-sweep)
        ends the study's part: no more trials are asked, but the runs in flight are still followed and decided as
        they end, and the call then ends with broken_store() (review 78: the clean-up stopped at the first failure,
        its trials in flight left pending, and the call ended on an internal error)."""
        from optuna.exceptions import StorageInternalError
        from sqlalchemy.exc import SQLAlchemyError
        try:
            yield
        except Exception as exc:  # review 81: another Optuna store raised KeyError, this module's errors go on
            if not (isinstance(exc, (StorageInternalError, SQLAlchemyError)) or raised_in_optuna(exc)):
                raise
            while exc.__cause__ is not None:  # Optuna's words are generic; sqlite's name what broke
                exc = exc.__cause__
            self.broken = self.broken or (str(exc).splitlines() or [type(exc).__name__])[0][:200]

    def broken_store(self) -> str:
        """What broke, what became of each run this call started, and what to do."""
        self.still_held()
        n = self.held
        ended = ", ".join(str(run) for run in self.started if run != n)
        said = f"{STORAGE} broke during the sweep ({self.broken}): no more trials were asked. Nothing was lost: "
        said += f"the runs it started ({ended}) are decided in {ledger.LEDGER_NAME}" if ended else "no other run began"
        if n is not None:
            keep = f"keep(run={n})"
            keep = f"confirm(run={n}), then {keep}" if self.loop.answer_for(n).confirm_first else keep
            said += (f"; run {n} (trial {self.held_trial}, val_bpb {self.held_value:.6f}) beats the best and waits "
                     f"for {keep} or discard(run={n})")
        return said + f". Move the store aside (`mv {STORAGE} {STORAGE}.bad`) and sweep again: a new study begins."

    def answer(self) -> SweepResult:
        if not self.broken:
            with self.store_kept():
                return self.table_answer()
        raise Refusal(self.broken_store())

    def table_answer(self) -> SweepResult:
        from optuna.trial import TrialState
        trials = self.study.get_trials(deepcopy=False)
        complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        rest = [t for t in trials if t.state != TrialState.COMPLETE]
        self.still_held()
        mine = set(self.numbers)  # this call's trials are always listed
        table = [table_row(t) for i, t in enumerate(complete + rest) if i < MAX_TABLE_ROWS or t.number in mine]
        noise = self.loop.state.load().get("noise")
        result = SweepResult(
            study=self.study.study_name, storage=STORAGE, sampler=self.sampler, trials_run=self.ran,
            trials_repeated=self.repeated, trials_in_study=len(trials), best=table[0] if complete else None,
            pending_run=self.held, best_val_bpb=self.best_val_bpb, noise=NoiseEstimate(**noise) if noise else None,
            table=table, stopped=self.stopped, next="")
        if self.held is not None and self.best_moved():
            result.next = (f"reapply(run={self.held}) measures trial {self.held_trial} on the new best, or "
                           f"discard(run={self.held})")
        elif self.held is not None:
            held = self.loop.answer_for(self.held)
            result.beats_noise = held.noise
            result.next = (f"confirm(run={self.held}) ({held.confirm_first}), then keep(run={self.held})"
                           if held.confirm_first else f"keep(run={self.held}) makes trial {self.held_trial} the best")
            result.next += "; or discard it. The study continues with the next sweep of the same space"
        elif self.best_moved():
            result.next = "sweep again to search the new best's constants"
        else:
            result.next = (f"no trial beat the best ({self.best_val_bpb:.6f}): sweep more trials (the study "
                           "continues), another range, or edit the code")
        if self.stopped:
            result.next = f"{self.stopped}. {result.next}"
        return result


def measured(result: RunResult) -> bool:
    """A trial's value the study is told, and the sweep may hold: the harness's number (or, where the harness does not
    export, train.py's as it always is), never train.py's own where the harness evaluates exports and got none."""
    return result.status == "ok" and result.val_bpb is not None and result.verified is not False


def own_number(result: RunResult) -> str | None:
    """Why an ok trial's value is no measurement: an exporting harness evaluated nothing of it, so the number is the
    one train.py printed (which it can choose by the swept values); told to the study, it steered the sampler, and
    held as the sweep's best it discarded measured gains as beaten by it."""
    if result.status != "ok" or result.verified is not False or result.val_bpb is None:
        return None
    return (f"val_bpb {result.val_bpb:.6f} is train.py's own, not measured by the harness (no model it could evaluate): "
            "not told to the study, never held")


def table_row(t) -> SweepTrial:
    a = t.user_attrs
    status = a.get("status") or ("ok" if t.value is not None else "not finished")
    return SweepTrial(trial=t.number, params=t.params, status=status, run=a.get("run"), commit=a.get("commit"),
                      val_bpb=t.value if t.value is not None else a.get("val_bpb"), delta=a.get("delta"),
                      note=a.get("note"))


def start(loop, space, trials: int, sampler: str, seed: int | None) -> Sweep:
    """Checks everything before anything runs, opens (or continues) the study, and settles the
    trials an earlier server left in flight from their runs' records."""
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= MAX_TRIALS:
        raise Refusal(f"trials must be a whole number from 1 to {MAX_TRIALS}.")
    if sampler not in SAMPLERS:
        raise Refusal(f"sampler must be one of {', '.join(SAMPLERS)} (Optuna's TPE or CMA-ES).")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEEDS):
        raise Refusal(f"seed must be a whole number from 0 to {SEEDS - 1} (the samplers' range), or left out. "
                      "Nothing ran.")
    state = loop.state.load()
    if not state.get("branch"):
        raise Refusal("This workspace is not set up for a research run: call setup(tag) first.")
    busy = loop.runs_of(state, *IN_FLIGHT, *UNDECIDED)
    if busy:
        listed = ", ".join(f"{e['run']} ({e['status']})" for e in busy)
        raise Refusal(f"A sweep needs every slot, but runs {listed} are in flight or undecided: wait() for them, "
                      "then keep or discard each, and sweep again.")
    over = loop.ended(state)
    if over:
        raise Refusal(f"The research run has ended ({over}): no new runs.")
    if not state.get("noise"):
        raise Refusal("No noise estimate yet: the best of a sweep's trials beats the best by luck alone, and only "
                      "the noise tells that from a gain (keep then asks for confirmation). measure_noise() first, "
                      "then sweep.")
    kept = state["kept_commit"]
    base = loop.ws.train_at(kept)
    if loop.ws.working_train() != base:
        raise Refusal(f"train.py differs from the kept commit {kept[:7]}: a sweep searches the kept code's "
                      "constants. Run and keep your edit first, or `git checkout train.py`, then sweep.")
    best = loop.status().best_val_bpb
    if best is None:
        raise Refusal("No kept result yet: run_experiment('baseline') and keep() it; trials are compared with it.")
    row = loop.kept_row(kept)
    whose = limits.not_measured(row.description) if row else None
    if whose:  # every trial would be held or discarded against it, its delta a difference from it
        raise Refusal(f"The best's val_bpb {best:.6f} is {whose}, and a sweep holds or discards each trial against it. "
                      "Measure the kept code first: run_experiment(description, rerun=true) with train.py unchanged, "
                      "then keep() it; then sweep. Nothing ran.")
    source = base.decode()
    dims = parse_space(space, source)
    name, key = study_name(state["branch"], dims, source)
    study = open_study(loop.root, name, sampler, seed)
    settle_stale(loop, study)
    return Sweep(loop, dims, trials, sampler, study, key, source, best, kept)


def open_study(root, name: str, sampler: str, seed: int | None):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sqlalchemy.exc import SQLAlchemyError
    path = root / STORAGE
    path.parent.mkdir(exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    except (SQLAlchemyError, RuntimeError) as exc:  # RuntimeError: Optuna's word on a store of another schema
        raise Refusal(f"{STORAGE} is not a study store Optuna can open ({str(exc).splitlines()[0][:200]}). Nothing "
                      f"ran. Move it aside (`mv {STORAGE} {STORAGE}.bad`) and sweep again: the sweep starts a new "
                      "study there; every trial's row stays in the ledger.") from None
    # a resumed study with the same seed would draw its first trials again; past the samplers' range it wraps round
    study.sampler = make_sampler(sampler, None if seed is None else (seed + len(study.trials)) % SEEDS)
    return study


def settle_stale(loop, study) -> None:
    """Trials an earlier server left running: each told its run's recorded value, or failed."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run = t.user_attrs.get("run")
        try:
            result = loop.answer_for(run) if run is not None else None
        except Refusal:
            result = None
        if result is not None and result.status == "ok" and result.val_bpb is not None:
            study.tell(t.number, result.val_bpb)
        else:
            study.tell(t.number, state=TrialState.FAIL)


class Progress:
    """What follow() reports, as the whole sweep's progress: trials done over trials, the runs in
    flight in between, every value above the last (MCP wants them to grow)."""

    def __init__(self, ctx, sweep: Sweep):
        self.ctx, self.sweep, self.last = ctx, sweep, -1.0

    async def report_progress(self, percent: float, total: float | None = None, message: str | None = None) -> None:
        s = self.sweep
        share = min(percent, 100.0) / 100.0 * len(s.in_flight)
        value = max(100.0 * (s.done + share) / s.trials, self.last + 1e-3)
        if value > 100.0:
            return  # the total was reported already
        best = f", best {s.held_value:.6f} (run {s.held})" if s.held is not None else ""
        text = f"sweep: {s.done}/{s.trials} trials done{best}" + (f" | {message}" if message else "")
        await self.ctx.report_progress(value, 100.0, text)
        self.last = value


def raised_in_optuna(exc: BaseException) -> bool:
    """Whether Optuna's own code raised exc: its storage's KeyError or ValueError for a record the store does not hold,
    its UpdateFinishedTrialError for a trial the store holds finished (a store overwritten with another study's or an
    older copy), as opposed to an error of the sweep's own code (a refusal of a trial's run)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("optuna")


async def run(sweep: Sweep, follow, ctx) -> SweepResult:
    """Keeps every slot busy with trials until `trials` were asked, settling each as it ends."""
    progress = Progress(ctx, sweep)
    loop = sweep.loop
    try:
        while True:
            while not (sweep.stopped or sweep.broken) and sweep.asked < sweep.trials \
                    and len(sweep.in_flight) < loop.slots:
                await anyio.to_thread.run_sync(sweep.next_trial)
            if not sweep.in_flight:
                break
            runs = list(sweep.in_flight)
            await follow(runs, progress, until_all=False)
            for run in runs:
                entry = loop.entry(run)
                if entry is None or entry["status"] not in IN_FLIGHT:
                    await anyio.to_thread.run_sync(sweep.settle, run)
            await progress.report_progress(0.0)
    finally:
        if sweep.in_flight:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sweep.cancel_in_flight)
    return await anyio.to_thread.run_sync(sweep.answer)

