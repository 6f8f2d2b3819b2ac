"""Search strategies side by side: greedy coordinate search against Optuna's TPE and CMA-ES (the
sweep tool), each given the same wall time with a short training budget, then the best of each
trained again on data orders that no search used.

    uv run bench/bench_search.py [--minutes 60] [--budget-seconds 20] [--orders 3] [--cache DIR] [--slots 1]
    uv run bench/bench_search.py --experiments 1 --parallel --orders 1 --budget-seconds 3   # a smoke-size run
    uv run bench/bench_search.py ... --keep-workspaces DIR   # leave the workspaces in DIR (for bench_early_stop.py)

Each strategy is demo.py in a workspace of its own (the demo's loop through the MCP server:
baseline, a noise repeat, experiments, confirmations), one strategy after another so each has the
machine to itself (--parallel: all at once, each beside the others, for a machine others load
anyway). Then the baseline's train.py and each strategy's best are trained on the held-out
data orders (after the highest any search's reruns used). Printed side by side: runs per hour (every
ledger row over the strategy's wall time), experiments, extra runs (noise, controls, confirmations),
the best kept val_bpb as the search saw it, and the best's mean on the held-out orders with its
paired delta against the baseline on the same orders. On the flops clock a run depends only on its
code and its data, so the held-out spread is the noise a strategy's gain must beat.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data_orders import val_bpb  # noqa: E402
from bench_train import REPO, prepared_cache  # noqa: E402

from autosearch.driver import experiments_done, is_rerun  # noqa: E402
from autosearch.report import best_kept, read_ledger  # noqa: E402

STRATEGIES = ("greedy", "tpe", "cmaes")
DEMO_ARGS = ["--profile", "cpu", "--dataset", "offline", "--dashboard", "-1"]


def start(strategy: str, folder: Path, args, env: dict) -> tuple:
    """One strategy's demo, for the wall time given (or --experiments); returns it and its start."""
    length = ["--experiments", str(args.experiments)] if args.experiments else ["--hours", str(args.minutes / 60)]
    command = [sys.executable, "demo.py", *DEMO_ARGS, "--strategy", strategy, *length,
               "--budget-seconds", str(args.budget_seconds), "--slots", str(args.slots), "--seed", str(args.seed),
               "--workspace", str(folder / strategy)]
    print(f"{strategy}: {' '.join(command[1:])}", flush=True)
    with open(folder / f"{strategy}.log", "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), time.monotonic()


def finish(strategy: str, folder: Path, started: tuple) -> dict:
    """Waits for a strategy's demo; its figures from the ledger it wrote."""
    demo, start_time = started
    demo.wait()
    wall = time.monotonic() - start_time
    workspace = folder / strategy
    if demo.returncode != 0:
        sys.exit(f"{strategy}'s demo failed (exit {demo.returncode}); its output: {folder / f'{strategy}.log'}")
    rows = read_ledger(workspace)
    state = json.loads((workspace / ".research-loop" / "state.json").read_text())
    baseline, best = next(r for r in rows if r["status"] == "keep"), best_kept(rows)
    print(f"  {len(rows)} runs in {wall / 60:.1f} min, best {best['val_bpb']:.6f}", flush=True)
    return dict(strategy=strategy, workspace=workspace, wall=wall, runs=len(rows), experiments=experiments_done(rows),
                extra=sum(is_rerun(r) for r in rows), best=best, baseline=baseline,
                orders_used=state.get("data_orders", 0), noise=(state.get("noise") or {}).get("threshold"))


def train_at(workspace: Path, commit: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:train.py"], cwd=workspace, capture_output=True, text=True,
                          check=True).stdout


def held_out(results: list[dict], cache: Path, orders: list[int], folder: Path) -> dict:
    """val_bpb per held-out order of the baseline and of each best (one training per distinct train.py)."""
    sources = {"baseline": train_at(results[0]["workspace"], results[0]["baseline"]["commit"])}
    sources |= {r["strategy"]: train_at(r["workspace"], r["best"]["commit"]) for r in results}
    measured: dict[str, list[float]] = {}
    for name, source in sources.items():
        script = folder / f"{name}.py"
        script.write_text(source)
        same = next((other for other in measured if sources[other] == source), None)
        measured[name] = measured[same] if same else [val_bpb(script, cache, order) for order in orders]
        print(f"  held out: {name} {' '.join(f'{v:.6f}' for v in measured[name])}"
              + (f" (the same train.py as {same})" if same else ""), flush=True)
    return measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="wall time of each strategy's search")
    parser.add_argument("--budget-seconds", type=float, default=20.0, help="training budget of each run")
    parser.add_argument("--orders", type=int, default=3, help="held-out data orders the bests are trained on")
    parser.add_argument("--slots", type=int, default=1, help="runs at once in each search")
    parser.add_argument("--experiments", type=int, help="experiments per strategy instead of --minutes (a smoke test)")
    parser.add_argument("--parallel", action="store_true", help="the strategies at once rather than in turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="a prepared cache (default: a fresh one with the offline corpus)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, greedy first")
    parser.add_argument("--keep-workspaces", metavar="DIR", type=Path,
                        help="make each strategy's workspace under DIR and leave it there (default: a temporary "
                             "folder, removed at the end)")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.minutes <= 0 or args.budget_seconds <= 0:
        parser.error("--orders, --minutes and --budget-seconds must be positive")
    names = args.strategies.split(",")
    taken = [args.keep_workspaces / name for name in names if args.keep_workspaces and
             (args.keep_workspaces / name).exists()]
    if taken:
        parser.error(f"{', '.join(map(str, taken))} already exist(s): name another --keep-workspaces folder "
                     "or remove them")
    cache = prepared_cache(args.cache)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), PYTHONUNBUFFERED="1")
    os.environ.update(AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_TIME_BUDGET=str(args.budget_seconds))
    if args.keep_workspaces:
        args.keep_workspaces.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep_workspaces)) if args.keep_workspaces
          else tempfile.TemporaryDirectory(prefix="bench-search-")) as folder:
        folder = Path(folder)
        if args.parallel:
            demos = {name: start(name, folder, args, env) for name in names}
            results = [finish(name, folder, demos[name]) for name in names]
        else:
            results = [finish(name, folder, start(name, folder, args, env)) for name in names]
        first = max(r["orders_used"] for r in results) + 1
        orders = list(range(first, first + args.orders))
        print(f"held-out data orders {orders[0]}..{orders[-1]} (the searches used 0..{first - 1})", flush=True)
        measured = held_out(results, cache, orders, folder)
    base = measured["baseline"]
    length = f"{args.experiments} experiment(s)" if args.experiments else f"{args.minutes:g} min"
    print(f"\n{length} per strategy{' (at once)' if args.parallel else ''}, {args.budget_seconds:g} s budget, "
          f"{args.slots} slot(s), {len(orders)} held-out order(s); baseline held out {statistics.fmean(base):.6f}")
    header = ("strategy", "runs/h", "experiments", "extra runs", "noise thr", "best (search)", "held-out mean",
              "paired delta", "delta sd")
    lines = [header]
    for r in results:
        deltas = [b - a for a, b in zip(base, measured[r["strategy"]])]
        lines.append((r["strategy"], f"{r['runs'] / (r['wall'] / 3600):.1f}", str(r["experiments"]), str(r["extra"]),
                      f"{r['noise']:.6f}" if r["noise"] else "-", f"{r['best']['val_bpb']:.6f}",
                      f"{statistics.fmean(measured[r['strategy']]):.6f}", f"{statistics.fmean(deltas):+.6f}",
                      f"{statistics.stdev(deltas):.6f}" if len(deltas) > 1 else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print("\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines))
    greedy = measured.get("greedy")
    for r in results:
        if greedy and r["strategy"] != "greedy":
            gap = statistics.fmean(b - a for a, b in zip(greedy, measured[r["strategy"]]))
            verdict = "beats greedy" if -gap > (r["noise"] or 0) else "within the noise or worse"
            print(f"{r['strategy']} - greedy on the held-out orders: {gap:+.6f} "
                  f"(noise threshold {r['noise'] or 0:.6f}: {verdict})")
    if args.keep_workspaces:
        print("\n".join(f"{r['strategy']}'s workspace, kept: {r['workspace']}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
