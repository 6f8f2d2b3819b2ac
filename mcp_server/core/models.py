"""Structured results of the tools (pydantic), and the one exception every refusal uses.

Fields that do not apply are None and are left out of the text answer, which keeps the
answers short: an agent reads them on every step of a night-long loop.
"""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RunStatus = Literal["ok", "crash", "timeout", "running", "queued", "interrupted"]
RowStatus = Literal["keep", "discard", "crash"]


class Refusal(Exception):
    """A rule or a bad input: the message says what to do next, and nothing was changed."""


class Row(BaseModel):
    commit: str
    val_bpb: float
    memory_gb: float
    status: RowStatus
    description: str


class Progress(BaseModel):
    step: int
    percent: float
    loss: float | None  # nan where the line's loss is no number (a diverged run): null in an answer (no NaN in JSON)
    remaining_s: int | None = None
    dt_ms: int | None = None  # the step's duration


class Summary(BaseModel):
    val_bpb: float | None = None
    training_seconds: float | None = None
    total_seconds: float | None = None
    peak_vram_mb: float | None = None
    mfu_percent: float | None = None
    total_tokens_M: float | None = None
    num_steps: int | None = None
    num_params_M: float | None = None
    depth: int | None = None
    eval_seconds: float | None = None  # this project's train.py; not upstream's
    compile_seconds: float | None = None  # likewise: time spent compiling, apart from training
    compile_cache: str | None = None  # warm, cold, partial, or off (why)
    recompiles: int | None = None  # graphs compiled during timed training
    budget_clock: str | None = None  # what the budget was spent on: wall, cpu (seconds per thread), or flops
    timed_seconds: float | None = None  # the timed steps' seconds (on the flops clock not the budget spent)
    flops_per_token: float | None = None  # what each token charged to a flops budget


class RunResult(BaseModel):
    run: int
    commit: str
    description: str
    status: RunStatus
    parent: str | None = None  # the kept commit this candidate was built on
    slot: str | None = None
    queue_position: int | None = None
    val_bpb: float | None = None
    memory_gb: float | None = None
    training_seconds: float | None = None  # the budget spent (on the flops clock: budget seconds, see timed_seconds)
    timed_seconds: float | None = None  # the timed steps' seconds
    total_seconds: float | None = None
    eval_seconds: float | None = None
    compile_seconds: float | None = None
    compile_cache: str | None = None
    recompiles: int | None = None
    num_steps: int | None = None
    budget_clock: str | None = None
    mfu_percent: float | None = None
    tokens_per_second: float | None = None  # of timed training, on the training clock
    best_num_steps: int | None = None  # the same, for the run of the best this one is compared with
    best_mfu_percent: float | None = None
    comparable: bool | None = None  # False: the throughput differs too much from the best's run
    confirm_first: str | None = None  # why keep needs confirm() first: a marginal or incomparable gain
    wall_seconds: float | None = None  # measured by the run's worker, not taken from the log
    device: str | None = None  # the GPU model (or CPU) it ran on
    exit_code: int | None = None
    timeout_seconds: float | None = None
    best_val_bpb: float | None = None
    best_commit: str | None = None
    delta: float | None = None
    noise: str | None = None
    verified: bool | None = None  # the harness's own evaluation measured val_bpb
    integrity: str | None = None  # how val_bpb was measured, or why it is train.py's own
    unsandboxed: str | None = None  # the run had no sandbox (the user's --unsandboxed): what that allowed
    warnings: list[str] | None = None
    repeat_of: str | None = None  # the answer is an earlier run's: identical train.py on the same best
    tried_before: str | None = None  # earlier runs that set the same constants to the same values
    log: str
    tail: str | None = None
    next: str


class LiveRun(BaseModel):
    """A run in flight: queued, or running with its latest progress line."""
    run: int
    commit: str
    description: str
    status: Literal["queued", "running"]
    slot: str | None = None
    progress: Progress | None = None
    elapsed_s: int | None = None
    timeout_s: int | None = None


class Metrics(BaseModel):
    source: str
    status: Literal["ok", "crash", "timeout", "running", "missing", "empty"]
    summary: Summary | None = None
    progress: Progress | None = None
    runs: list[LiveRun] | None = None
    tail: str | None = None
    note: str | None = None
    unsandboxed: str | None = None  # the run (or a run in flight) has no sandbox
    unverified: str | None = None  # the recorded val_bpb is train.py's own, and why (review 72)


class SetupResult(BaseModel):
    branch: str
    base_commit: str
    ledger: str
    fingerprint: str
    archived_ledger: str | None = None
    limits: str | None = None
    early_stop: str | None = None  # the early stop rule, when setup turned it on
    harness_changed: str | None = None  # the harness differs from the research run's before (submit.harness_change)
    settings_changed: str | None = None  # so do the budget settings (budget_settings.change_note)
    next: str


class DecisionResult(BaseModel):
    row: Row
    branch: str
    kept_commit: str
    best_val_bpb: float | None = None
    evidence: str | None = None  # for a keep: what the gain rests on (beyond noise, confirmed, or not)
    warning: str | None = None  # for a keep of a result worse than the best it was measured against
    note: str | None = None
    unsandboxed: str | None = None  # the decided run had no sandbox


