"""ResearchLoop's work along the life of a run: modules of functions over one LoopCore, each
importing only the modules before it in this list (tests/test_layout.py checks there is no cycle):
  runs          LoopCore, the core layer: state access, the rules every phase checks, the run
                records and their reading, the constants the phases share
  early_stop    opt-in: the watcher that stops a run lagging its best's loss curve
  novelty       a train.py already tried on the same best: answered from its run, or refused
  results       a finished run's result: recording, reading, comparability, throughput
  measurements  noise estimates, data orders, the reruns a confirmation can reuse
  dispatch      queue to slots, the executor's callback, ownership and recovery
  submit        setup, and run_experiment's checks and candidate commit
  overview      status and the next step, metrics, live progress, history
  decide        keep, discard, confirm, reapply, cancel, stop, log_result
  sweep         the sweep tool: an Optuna study whose trials are ordinary candidates
  morning       the morning report from the server's records, and the pull request's branch
mcp_server.loop.ResearchLoop is LoopCore with these functions as its methods.

Imports from the package: scripts, core, executors.
"""
