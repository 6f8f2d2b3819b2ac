"""The loop's records and rules: models (the tools' answers, Refusal), state (state.json, its
transaction, the owner lock), ledger (rows, results.tsv), workspace (git), integrity (the harness's
evaluation, time and flops checks), budget_settings (the clock, budget and evaluation size a research
run recorded at setup), noise, limits (stop conditions; standard library only, shared with the hooks),
history (what a run changed in train.py), logparse (the summary block), plot.

Imports from the package: scripts.
"""
