"""Starting a research run and submitting candidates: setup, then run_experiment's checks and commit.

setup creates the research branch and the records; submit checks every rule before anything
changes (the run's description and timeout, the owner, only train.py changed, the harness and the
prepared data as at setup, a free slot for an undecided result), makes the candidate commit under
its own ref and queues it; dispatch starts it.

Imports the core (runs), dispatch and measurements (what a new research run carries).
"""
import os
import subprocess
import sys
import time

import git

from mcp_server.phases import early_stop, measurements, novelty
from mcp_server.core import budget_settings, envpin, history, integrity, ledger, limits, plot
from mcp_server.phases.dispatch import dispatch, require_owner, run_command
from mcp_server.core.models import Refusal, SetupResult
from mcp_server.core.programs import oversized
from mcp_server.phases.runs import RUNS_DIR, UNDECIDED, LoopCore, run_name
from mcp_server.core.workspace import (BRANCH_PREFIX, EDITABLE, RUN_REF_PREFIX, cache_dir, name_git_can_make,
                                       prepared_info, timeout_for, validate_tag)

MAX_TIMEOUT_S = 86400.0
MAX_COMMIT_ATTEMPTS = 20  # candidates whose 7-character hash collides with a logged one are re-made
HARNESS_FILES_SHOWN = 10  # in the note that a research run's harness differs from the one before's
# ... and where that harness no longer evaluates exports (review 85)
UNMEASURED_NOTE = ("does not evaluate exported models: every val_bpb of this research run is the one train.py prints, "
                   "not the harness's")


