"""The token that guards what the server serves over HTTP: the MCP transport (--http) and the dashboard,
and the port each listens on.

Shared by mcp_server.__main__ and mcp_server.dashboard.dashboard_http (the `research-loop dashboard`
command); standard library only.
"""
import argparse
import os
import stat
import sys

TOKEN_ENV = "RESEARCH_LOOP_TOKEN"
MAX_TOKEN_BYTES = 1 << 16  # a token is a line; a huge file (or /dev/zero's like) is read no further


def http_token(args, program: str) -> str | None:
    """The token from --token-file, else from the environment; None when neither sets one. program: the command's
    name its errors begin with (review 93: the dashboard's said "research-loop-mcp:", the server's name)."""
    if args.token_file:
        try:
            token = read_token(args.token_file)
        except (OSError, UnicodeDecodeError) as exc:
            sys.exit(f"{program}: cannot read --token-file {args.token_file}: {exc}: give a plain file that holds the "
                     "token")
        if not token:
            sys.exit(f"{program}: --token-file {args.token_file} is empty: write the token in it, or leave "
                     f"--token-file out to take the token from {TOKEN_ENV}")
        return token
    return os.environ.get(TOKEN_ENV) or None


def read_token(path) -> str:
    """A token file's text, opened without blocking and read only where it is a plain file: a FIFO put at its name
    blocked the server's (or the dashboard's) start, without a word."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError("not a plain file")
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_TOKEN_BYTES).decode().strip()


def port_number(text: str) -> int:
    """A --port as argparse reads it: one out of range raised from the socket's bind, after the server started."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return int(text)
