"""The demo end to end on the CPU, driving the real MCP server and the real train.py with a
budget of seconds per run; then Ctrl-C in the middle of a run and a resume, tracked in W&B offline."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autosearch.driver import RERUN_PREFIXES
from mcp_server.core import wandb_tracking
from server_support import Webhook
from wandb_support import offline, offline_runs  # noqa: F401 (offline: a fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMIT = re.compile(r"^[0-9a-f]{7}$")
DEMO_ARGS = ["--profile", "cpu", "--dataset", "offline"]
QUICK_BUDGET = "3"  # seconds of training per run
# Long enough that a Ctrl-C sent on the first progress line lands while the run is still training.
INTERRUPTIBLE_BUDGET = "5"


def demo_command(workspace: Path, budget: str, *extra: str) -> list[str]:
    return [sys.executable, "demo.py", *DEMO_ARGS, "--budget-seconds", budget, "--workspace", str(workspace), *extra]


def ledger_rows(workspace: Path) -> list[dict]:
    lines = (workspace / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    for line in lines[1:]:
        assert line.count("\t") == 4, f"malformed ledger line: {line!r}"
    return list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))


def ideas(rows: list[dict]) -> list[dict]:
    """The rows of experiments, without the server's reruns (noise, controls, confirmations)."""
    return [row for row in rows if not row["description"].startswith(RERUN_PREFIXES)]


def check_rows(rows: list[dict]) -> None:
    """Every field well formed, and every kept row beats the best kept before it."""
    best = None
    for row in rows:
        assert COMMIT.match(row["commit"]), row
        assert row["status"] in ("keep", "discard", "crash"), row
        assert re.fullmatch(r"\d+\.\d{6}", row["val_bpb"]) and re.fullmatch(r"\d+\.\d", row["memory_gb"]), row
        assert row["description"].strip(), row
        if row["status"] == "crash":
            assert row["val_bpb"] == "0.000000" and row["memory_gb"] == "0.0"
            continue
        assert 0 < float(row["val_bpb"]) < 20
        if row["status"] == "keep":
            assert best is None or float(row["val_bpb"]) < best, rows
            best = float(row["val_bpb"])


