"""Where a run's start-up goes, and the warm paths against the cold one, side by side (issue 27).

    uv run bench/bench_startup.py [--repeat 3] [--budget-seconds 60] [--experiments 7] [--rounds 1]
        [--modes cold,warm] [--cache DIR] [--phases-only]

Part 1, the phases of one run's start-up, each timed --repeat times (median, and its share of their
sum): the `uv run` probe (the server runs it once, not per run), the slot's git checkout, the
sandbox (bubblewrap around an empty interpreter, less the same interpreter bare), train.py's
imports in the sandbox (torch; the harness; torch.compile's dynamo and inductor), and the cold
evaluator's imports (-I -S -B, torch and torch.export's loader), which ran beside the run's own
start-up on every run and which a slot's warm evaluator pays once.

Part 2, the demo's loop (demo.py: a real server over stdio, the real train.py, one slot) in each
of --modes, alternating --rounds times: cold (RESEARCH_LOOP_WARM_EVALUATOR=0 and
RESEARCH_LOOP_WARM_START=0: every run starts its interpreter and its evaluator), evaluator (a
slot's warm evaluator only) and warm (the warm evaluator and the slot's next worker started ahead,
its interpreter importing torch while the run before it is evaluated),
read from the runs' own records: per run its wall time (started_at -> ended_at), train.py's own
split (training, waiting for the evaluation, the rest of its start-up) and the time outside
train.py (worker, sandbox, interpreter start, exit), and the evaluator's own CPU-seconds (its
report; bench/bench_evaluation.py splits them); then runs x budget / elapsed over the runs
after the baseline (issue 27's measure: elapsed from the baseline's end to the last run's end).
demo.py clones this repository's HEAD: commit before measuring a change.

The issue's target, on a quiet 2-core CPU (nothing else running; the figures are printed with the
load average, which skews every row):

    uv run bench/bench_startup.py --budget-seconds 60 --experiments 7 --rounds 1

The cache defaults to $AUTORESEARCH_CACHE, else a temp folder prepared with the offline corpus.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mcp_server.scripts import harness_eval
from mcp_server.scripts import sandbox  # noqa: E402
from mcp_server.core.integrity import site_packages  # noqa: E402
from mcp_server.core.workspace import Workspace  # noqa: E402
from mcp_server.executors.executor import WARM_START_ENV  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRAIN_IMPORTS = {  # what train.py imports before its first line of work, in three steps
    "import torch": "import torch",
    "import the harness (prepare, nanochat)": "import torch, prepare, nanochat.compile, nanochat.fused",
    "import torch.compile (dynamo, inductor)": "import torch, prepare, torch._dynamo, torch._inductor.compile_fx",
}
EVALUATOR_IMPORTS = "import torch._export.serde.serialize"  # nanochat/evaluate_export.py before its "go"
TARGET = 0.87  # runs x budget / elapsed, issue 27
MODES = {"cold": ("0", "0"), "evaluator": ("1", "0"), "warm": ("1", "1")}  # (warm evaluator, warm start)


def timed(argv: list[str], cwd: Path = REPO, env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def in_sandbox(argv: list[str], cache: Path) -> list[str]:
    spec = {"readonly": [str(REPO), str(cache), sys.prefix], "writable": ["."]}
    command, kind = sandbox.wrap(argv, spec, str(REPO))
    if kind is None:
        sys.exit(f"bench_startup: {sandbox.missing()}")
    return command


def phases(cache: Path, repeat: int) -> dict[str, list[float]]:
    """name -> seconds per repetition; the import steps are cumulative, reported as differences."""
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    clean = {"PATH": os.environ["PATH"], "AUTORESEARCH_CACHE": str(cache)}
    clone = Path(tempfile.mkdtemp(prefix="bench-startup-")) / "ws"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    ws = Workspace(clone)
    commits = ws.repo.git.rev_list("-n", "2", "HEAD").split()  # alternate: each checkout changes files
    evaluator = [PYTHON, *harness_eval.ISOLATED, "-c",
                 f"import sys; sys.path[:0] = {[str(REPO), *site_packages()]!r}; {EVALUATOR_IMPORTS}"]
    found: dict[str, list[float]] = {}
    for i in range(repeat):
        rows = {"`uv run` probe (once per server)": timed(["uv", "run", "--project", str(REPO), "python", "-c", ""]),
                "slot checkout (git)": timed_call(lambda: ws.checkout_slot(0, commits[i % len(commits)]))}
        bare = timed([PYTHON, "-c", ""], env=env)
        rows["sandbox (bubblewrap)"] = max(0.0, timed(in_sandbox([PYTHON, "-c", ""], cache), env=env) - bare)
        before = bare
        for name, code in TRAIN_IMPORTS.items():
            took = timed(in_sandbox([PYTHON, "-c", code], cache), env=env)
            rows[f"train.py: {name}"] = max(0.0, took - before)
            before = took
        rows["cold evaluator: its imports (warm: once per slot)"] = timed(evaluator, env=clean)
        for name, seconds in rows.items():
            found.setdefault(name, []).append(seconds)
    return found


def timed_call(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def print_phases(found: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in found.items()}
    total = sum(medians.values())
    print(f"\nPart 1: a run's start-up, phase by phase ({len(next(iter(found.values())))} repetitions, "
          f"load {os.getloadavg()[0]:.1f})")
    width = max(map(len, medians))
    print(f"{'phase':<{width}}  {'median s':>8}  {'share':>6}  each repetition (s)")
    for name, median in medians.items():
        each = " ".join(f"{v:.2f}" for v in found[name])
        print(f"{name:<{width}}  {median:8.2f}  {median / total:6.1%}  {each}")


def demo(cache: Path, mode: str, budget: float, experiments: int, seed: int) -> list[dict]:
    """One demo.py search; the records of its runs (run, result, report), oldest first."""
    workspace = Path(tempfile.mkdtemp(prefix=f"bench-startup-{mode}-")) / "ws"
    evaluator, start = MODES[mode]
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), **{harness_eval.WARM_ENV: evaluator, WARM_START_ENV: start})
    prepared = json.loads((cache / "prepared.json").read_text())  # the demo prepares nothing again
    subprocess.run([PYTHON, "demo.py", "--workspace", str(workspace), "--experiments", str(experiments),
                    "--budget-seconds", str(budget), "--seed", str(seed), "--dashboard", "-1",
                    "--profile", prepared.get("profile", "auto"), "--dataset", prepared.get("dataset", "auto")],
                   cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    records = []
    for path in sorted((workspace / "runs").glob("*.json")):
        if path.name.endswith(".report.json"):
            continue
        record = json.loads(path.read_text())
        report = path.with_name(path.name.removesuffix(".json") + ".report.json")
        record["report"] = json.loads(report.read_text()) if report.exists() else {}
        records.append(record)
    return records


def summarize(records: list[dict], budget: float) -> dict:
    """Per run after the baseline: wall, train.py's split and the rest; runs x budget / elapsed."""
    baseline, runs = records[0], records[1:]
    rows = []
    for record in runs:
        run, result = record["run"], record["result"]
        wall = run["ended_at"] - run["started_at"]
        total = result.get("total_seconds") or 0.0
        training = result.get("timed_seconds") or result.get("training_seconds") or 0.0
        evaluation = result.get("eval_seconds") or 0.0
        rows.append({"wall": wall, "training": training, "evaluation": evaluation,
                     "train.py start-up": total - training - evaluation, "outside train.py": wall - total,
                     # the evaluator's own CPU-seconds (all its threads): what the next interpreter competes with
                     "evaluator cpu": (record["report"].get("evaluation") or {}).get("cpu_seconds", float("nan")),
                     "evaluator": (record["report"].get("evaluation") or {}).get("evaluator", "-"),
                     "warm start": record["report"].get("warm_start", False)})
    elapsed = runs[-1]["run"]["ended_at"] - baseline["run"]["ended_at"] if runs else float("nan")
    return {"rows": rows, "ratio": len(runs) * budget / elapsed, "elapsed": elapsed, "runs": len(runs)}