class ConfirmResult(BaseModel):
    """A candidate rerun beside a rerun of the best (its control), pair by pair."""
    run: int
    confirmed: bool
    paired_deltas: list[float]  # candidate rerun minus control rerun, per pair that both finished
    control_val_bpb: list[float]
    candidate_val_bpb: list[float]
    failed: list[str]  # commits of reruns that did not finish ok
    reused: list[str] | None = None  # earlier reruns on the same data that stood in for a run (flops clock)
    resumed: str | None = None  # data orders an earlier confirmation began and never judged, measured again
    held_to: str | None = None  # orders every confirmation is measured on (carried by a setup on one harness)
    extra_runs: int  # runs this confirmation spent
    extra_runs_total: int  # spent on controls, confirmations and noise in this research run
    next: str


class LoggedRow(BaseModel):
    row: Row
    rows_in_ledger: int


class NoiseEstimate(BaseModel):
    values: list[float]
    std: float
    spread: float
    threshold: float


class StatusResult(BaseModel):
    workspace: str
    branch: str | None = None
    set_up: bool
    best_val_bpb: float | None = None
    best_commit: str | None = None
    best_note: str | None = None  # whose the best's number is where the harness did not measure it, or no sandbox ran it
    kept_commit: str | None = None
    counts: dict[str, int]
    recent: list[Row]
    slots: int = 1
    running: str | None = None
    progress: Progress | None = None
    queued: str | None = None
    pending: str | None = None
    interrupted: str | None = None
    undecided: list[int] | None = None  # run numbers that wait for keep or discard
    limits: str | None = None  # what is left of each limit
    ended: str | None = None  # why the research run is over, once it is
    compute: str | None = None  # the research run's slot time: GPU-hours (slot-hours on a CPU), cost.run_hours
    read_only: str | None = None  # another server owns the workspace's runs
    noise: NoiseEstimate | None = None
    extra_runs: int = 0  # reruns spent on noise, controls and confirmations
    malformed_ledger_lines: int = 0
    dashboard: str | None = None  # the live page's address, when this server serves it
    unsandboxed: str | None = None  # this server's runs (or some undecided ones) have no sandbox
    records_changed: list[str] | None = None  # changes to state.json or results.tsv the server did not make
    harness_changed: str | None = None  # this research run's harness differs from the one before's
    budget_settings: str | None = None  # the research run's clock, budget and evaluation size, and where the server's
    # environment differs from them
    next: str


class NoiseResult(BaseModel):
    noise: NoiseEstimate
    runs: list[str]
    failed: list[str]


class PlotResult(BaseModel):
    path: str
    runs_plotted: int
    kept: int
    crashes_excluded: int
    reruns: int = 0  # noise repeats, confirmations and controls, drawn apart from the ideas
    not_measured: int = 0  # kept runs whose number the harness did not measure (logged by hand, unverified): hollow


class WaitResult(BaseModel):
    results: list[RunResult]
    running: int
    queued: int
    next: str


class CancelResult(BaseModel):
    run: int
    was: str
    row: Row | None = None
    note: str


class HistoryResult(BaseModel):
    total: int  # decided runs that match
    lines: list[str]  # the newest, one per run: number, commit, decision, val_bpb (delta), changes | description


class StopResult(BaseModel):
    stopped: str
    cancelled: list[int] | None = None
    running: str | None = None
    undecided: list[int] | None = None
    next: str


class SweepRange(BaseModel):
    """One constant's range in a sweep: low and high (log=true samples them on a log scale), or choices."""
    model_config = ConfigDict(extra="forbid")
    low: int | float | None = Field(None, description="smallest value (with high); whole numbers for an integer constant")
    high: int | float | None = Field(None, description="largest value (with low)")
    log: bool = Field(False, description="sample on a log scale (low must be above 0): learning rates, sizes")
    choices: list[int | float | str | bool] | None = Field(
        None, description="instead of low/high: the values to choose from, e.g. [\"L\", \"SSSL\"]")


class SweepTrial(BaseModel):
    trial: int  # the study's trial number
    params: dict[str, int | float | str | bool]
    status: str  # ok, crash, timeout, interrupted; unverified (train.py's own number: no value); repeat (answered from an
    # earlier trial); not run; the start
    run: int | None = None
    commit: str | None = None
    val_bpb: float | None = None
    delta: float | None = None  # against the best when it ran
    note: str | None = None


class SweepResult(BaseModel):
    study: str
    storage: str
    sampler: str
    trials_run: int  # this call's trials that trained
    trials_repeated: int  # this call's trials answered from an identical earlier one, with no run
    trials_in_study: int
    best: SweepTrial | None = None  # the study's best finished trial
    pending_run: int | None = None  # this call's best, left undecided because it beats the kept best
    best_val_bpb: float | None = None  # the kept best's
    beats_noise: str | None = None  # the pending run's verdict against the measured noise
    noise: NoiseEstimate | None = None
    table: list[SweepTrial]  # the study's trials, best first
    stopped: str | None = None  # why trials stopped early (a limit of the research run, a refusal)
    next: str


class ReportResult(BaseModel):
    """The morning report: where it was written, and the pull request's branch when one was asked for."""
    path: str  # the Markdown report, beside its chart
    chart: str | None = None  # its copy of progress.png (None: no row to draw yet)
    kept: int  # kept changes in the report
    ideas: int  # runs that tried an idea (reruns aside)
    extra_runs: int  # noise repeats, confirmations and controls
    slot_hours: float  # runs' wall time summed over slots (GPU-hours on GPUs)
    branch: str | None = None  # the new branch with one commit per kept change
    commits: list[str] | None = None  # its commits, oldest first
    next: str
