"""Training benchmark for the CPU profile: the training paths side by side, in one run, on the same
data, each a real `train.py` run at the profile's full budget, printed as one table and a list of
targets.

    uv run bench/bench_train.py [--cache DIR] [--keep-env-budget] [--modes] [--no-today]

Rows: today's train.py (commit fd3376c, before this compiled path: the reference of the ratio
targets), the eager path (AUTORESEARCH_COMPILE=0), the compiled path with a fresh compile cache
(cold: a model never compiled, on a machine that prepare.py prepared, its once-per-machine
compiler step timed apart) and the same again (warm), and with --modes the other compile modes
tried (steps only: a mode's compilation happens in the untimed first step, so a cold cache does
not change its steps).
Last, a copy of train.py whose learning rate and warm-down ratio differ runs briefly, to show that
a constants-only edit starts warm. The cache defaults to $AUTORESEARCH_CACHE, else a temp folder
prepared with the offline corpus. Take figures on a quiet machine: the load average is printed
because other work skews every row.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mcp_server.core.logparse import parse_summary  # the tools' own reading of the summary block
from mcp_server.core.models import Summary

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same threading as train.py
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

REPO = Path(__file__).resolve().parent.parent
TODAY_COMMIT = "fd3376c"  # train.py before the compiled CPU path
LOADER_BATCHES = 50  # dataloader batches timed after the runs
EDIT_CHECK_BUDGET = "2"  # seconds: the constants-only edit only has to start
# issue 10: the compiled path
MIN_STEP_RATIO = {True: 1.35, False: 1.15}  # steps vs today's train.py, on a CPU with / without AMX
MIN_BPB_GAIN = 0.05
MAX_WARM_WALL_RATIO = 1.3
MAX_COLD_STARTUP_S = 40.0
# issue 2: the CPU profile
MIN_MFU_PERCENT = 50.0
MAX_LOADER_SHARE = 0.05
MAX_EVAL_SHARE = 0.15

COMPILE_LINE = "train_model = compiler(model, dynamic=False)\n"
MODES = {  # the other ways to compile that were tried, as edits of train.py: (text, replacement)
    "compiled, per block": (COMPILE_LINE, "for block in model.blocks:  # one block compiled, reused by every layer\n"
                                          "    block.forward = compiler(block.forward, dynamic=False)\n"
                                          "train_model = model\n"),
    "compiled, optimizer eager": ("@compiler\ndef update_all", "def update_all"),
    "compiled, max-autotune": (COMPILE_LINE, 'train_model = compiler(model, dynamic=False, '
                                             'mode="max-autotune-no-cudagraphs")\n'),
}


@dataclass
class Run:
    name: str
    summary: Summary
    wall: float
    timed_steps: int
    tokens_per_s: float
    startup: float
    load: float  # load average when the run started: other work on the machine skews its figures


def prepared_cache(requested: str | None) -> Path:
    """A cache holding the CPU profile: the one given, else a fresh temp one with the offline corpus."""
    if requested:
        return Path(requested)
    cache = Path(tempfile.mkdtemp(prefix="bench-train-"))
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    subprocess.run([sys.executable, "prepare.py", "--profile", "cpu", "--dataset", "offline"], cwd=REPO, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return cache


def python_command() -> list[str]:
    """What the tools run by default (`uv run train.py`), or the current interpreter without uv."""
    uv = shutil.which("uv")
    return [uv, "run", "--frozen", "python"] if uv else [sys.executable]


def run_training(name: str, script: Path, env: dict, total_batch: int) -> Run:
    """One train.py run; the script may be a copy outside the repository (it imports the harness)."""
    env = dict(env, PYTHONPATH=str(REPO))
    print(f"  {name} ...", end="", flush=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    result = subprocess.run(python_command() + [str(script)], cwd=REPO, env=env, capture_output=True)
    wall = time.time() - t0
    out = result.stdout.decode()
    summary = parse_summary(out)
    if result.returncode != 0 or summary is None or summary.eval_seconds is None:
        sys.exit(f"\n{name}: train.py failed (exit {result.returncode}):\n{out[-3000:]}\n{result.stderr.decode()[-3000:]}")
    print(f" {wall:.0f} s", flush=True)
    # steps timed: all but the untimed first (upstream leaves out 10 on CUDA; this is the CPU profile)
    timed = max(summary.num_steps - 1, 1)
    return Run(name, summary, wall, timed, timed * total_batch / summary.training_seconds,
               wall - summary.training_seconds - summary.eval_seconds, load)


def prepare_compiler(env: dict) -> float:
    """prepare.py's once-per-machine compiler step, into the fresh compile cache of the cold run: the
    seconds it took (the first run on a machine that skipped it would pay them in its start-up)."""
    print("  prepare.py's compiler step (once per machine) ...", end="", flush=True)
    t0 = time.time()
    done = subprocess.run(python_command() + ["prepare.py"], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0 or "compiler ready" not in done.stdout:
        sys.exit(f"\nprepare.py did not prepare the compiler (exit {done.returncode}):\n{done.stdout[-3000:]}"
                 f"\n{done.stderr[-3000:]}")
    seconds = time.time() - t0
    print(f" {seconds:.0f} s", flush=True)
    return seconds


def variant(source: str, old: str, new: str, folder: Path, name: str) -> Path | None:
    """A copy of train.py with one edit, or None where train.py no longer holds the text to edit."""
    if source.count(old) != 1:
        return None
    path = folder / name
    path.write_text(source.replace(old, new))
    return path


def git_show(path: str) -> str:
    return subprocess.run(["git", "show", f"{TODAY_COMMIT}:{path}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout


def today_train_py(folder: Path, profile: str) -> tuple[Path, int]:
    """train.py as it was, with the profile's starting values as they were (written in as literals,
    since the harness's profile has moved on), and its total batch."""
    source, old_profiles = git_show("train.py"), {}
    exec(git_show("nanochat/profiles.py"), old_profiles)
    defaults = old_profiles["PROFILES"][profile]["train_defaults"]
    for key, value in defaults.items():
        source = source.replace(f'TRAIN_DEFAULTS["{key}"]', repr(value))
    path = folder / "train_today.py"
    path.write_text(source)
    return path, defaults["total_batch_size"]


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