def print_runs(results: dict[str, list[dict]], budget: float) -> None:
    print(f"\nPart 2: the demo's loop, {budget:g} s budget, from the runs' own records (load {os.getloadavg()[0]:.1f})")
    columns = ("wall", "training", "evaluation", "evaluator cpu", "train.py start-up", "outside train.py")
    print(f"{'':<28}" + "".join(f"{mode:>14}" for mode in results) + f"{'last/first':>11}")
    means = {}
    first, last = list(results)[0], list(results)[-1]
    for mode, summaries in results.items():
        rows = [row for s in summaries for row in s["rows"]]
        means[mode] = {c: statistics.mean(row[c] for row in rows) for c in columns} if rows else {}
        means[mode]["ratio"] = statistics.mean(s["ratio"] for s in summaries)
        means[mode]["evaluators"] = ",".join(sorted({row["evaluator"] for row in rows}))
        means[mode]["warm starts"] = sum(row["warm start"] for row in rows)
    for column in (*columns, "ratio"):
        cold, warm = means[first].get(column), means[last].get(column)
        label = "runs x budget / elapsed" if column == "ratio" else f"{column} (s, mean)"
        print(f"{label:<28}" + "".join(f"{means[m].get(column, float('nan')):14.3f}" for m in results)
              + (f"{warm / cold:11.2f}" if cold else f"{'-':>11}"))
    for mode in results:
        startup = means[mode]["wall"] - means[mode]["training"]
        print(f"{mode}: start-up and evaluation {startup / means[mode]['wall']:.0%} of a run's wall "
              f"(evaluators: {means[mode]['evaluators']}; {means[mode]['warm starts']} warm starts); target runs x budget / elapsed >= {TARGET} "
              f"{'met' if means[mode]['ratio'] >= TARGET else 'not met'} ({means[mode]['ratio']:.2f})")


def prepared_cache(given: str | None) -> Path:
    if given or os.environ.get("AUTORESEARCH_CACHE"):
        return Path(given or os.environ["AUTORESEARCH_CACHE"])
    cache = Path(tempfile.mkdtemp(prefix="bench-startup-cache-"))
    subprocess.run([PYTHON, "prepare.py", "--profile", "cpu", "--dataset", "offline"], cwd=REPO, check=True,
                   env=dict(os.environ, AUTORESEARCH_CACHE=str(cache)), stdout=subprocess.DEVNULL)
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget-seconds", type=float, default=60.0)
    p.add_argument("--experiments", type=int, default=7, help="runs after the baseline, per demo")
    p.add_argument("--rounds", type=int, default=1, help="cold then warm demos, this many times")
    p.add_argument("--modes", default="cold,warm", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--cache")
    p.add_argument("--phases-only", action="store_true")
    args = p.parse_args()
    cache = prepared_cache(args.cache)
    print_phases(phases(cache, args.repeat))
    if args.phases_only:
        return
    results: dict[str, list[dict]] = {mode: [] for mode in args.modes.split(",")}
    for round_ in range(args.rounds):
        for mode in results:  # alternating: a change in the machine's load falls on each
            records = demo(cache, mode, args.budget_seconds, args.experiments, seed=round_)
            results[mode].append(summarize(records, args.budget_seconds))
    print_runs(results, args.budget_seconds)


if __name__ == "__main__":
    main()
