"""ResearchLoop's work along the life of a run: modules of functions over one LoopCore, each
importing only the modules before it in this list (tests/test_layout.py checks there is no cycle):
  runs          LoopCore, the core layer: state access, the rules every phase checks, the run
                records and their reading, the constants the phases share
  results       a finished run's result: recording, reading, comparability, throughput
  measurements  noise estimates, data orders, the reruns a confirmation can reuse
  dispatch      queue to slots, the executor's callback, ownership and recovery
  submit        setup, and run_experiment's checks and candidate commit
  report        status and the next step, metrics, live progress, history
  decide        keep, discard, confirm, reapply, cancel, stop, log_result
mcp_server.loop.ResearchLoop is LoopCore with these functions as its methods.

Imports from the package: scripts, core, executors.
"""
