"""The research loop end to end, no LLM needed: a search agent drives the MCP server over stdio.

    uv run demo.py                      # CPU: baseline + 5 experiments, under 10 minutes on 2 cores
    uv run demo.py --strategy greedy --hours 8 --workspace ~/runs/night1   # an overnight baseline search
    uv run demo.py --strategy tpe --experiments 12   # Optuna's TPE (or cmaes) through the server's sweep tool
    uv run demo.py --track mlflow       # every run in MLflow too (extra `mlflow`): `mlflow ui` shows them
    uv run demo.py --track wandb        # or in W&B, offline (extra `wandb`): `wandb sync` uploads them

It prepares data and tokenizer if needed, clones this repository's HEAD into a scratch workspace
(your checkout and branch are never touched), sets up a research branch, runs the baseline and
then experiments chosen by the strategy, keeping or discarding each, and ends with the ledger,
the best result's diff against the baseline, the progress chart and the morning report (under
.research-loop/reports/). While it runs, the server also serves the live dashboard; its address
(with a token made for this call) is printed first.
Ctrl-C stops the run in progress; the same command with --workspace resumes.
"""
import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autosearch.constants import harness_exports
from autosearch.driver import (
    USER_FACING_ERRORS, SearchError, SearchPlan, child_env, experiments_done, resolve_space, run_search,
)
from autosearch.report import best_kept, diff_against_baseline, ledger_table, read_ledger, timing_table
from autosearch.space import DEFAULT_SPACE, load_space
from autosearch.strategies import STRATEGIES
from mcp_server.core import notify, tracking, wandb_tracking

REPO = Path(__file__).resolve().parent
DEFAULT_EXPERIMENTS = 5  # baseline + 5 runs of the CPU profile's 60 s budget fit in 10 minutes
SETTINGS_FILE = "autosearch.json"  # inside the workspace's .git: never tracked, never reset
RESUMED_SETTINGS = ("strategy", "seed", "budget_seconds", "experiments", "hours", "tag", "slots")
STARTED = time.monotonic()


