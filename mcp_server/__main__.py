"""Entry point: `uv run python -m mcp_server [--workspace DIR] [--slots N] [--executor local|ray|slurm]
[--http --port N] [--dashboard PORT] [--unsandboxed] [--notify URL] [--track mlflow [--mlflow-uri URI] | wandb]`.

stdio by default (what Claude Code starts); --http serves streamable HTTP on 127.0.0.1
only, optionally behind a bearer token taken from RESEARCH_LOOP_TOKEN or --token-file (never
from the command line, which every local user can read). --dashboard serves the live web page
(mcp_server/dashboard/dashboard_http.py) on a port of its own, in either mode, behind the same token.
--notify posts to a webhook on a keep, the research run's end and failures in a row (mcp_server/core/notify.py).
Whatever way the server ends, the training runs it started are killed with it (here for
orderly exits, by each run's worker when its pipe from the server closes).
"""
import argparse
import hmac
import os
import shlex
import signal
import sys
from pathlib import Path

from mcp_server.core import notify, trackers, tracking
from mcp_server.scripts import sandbox
from mcp_server.dashboard.auth import http_token, port_number
from mcp_server.executors.executor import SLOTS_ENV

DEFAULT_PORT = 8765
EXECUTORS = ("local", "ray", "slurm")
LOOPBACK = "127.0.0.1"


def slot_count(text: str) -> int:
    """--slots as argparse reads it, from the flag or the environment (where 0 made a server that could never run)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"the slots (--slots, or env {SLOTS_ENV}) are a whole number of 1 or more, "
                                         f"got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="research-loop-mcp", allow_abbrev=False,
                                     description="The research-loop MCP server (stdio unless --http).")
    parser.add_argument("--workspace", default=os.environ.get("RESEARCH_LOOP_WORKSPACE") or os.getcwd(),
                        help="git repository holding prepare.py and train.py (default: env "
                             "RESEARCH_LOOP_WORKSPACE, else the current directory)")
    parser.add_argument("--train-command", default=os.environ.get("RESEARCH_LOOP_TRAIN_COMMAND"),
                        help="training command, run in the workspace (default: uv run train.py)")
    parser.add_argument("--slots", type=slot_count, default=os.environ.get(SLOTS_ENV) or None,
                        help="runs at once, one per slot (default: env RESEARCH_LOOP_SLOTS, else the number of "
                             "visible GPUs, 1 without a GPU; on a CPU, N > 1 splits the cores between slots)")
    parser.add_argument("--executor", choices=EXECUTORS, default=os.environ.get("RESEARCH_LOOP_EXECUTOR") or "local",
                        help="where runs execute: this machine's slots, a Ray cluster (extra `ray`) or SLURM "
                             "(extra `slurm`) (default: env RESEARCH_LOOP_EXECUTOR, else local)")
    parser.add_argument("--ray-address", default=None,
                        help="the Ray cluster's dashboard, e.g. http://HEAD:8265 (default: env RAY_ADDRESS, else a "
                             "cluster started on this machine)")
    parser.add_argument("--slurm-folder", type=Path, default=os.environ.get("RESEARCH_LOOP_SLURM_FOLDER"),
                        help="a folder on the file system the SLURM nodes share, for each run's code and logs "
                             "(default: env RESEARCH_LOOP_SLURM_FOLDER, else .research-loop/slurm in the workspace)")
    parser.add_argument("--slurm-partition", default=os.environ.get("RESEARCH_LOOP_SLURM_PARTITION"),
                        help="sbatch --partition (default: env RESEARCH_LOOP_SLURM_PARTITION, else the cluster's)")
    parser.add_argument("--slurm-account", default=os.environ.get("RESEARCH_LOOP_SLURM_ACCOUNT"),
                        help="sbatch --account (default: env RESEARCH_LOOP_SLURM_ACCOUNT)")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP on 127.0.0.1")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the bearer token every HTTP request (MCP and dashboard) must carry "
                             "(default: env RESEARCH_LOOP_TOKEN; none: any local client is accepted)")
    parser.add_argument("--dashboard", type=port_number, metavar="PORT",
                        default=os.environ.get("RESEARCH_LOOP_DASHBOARD") or None,
                        help="also serve the dashboard, a live web page of the research run, on 127.0.0.1:PORT "
                             "(0 picks a free port; default: env RESEARCH_LOOP_DASHBOARD, else none)")
    parser.add_argument("--unsandboxed", action="store_true", default=sandbox.opted_in(),
                        help="accept runs without a sandbox where none can run here (no bubblewrap, or one that "
                             "cannot start); every answer and ledger row then says unsandboxed. Without it such "
                             f"runs are refused (default: env {sandbox.UNSANDBOXED_ENV}=1)")
    notify.add_arguments(parser)
    tracking.add_arguments(parser)
    args = parser.parse_args(argv)
    # argparse checks its choices on flags, not on a default taken from the environment: a typo there (SLURM) ran every
    # run on this machine, unsaid
    if args.executor not in EXECUTORS:
        parser.error(f"--executor (or env RESEARCH_LOOP_EXECUTOR) must be one of {', '.join(EXECUTORS)}, "
                     f"got {args.executor!r}")
    problem = tracking.arguments_problem(args) or notify.arguments_problem(args)
    if problem:
        parser.error(problem)
    try:  # the server split it as it started, and an unclosed quote raised out of it
        args.train_command = shlex.split(args.train_command) if args.train_command else None
    except ValueError as exc:
        parser.error(f"--train-command (or env RESEARCH_LOOP_TRAIN_COMMAND) {args.train_command!r}: {exc}; "
                     "quote it as a shell would")
    return args


def require_bearer(app, token: str):
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`."""
    expected = token.encode()

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), expected):
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
    else:
        print(f"research-loop-mcp: WARNING: no token set (RESEARCH_LOOP_TOKEN or --token-file): every local user "
              f"and process can call the tools on http://{LOOPBACK}:{port}/mcp", file=sys.stderr, flush=True)
    uvicorn.run(app, host=LOOPBACK, port=port, log_level="warning")


