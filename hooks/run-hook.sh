#!/bin/sh
# Runs hooks/research_loop_hook.py (standard library only) with the first Python 3 found:
# python3 on PATH, else the Python that uv finds. Without either the hook cannot run; Claude Code
# then reports the error; an edit is refused (hooks.json: onFailure block), any other action goes
# ahead (the MCP server still enforces the rules).
here=${0%/*}  # no dirname: the hook must run with a bare PATH
if command -v python3 >/dev/null 2>&1; then
    exec python3 "$here/research_loop_hook.py" "$@"
fi
if command -v uv >/dev/null 2>&1; then
    exec uv run --no-project --quiet python "$here/research_loop_hook.py" "$@"
fi
echo "research-loop: no python3 and no uv on PATH; install uv (curl -LsSf https://astral.sh/uv/install.sh | sh) and restart Claude Code." >&2
exit 1
