"""What experiment tracking costs the loop: the same fake-trainer experiments with tracking off, into
the workspace's MLflow store, into a server that never answers, into a closed port, and as W&B
offline runs; the tool calls' times side by side (the `mlflow` and `wandb` extras).

    uv run python bench/bench_tracking.py [--experiments 20]

Target: the tool calls take as long with tracking on, up or down, as with it off (the tracker works
on a thread of its own, from the records).
"""
import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from server_support import Lab, make_cache, make_workspace, set_knobs  # noqa: E402

from mcp_server.core import tracking, wandb_tracking  # noqa: E402

CALLS = ("run_experiment", "keep", "discard", "status")


def black_hole() -> tuple[socket.socket, str]:
    """A port that takes connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def night(mode: str, experiments: int) -> dict[str, list[float]]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-tracking-{mode}-"))
    os.environ["AUTORESEARCH_CACHE"] = str(make_cache(root))
    lab = Lab(make_workspace(root))
    hole = None
    uri = {"off": None, "local store": tracking.default_uri(lab.ws), "closed port": closed_port()}.get(mode)
    if mode == "never answers":
        hole, uri = black_hole()
    timing = dict(poll_s=0.5, retry_s=(1.0, 5.0))
    tracker = tracking.Tracker(lab.ws, uri, **timing).start() if uri else None
    if mode == "wandb offline":
        tracker = wandb_tracking.tracker(lab.ws, **timing).start()
    times = {name: [] for name in CALLS}

    def timed(name, **args):
        t0 = time.perf_counter()
        lab.ok(name, **args)
        times[name].append(time.perf_counter() - t0)

    lab.ok("setup", tag="bench")
    for n in range(experiments + 1):
        set_knobs(lab.ws, val_bpb=1.0 - 0.001 * n if n % 2 == 0 else 1.5, steps=20)
        timed("run_experiment", description=f"experiment {n}")
        timed("keep", unconfirmed=True) if n % 2 == 0 else timed("discard")
        timed("status")
    if tracker:
        tracker.stop(timeout=0)
    lab.loop.shutdown()
    if hole:
        hole.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=20)
    args = parser.parse_args()
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "600"  # the never-answering server holds each call this long
    modes = ("off", "local store", "never answers", "closed port", "wandb offline")
    results = {mode: night(mode, args.experiments) for mode in modes}
    print(f"\nmedian / max seconds per call, {args.experiments + 1} experiments (fake trainer)")
    print(f"{'call':16}" + "".join(f"{mode:>22}" for mode in modes))
    for name in CALLS:
        cells = [f"{statistics.median(results[m][name]):.3f} / {max(results[m][name]):.3f}" if results[m][name]
                 else "-" for m in modes]
        print(f"{name:16}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
