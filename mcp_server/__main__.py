"""Entry point: `uv run python -m mcp_server [--workspace DIR] [--http --port N]`.

stdio by default (what Claude Code starts); --http serves streamable HTTP on 127.0.0.1
only, optionally behind a bearer token. Whatever way the server ends, a training run it
started is killed with it (here for orderly exits, by the watchdog for SIGKILL).
"""
import argparse
import hmac
import os
import shlex
import signal
import sys
from pathlib import Path

DEFAULT_PORT = 8765
LOOPBACK = "127.0.0.1"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="research-loop-mcp", description="The research-loop MCP server (stdio unless --http).")
    parser.add_argument("--workspace", default=os.environ.get("RESEARCH_LOOP_WORKSPACE") or os.getcwd(),
                        help="git repository holding prepare.py and train.py (default: env "
                             "RESEARCH_LOOP_WORKSPACE, else the current directory)")
    parser.add_argument("--train-command", default=os.environ.get("RESEARCH_LOOP_TRAIN_COMMAND"),
                        help="training command, run in the workspace (default: uv run train.py)")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP on 127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--token", default=os.environ.get("RESEARCH_LOOP_TOKEN"),
                        help="bearer token required on every HTTP request (env RESEARCH_LOOP_TOKEN)")
    return parser.parse_args(argv)


def require_bearer(app, token: str):
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
                return
        await app(scope, receive, send)
    return guarded


def serve_http(srv, port: int, token: str | None) -> None:
    import uvicorn
    app = srv.streamable_http_app(host=LOOPBACK)
    if token:
        app = require_bearer(app, token)
    uvicorn.run(app, host=LOOPBACK, port=port, log_level="warning")


def main(argv=None) -> None:
    args = parse_args(argv)
    from mcp_server.loop import ResearchLoop
    from mcp_server.server import build_server

    command = shlex.split(args.train_command) if args.train_command else None
    loop = ResearchLoop(Path(args.workspace), command)
    srv = build_server(loop)

    def on_term(signum, frame):
        loop.shutdown()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if args.http:
            serve_http(srv, args.port, args.token)
        else:
            srv.run("stdio")
    except KeyboardInterrupt:
        pass
    finally:
        loop.shutdown()


if __name__ == "__main__":
    sys.exit(main())
