"""research-loop's MCP server, the package the plugin starts (`python -m mcp_server`, `research-loop-mcp`).

Its top level is the MCP surface: __main__.py (the server's options and transports), cli.py
(`research-loop overnight | dashboard`), server.py (the tools), stdio_lines.py (the
stdio input checked before the SDK reads it) and loop.py (ResearchLoop, the face
the tools call). The rest lives in sub-packages, each importing only those before it here:
  scripts     worker.py, node.py, sandbox.py: standard library only, they ship to cluster nodes
  core        the loop's records and rules: models, state, ledger, workspace, integrity, noise, limits,
              history, logparse, plot
  executors   where runs execute: the local pool, Ray, SLURM
  phases      ResearchLoop's work along the life of a run, over one core layer (phases.runs)
  overnight   headless agent sessions until a limit is met
  dashboard   the read-only web page and its HTTP token
The top level may import every sub-package; no sub-package imports the top level.
"""