def say(message: str) -> None:
    minutes, seconds = divmod(int(time.monotonic() - STARTED), 60)
    print(f"[{minutes:02d}:{seconds:02d}] {message}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="search strategy (default: random; tpe and cmaes: the server's sweep tool, an Optuna study)")
    p.add_argument("--experiments", type=int, help=f"experiments after the baseline (default {DEFAULT_EXPERIMENTS}, "
                                                    "unlimited with --hours); counts the whole ledger when resuming")
    p.add_argument("--hours", type=float, help="stop starting experiments after this many hours")
    p.add_argument("--slots", type=int, help="experiments at once (default 1; one per GPU, or a share of the CPU each)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--workspace", type=Path, help="scratch workspace; an existing one is resumed")
    p.add_argument("--tag", help="research branch autoresearch/<tag> (default: demo)")
    p.add_argument("--budget-seconds", type=float, help="training seconds per run (sets AUTORESEARCH_TIME_BUDGET)")
    p.add_argument("--space", type=Path, help='JSON search space, e.g. {"MATRIX_LR": [0.02, 0.08]}')
    p.add_argument("--profile", default="auto", help="hardware profile for prepare.py (default auto)")
    p.add_argument("--dataset", default="auto", help="data set for prepare.py (default auto)")
    p.add_argument("--dashboard", type=int, default=0, metavar="PORT",
                   help="port of the live dashboard on 127.0.0.1 (default 0: a free port; -1: none)")
    p.add_argument("--notify", type=notify.url_argument, metavar="URL",
                   help="a webhook (Slack, Discord, ntfy, ...) the server pings on a keep, at the end and after "
                        "failed runs in a row")
    p.add_argument("--track", choices=tracking.TRACKERS,
                   help="track every run in MLflow (extra `mlflow`), in the workspace's own store unless --mlflow-uri, "
                        "or in W&B (extra `wandb`), offline in the workspace unless WANDB_MODE or WANDB_API_KEY is set")
    p.add_argument("--mlflow-uri", help="an MLflow tracking server, e.g. http://127.0.0.1:5000 (implies --track mlflow)")
    args = p.parse_args(argv)
    if args.mlflow_uri and args.track == "wandb":
        p.error("--mlflow-uri is for --track mlflow, not wandb: drop one of them")
    if args.mlflow_uri:
        args.track = "mlflow"
    if args.experiments is not None and args.experiments < 0:
        p.error("--experiments must be 0 or more")
    if args.slots is not None and args.slots < 1:
        p.error("--slots must be 1 or more")
    for name in ("hours", "budget_seconds"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def settings(args, workspace: Path) -> dict:
    """Options for this call: a resumed workspace keeps the ones it was started with, unless given again;
    a different training budget would make its results incomparable, so it is refused."""
    path = workspace / ".git" / SETTINGS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    given = {name: getattr(args, name) for name in RESUMED_SETTINGS if getattr(args, name) is not None}
    if "budget_seconds" in given and saved and given["budget_seconds"] != saved.get("budget_seconds"):
        raise SearchError(f"{workspace} was searched with --budget-seconds {saved.get('budget_seconds')}; "
                          "resume with the same budget, or use a new --workspace")
    chosen = dict(strategy="random", seed=0, budget_seconds=None, tag="demo", experiments=None, hours=None, slots=1)
    chosen |= saved | given
    if chosen["experiments"] is None and chosen["hours"] is None:
        chosen["experiments"] = DEFAULT_EXPERIMENTS
    path.write_text(json.dumps(chosen))
    return chosen


def prepare(profile: str, dataset: str, env: dict) -> None:
    """Data and tokenizer, if not prepared yet (prepare.py says so and returns at once if they are)."""
    say(f"preparing data and tokenizer (profile {profile}, dataset {dataset})")
    proc = subprocess.run([sys.executable, "prepare.py", "--profile", profile, "--dataset", dataset],
                          cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SearchError("prepare.py failed (its message is above); fix that, then run the demo again")


def is_demo_workspace(workspace: Path | None) -> bool:
    return workspace is not None and (workspace / ".git" / SETTINGS_FILE).is_file()


def refuse_foreign_folder(workspace: Path | None) -> None:
    """Any folder with content that demo.py did not make (your own checkout above all) is refused."""
    if workspace is not None and not is_demo_workspace(workspace) and workspace.exists() and (
            not workspace.is_dir() or any(workspace.iterdir())):
        raise SearchError(f"{workspace} is not empty and is not a workspace made by demo.py: give a new or "
                          "empty folder (the demo clones this repository into it)")


def make_workspace(workspace: Path | None) -> Path:
    """A clone of this repository's HEAD, or the existing demo workspace to resume."""
    if is_demo_workspace(workspace):
        say(f"resuming workspace {workspace}")
        return workspace.resolve()
    target = workspace or Path(tempfile.mkdtemp(prefix="research-loop-demo-"))
    target.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                      capture_output=True, text=True).stdout.strip():
        say("note: uncommitted changes in this checkout are not part of the demo (it clones HEAD)")
    say(f"cloning {REPO} HEAD into {target}")
    proc = subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SearchError(f"git clone into {target} failed: {proc.stderr.strip()}")
    return target.resolve()


def final_report(plan: SearchPlan) -> None:
    rows = read_ledger(plan.workspace)
    print("\nLedger (results.tsv; * = best kept):")
    print(ledger_table(rows))
    best = best_kept(rows)
    if best is not None:
        baseline = next(row for row in rows if row["status"] == "keep")
        kept = sum(row["status"] == "keep" for row in rows) - 1
        print(f"\nBaseline val_bpb {baseline['val_bpb']:.6f}; best {best['val_bpb']:.6f} at {best['commit']} "
              f"({best['description']}); {kept} of {experiments_done(rows)} experiments kept.")
        print(f"\ngit diff {baseline['commit']} {best['commit']} -- train.py\n"
              + diff_against_baseline(plan.workspace, baseline["commit"], best["commit"]))
    if plan.timings:
        print("\nWall time per experiment in this call (seconds):")
        print(timing_table(plan.timings))
    if plan.chart:
        print(f"\nProgress chart: {plan.chart}")
    if plan.report:
        print(f"Report: {plan.report} (make a pull request branch of the kept changes: uv run research-loop report "
              f"--workspace {plan.workspace} --branch pr/{plan.tag})")
    if plan.tracking == ("--track", "wandb"):
        print(f"Tracked runs: {wandb_tracking.where(plan.workspace)} (upload them: uv run wandb sync "
              f"{wandb_tracking.local_dir(plan.workspace)}/offline-run-*)")
    elif plan.tracking:
        uri = plan.tracking[-1] if "--mlflow-uri" in plan.tracking else tracking.default_uri(plan.workspace)
        print(f"Tracked runs: MLflow at {uri}" + ("" if uri.startswith("http") else
                                                   f" (see them: uv run mlflow ui --backend-store-uri {uri})"))
    print(f"Workspace: {plan.workspace} (resume or extend: uv run demo.py --workspace {plan.workspace}; "
          f"read it in a browser: uv run research-loop dashboard --workspace {plan.workspace})")


def tracking_options(args) -> tuple:
    if not args.track:
        return ()
    return ("--track", args.track) + (("--mlflow-uri", args.mlflow_uri) if args.mlflow_uri else ())


def main(argv=None) -> int:
    args = parse_args(argv)
    workspace = None
    try:
        if args.track and tracking.missing_extra(args.track):
            raise SearchError(tracking.missing_extra(args.track))
        space = load_space(args.space) if args.space else DEFAULT_SPACE
        refuse_foreign_folder(args.workspace)
        resuming = is_demo_workspace(args.workspace)
        prepare(args.profile, args.dataset, child_env(args.budget_seconds))
        # Checked before anything is cloned or run: against the workspace's train.py, or this HEAD's.
        source_repo = args.workspace if resuming else REPO
        harness = harness_exports(source_repo, child_env(args.budget_seconds))
        space = resolve_space(source_repo, space, harness, strict=args.space is not None)
        workspace = make_workspace(args.workspace)
        chosen = settings(args, workspace)
        env = child_env(chosen["budget_seconds"])
        if args.dashboard >= 0:  # the page is opened with this token, printed in its address
            env.setdefault("RESEARCH_LOOP_TOKEN", secrets.token_urlsafe(16))
        if args.notify:  # the server reads it from its environment, as under the overnight runner
            env[notify.NOTIFY_ENV] = args.notify
        plan = SearchPlan(workspace=workspace, tag=chosen["tag"], strategy=chosen["strategy"],
                          experiments=chosen["experiments"], hours=chosen["hours"], seed=chosen["seed"],
                          slots=chosen["slots"], dashboard=args.dashboard if args.dashboard >= 0 else None,
                          space=space, env=env, harness=harness, tracking=tracking_options(args))
        say(f"{plan.strategy} search over {', '.join(dim.name for dim in space)}")
        asyncio.run(run_search(plan, REPO, say))
    except KeyboardInterrupt:
        where = f" --workspace {workspace}" if workspace else ""
        print(f"\ninterrupted: any training run was stopped and the ledger is intact; "
              f"resume with: uv run demo.py{where}", file=sys.stderr)
        return 130
    except USER_FACING_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    final_report(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
