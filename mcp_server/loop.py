"""The research loop's face: ResearchLoop, what the MCP tools and the tests call.

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

The work is done by the modules of mcp_server/phases/, along the life of a run, each a set of
functions over the core (runs.LoopCore: the state, the workspace, the executor, the rules and the
run records), and each importing only the modules above it in this list:
  runs          the core
  early_stop    the opt-in watcher of running runs' loss curves
  novelty       a train.py already tried on the same best
  results       a finished run's result: recording, reading, comparability, throughput
  measurements  noise estimates and the reruns a confirmation can reuse
  dispatch      queue to slots, the executor's callback, ownership and recovery
  submit        setup, and run_experiment's checks and candidate commit
  overview      status and the next step, metrics, live progress, history
  decide        keep, discard, confirm, reapply, cancel, stop, log_result
ResearchLoop is the core with the phases' functions as its methods.
"""
from pathlib import Path

from mcp_server.phases import decide, dispatch, early_stop, measurements, overview, results
from mcp_server.phases import submit as submitting
from mcp_server.core.models import Refusal
from mcp_server.phases.runs import LoopCore


class ResearchLoop(LoopCore):
    def __init__(self, root: Path, train_command: list[str] | None = None, slots: int | None = None,
                 executor=None, unsandboxed: bool = False):
        """executor: makes the executor from the Workspace (a Ray or SLURM one); default the local pool.
        unsandboxed: the user accepts runs without a sandbox where none can run (--unsandboxed)."""
        super().__init__(root, train_command, slots, executor, unsandboxed)
        self.watcher = early_stop.Watcher(self)  # stops hopeless runs where setup asked for it
        try:
            self.take_over()
        except Refusal:
            pass  # not a repository, or a corrupt state file: every tool says what to do

    take_over = dispatch.take_over
    run_command = dispatch.run_command
    wait_ended = dispatch.wait_ended

    setup = submitting.setup
    submit = submitting.submit

    answer_for = results.answer_for

    confirmation_orders = measurements.confirmation_orders
    noise_orders = measurements.noise_orders
    noise_values = measurements.noise_values
    rerun_value = staticmethod(measurements.rerun_value)
    store_noise = measurements.store_noise
    store_measured_noise = measurements.store_measured_noise
    record_confirmation = measurements.record_confirmation
    note_pair = measurements.note_pair
    one_call = measurements.one_call
    judge_pairs = staticmethod(measurements.judge_pairs)

    status = overview.status
    read_metrics = overview.read_metrics
    live = overview.live
    history = overview.history

    keep = decide.keep
    confirmation_plan = decide.confirmation_plan
    discard = decide.discard
    cancel = decide.cancel
    stop = decide.stop
    settle_reruns = decide.settle_reruns
    reapply = decide.reapply
    log_result = decide.log_result