def setup(core: LoopCore, tag: str, hours: float | None = None, max_experiments: int | None = None,
          target_val_bpb: float | None = None,
          max_failures_in_row: int | None = limits.DEFAULT_MAX_FAILURES_IN_ROW,
          max_gpu_hours: float | None = None, early_stop_runs: bool = False) -> SetupResult:
    tag = validate_tag(tag)
    if not isinstance(early_stop_runs, bool):
        raise Refusal(f"early_stop must be true or false, got {early_stop_runs!r}. Nothing was set up.")
    ws = core.ws
    branch = BRANCH_PREFIX + tag
    if not ws.repo.head.is_valid():
        if (ws.git_or_none("rev-parse", "--show-object-format") or "").strip() not in ("", "sha1"):
            raise Refusal(f"{core.root} is a git repository of SHA-256 object ids, which the server's git library "
                          "(GitPython) cannot read: make the workspace a repository of the default format (git init "
                          "in a new folder, then commit prepare.py, train.py and the harness there), then call "
                          "setup again.")
        raise Refusal(f"{core.root} has no commit yet: commit prepare.py and train.py (the baseline) "
                      "first, then call setup again.")
    missing = ws.missing_files()
    if missing:
        raise Refusal(f"{', '.join(missing)} not found in {core.root}: the workspace must be an "
                      "autoresearch layout (prepare.py and train.py at the root).")
    if prepared_info() is None:
        raise Refusal(f"No prepared data or tokenizer in {cache_dir()}: run `uv run prepare.py` "
                      "in the workspace first (it downloads or builds the data and trains the tokenizer).")
    settings = budget_settings.checked_environment(core.root, prepared_info() or {})  # every run trains at them
    start = core.kept_row(ws.head()) if core.ledger_path.exists() else None
    try:
        chosen = limits.make_limits(hours, max_experiments, target_val_bpb, max_failures_in_row,
                                    best=start.val_bpb if start else None, max_gpu_hours=max_gpu_hours)
    except ValueError as exc:
        raise Refusal(f"{exc}. Nothing was set up.") from None
    require_owner(core)
    with core.state.transaction() as state:
        unsettled = core.runs_of(state)
        if unsettled:
            listed = ", ".join(f"run {e['run']} ({e['status']})" for e in unsettled)
            raise Refusal(f"Busy: {listed} of {state.get('branch')} not decided yet. Decide each "
                          "(keep/discard, or cancel one in flight) before a new setup, so no result is dropped.")
        if ws.branch_exists(branch):
            raise Refusal(f"Branch {branch} already exists: pick a new tag (e.g. {tag}-2), or "
                          f"git checkout {branch} to continue that run.")
        # review 93: a tag (or a remote's branch) of that name made the branch ambiguous to every later git command
        name_git_can_make(ws.repo, branch, f"pick another tag (e.g. {tag}-2). Nothing was set up")
        # the server's own chart, where git tracks one (upstream's autoresearch does), enters no commit of a run
        dirty = [path for path in ws.dirty_tracked_files() if path != plot.PLOT_NAME]
        if dirty:
            raise Refusal(f"Uncommitted changes to tracked files: {', '.join(dirty)}. Commit or "
                          "revert them first, so the baseline is a known commit.")
        if ws.tracked(ledger.LEDGER_NAME):
            raise Refusal(f"{ledger.LEDGER_NAME} is tracked by git, so a reset could lose rows: "
                          f"git rm --cached {ledger.LEDGER_NAME} and commit, then setup again.")
        fingerprint = ws.fingerprint()
        _check_same_harness(core, state, fingerprint)
        integrity.refuse_linked_data()  # before the branch: runs would all be refused
        ws.create_branch(branch)
        archived = _archive_ledger(core)
        ledger.ensure_ledger(core.ledger_path)
        ws.add_excludes()
        walk = envpin.Walk()  # one walk of the environments for the four pins
        environment_pin = _environment_pin(core, walk)
        python, evaluates = run_command(core)[0], integrity.supports_export(ws, ws.head())
        evaluator_pin = _evaluator_pin(python, evaluates, walk) if environment_pin is not None else None
        pythons = [python, sys.executable] if environment_pin is not None else None
        startup_pin = envpin.take_startup(pythons, walk) if pythons else None
        source_pin = envpin.pin_sources(pythons, walk, _packages(python, evaluates)) if pythons else None
        seq = state.get("seq", 0) or _last_run_number(core)
        harness_changed = harness_change(core, state, fingerprint)
        settings_changed = budget_settings.change_note(state, settings)
        measured_with = {"cache_fingerprint": integrity.cache_fingerprint(), "input_pins": integrity.input_pins(),
                         "environment_pin": environment_pin, "evaluator_pin": evaluator_pin,
                         "startup_pin": startup_pin, "source_pin": source_pin, budget_settings.SETTINGS: settings}
        carried = measurements.carried(state, fingerprint, measured_with)  # other arithmetic, data or environment
        state.clear()
        core.fresh_records.clear()  # the earlier research run's records vouch for nothing here
        # start_commit: the report's starting point (review 85: a first keep logged by hand on commits of the agent's
        # own made the parent of its commit the start, and the pull request's branch was built on that commit's tree)
        state.update({"tag": tag, "branch": branch, "kept_commit": ws.head(), "start_commit": ws.head(),
                      "fingerprint": fingerprint,
                      "seq": seq, "runs": {}, "rows": [], "noise": None,
                      "limits": chosen, "started_at": time.time(), "early_stop": early_stop_runs,
                      "harness_changed": harness_changed, budget_settings.CHANGED: settings_changed,
                      history.DIGESTS: {}, history.LOG_DIGESTS: {}}  # none yet: never a state from before digests (dispatch.take_over)
                     | measured_with | carried)
    return SetupResult(branch=branch, base_commit=ws.head()[:7], ledger=ledger.LEDGER_NAME,
                       fingerprint=fingerprint, archived_ledger=archived,
                       limits=limits.left({"limits": chosen}, []), early_stop=early_stop.describe(state),
                       harness_changed=harness_changed, settings_changed=settings_changed,
                       next="run_experiment('baseline') with train.py unchanged, then keep()")


def _check_same_harness(core: LoopCore, state: dict, fingerprint: str) -> None:
    """A harness other than the active research run's (the evaluation itself: an agent may commit an edit of
    it and call setup) is set up only once that run has ended or was stopped on purpose, which is then said."""
    if state.get("branch") and state.get("fingerprint") not in (None, fingerprint) \
            and not core.ended(state):
        raise Refusal(f"The harness at HEAD (every tracked file but {EDITABLE}) differs from the one the research run "
                      f"{state['branch']} is measured with, and that run is still active: its results must all "
                      "come from one harness. Set up from its harness, or end it first: stop(reason) says why, "
                      "and then setup(tag) may pin the new harness.")


