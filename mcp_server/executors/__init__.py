"""Where runs execute: executor (RunSpec, Outcome, LocalPool: one worktree per slot), cluster
(what the Ray and SLURM executors share), ray_executor and slurm_executor (their extras imported
lazily). Each starts scripts/worker.py (locally) or scripts/node.py (on a node) for a run and calls
back once it is over.

Imports from the package: scripts, core.
"""