def cpu_description() -> tuple[str, bool]:
    """The CPU model and the flags that decide the training dtype, and whether it has AMX."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine(), False
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model.group(1) if model else '?'} ({' '.join(shown)})", "amx_bf16" in flags


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a prepared AUTORESEARCH_CACHE (default: $AUTORESEARCH_CACHE or a temp one)")
    parser.add_argument("--keep-env-budget", action="store_true",
                        help="honour AUTORESEARCH_TIME_BUDGET / _EVAL_TOKENS instead of the profile's values")
    parser.add_argument("--modes", action="store_true", help="also run the other compile modes tried")
    parser.add_argument("--no-today", action="store_true", help=f"skip train.py of commit {TODAY_COMMIT}")
    args = parser.parse_args()
    cache = prepared_cache(args.cache or os.environ.get("AUTORESEARCH_CACHE"))
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    if not args.keep_env_budget:
        for name in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS"):
            os.environ.pop(name, None)
    for name in ("AUTORESEARCH_COMPILE", "TORCHINDUCTOR_CACHE_DIR"):
        os.environ.pop(name, None)
    # today's train.py knows only the wall clock: every row spends its budget on it (bench_clock.py
    # compares the clocks)
    os.environ["AUTORESEARCH_BUDGET_CLOCK"] = "wall"
    sys.path.insert(0, str(REPO))
    import torch
    from nanochat.platform import COMPUTE_DTYPE, DEVICE, measure_matmul_flops, save_peak_flops
    from prepare import MAX_SEQ_LEN, PROFILE, TIME_BUDGET, TRAIN_DEFAULTS

    cpu, has_amx = cpu_description()
    total_batch = TRAIN_DEFAULTS["total_batch_size"]
    work = Path(tempfile.mkdtemp(prefix="bench-train-runs-"))
    source = (REPO / "train.py").read_text()
    base = dict(os.environ)
    load_before = os.getloadavg()[0]
    peak = measure_matmul_flops(COMPUTE_DTYPE)
    save_peak_flops(peak, COMPUTE_DTYPE)  # every run's MFU is then relative to this very measurement
    print(f"{cpu}: {DEVICE.type} / {str(COMPUTE_DTYPE).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"profile {PROFILE}, budget {TIME_BUDGET} s, matmul peak {peak / 1e9:.0f} GFLOP/s (measured now)\n"
          f"runs (results in {work}):", flush=True)

    runs = []
    if not args.no_today:
        today, today_batch = today_train_py(work, PROFILE)
        runs.append(run_training(f"today ({TODAY_COMMIT})", today, base, today_batch))
    runs.append(run_training("eager", REPO / "train.py", dict(base, AUTORESEARCH_COMPILE="0"), total_batch))
    fresh = dict(base, TORCHINDUCTOR_CACHE_DIR=str(work / "compile-cache"))
    machine_s = prepare_compiler(fresh)
    cold = run_training("compiled, cold cache", REPO / "train.py", fresh, total_batch)
    warm = run_training("compiled, warm cache", REPO / "train.py", fresh, total_batch)
    runs += [cold, warm]
    if args.modes:
        for name, (text, replacement) in MODES.items():
            script = variant(source, text, replacement, work, f"train_{len(runs)}.py")
            if script is None:
                print(f"  {name}: skipped, train.py no longer has {text.strip()!r}")
                continue
            mode_env = dict(base, TORCHINDUCTOR_CACHE_DIR=str(work / f"compile-cache-{len(runs)}"))
            runs.append(run_training(name, script, mode_env, total_batch))
    edited = variant(source, "\nMATRIX_LR = 0.04", "\nMATRIX_LR = 0.05", work, "train_edited.py")
    edited = edited and variant(edited.read_text(), "\nWARMDOWN_RATIO = 0.5", "\nWARMDOWN_RATIO = 0.6", work,
                                "train_edited.py")
    edit_run = None
    if edited:
        edit_run = run_training("constants-only edit (MATRIX_LR, WARMDOWN_RATIO), short", edited,
                                dict(fresh, AUTORESEARCH_TIME_BUDGET=EDIT_CHECK_BUDGET), total_batch)
    loader_s = time_dataloader(TRAIN_DEFAULTS["device_batch_size"], MAX_SEQ_LEN)
    load_after = os.getloadavg()[0]

    header = ("run", "steps", "tok/s", "MFU %", "start-up s", "compile s", "cache", "eval s", "wall s", "val_bpb",
              "load")
    rows = [(r.name, str(r.summary.num_steps), f"{r.tokens_per_s:,.0f}", f"{r.summary.mfu_percent:.1f}",
             f"{r.startup:.1f}", _text(r.summary.compile_seconds, "{:.1f}"), r.summary.compile_cache or "-",
             f"{r.summary.eval_seconds:.1f}", f"{r.wall:.1f}", f"{r.summary.val_bpb:.4f}", f"{r.load:.1f}")
            for r in runs]
    if edit_run:
        s = edit_run.summary
        rows.append((edit_run.name, str(s.num_steps), "", "", f"{edit_run.startup:.1f}",
                     _text(s.compile_seconds, "{:.1f}"), s.compile_cache or "-", "", f"{edit_run.wall:.1f}", "",
                     f"{edit_run.load:.1f}"))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    print()
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))

    budget = TIME_BUDGET
    eager = next(r for r in runs if r.name == "eager")
    default_steps = min(cold.summary.num_steps, warm.summary.num_steps)
    others = [r for r in runs if r not in (cold, warm) and not r.name.startswith("today")]
    # the default path ran twice (cold and warm train the same code): another path is faster only
    # where it beats both, since their gap is the run-to-run spread of a step count on the wall clock
    targets = [
        (f"default path fastest by steps (vs {', '.join(r.name for r in others)})",
         f"{cold.summary.num_steps}/{warm.summary.num_steps} vs "
         f"{', '.join(str(r.summary.num_steps) for r in others)}",
         all(max(cold.summary.num_steps, warm.summary.num_steps) >= r.summary.num_steps for r in others)),
    ]
    today_run = next((r for r in runs if r.name.startswith("today")), None)
    if today_run:
        ratio = default_steps / today_run.summary.num_steps
        need = MIN_STEP_RATIO[has_amx]
        targets += [
            (f"steps vs today's train.py >= {need}x ({'AMX' if has_amx else 'no AMX'})",
             f"{ratio:.2f}x ({default_steps} vs {today_run.summary.num_steps})", ratio >= need),
            ("tok/s of timed training vs today's (steps differ in size when the profile's batch did)",
             f"{warm.tokens_per_s / today_run.tokens_per_s:.2f}x", None),
            (f"val_bpb at least {MIN_BPB_GAIN} below today's", f"{warm.summary.val_bpb:.4f} vs "
             f"{today_run.summary.val_bpb:.4f} ({warm.summary.val_bpb - today_run.summary.val_bpb:+.4f})",
             warm.summary.val_bpb <= today_run.summary.val_bpb - MIN_BPB_GAIN),
        ]
    targets += [
        ("compiled vs eager, steps", f"{default_steps / eager.summary.num_steps:.2f}x", None),
        (f"warm wall <= {MAX_WARM_WALL_RATIO}x budget", f"{warm.wall:.1f} s = {warm.wall / budget:.2f}x",
         warm.wall <= MAX_WARM_WALL_RATIO * budget),
        (f"cold start-up <= {MAX_COLD_STARTUP_S:.0f} s (a new model; once per machine, prepare.py took "
         f"{machine_s:.0f} s)", f"{cold.startup:.1f} s (warm {warm.startup:.1f} s)", cold.startup <= MAX_COLD_STARTUP_S),
        ("caches: cold run cold, rerun warm", f"{cold.summary.compile_cache} / {warm.summary.compile_cache}",
         cold.summary.compile_cache == "cold" and warm.summary.compile_cache == "warm"),
    ]
    if edit_run:
        s = edit_run.summary
        targets.append(("constants-only edit starts warm, no recompiles",
                        f"{s.compile_cache}, {s.recompiles} recompiles", s.compile_cache == "warm" and s.recompiles == 0))
    grad_accum = total_batch // (TRAIN_DEFAULTS["device_batch_size"] * MAX_SEQ_LEN)
    loader_share = loader_s / (warm.summary.training_seconds / warm.timed_steps / grad_accum)
    targets += [
        (f"training MFU (compiled) >= {MIN_MFU_PERCENT:.0f}%", f"{warm.summary.mfu_percent:.1f}%",
         warm.summary.mfu_percent >= MIN_MFU_PERCENT),
        (f"dataloader <= {100 * MAX_LOADER_SHARE:.0f}% of a step", f"{100 * loader_share:.2f}%",
         loader_share <= MAX_LOADER_SHARE),
        (f"evaluation <= {100 * MAX_EVAL_SHARE:.0f}% of budget", f"{warm.summary.eval_seconds:.1f} s = "
         f"{100 * warm.summary.eval_seconds / budget:.1f}%", warm.summary.eval_seconds <= MAX_EVAL_SHARE * budget),
        # before: other work on the machine; after: mostly the last run's own training
        ("load average before / after", f"{load_before:.2f} / {load_after:.2f}", load_before < 1.0),
    ]
    print()
    width = max(len(t[0]) for t in targets)
    for name, value, ok in targets:
        verdict = "" if ok is None else "PASS" if ok else "FAIL"
        print(f"{name:<{width}}  {value:<28}  {verdict}")


def _text(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


if __name__ == "__main__":
    main()
