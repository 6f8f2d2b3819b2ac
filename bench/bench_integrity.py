"""What the integrity pipeline costs a real run on the CPU profile, in one run:

    uv run python bench/bench_integrity.py [--cache DIR]

The same train.py, eager, at the profile's full budget: once on its own (`python train.py`, its
own evaluation only) and once through the server (sandbox, export, the separate evaluation of the
exported model in an isolated interpreter, the checks). Prints each one's wall time, the export
and separate evaluation times, and the ratios against the budget.

Targets (issue 13): export + separate evaluation + checks at most 10% of the budget; the run's
wall time at most 1.3x the budget.
"""
import argparse
import json
import os
import shutil
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

from mcp_server.loop import ResearchLoop  # noqa: E402
from mcp_server.server import build_server  # noqa: E402

HARNESS = ("prepare.py", "train.py", "nanochat")
MAX_COST_SHARE = 0.10
MAX_WALL_RATIO = 1.3


def workspace(folder: Path) -> Path:
    ws = folder / "ws"
    ws.mkdir()
    for name in HARNESS:
        source = REPO / name
        (shutil.copytree(source, ws / name, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir()
         else shutil.copy(source, ws / name))
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", "harness"]):
        subprocess.run(["git", "-C", str(ws), *args], check=True)
    return ws


def alone(ws: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "train.py"], cwd=ws, check=True, capture_output=True)
    return time.perf_counter() - t0


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
    return dict(result=result, wall=wall, export=evaluation.get("export_seconds"),
                evaluation=evaluation.get("wall_seconds") or evaluation.get("seconds"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a prepared CPU-profile cache (default: a fresh temp one)")
    args = parser.parse_args()
    cache = prepared_cache(args.cache)
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    os.environ["AUTORESEARCH_COMPILE"] = "0"
    for name in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS"):
        os.environ.pop(name, None)
    from prepare import TIME_BUDGET
    folder = Path(tempfile.mkdtemp(prefix="bench-integrity-"))
    ws = workspace(folder)
    print(f"cache {cache}, budget {TIME_BUDGET}s, bubblewrap {'yes' if shutil.which('bwrap') else 'NO'}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("  train.py alone ...", end="", flush=True)
    bare = alone(ws)
    print(f" {bare:.0f} s\n  through the server ...", end="", flush=True)
    served = through_the_server(ws)
    print(f" {served['wall']:.0f} s")
    r = served["result"]
    assert r["status"] == "ok", r.get("tail")
    cost = served["wall"] - bare
    print(f"\nalone: {bare:.1f} s wall; through the server: {served['wall']:.1f} s wall, val_bpb {r['val_bpb']:.6f} "
          f"(verified: {r.get('verified')}), export {served['export']} s, separate evaluation {served['evaluation']} s")
    print(f"integrity cost (server wall - alone wall): {cost:.1f} s = {cost / TIME_BUDGET:.0%} of the budget "
          f"(target <= {MAX_COST_SHARE:.0%}) {'met' if cost <= MAX_COST_SHARE * TIME_BUDGET else 'MISSED'}")
    ratio = served["wall"] / TIME_BUDGET
    print(f"run wall / budget: {ratio:.2f}x (target <= {MAX_WALL_RATIO}x) {'met' if ratio <= MAX_WALL_RATIO else 'MISSED'}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
