"""The token that guards what the server serves over HTTP: the MCP transport (--http) and the dashboard.

Shared by mcp_server.__main__ and mcp_server.dashboard_http (the `research-loop dashboard`
command); standard library only.
"""
import os
import sys

TOKEN_ENV = "RESEARCH_LOOP_TOKEN"


def http_token(args) -> str | None:
    """The token from --token-file, else from the environment; None when neither sets one."""
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            sys.exit(f"research-loop-mcp: cannot read --token-file {args.token_file}: {exc}")
        if not token:
            sys.exit(f"research-loop-mcp: --token-file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None
