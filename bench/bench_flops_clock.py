"""The flops clock's calibration: how long the CPU profile's budget takes in wall time when the clock's
rate comes from a large matmul's peak (before) or from training-shaped work (prepare.py now), side by
side in one run on this machine.

    uv run bench/bench_flops_clock.py [--cache DIR] [--budget 60] [--eager]

Both rates are measured here, then the same train.py trains the same budget once on each (a copy of
the cache's record with only the rate changed). On a CPU whose matrix units make a large matmul far
faster than the rest of a small model's step (AMX), the old rate made a budget second take about three
wall seconds; the target is the same on every CPU: a budget second takes at most about one second.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, prepared_cache, python_command  # noqa: E402

sys.path.insert(0, str(REPO))
from mcp_server.core.logparse import parse_summary  # noqa: E402
from nanochat import platform  # noqa: E402
from nanochat.profiles import PROFILES  # noqa: E402

OLD_SHARE_OF_MATMUL_PEAK = 0.5  # the clock's rate before: half the square matmul's peak
TARGET_WALL_PER_BUDGET = 1.1  # a budget second takes at most this many seconds of training


def cache_with_rate(cache: Path, rate: float) -> Path:
    """A cache that is `cache` in all but the flops clock's rate (its folders linked, not copied)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-flops-clock-"))
    for entry in cache.iterdir():
        if entry.name != "prepared.json":
            (folder / entry.name).symlink_to(entry)
    record = json.loads((cache / "prepared.json").read_text())
    if record.get("budget_clock") != "flops":
        sys.exit(f"{cache} is not prepared for the flops clock (the CPU profile's): pass another --cache.")
    (folder / "prepared.json").write_text(json.dumps(dict(record, flops_per_budget_second=rate)))
    return folder


def train(name: str, cache: Path, budget: int, eager: bool) -> dict:
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_TIME_BUDGET=str(budget),
               AUTORESEARCH_COMPILE="0" if eager else "1", PYTHONUNBUFFERED="1")
    print(f"  {name} ...", end="", flush=True)
    done = subprocess.run(python_command() + ["train.py"], cwd=REPO, env=env, capture_output=True, text=True)
    summary = parse_summary(done.stdout)
    if done.returncode != 0 or summary is None:
        sys.exit(f"\n{name}: train.py failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f" {summary.num_steps} steps", flush=True)
    return {"steps": summary.num_steps, "val_bpb": summary.val_bpb, "mfu": summary.mfu_percent,
            "timed": summary.timed_seconds, "total": summary.total_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="a cache prepared for the CPU profile (default: a fresh one)")
    parser.add_argument("--budget", type=int, default=60, help="seconds of budget per run (default 60)")
    parser.add_argument("--eager", action="store_true", help="train eager, as the tests do (default: compiled)")
    args = parser.parse_args()
    cache = prepared_cache(args.cache)
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    import prepare  # reads the cache's record on import

    peak = platform.measure_matmul_flops()
    rates = {"before: half the matmul peak": peak * OLD_SHARE_OF_MATMUL_PEAK,
             "now: training-shaped work": prepare.calibrate_flops_clock(PROFILES["cpu"])}
    print(f"{platform.device_name()}, {os.cpu_count()} CPUs; square matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"per thread-second; budget {args.budget} s, {'eager' if args.eager else 'compiled'}")
    results = {name: train(name, cache_with_rate(cache, rate), args.budget, args.eager) for name, rate in rates.items()}
    print(f"\n{'rate':<30} {'GFLOP/budget s':>14} {'steps':>6} {'val_bpb':>9} {'MFU %':>6} "
          f"{'training s':>10} {'per budget s':>12} {'run s':>6}")
    for name, result in results.items():
        per_budget = result["timed"] / args.budget
        print(f"{name:<30} {rates[name] / 1e9:>14.1f} {result['steps']:>6} {result['val_bpb']:>9.4f} "
              f"{result['mfu']:>6.1f} {result['timed']:>10.1f} {per_budget:>12.2f} {result['total']:>6.1f}")
    now = results["now: training-shaped work"]["timed"] / args.budget
    verdict = "met" if now <= TARGET_WALL_PER_BUDGET else "MISSED"
    print(f"\ntarget: a budget second takes at most {TARGET_WALL_PER_BUDGET} s of training now: {now:.2f} ({verdict})")
    print("(training s: the timed steps on the CPU-seconds-per-thread clock, the wall time on a quiet machine)")


if __name__ == "__main__":
    main()