def git(workspace: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout.strip()


def processes_in(folder: Path) -> list[int]:
    """Live processes whose working directory is the folder or below it (training runs in a slot's
    worktree inside the workspace's .git)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def wait_until_no_processes_in(folder: Path, seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def within(distribution, value) -> bool:
    """Whether a trial's value is one its Optuna distribution offers."""
    if hasattr(distribution, "choices"):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


def test_demo_end_to_end(repo_root, prepared_env, tmp_path):
    """--strategy tpe: the server's sweep tool proposes (an Optuna study in the workspace), each
    trial an ordinary run; the sweep's best is decided as the demo decides any result. One demo run
    of real training serves the whole end to end: the Ctrl-C test below runs the demo's own loop of
    proposals (greedy), and tests/test_search_edits.py the random strategy's on the real train.py. Its
    sweep is also the suite's sweep of the real train.py (tests/test_sweep.py's use the fake trainer)."""
    workspace = tmp_path / "ws"
    branch_before = git(repo_root, "rev-parse", "--abbrev-ref", "HEAD")
    hook = Webhook()
    proc = subprocess.run(demo_command(workspace, QUICK_BUDGET, "--experiments", "2", "--strategy", "tpe",
                                       "--track", "mlflow", "--notify", hook.url),
                          cwd=repo_root, env=prepared_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "sweep of 2 trial(s) with Optuna's tpe sampler" in out, out
    assert len(re.findall(r"^\[\d\d:\d\d\] trial \d+ \(run \d+\): ", out, re.M)) == 2, out
    assert (workspace / ".research-loop" / "optuna.db").is_file()

    rows = ledger_rows(workspace)
    assert rows[1]["description"].startswith("noise repeat 1/1 of"), rows  # the demo measures its noise
    assert len(ideas(rows)) == 3, rows  # the baseline and two experiments (and any confirmation reruns)
    assert len([row for row in ideas(rows) if "sweep trial " in row["description"]]) == 2, rows
    assert rows[0]["description"] == "baseline" and rows[0]["status"] == "keep"
    check_rows(rows)

    # The sweep's trials, read back from its Optuna study (what a tiny sweep of the real train.py on a
    # server of its own checked in tests/test_sweep.py): each an ok run of its own commit, whose train.py
    # holds the trial's values, each inside the space's ranges and each changing the number; the best is
    # left pending for the demo to decide exactly when it beats the kept baseline.
    import optuna

    from mcp_server.core.constants import format_value
    storage = f"sqlite:///{workspace / '.research-loop' / 'optuna.db'}"
    (study,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    base = float(rows[0]["val_bpb"])
    assert len(trials) == 2, trials
    for trial in trials:
        assert trial.user_attrs["status"] == "ok" and 0 < trial.value < 20, trial
        source = git(workspace, "show", f"{trial.user_attrs['commit']}:train.py")
        for name, value in trial.params.items():
            assert within(trial.distributions[name], value), (name, value, trial.distributions[name])
            assert re.search(rf"^{name} = {re.escape(format_value(value))}(?:\s|$)", source, re.M), (name, value)
        assert round(trial.value, 6) != base, trial  # the trial's values changed the training
    best_trial = min(trials, key=lambda trial: trial.value)
    pending = re.search(r"the sweep's best, run (\d+):", out)
    assert (pending is not None and int(pending.group(1)) == best_trial.user_attrs["run"]) == \
        (best_trial.value < base), out  # as the sweep compares: the trial's number, the kept row's

    # The research branch's head is the best kept commit, and train.py there is what was kept.
    kept = [row for row in rows if row["status"] == "keep"]
    best = min(kept, key=lambda row: float(row["val_bpb"]))
    assert git(workspace, "rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/demo"
    assert git(workspace, "rev-parse", "--short=7", "HEAD") == best["commit"]
    assert git(workspace, "status", "--porcelain", "--untracked-files=no") == ""

    # Progress all along, then the ledger, the best result's diff and the chart.
    assert re.search(r"^\s+step \d+ \(", out, re.M), out
    assert "Ledger (results.tsv" in out and f"git diff {rows[0]['commit']} {best['commit']}" in out
    assert "Wall time per experiment" in out
    chart = Path(re.search(r"Progress chart: (\S+)", out).group(1))
    assert chart.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image
    assert matplotlib.image.imread(chart).ndim == 3
    report = Path(re.search(r"^Report: (\S+)", out, re.M).group(1))  # the morning report, ignored by git
    assert report.parent == workspace.resolve() / ".research-loop" / "reports"
    assert "## Kept changes" in report.read_text() and "noise repeat" in report.read_text()

    # Every run in the workspace's MLflow store at its decision, the real train.py's loss curve with it.
    store = f"sqlite:///{workspace / '.research-loop' / 'mlflow.db'}"
    assert f"Tracked runs: MLflow at {store}" in out
    from mlflow import MlflowClient

    from mcp_server.core import tracking
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(tracking.experiment_name(workspace, "autoresearch/demo"))
    runs = {run.data.tags["commit"][:7]: run for run in client.search_runs([experiment.experiment_id])}
    assert {commit: run.data.tags[tracking.STAGE_TAG] for commit, run in runs.items()} == \
        {row["commit"]: row["status"] for row in rows}
    assert len(client.get_metric_history(runs[best["commit"]].info.run_id, "train_loss")) > 1

    # Each keep pinged the webhook (Slack's and Discord's JSON), the baseline's first.
    pings = [m for m in hook.messages() if m.startswith("kept ")]
    assert len(pings) == len(kept) and pings[0].startswith(f"kept {rows[0]['commit']}: val_bpb"), hook.messages()

    # The user's checkout is untouched: same branch, no research branch created there.
    assert git(repo_root, "rev-parse", "--abbrev-ref", "HEAD") == branch_before
    assert "autoresearch/" not in git(repo_root, "branch", "--list", "autoresearch/*")
    assert wait_until_no_processes_in(workspace) == []


def test_interrupt_and_resume(repo_root, prepared_env, tmp_path, offline):
    """Ctrl-C in the middle of a run, then a resume; both calls with --track wandb, so the night's real
    train.py runs are W&B offline runs, each written once across the restart (one demo run of real
    training serves both: tests/test_wandb_tracking.py has the tracker's own tests)."""
    workspace = tmp_path / "ws"
    env = {**prepared_env, **{k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")}}  # offline's
    demo = subprocess.Popen(demo_command(workspace, INTERRUPTIBLE_BUDGET, "--experiments", "1", "--strategy", "greedy",
                                         "--track", "wandb"),
                            cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    try:
        # Wait for the first experiment after the baseline to be training, then Ctrl-C.
        in_experiment = False
        for line in demo.stdout:
            seen.append(line)
            in_experiment = in_experiment or "experiment 1/1:" in line
            if in_experiment and re.match(r"\s+step \d+", line):
                break
        else:
            pytest.fail("the demo ended before its first experiment trained:\n" + "".join(seen))
        assert processes_in(workspace), "no training process is running in the workspace"
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=180)  # a bound for a loaded CI machine, not a target
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, "".join(seen) + rest
    assert "resume with: uv run demo.py --workspace" in rest
    assert wait_until_no_processes_in(workspace) == [], "a training process survived Ctrl-C"
    rows = ledger_rows(workspace)
    assert [row["description"] for row in ideas(rows)] == ["baseline"]
    check_rows(rows)

    resumed = subprocess.run(demo_command(workspace, INTERRUPTIBLE_BUDGET, "--track", "wandb"), cwd=repo_root,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "interrupted run" in resumed.stdout
    rows = ledger_rows(workspace)
    check_rows(rows)
    # The interrupted run is logged as a crash; it does not count, so the one experiment asked
    # for follows it: the interrupted configuration again.
    rows = ideas(rows)
    assert len(rows) == 3, rows
    assert rows[1]["status"] == "crash" and rows[1]["description"].endswith("(interrupted)")
    assert rows[2]["description"].startswith(rows[1]["description"].removesuffix(" (interrupted)"))
    best = min((r for r in rows if r["status"] == "keep"), key=lambda r: float(r["val_bpb"]))
    assert git(workspace, "rev-parse", "--short=7", "HEAD") == best["commit"]
    assert wait_until_no_processes_in(workspace) == []

    # Every run of the night that ended in W&B, offline in the workspace, at its decision, with the real
    # train.py's loss curve (the interrupted one never ended: it has no result to track); and the way to
    # upload them.
    folder = wandb_tracking.local_dir(workspace)
    assert f"Tracked runs: W&B (offline, {folder}) (upload them: uv run wandb sync {folder}/offline-run-*)" \
        in resumed.stdout
    runs = {r.summary["commit"][:7]: r for r in offline_runs(folder).values()}
    ended = [row for row in ledger_rows(workspace) if not row["description"].endswith(" (interrupted)")]
    assert len(ended) == len(ledger_rows(workspace)) - 1
    assert {c: r.summary["decision"] for c, r in runs.items()} == {row["commit"]: row["status"] for row in ended}
    assert all(len([h for h in r.history if "train_loss" in h]) > 1 for r in runs.values())
    assert offline.connections == 0
