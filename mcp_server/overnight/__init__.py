"""The overnight runner: headless `claude -p` sessions on a workspace until one of its limits is met
(`research-loop overnight`).

Imports from the package: scripts, core.
"""
