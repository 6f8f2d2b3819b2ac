"""Replay a research run's kept chain: does each kept gain reproduce when measured again?

    uv run bench/bench_replay.py WORKSPACE [--pairs 1] [--data-order 0] [--command "python train.py"]
                                 [--plot replay.png]

For each kept commit after the first (the baseline), the best it was kept over and the commit itself
are rerun interleaved (parent, child, parent, child, ...), each in a fresh checkout of its commit,
with the prepared cache of this environment (AUTORESEARCH_CACHE). A kept gain reproduces when the
child beats its parent on average over the pairs (the mean paired delta is below zero: one pair
can lose to the luck of its data while the change still helps); the rest are false keeps. Prints
a table with each pair, the pairs won and the mean, the false-keep rate, and plots recorded
against replayed values. On the flops clock a rerun on the recorded
stretch of data repeats its number, so --data-order K trains pair p on data order K + p instead
(AUTORESEARCH_DATA_ORDER): does the gain hold on data the research run never trained on?
"""
import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mcp_server.core import ledger  # noqa: E402
from mcp_server.core.logparse import parse_summary  # noqa: E402

RUN_TIMEOUT_S = 1800


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(ws), *args], check=True, capture_output=True, text=True).stdout.strip()


def kept_chain(ws: Path) -> list[ledger.Row]:
    rows, _ = ledger.read_rows(ws / ledger.LEDGER_NAME)
    return [r for r in rows if r.status == "keep"]


def measure(ws: Path, commit: str, command: list[str], scratch: Path, data_order: int) -> float | None:
    """val_bpb of one run of a commit in a checkout of its own, or None when it printed none."""
    folder = scratch / f"{commit}-{time.monotonic_ns()}"
    git(ws, "worktree", "add", "--detach", "-q", str(folder), commit)
    env = dict(os.environ, AUTORESEARCH_DATA_ORDER=str(data_order))
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
        summary = parse_summary(done.stdout)
        if done.returncode != 0 or summary is None:
            return None
        print(f"    {time.strftime('%H:%M')} {commit}: val_bpb {summary.val_bpb:.6f} in {summary.num_steps} steps",
              flush=True)
        return summary.val_bpb
    finally:
        git(ws, "worktree", "remove", "--force", str(folder))


def replay(ws: Path, command: list[str], pairs: int, first_order: int) -> list[dict]:
    chain = kept_chain(ws)
    if len(chain) < 2:
        sys.exit(f"{ws}: fewer than two kept runs in {ledger.LEDGER_NAME}: no gain to replay.")
    found = []
    with tempfile.TemporaryDirectory(prefix="replay-") as scratch:
        for parent, child in zip(chain, chain[1:]):
            print(f"  {child.commit} over {parent.commit}: {child.description[:60]}", flush=True)
            before, after = [], []
            for k in range(pairs):
                order = first_order + k if first_order else 0
                before.append(measure(ws, parent.commit, command, Path(scratch), order))
                after.append(measure(ws, child.commit, command, Path(scratch), order))
            deltas = paired_deltas(before, after)
            holds = len(deltas) == pairs and sum(deltas) < 0
            found.append({"commit": child.commit, "description": child.description,
                          "recorded": child.val_bpb - parent.val_bpb, "parent_replayed": before,
                          "replayed": after, "reproduces": holds})
    return found


def paired_deltas(before: list, after: list) -> list[float]:
    """child - parent per pair where both runs finished."""
    return [a - b for b, a in zip(before, after) if a is not None and b is not None]


def plot(found: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    xs = range(1, len(found) + 1)
    replayed = [statistics.fmean(paired_deltas(f["parent_replayed"], f["replayed"]) or [0.0]) for f in found]
    ax.bar([x - 0.2 for x in xs], [f["recorded"] for f in found], width=0.4, label="recorded gain", color="#2a9d47")
    ax.bar([x + 0.2 for x in xs], replayed, width=0.4, label="replayed gain (mean of pairs)",
           color=["#2a9d47" if f["reproduces"] else "#d1495b" for f in found], alpha=0.6)
    ax.axhline(0, color="#555555", linewidth=0.8)
    ax.set_xticks(list(xs), [f["commit"] for f in found], rotation=30, fontsize=8)
    ax.set_ylabel("val_bpb delta over the parent (lower is better)")
    ax.set_title(f"replay of the kept chain: {sum(f['reproduces'] for f in found)}/{len(found)} gains reproduce")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--pairs", type=int, default=1, help="parent/child reruns per kept gain")
    parser.add_argument("--data-order", type=int, default=0,
                        help="train pair p on data order K+p (0: the recorded stretch, every pair)")
    parser.add_argument("--command", default=f"{sys.executable} train.py", help="what runs a commit's training")
    parser.add_argument("--plot", type=Path, default=Path("replay.png"))
    args = parser.parse_args(argv)
    if args.data_order < 0:
        parser.error("--data-order must be 0 or more")
    found = replay(args.workspace.resolve(), shlex.split(args.command), args.pairs, args.data_order)
    print(f"\n{'commit':8} {'recorded':>9} {'replayed (child - parent)':>36} {'won':>5} {'mean':>8}  "
          f"reproduces  description")
    for f in found:
        pairs = ", ".join("crash" if a is None or b is None else f"{a - b:+.4f}"
                          for a, b in zip(f["replayed"], f["parent_replayed"]))
        deltas = paired_deltas(f["parent_replayed"], f["replayed"])
        won = f"{sum(d < 0 for d in deltas)}/{len(f['replayed'])}"
        mean = f"{statistics.fmean(deltas):+.4f}" if deltas else "-"
        print(f"{f['commit']:8} {f['recorded']:>+9.4f} {pairs:>36} {won:>5} {mean:>8}  "
              f"{'yes' if f['reproduces'] else 'NO':10}  {f['description'][:50]}")
    false_keeps = sum(not f["reproduces"] for f in found)
    print(f"\nfalse keeps: {false_keeps} of {len(found)} kept gains ({false_keeps / len(found):.0%})")
    plot(found, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