def start_dashboard(loop, port: int, token: str | None):
    """The dashboard on its own thread; a port in use costs the page, never the MCP server."""
    from mcp_server.dashboard import dashboard_http
    try:
        server = dashboard_http.DashboardServer(loop.root, port, token).start()
    except OSError as exc:
        loop.dashboard = f"not served: {LOOPBACK}:{port} {exc.strerror}"
        print(f"research-loop-mcp: the dashboard is {loop.dashboard}; pick another --dashboard port",
              file=sys.stderr, flush=True)
        return None
    loop.dashboard = server.url
    dashboard_http.publish(loop.root, server.url, token=bool(token))
    if not token:
        print(f"research-loop-mcp: no token set (RESEARCH_LOOP_TOKEN or --token-file): every local user and process "
              f"can read the dashboard on {server.url}", file=sys.stderr, flush=True)
    return server


def stop_dashboard(loop, server) -> None:
    if server is not None:
        from mcp_server.dashboard import dashboard_http
        dashboard_http.withdraw(loop.root)


def choose_executor(args, command: list[str]):
    """(slots, a factory of the executor from the Workspace, or None for the local pool). A missing
    extra ends the server with the command that installs it."""
    from mcp_server.core.models import Refusal
    try:
        if args.executor == "ray":
            from mcp_server.executors import ray_executor
            slots, gpus = ray_capacity(args)
            return slots, lambda ws: ray_executor.RayExecutor(ws, command, slots, args.ray_address, gpus)
        if args.executor == "slurm":
            from mcp_server.executors import slurm_executor
            slurm_executor.submitit_module()
            slurm_executor.check_cluster()
            slots = args.slots or slurm_executor.DEFAULT_CAPACITY
            return slots, lambda ws: slurm_executor.SlurmExecutor(
                ws, command, slots, args.slurm_folder or ws.root / ".research-loop" / "slurm",
                partition=args.slurm_partition, account=args.slurm_account)
    except Refusal as exc:
        sys.exit(f"research-loop-mcp: {exc}")
    return args.slots, None


def ray_capacity(args) -> tuple[int, bool]:
    """Runs at once on Ray: --slots, else the cluster's GPUs (its CPUs where it has none). An
    unreachable cluster does not stop the server: each run then says why it could not start."""
    from mcp_server.executors import ray_executor
    ray_executor.ray_jobs()
    try:
        resources = ray_executor.cluster_resources(ray_executor.connect(args.ray_address))
    except Exception as exc:  # Refusal (unreachable), or the state API's own errors
        print(f"research-loop-mcp: WARNING: {exc} Runs will fail to start until the cluster is reachable.",
              file=sys.stderr, flush=True)
        return args.slots or 1, True
    gpus = int(resources.get("GPU", 0))
    return args.slots or max(1, gpus or int(resources.get("CPU", 1))), gpus > 0


def start_tracking(args, loop):
    """The tracker's thread, if asked for; a missing extra ends the server with the command that installs it."""
    if not args.track:
        return None
    missing = tracking.missing_extra(args.track)
    if missing:
        sys.exit(f"research-loop-mcp: {missing}")
    return trackers.tracker(loop.root, args.track, args.mlflow_uri, owned=lambda: loop.state.owned).start()


def main(argv=None) -> None:
    args = parse_args(argv)
    import anyio
    from mcp_server.loop import ResearchLoop
    from mcp_server.phases.runs import DEFAULT_TRAIN_COMMAND
    from mcp_server.server import build_server, serve_stdio

    slots, executor = choose_executor(args, args.train_command or DEFAULT_TRAIN_COMMAND)
    loop = ResearchLoop(Path(args.workspace), args.train_command, slots, executor, unsandboxed=args.unsandboxed)
    loop.notifier = notify.Notifier(args.notify, args.notify_format)
    srv = build_server(loop)
    tracker = start_tracking(args, loop)
    page = (start_dashboard(loop, args.dashboard, http_token(args, "research-loop-mcp")) if args.dashboard is not None
            else None)

    def on_term(signum, frame):
        loop.shutdown()
        stop_dashboard(loop, page)
        loop.notifier.close()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            if args.http:
                serve_http(srv, args.port, http_token(args, "research-loop-mcp"))
            else:
                anyio.run(serve_stdio, srv)
        except* BrokenPipeError:  # the client left (Ctrl-C in the demo) before its answer: no one to tell
            pass
    except KeyboardInterrupt:
        pass
    finally:
        loop.shutdown()
        stop_dashboard(loop, page)
        loop.notifier.close()
        if tracker is not None:
            tracker.stop()  # after a last pass, or its first seconds: the next server redoes what is left


if __name__ == "__main__":
    sys.exit(main())