def harness_change(core: LoopCore, state: dict, fingerprint: str) -> str | None:
    """What setup's answer and status say for the whole research run when its harness differs from the one
    the research run before it was measured with (allowed once that run ended or was stopped): its numbers
    and the earlier ones are not comparable, and an agent's stop-then-setup is not unsaid. Carried while the
    harness stays the one the note named: a second stop-then-setup on it would otherwise drop the note."""
    if not state.get("branch") or state.get("fingerprint") is None:
        return None
    if state["fingerprint"] == fingerprint:
        return state.get("harness_changed")
    names = core.ws.repo.git.diff("--name-only", "-z", "--no-renames", state["kept_commit"], "HEAD", "--")
    files = [p for p in names.split("\0") if p and p != EDITABLE]
    shown = ", ".join(files[:HARNESS_FILES_SHOWN]) + (f" and {len(files) - HARNESS_FILES_SHOWN} more"
                                                     if len(files) > HARNESS_FILES_SHOWN else "")
    # review 85: a harness without the evaluator and exporter leaves every number to train.py, which no row marks;
    # said again while the harness still exports nothing (review 86: a second change, a comment, dropped the note)
    dropped = _exported(core, state["kept_commit"]) or UNMEASURED_NOTE in (state.get("harness_changed") or "")
    unmeasured = f"; and it {UNMEASURED_NOTE}" if dropped and not _exported(core, core.ws.head()) else ""
    return (f"the harness differs from the one {state['branch']} was measured with ({shown or 'file modes'}): "
            f"this research run's numbers are not comparable with that run's{unmeasured}")


def _exported(core: LoopCore, commit: str) -> bool:
    try:
        return integrity.supports_export(core.ws, commit)
    except (ValueError, git.BadName):  # the earlier run's kept commit gone from git: nothing to say about it
        return False


def _last_run_number(core: LoopCore) -> int:
    """Run numbers never repeat, even across setups: they name the run's files and ref."""
    runs = core.root / RUNS_DIR
    numbers = [int(p.name[:4]) for p in runs.glob("[0-9][0-9][0-9][0-9]-*")] if runs.is_dir() else []
    return max(numbers, default=0)


def _archive_ledger(core: LoopCore) -> str | None:
    """A ledger from an earlier research run is moved aside, never overwritten."""
    if not core.ledger_path.exists() or not core.rows():
        return None
    archive = core.state.dir / "archive"
    ledger.make_folder(archive)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        target = archive / (f"results-{stamp}.tsv" if k == 0 else f"results-{stamp}-{k}.tsv")
        try:
            os.link(core.ledger_path, target)  # fails if the name is taken: never overwrites
        except FileExistsError:
            continue
        core.ledger_path.unlink()
        return str(target.relative_to(core.root))
    raise Refusal(f"Too many ledger archives named results-{stamp}*.tsv in {archive}.")


