"""The token that guards what the server serves over HTTP: the MCP transport (--http) and the dashboard,
and the port each listens on.

Shared by mcp_server.__main__ and mcp_server.dashboard.dashboard_http (the `research-loop dashboard`
command); standard library only.
"""
import argparse
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


def port_number(text: str) -> int:
    """A --port as argparse reads it: one out of range raised from the socket's bind, after the server started."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return int(text)
