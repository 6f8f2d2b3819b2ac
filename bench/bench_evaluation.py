"""The harness's evaluation in CPU-seconds, before and after a change, alone and beside the slot's
next interpreter importing torch (issue 27): on a 2-core machine every CPU-second outside training
costs wall time, and CPU-seconds, unlike wall seconds, hardly move with the machine's load.

    uv run bench/bench_evaluation.py [--before REV] [--repeat 3] [--cache DIR]

One export of the real train.py (the prepared profile, a short budget), then for each harness (the
one at --before, from git, and this working tree's) and each setting (alone; beside a fresh
interpreter importing what scripts/warm_train.py preloads, started with the evaluation as the warm
start's next worker may be): a slot's warm evaluator (harness_eval.WarmEvaluator, as the pool runs
it) scores the export --repeat times. Per evaluation: the forked evaluator's CPU-seconds (all its
threads, from /proc/<pid>/stat while it lives), its wall seconds, the importer's CPU-seconds and
wall, and val_bpb, which must be the same in every row.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mcp_server.core.integrity import site_packages  # noqa: E402
from mcp_server.scripts import harness_copy, harness_eval  # noqa: E402
from mcp_server.scripts.warm_train import IMPORT_ENV, PRELOAD  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
EXPORT_BUDGET_S = "5"  # the export's training: any trained model will do
SAMPLE_S = 0.02  # how often the evaluator's CPU time is read while it lives
TICKS = os.sysconf("SC_CLK_TCK")
IMPORTER = f"import importlib; [importlib.import_module(m) for m in {PRELOAD!r}]"


def export_model(cache: Path, folder: Path) -> Path:
    """The real train.py's export; the answer is written first, so train.py does not wait for one."""
    export, answer = folder / "model.pt2", folder / "answer.json"
    answer.write_text(json.dumps({"val_bpb": 0.0}))
    subprocess.run([PYTHON, "train.py"], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_TIME_BUDGET=EXPORT_BUDGET_S,
                            RESEARCH_LOOP_EXPORT=str(export), RESEARCH_LOOP_ANSWER=str(answer)))
    return export


def harness_at(rev: str | None, folder: Path) -> Path:
    """A copy of prepare.py and nanochat/ as committed at rev, or as in this working tree where rev is
    None (a copy: the evaluation checks that its harness folder did not change while it ran)."""
    if rev is None:
        shutil.copytree(REPO / "nanochat", folder / "nanochat", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "prepare.py", folder / "prepare.py")
        return folder
    folder.mkdir()
    archive = subprocess.run(["git", "archive", rev, "prepare.py", "nanochat"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def spec_for(harness: Path, cache: Path) -> dict:
    """What integrity.evaluation_spec makes, for a harness folder outside git."""
    record = json.loads((cache / "prepared.json").read_text())
    return {"argv": [*harness_eval.evaluator_command(PYTHON, harness / "nanochat" / "evaluate_export.py"),
                     "--profile", record["profile"], "--eval-tokens", str(record["eval_tokens"]),
                     "--site-packages", *site_packages()],
            "env": {"PATH": os.environ["PATH"], "AUTORESEARCH_CACHE": str(cache)}, "harness": str(harness),
            "harness_manifest": harness_copy.file_manifest(str(harness)), "timeout": 600.0,
            "inputs": harness_eval.evaluation_inputs(cache, cache / "data" / record["val_shard"]["name"], record)}


def cpu_of(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: every thread's


def evaluate_once(spec: dict, export: Path, warm: harness_eval.WarmEvaluator, folder: Path, beside: bool) -> dict:
    """One evaluation by the warm evaluator's forked child, its CPU sampled until it exits."""
    import socket
    log = folder / f"eval-{time.monotonic_ns()}.log"
    sock = socket.socket(fileno=os.dup(warm.fileno()))
    evaluation = harness_eval.HarnessEvaluation(spec, log, export, log.with_suffix(".answer.json"), sock)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    importer = subprocess.Popen([PYTHON, "-c", IMPORTER], env=dict(os.environ, **IMPORT_ENV)) if beside else None
    started = time.monotonic()
    evaluation.start_if_exported(None)
    seen = {"cpu": 0.0}

    def sample():
        while evaluation.warm_pid is None and evaluation.finished_at is None:
            time.sleep(SAMPLE_S / 4)
        while evaluation.warm_pid is not None and (cpu := cpu_of(evaluation.warm_pid)) is not None:
            seen["cpu"] = cpu
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = evaluation.finish(5.0)
    sampler.join()
    row = {"val_bpb": result.get("val_bpb"), "evaluator cpu s": seen["cpu"], "evaluator wall s": result["wall_seconds"],
           "reported cpu s": result.get("cpu_seconds", float("nan")),
           "page faults": result.get("page_faults", float("nan"))}
    if importer is not None:
        importer.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row["importer cpu s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        row["importer wall s"] = time.monotonic() - started
    if result.get("val_bpb") is None:
        sys.exit(f"bench_evaluation: no result: {result}\n{log.read_text()[-2000:]}")
    return row


def measure(harness: Path, cache: Path, export: Path, repeat: int, folder: Path) -> dict[str, list[dict]]:
    spec = spec_for(harness, cache)
    warm = harness_eval.WarmEvaluator(spec)
    try:
        return {setting: [evaluate_once(spec, export, warm, folder, beside) for _ in range(repeat)]
                for setting, beside in (("alone", False), ("beside the next imports", True))}
    finally:
        warm.close()


def print_table(found: dict[str, dict[str, list[dict]]]) -> None:
    print(f"\nThe harness's evaluation (median of each; load {os.getloadavg()[0]:.1f})")
    columns = ("evaluator cpu s", "reported cpu s", "page faults", "evaluator wall s", "importer cpu s",
               "importer wall s")
    print(f"{'harness':<22}{'setting':<26}" + "".join(f"{c:>17}" for c in columns) + "  val_bpb")
    for name, settings in found.items():
        for setting, rows in settings.items():
            cells = "".join(f"{statistics.median(r.get(c, float('nan')) for r in rows):17.2f}" for c in columns)
            print(f"{name:<22}{setting:<26}{cells}  {sorted({r['val_bpb'] for r in rows})}")
    scores = {r["val_bpb"] for settings in found.values() for rows in settings.values() for r in rows}
    print("val_bpb the same in every row:", "yes" if len(scores) == 1 else f"NO: {sorted(scores)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="the harness to compare with, a git revision (default: none)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache", default=os.environ.get("AUTORESEARCH_CACHE", str(Path.home() / ".cache/autoresearch")))
    args = p.parse_args()
    cache = Path(args.cache)
    folder = Path(tempfile.mkdtemp(prefix="bench-evaluation-"))
    export = export_model(cache, folder)
    harnesses = {f"at {args.before}": args.before} if args.before else {}
    harnesses["this working tree"] = None
    found = {name: measure(harness_at(rev, folder / f"harness-{i}"), cache, export, args.repeat, folder)
             for i, (name, rev) in enumerate(harnesses.items())}
    print_table(found)


if __name__ == "__main__":
    main()