def submit(core: LoopCore, description: str, timeout_seconds: float | None = None, source: bytes | None = None,
           parent_note: str = "", replacing: int | None = None, rerun_of: int | None = None,
           data_order: int = 0, rerun: bool = False, novel: bool = False, siblings: tuple[int, ...] = ()) -> dict:
    """Queues a candidate: train.py from the working tree (or `source`) on top of the kept
    commit. Returns its state entry; it starts as soon as a slot is free. `replacing`: an
    undecided run that this one supersedes (not counted against the slots). `rerun_of`: an
    undecided run this one re-measures (a control or a confirmation): not counted either, and
    its discard never touches train.py. `data_order`: another stretch of the training data
    (a rerun's; 0 is the usual one; local slots only). `siblings`: the runs the same call queued before this one
    (measure_noise's repeats), which it decides itself: not counted either. train.py from the working tree that was
    tried already is refused or answered from its earlier run ({"answered": result}; novelty.py)
    unless `rerun`; so is a given `source` where `novel` (a sweep's trial: an ordinary candidate)."""
    replacing = rerun_of if rerun_of is not None else replacing
    description = ledger.refuse_markers(ledger.validate_description(description))
    if timeout_seconds is not None and not (isinstance(timeout_seconds, (int, float))
                                            and 0 < timeout_seconds <= MAX_TIMEOUT_S):
        raise Refusal(f"timeout_seconds must be between 0 and {MAX_TIMEOUT_S:.0f} (one day).")
    if not isinstance(rerun, bool):
        raise Refusal(f"rerun must be true or false, got {rerun!r}.")
    require_owner(core)
    core.require_sandbox()
    try:
        run_command(core)  # found once, outside the state lock: the first sync can take minutes
    except (OSError, subprocess.SubprocessError) as exc:
        raise Refusal(f"{exc}. Fix the environment (`uv sync` in {core.root}), then retry.") from None
    with core.state.transaction() as state:
        core.research_state(state)
        over = core.ended(state)
        if over:
            raise Refusal(f"The research run has ended ({over}): no new runs. Decide any result still pending "
                          "(status()), then stop; setup(tag) starts a new research run.")
        # a rerun's siblings (the other reruns of the same run or call, which their tool discards) do not count:
        # on one slot a repeat that failed fast would otherwise block the next one of the same call (review 60)
        undecided = [e for e in core.runs_of(state, *UNDECIDED) if e["run"] != replacing and e["run"] not in siblings
                     and (rerun_of is None or e.get("rerun_of") != rerun_of)]
        if len(undecided) >= core.slots:
            raise Refusal(_decide_first(core, undecided))
        kept = state["kept_commit"]
        tried = novelty.Found(None, None)
        from_tree = source is None
        source = _checked_working_train(core, state) if from_tree else source
        if too_big := oversized(source):  # the working tree's, a sweep trial's or a reapply's
            raise Refusal(f"train.py {too_big} (upstream's is about 25 kB): keep large tables and weights out of the "
                          f"one file the loop diffs and compares, or `git checkout {kept[:7]} -- train.py`. No run was "
                          "queued.")
        if from_tree or novel:  # a sweep's trial is an ordinary candidate
            tried = novelty.check(core, state, source, rerun if from_tree else False)
        core.check_branch_holds_best(state)
        record = integrity.checked_record(state)
        integrity.check_pins(state.get("input_pins"))  # before anything is committed; dispatch checks again
        watched = _check_environment(core, state)
        if tried.answer:
            return {"answered": tried.answer.model_dump()}
        n = state.get("seq", 0) + 1
        commit = _new_candidate(core, n, kept, source, description, parent_note)
        # the run is judged by the budget checked now (the prepared record is the agent's to edit while it
        # trains), and its training time is train.py's word: only the wall bounds it, by the server's own
        # timeout for that budget, whatever timeout was asked (results._measured)
        settings = budget_settings.governing(state, core.root, record)  # the research run's, whatever the environment
        _tell_settings(core, state, record)
        budget = settings["time_budget"]
        most_seconds = timeout_for(budget)
        entry = {"run": n, "commit": commit, "parent": kept, "description": description, "status": "queued",
                 "verifies": integrity.supports_export(core.ws, commit),
                 "timeout": float(timeout_seconds or most_seconds), "submitted_at": time.time(),
                 "budget": budget, "most_seconds": most_seconds,
                 "flops_rate": record.get("flops_per_budget_second"), "clock": settings["budget_clock"],
                 "eval_tokens": settings["eval_tokens"],
                 "log": f"{RUNS_DIR}/{run_name(n, commit)}.log",
                 "report": f"{RUNS_DIR}/{run_name(n, commit)}.report.json"}
        if rerun_of is not None:
            entry["rerun_of"] = rerun_of
        if data_order:
            entry["data_order"] = data_order
        if tried.note:
            entry["tried_before"] = tried.note
        if watched:
            entry["environment_watch"] = watched
        state.setdefault("runs", {})[str(n)] = entry
        state["seq"] = n
        core.event(n)
    dispatch(core)
    return core.entry(n) or entry


def _tell_settings(core: LoopCore, state: dict, record: dict) -> None:
    """The answer of the first call that trains after this server found its environment's budget settings to
    differ from the research run's says so (status says it while they differ; the server's log, at its start)."""
    differ = budget_settings.differences(state, core.root, record)
    if differ and differ not in core.settings_told:
        core.settings_told.add(differ)
        core.state.tell(differ)


def _decide_first(core: LoopCore, undecided: list[dict]) -> str:
    if len(undecided) == 1:
        e = undecided[0]
        if e["status"] == "interrupted":
            return f"Unresolved {core.interrupted_note(e)} before the next run."
        return (f"Run {e['run']} ({e['commit'][:7]}, {e['result']['status']}) is not resolved yet: "
                "call keep() or discard() first.")
    runs = ", ".join(str(e["run"]) for e in undecided)
    return (f"{len(undecided)} results are not decided yet (runs {runs}), as many as there are slots: "
            "keep(run=N) or discard(run=N) first.")


