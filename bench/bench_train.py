"""Training benchmark for the CPU profile: one real `train.py` run at its full budget, with the
machine's matmul peak and the dataloader measured side by side, printed as a table of targets.

    uv run bench/bench_train.py [--cache DIR] [--keep-env-budget]

The cache defaults to $AUTORESEARCH_CACHE, else a temp folder prepared with the offline corpus.
Take figures on a quiet machine: the load average is printed because other work skews every row.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mcp_server.logparse import parse_summary  # the tools' own reading of the summary block
from mcp_server.models import Summary

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same threading as train.py
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

REPO = Path(__file__).resolve().parent.parent
LOADER_BATCHES = 50  # dataloader batches timed after the run
# issue 2 "Performance": CPU profile targets
MIN_MFU_PERCENT = 50.0
MAX_LOADER_SHARE = 0.05
MAX_EVAL_SHARE = 0.15
MAX_STARTUP_SHARE = 0.10
MAX_WALL_RATIO = 1.25


def prepared_cache(requested: str | None) -> Path:
    """A cache holding the CPU profile: the one given, else a fresh temp one with the offline corpus."""
    if requested:
        return Path(requested)
    cache = Path(tempfile.mkdtemp(prefix="bench-train-"))
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    subprocess.run([sys.executable, "prepare.py", "--profile", "cpu", "--dataset", "offline"], cwd=REPO, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return cache


def train_command() -> list[str]:
    """What the tools run by default (`uv run train.py`), or the current interpreter without uv."""
    uv = shutil.which("uv")
    return [uv, "run", "--frozen", "train.py"] if uv else [sys.executable, "train.py"]


def run_training(env: dict) -> tuple[Summary, float]:
    t0 = time.time()
    result = subprocess.run(train_command(), cwd=REPO, env=env, capture_output=True)
    wall = time.time() - t0
    out = result.stdout.decode()
    summary = parse_summary(out)
    if result.returncode != 0 or summary is None or summary.eval_seconds is None:
        sys.exit(f"train.py failed (exit {result.returncode}):\n{out[-3000:]}\n{result.stderr.decode()[-3000:]}")
    return summary, wall


def time_dataloader(batch_size: int, seq_len: int) -> float:
    """Seconds per (B, T) training batch from the real dataloader, after its warm-up."""
    from prepare import Tokenizer, make_dataloader
    loader = make_dataloader(Tokenizer.from_directory(), batch_size, seq_len, "train")
    for _ in range(3):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(LOADER_BATCHES):
        next(loader)
    return (time.perf_counter() - t0) / LOADER_BATCHES


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a prepared AUTORESEARCH_CACHE (default: $AUTORESEARCH_CACHE or a temp one)")
    parser.add_argument("--keep-env-budget", action="store_true",
                        help="honour AUTORESEARCH_TIME_BUDGET / _EVAL_TOKENS instead of the profile's values")
    args = parser.parse_args()
    cache = prepared_cache(args.cache or os.environ.get("AUTORESEARCH_CACHE"))
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    if not args.keep_env_budget:
        for name in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS"):
            os.environ.pop(name, None)
    sys.path.insert(0, str(REPO))
    import torch
    from nanochat.platform import COMPUTE_DTYPE, DEVICE, measure_matmul_flops, save_peak_flops
    from prepare import MAX_SEQ_LEN, PROFILE, TIME_BUDGET, TRAIN_DEFAULTS

    load_before = os.getloadavg()[0]
    peak = measure_matmul_flops(COMPUTE_DTYPE)
    save_peak_flops(peak, COMPUTE_DTYPE)  # train.py's MFU is then relative to this very measurement
    summary, wall = run_training(dict(os.environ))
    loader_s = time_dataloader(TRAIN_DEFAULTS["device_batch_size"], MAX_SEQ_LEN)
    load_after = os.getloadavg()[0]

    budget = TIME_BUDGET
    train_s, eval_s = summary.training_seconds, summary.eval_seconds
    startup_s = wall - train_s - eval_s  # interpreter, imports, set-up and the untimed first step
    grad_accum = TRAIN_DEFAULTS["total_batch_size"] // (TRAIN_DEFAULTS["device_batch_size"] * MAX_SEQ_LEN)
    # timed steps: all but the first (the eager path's warm-up step, see UNTIMED_STEPS in train.py)
    micro_step_s = train_s / max(summary.num_steps - 1, 1) / grad_accum
    loader_share = loader_s / micro_step_s
    tok_per_s = (summary.num_steps - 1) * TRAIN_DEFAULTS["total_batch_size"] / train_s  # timed steps only

    rows = [
        ("device / dtype", f"{DEVICE.type} / {str(COMPUTE_DTYPE).removeprefix('torch.')}, "
                           f"{torch.get_num_threads()} threads, profile {PROFILE}", ""),
        ("matmul peak (measured now)", f"{peak / 1e9:.0f} GFLOP/s", ""),
        ("training MFU", f"{summary.mfu_percent:.1f}%", check(summary.mfu_percent >= MIN_MFU_PERCENT, f">= {MIN_MFU_PERCENT:.0f}%")),
        ("training throughput", f"{tok_per_s:,.0f} tok/s, {summary.num_steps:.0f} steps", ""),
        ("dataloader / step time", f"{100 * loader_share:.2f}% ({1000 * loader_s:.1f} ms per batch)", check(loader_share <= MAX_LOADER_SHARE, "<= 5%")),
        ("evaluation", f"{eval_s:.1f} s = {100 * eval_s / budget:.1f}% of budget", check(eval_s <= MAX_EVAL_SHARE * budget, "<= 15%")),
        ("start-up (to first timed step)", f"{startup_s:.1f} s = {100 * startup_s / budget:.1f}% of budget", check(startup_s <= MAX_STARTUP_SHARE * budget, "<= 10%")),
        ("wall time", f"{wall:.1f} s = {wall / budget:.2f} x budget ({budget} s)", check(wall <= MAX_WALL_RATIO * budget, "<= 1.25x")),
        ("val_bpb", f"{summary.val_bpb:.6f}", ""),
        ("peak memory", f"{summary.peak_vram_mb:.0f} MB", ""),
        # before: other work on the machine; after: mostly this run's own training
        ("load average before / after", f"{load_before:.2f} / {load_after:.2f}", check(load_before < 1.0, "quiet before (< 1)")),
    ]
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"{'metric':<{width}}  {'value':<{value_width}}  target")
    for name, value, verdict in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {verdict}")


def check(ok: bool, target: str) -> str:
    return f"{target}  {'PASS' if ok else 'FAIL'}"


if __name__ == "__main__":
    main()
