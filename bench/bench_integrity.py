"""What the integrity pipeline costs a real run on the CPU profile, in one run:

    uv run python bench/bench_integrity.py [--cache DIR] [--compile] [--pairs N]

The same train.py at the profile's full budget (eager, or compiled with --compile): once on its
own (`python train.py`, its own evaluation only) and once through the server (sandbox, export, the
separate evaluation of the exported model in an isolated interpreter, whose number train.py then
prints in place of its own evaluation, the checks), in pairs: one run of a 2-core machine's wall
time varies by several seconds. Prints each one's wall time, where the separate evaluation's time
goes, and the medians' ratios against the budget.

Targets (issue 13): export + separate evaluation + checks at most 10% of the budget; the run's
wall time at most 1.3x the budget.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import prepared_cache  # noqa: E402

from mcp_server.core import logparse  # noqa: E402
from mcp_server.loop import ResearchLoop  # noqa: E402
from mcp_server.core.models import Summary  # noqa: E402
from mcp_server.server import build_server  # noqa: E402

HARNESS = ("prepare.py", "train.py", "nanochat")
MAX_COST_SHARE = 0.10
MAX_WALL_RATIO = 1.3


def workspace(folder: Path) -> Path:
    ws = folder / "ws"
    ws.mkdir(parents=True)
    for name in HARNESS:
        source = REPO / name
        (shutil.copytree(source, ws / name, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir()
         else shutil.copy(source, ws / name))
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", "harness"]):
        subprocess.run(["git", "-C", str(ws), *args], check=True)
    return ws


def alone(ws: Path) -> tuple[float, Summary]:
    """(wall seconds, train.py's summary block)"""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "train.py"], cwd=ws, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, logparse.parse_summary(out)


def through_the_server(ws: Path) -> dict:
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1)

    async def go():
        async with Client(build_server(loop)) as client:
            await client.call_tool("setup", {"tag": "bench"})
            t0 = time.perf_counter()
            result = await client.call_tool("run_experiment", {"description": "baseline", "timeout_seconds": 1800})
            return result.structured_content, time.perf_counter() - t0
    try:
        result, wall = anyio.run(go)
    finally:
        loop.shutdown()
    report = (ws / result["log"]).with_suffix(".report.json")
    evaluation = json.loads(report.read_text()).get("evaluation") or {}
    return dict(result=result, wall=wall, evaluation=evaluation)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a prepared CPU-profile cache (default: a fresh temp one)")
    parser.add_argument("--compile", action="store_true",
                        help="train compiled, as the CPU profile does by default (a first run, untimed, warms it)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="alone/served pairs, each on a fresh workspace; the verdicts take the median")
    args = parser.parse_args()
    cache = prepared_cache(args.cache)
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    os.environ["AUTORESEARCH_COMPILE"] = "1" if args.compile else "0"
    for name in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS"):
        os.environ.pop(name, None)
    from prepare import TIME_BUDGET
    folder = Path(tempfile.mkdtemp(prefix="bench-integrity-"))
    print(f"cache {cache}, budget {TIME_BUDGET}s, {'compiled' if args.compile else 'eager'}, "
          f"bubblewrap {'yes' if shutil.which('bwrap') else 'NO'}, "
          f"load {os.getloadavg()[0]:.1f}, {args.pairs} pair(s)")
    if args.compile:  # the timed runs then start warm: the cost measured is the pipeline's, not a compile
        print("  train.py alone, warming the compile cache ...", end="", flush=True)
        print(f" {alone(workspace(folder / 'warm-up'))[0]:.0f} s")
    costs, walls = [], []
    for pair in range(1, args.pairs + 1):
        ws = workspace(folder / f"pair{pair}")
        bare, summary = alone(ws)
        served = through_the_server(ws)
        r, e = served["result"], served["evaluation"]
        assert r["status"] == "ok", r.get("tail")
        costs.append(served["wall"] - bare)
        walls.append(served["wall"])
        print(f"pair {pair}: alone {bare:.1f} s wall (compile cache {summary.compile_cache}, its own evaluation "
              f"{summary.eval_seconds:.1f} s); through the server "
              f"{served['wall']:.1f} s (compile cache {r.get('compile_cache')}), val_bpb {r['val_bpb']:.6f} "
              f"(verified: {r.get('verified')}); cost {costs[-1]:.1f} s")
        print(f"  the harness's evaluation, in place of train.py's: export {e.get('export_seconds')} s, then "
              f"{e.get('wall_seconds')} s while train.py waits (load {e.get('load_seconds')} s, evaluation "
              f"{e.get('eval_seconds')} s, causality {e.get('causality_seconds')} s, checks and start the rest)")
    cost, wall = statistics.median(costs), statistics.median(walls)
    print(f"integrity cost (server wall - alone wall), median of {len(costs)}: {cost:.1f} s = "
          f"{cost / TIME_BUDGET:.0%} of the budget (target <= {MAX_COST_SHARE:.0%}) "
          f"{'met' if cost <= MAX_COST_SHARE * TIME_BUDGET else 'MISSED'}")
    ratio = wall / TIME_BUDGET
    print(f"run wall / budget, median: {ratio:.2f}x (target <= {MAX_WALL_RATIO}x) "
          f"{'met' if ratio <= MAX_WALL_RATIO else 'MISSED'}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