def _check_environment(core: LoopCore, state: dict) -> dict:
    """The interpreters a run loads (the training's, the evaluator's) hold what setup pinned
    (core/envpin.py): their packages, their start-up and standard library, their sources' contents; a
    state from before a pin is pinned now. Returns where the environments' watches stood just before
    the check (core/envwatch.py): a change from then to the run's end makes it no result."""
    python = run_command(core)[0]
    position = core.pool.environment_position([python, sys.executable])  # sys.executable: the evaluator's
    pythons = [python, sys.executable]
    evaluates = integrity.supports_export(core.ws, state["kept_commit"])
    packages = _packages(python, evaluates, state.get("source_pin"))
    evaluator = ("The harness evaluator's environment (this server's)", "reinstall the plugin's environment")
    walk = envpin.Walk()  # each file stat'ed once for the four pins
    for key, take, check in (
            ("environment_pin", lambda: envpin.take(python, walk) or {},
             lambda pin: envpin.check(pin, python, walk=walk)),
            ("evaluator_pin", lambda: _evaluator_pin(python, evaluates, walk),
             lambda pin: envpin.check(pin, sys.executable, *evaluator, walk=walk)),
            ("startup_pin", lambda: envpin.take_startup(pythons, walk),
             lambda pin: envpin.check_startup(pin, pythons, walk)),
            ("source_pin", lambda: envpin.pin_sources(pythons, walk, packages),
             lambda pin: envpin.check_sources(pin, pythons, walk, packages))):
        if state.get(key) is None:  # a state from before this pin: pinned now
            state[key] = take()
        elif state[key]:
            check(state[key])
    return position


def _evaluator_pin(training_python: str, evaluates: bool, walk: envpin.Walk | None = None) -> dict:
    """The environment the harness's evaluator imports torch from (this server's interpreter's, which
    the evaluation spec names), where it is not the training's and the harness evaluates exports: an
    edited loss there bends every verified number. Upstream's harness evaluates nothing outside train.py,
    and nothing else the server runs imports its packages (a worker runs without site), so walking them
    for each run (0.4 s with torch's) would guard nothing."""
    if not evaluates or envpin.folders(sys.executable)[0] == envpin.folders(training_python)[0]:
        return {}
    return envpin.take(sys.executable, walk) or {}


def _packages(training_python: str, evaluates: bool, pinned: dict | None = None) -> tuple[str, ...]:
    """The interpreters whose packages the source pin covers: the training's, and the server's where the
    harness's evaluator imports from it (or a pin taken before this rule holds them)."""
    server_site = tuple(folder + os.sep for folder in envpin.folders(sys.executable)[0])
    held = any(path.startswith(server_site) for path in pinned or ())
    return (training_python, sys.executable) if evaluates or held else (training_python,)


def _environment_pin(core: LoopCore, walk: envpin.Walk | None = None) -> dict | None:
    """At setup: the environment the runs will train with, found as a run finds it; where it
    cannot be found yet, the first run pins it."""
    try:
        return envpin.take(run_command(core)[0], walk) or {}
    except (OSError, subprocess.SubprocessError):
        return None


def _checked_working_train(core: LoopCore, state: dict) -> bytes:
    kept = state["kept_commit"]
    hidden = integrity.hidden_index_changes(core.ws)
    if hidden:
        raise Refusal(f"git is told not to look at changes to {', '.join(hidden[:5])} (assume-unchanged or "
                      "skip-worktree), so a diff would not show them: `git update-index --no-assume-unchanged "
                      "--no-skip-worktree <file>`, then retry.")
    offenders = [p for p in core.ws.changed_since(kept) if p not in (EDITABLE, plot.PLOT_NAME)]  # the chart: ours
    if offenders:
        raise Refusal(f"Only train.py may change, but these differ from the last kept commit "
                      f"{kept[:7]}: {', '.join(offenders)}. Revert them (git checkout {kept[:7]} -- <file>).")
    if core.ws.fingerprint(kept) != state["fingerprint"]:
        raise Refusal("The harness (tracked files other than train.py) changed since setup: "
                      f"git reset to {kept[:7]}'s harness, or call setup(tag) for a new research run.")
    if not core.ws.train_is_regular_file():
        raise Refusal("train.py is not a regular file (a symlink or missing): write the code into "
                      f"train.py itself (git checkout {kept[:7]} -- train.py restores it).")
    return core.ws.working_train()


def _new_candidate(core: LoopCore, n: int, parent: str, source: bytes, description: str, parent_note: str) -> str:
    """The run's commit, under its own ref; its 7-character hash differs from every logged row's
    and every undecided run's, so each run has its own identity in results.tsv."""
    taken = {r.commit for r in core.rows()}
    taken |= {e["commit"][:7] for e in (core.state.load().get("runs") or {}).values()}
    message = f"{description}\n\n{parent_note}Research-Loop-Run: {n}"
    for attempt in range(MAX_COMMIT_ATTEMPTS):
        suffix = f"\nResearch-Loop-Attempt: {attempt}" if attempt else ""
        commit = core.ws.create_candidate(parent, source, message + suffix, f"{RUN_REF_PREFIX}{n}")
        if commit[:7] not in taken:
            return commit
    raise Refusal("Could not give this run a commit hash distinct from the ledger's; retry.")
