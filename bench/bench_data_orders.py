"""How much the luck of the training data moves val_bpb: train.py and one change to it, each trained
on several data orders (AUTORESEARCH_DATA_ORDER: the stretches of the split that noise repeats,
controls and confirmations train on), for each prepared cache given, side by side in one run.

    uv run bench/bench_data_orders.py [--caches DIR,DIR] [--orders 4] [--change "DEPTH=3 UNEMBEDDING_LR=0.008"]

Per cache it prints, order by order, the baseline's val_bpb and the change's paired delta (change
minus baseline on the same stretch), then the standard deviation of each across orders: the first
is the noise measure_noise sees, the second the noise one confirmation pair is judged in. On the
flops clock a run depends only on its code and its data, so this is all the noise there is. Give
two caches to compare two corpora (or two preparations of one); the default is a fresh cache with
the offline corpus.
"""
import argparse
import ast
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, prepared_cache, python_command  # noqa: E402

from autosearch.constants import rewrite_constants  # noqa: E402
from mcp_server.core.logparse import parse_summary  # noqa: E402

DEFAULT_CHANGE = "DEPTH=3 UNEMBEDDING_LR=0.008"  # a model-size change the demo's search kept


def parse_change(text: str) -> dict:
    changes = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--change: {item!r} is not NAME=VALUE (for example DEPTH=3).")
        try:
            changes[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            sys.exit(f"--change: {value!r} (for {name}) is not a Python literal.")
    return changes


def val_bpb(script: Path, cache: Path, order: int) -> float:
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_DATA_ORDER=str(order),
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    done = subprocess.run(python_command() + [str(script)], cwd=REPO, env=env, capture_output=True, text=True)
    summary = parse_summary(done.stdout)
    if done.returncode != 0 or summary is None:
        sys.exit(f"{script} on data order {order} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return summary.val_bpb


def measure(cache: Path, scripts: dict, orders: int) -> list[tuple[float, float]]:
    """(baseline, change - baseline) per data order."""
    rows = []
    for order in range(orders):
        base = val_bpb(scripts["baseline"], cache, order)
        delta = val_bpb(scripts["change"], cache, order) - base
        print(f"  {cache}  order {order}: baseline {base:.6f}, change {delta:+.6f}", flush=True)
        rows.append((base, delta))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", help="prepared caches, comma-separated (default: a fresh offline one)")
    parser.add_argument("--orders", type=int, default=4, help="data orders 0 .. N-1 per cache")
    parser.add_argument("--change", default=DEFAULT_CHANGE, help="constants of train.py to set, NAME=VALUE ...")
    args = parser.parse_args(argv)
    if args.orders < 2:
        parser.error("--orders must be 2 or more: a spread needs two values")
    caches = [Path(c) for c in args.caches.split(",")] if args.caches else [prepared_cache(None)]
    for cache in caches:
        if not (cache / "prepared.json").exists():
            parser.error(f"{cache} holds no prepared.json: prepare it first (AUTORESEARCH_CACHE={cache} "
                         "uv run prepare.py --profile cpu)")
    source = (REPO / "train.py").read_text()
    with tempfile.TemporaryDirectory(prefix="bench-orders-") as folder:
        scripts = {"baseline": Path(folder) / "baseline.py", "change": Path(folder) / "change.py"}
        scripts["baseline"].write_text(source)
        scripts["change"].write_text(rewrite_constants(source, parse_change(args.change)))
        results = {cache: measure(cache, scripts, args.orders) for cache in caches}
    print(f"\n{'cache':40} {'baseline mean':>13} {'its std':>8} {'delta mean':>10} {'its std':>8}  ({args.change})")
    for cache, rows in results.items():
        bases, deltas = [b for b, _ in rows], [d for _, d in rows]
        print(f"{str(cache):40} {statistics.fmean(bases):>13.4f} {statistics.stdev(bases):>8.4f} "
              f"{statistics.fmean(deltas):>+10.4f} {statistics.stdev(deltas):>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
