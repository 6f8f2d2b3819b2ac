"""Deciding: keep, discard, confirm, reapply, cancel, stop, and rows logged from outside (log_result).

Each decision checks its rules, then in one State.transaction writes its ledger row into the state
(results.tsv is written from it), moves the branch or restores train.py, and drops the run's entry:
a refused or interrupted decision records nothing, and its retry logs once.

Imports the core (runs) and every phase above it (results, dispatch, submit, overview).
"""
import time

import git

from mcp_server.phases import early_stop
from mcp_server.core import cost, history, ledger, limits, noise
from mcp_server.scripts import sandbox
from mcp_server.phases.dispatch import dispatch, require_owner
from mcp_server.executors.executor import read_report
from mcp_server.core.models import CancelResult, DecisionResult, LoggedRow, Refusal, Row, RunResult, StopResult
from mcp_server.phases import overview
from mcp_server.core.programs import unreadable_program
from mcp_server.phases.results import confirmation_needed, no_change, one_program_pair, result_of
from mcp_server.phases.runs import IN_FLIGHT, UNDECIDED, LoopCore
from mcp_server.phases.submit import submit
from mcp_server.core.workspace import EDITABLE, PROTECTED_BRANCHES, RUN_REF_PREFIX, validate_commit_arg

MAX_NOTE_CHARS = 140  # of a keep note or discard reason in the row: the description keeps the rest
UNVERIFIED_MARKER = limits.UNVERIFIED  # a kept row whose number is train.py's own, kept on request


def _undecided(core: LoopCore, state: dict, run: int | None, verb: str) -> dict:
    runs = state.get("runs") or {}
    if run is None:
        undecided = core.runs_of(state, *UNDECIDED)
        if len(undecided) == 1:
            return undecided[0]
        if len(undecided) > 1:
            listed = ", ".join(f"{e['run']} ({e['status'] if e['status'] == 'interrupted' else e['result']['status']})"
                               for e in undecided)
            raise Refusal(f"Several results wait for a decision (runs {listed}): {verb}(run=N) for each.")
        in_flight = core.runs_of(state, *IN_FLIGHT)
        if in_flight:
            raise Refusal(f"No result yet: run {in_flight[0]['run']} is {in_flight[0]['status']}. wait() for it "
                          f"(read_metrics() shows progress), then {verb}().")
        raise Refusal(f"Nothing to {verb}: no pending result. Call run_experiment(description) first.")
    if isinstance(run, bool) or not isinstance(run, int):
        raise Refusal(f"run must be a run number (status() lists them), got {run!r}.")
    entry = runs.get(str(run))
    if entry is None:
        record = core.read_record(run)
        if record and record.get("decision"):
            raise Refusal(f"Run {run} is already decided ({record['decision'].get('status')} row in "
                          f"{ledger.LEDGER_NAME}); each run is logged once.")
        raise Refusal(f"There is no undecided run {run}: status() lists the runs in flight and pending.")
    if entry["status"] in IN_FLIGHT:
        raise Refusal(f"Run {run} is still {entry['status']}: wait() for its result, or cancel(run={run}).")
    return entry


def keep(core: LoopCore, note: str | None = None, run: int | None = None, unverified: bool = False,
         unconfirmed: bool = False) -> DecisionResult:
    note = _checked_note(note, "note")
    require_owner(core)
    with core.state.transaction() as state:
        core.research_state(state)
        entry = _undecided(core, state, run, "keep")
        if entry["status"] == "interrupted":
            raise Refusal(f"{core.interrupted_note(entry)}; it has no result to keep.")
        result = entry["result"]
        if history.is_rerun(entry):  # kept beside measure_noise, it was the best
            raise Refusal(f"Run {entry['run']} is a rerun that measure_noise or confirm made on data order "
                          f"{entry.get('data_order')} ({entry['description']}): that tool logs it as a discard; its "
                          "val_bpb is that stretch of data's luck, never a result to keep.")
        if result["status"] != "ok":
            raise Refusal(f"Run {entry['run']} ended with {result['status']}, so it cannot be kept: "
                          "discard() logs it as a crash; fix train.py and rerun.")
        _refuse_no_change(core, entry)
        if result.get("verified") is False and not unverified:
            raise Refusal(f"Run {entry['run']}'s val_bpb is train.py's own, not the harness's ({result.get('integrity')}): "
                          f"keep(run={entry['run']}, unverified=true) keeps it anyway; or discard it.")
        # the noise of the result's own GPU model, as its answer judged it (reviews 56 and 58: the last estimate stored,
        # a quieter model's, let a gain inside this model's noise through unconfirmed)
        evidence = _keep_evidence(entry, noise.for_device(state, result.get("device")), unconfirmed,
                                  core.kept_row(entry["parent"]))
        kept = state["kept_commit"]
        if entry["parent"] != kept:
            raise Refusal(f"Run {entry['run']} was measured on {entry['parent'][:7]}, but {kept[:7]} has been kept "
                          "since: its gain was not measured on the current best, and an untested combination "
                          f"never becomes the best. reapply(run={entry['run']}) re-applies its change onto "
                          f"{kept[:7]} as a new run (or discard(run={entry['run']})).")
        tip = core.ws.branch_tip(state["branch"])
        if tip != entry["commit"]:  # a retried keep finds the branch already advanced
            core.check_branch_holds_best(state)
        row = ledger.make_row(entry["commit"][:7], result["val_bpb"], result["memory_gb"] or 0.0, "keep",
                              _described(entry["description"], note, core.sandbox_marker(entry) +
                                         (UNVERIFIED_MARKER if result.get("verified") is False else "")))
        _append_once(state, row)
        moved = tip != entry["commit"]
        try:
            if moved:
                core.ws.advance_branch(state["branch"], entry["commit"], kept)
            state["kept_commit"] = entry["commit"]
            state["kept_log"] = entry["log"]  # the best's curve for the early stop: the server's, not a record's
            del state["runs"][str(entry["run"])]
            core.write_record(state, entry, RunResult(**result), {"status": "keep", "at": time.time(),
                                                                  "evidence": evidence})
        except BaseException:
            # review 96: a keep that failed past the branch's move (a stale .git/index.lock) kept nothing in the
            # state but left the branch on the run; a discard then left a discarded idea as the branch's tip
            if moved:
                core.ws.retreat_branch(state["branch"], entry["commit"], kept)
            raise
    note_out = None
    if core.ws.branch() == state["branch"] and core.ws.working_train() != core.ws.train_at(entry["commit"]):
        note_out = (f"your train.py differs from the new best {entry['commit'][:7]} (`git diff` shows how): "
                    "build the next idea on the kept code")
    core.notifier.kept(core, row, evidence)
    best = core.kept_row(entry["commit"])
    return DecisionResult(row=row, branch=state["branch"], kept_commit=entry["commit"][:7],
                          best_val_bpb=best.val_bpb if best else None, evidence=evidence, note=note_out,
                          warning=_worse_warning(entry),
                          unsandboxed=sandbox.RUN_NOTE if core.sandbox_marker(entry) else None)


def _worse_warning(entry: dict) -> str | None:
    """A keep of a worse result is the agent's call (equal or worse code may be simpler), never a silent one."""
    result = entry["result"]
    if result.get("delta") is None or result["delta"] <= 0:
        return None
    return (f"run {entry['run']} ({result['val_bpb']:.6f}) is worse than the best it replaced "
            f"({result['best_val_bpb']:.6f}, +{result['delta']:.6f}): the branch now holds the worse result, and "
            "the next runs are compared with it. Keep only what improves val_bpb (or equals it with simpler "
            "code); to go back, restore the better train.py from git and run it again.")


def _keep_evidence(entry: dict, estimate: dict | None, unconfirmed: bool, base: Row | None) -> str:
    result, n = entry["result"], entry["run"]
    confirmation = entry.get("confirmation")
    if confirmation:
        deltas = ", ".join(f"{d:+.6f}" for d in confirmation["paired_deltas"]) or "none finished"
        if confirmation["confirmed"]:
            return f"confirmed: rerun beside a rerun of the best, the candidate won each pair ({deltas})"
        why = confirmation.get("reason") or f"Run {n}'s gain did not hold beside a rerun of the best."
        if not unconfirmed:
            raise Refusal(f"{why} Paired deltas {deltas}: discard(run={n}), or keep(run={n}, unconfirmed=true) "
                          "against that evidence.")
        ignored = f"; {confirmation['reason'].split(':')[0]}" if confirmation.get("reason") else ""
        return f"kept unconfirmed on request, though its confirmation failed ({deltas}{ignored})"
    if result.get("delta") is None and result.get("best_val_bpb") is not None:
        # review 56: kept unasked as "the first result", though another model's number can be lower for the same code
        if not unconfirmed:
            raise Refusal(f"Run {n} was {result.get('noise')}: its val_bpb says nothing about its change against the "
                          f"best's. discard(run={n}) and run it again where the best ran (run_experiment(..., "
                          f"rerun=true)), or keep(run={n}, unconfirmed=true) on your own judgement.")
        return f"kept on request, not compared with the best: {result.get('noise', '').removeprefix('not compared: ')}"
    need = confirmation_needed(result, estimate, base)
    if need and not unconfirmed:
        raise Refusal(f"Run {n} needs confirming before keep: {need}. confirm(run={n}) reruns the best and the "
                      f"candidate, interleaved (2 runs), and keep() then accepts it if the gain holds; "
                      f"keep(run={n}, unconfirmed=true) keeps it as it is.")
    if need:
        return f"kept unconfirmed on request: {need}"
    if result.get("delta") is None:
        return "the first result of the research run"
    if result.get("verified") is False:  # review 74: "beyond the noise" was said of train.py's own number
        return ("kept unverified on request: its val_bpb is train.py's own, not measured by the harness, so no noise "
                "judged it")
    return "beyond the noise" if result["delta"] < 0 else "not better than the best: kept on request"


def confirmation_plan(core: LoopCore, run: int | None) -> tuple[dict, bytes, bytes]:
    """The undecided ok result to confirm, the best's train.py (the control) and the candidate's."""
    state = core.state.load()
    core.research_state(state)
    entry = _undecided(core, state, run, "confirm")
    if history.is_rerun(entry):  # review 63: its code reran beside the best's, and the answer said keep(run)
        raise Refusal(f"Run {entry['run']} is a rerun that measure_noise or confirm made ({entry['description']}): it "
                      "is no candidate, so there is no gain to confirm, and keep refuses it. discard(run="
                      f"{entry['run']}) logs it (its value is filed already: measure_noise and confirm count it).")
    result = entry.get("result") or {}
    if result.get("status") != "ok":
        raise Refusal(f"Run {entry['run']} has no result to confirm ({result.get('status') or entry['status']}).")
    if entry["parent"] != state["kept_commit"]:
        raise Refusal(f"Run {entry['run']} was measured on {entry['parent'][:7]}, no longer the best: "
                      f"reapply(run={entry['run']}) first.")
    _refuse_no_change(core, entry)
    if alone := one_program_pair(core, entry):  # review 83: one program beside itself "confirmed" a chosen draw
        raise Refusal(f"Run {entry['run']} has no gain to confirm: {alone}.")
    return entry, core.ws.train_at(state["kept_commit"]), core.ws.train_at(entry["commit"])


def _refuse_no_change(core: LoopCore, entry: dict) -> None:
    """keep and confirm refuse the best's own program run again (results.no_change)."""
    if unchanged := no_change(core, entry):
        raise Refusal(unchanged[0].upper() + unchanged[1:] + ".")


def discard(core: LoopCore, reason: str | None = None, run: int | None = None, restore: bool = True) -> DecisionResult:
    """restore=False: train.py is left as it is (reapply restores it once its records are saved)."""
    reason = _checked_note(reason, "reason")
    require_owner(core)
    with core.state.transaction() as state:
        if not state.get("branch"):
            raise Refusal("This workspace is not set up for a research run: call setup(tag) first.")
        entry = _undecided(core, state, run, "discard")
        result = entry.get("result") or {}
        if entry["status"] == "interrupted":
            status, val_bpb, memory, suffix = "crash", 0.0, 0.0, " (interrupted)"
        else:
            status = "discard" if result["status"] == "ok" else "crash"
            val_bpb, memory = result.get("val_bpb") or 0.0, result.get("memory_gb") or 0.0
            # train.py's own number is marked in a discard row too (review 72: a plain row read as measured)
            suffix = UNVERIFIED_MARKER if status == "discard" and result.get("verified") is False else ""
        description = _described(entry["description"], reason, suffix + core.sandbox_marker(entry))
        row = ledger.make_row(entry["commit"][:7], val_bpb, memory, status, description)
        _append_once(state, row)  # saved with the state: a failure below records neither
        note = _restore_train(core, state, entry) if restore else None
        del state["runs"][str(entry["run"])]
        core.write_record(state, entry, result_of(core, state, entry), {"status": status, "at": time.time()})
    core.notifier.check(core)
    best = core.kept_row(state["kept_commit"])
    return DecisionResult(row=row, branch=state["branch"], kept_commit=state["kept_commit"][:7],
                          best_val_bpb=best.val_bpb if best else None, note=note,
                          unsandboxed=sandbox.RUN_NOTE if core.sandbox_marker(entry) else None)


def _restore_train(core: LoopCore, state: dict, entry: dict) -> str | None:
    """train.py back to the kept code, if it still holds the discarded run's code; the agent's
    newer edits are never overwritten."""
    if core.ws.branch() != state["branch"] or not (core.root / EDITABLE).is_file() or "rerun_of" in entry:
        return None
    working = core.ws.working_train()
    if working == core.ws.train_at(state["kept_commit"]):
        return None
    if working == core.ws.train_at(entry["commit"]):
        core.ws.restore_train(state["kept_commit"])
        return None
    return (f"train.py holds edits newer than run {entry['run']}; they were left in place (the discarded code "
            f"stays in commit {entry['commit'][:7]})")


def _append_once(state: dict, row: Row) -> list[Row]:
    """keep/discard retried after a failure past the append (e.g. git) do not log twice."""
    rows = ledger.rows_of(state)
    if any(r.commit == row.commit and r.status == row.status for r in rows):
        return rows
    return ledger.add_row(state, row)


def _checked_note(note: str | None, what: str) -> str | None:
    if note is None or (isinstance(note, str) and not note.strip()):
        return None
    return ledger.refuse_markers(ledger.validate_description(note, what), what, wrapped=True)


def _described(description: str, note: str | None, marker: str = "") -> str:
    """The row's description: the run's, then a marker such as " (interrupted)", then the agent's
    note; the run's own words are shortened to fit, never the marker."""
    if note:
        marker += f" ({ledger.fit_description(note, limit=MAX_NOTE_CHARS)})"
    return ledger.fit_description(description, marker)


def cancel(core: LoopCore, run: int, stopped: dict | None = None, ending: bool = False) -> CancelResult:
    """A queued run leaves the queue (no row: it never ran); a running one is stopped and logged
    as a crash. Its code stays under its ref either way. stopped: the early stop's verdict
    (early_stop.py), which the row, the record and the run's answer give. ending: stop(now=True)'s,
    the one caller that may cancel the reruns of measure_noise and confirm."""
    if isinstance(run, bool) or not isinstance(run, int):
        raise Refusal(f"run must be a run number (status() lists them), got {run!r}.")
    require_owner(core)
    with core.state.transaction() as state:
        entry = (state.get("runs") or {}).get(str(run))
        if entry is None or entry["status"] not in IN_FLIGHT:
            what = "has a result: keep or discard it" if entry else "is not queued or running (status() lists them)"
            raise Refusal(f"Run {run} {what}.")
        if history.is_rerun(entry) and not ending:
            # review 53: a confirmation rerun cut short as its curve fell behind left its pair unjudged (and the
            # call an error), so confirming again drew new luck; a noise repeat likewise left the estimate out
            raise Refusal(f"Run {run} is a rerun that measure_noise or confirm made ({entry['description']}): that "
                          "tool decides it when it ends, and a rerun cut short would leave its measurement unjudged. "
                          "stop(reason, now=True) ends the research run's runs, reruns included.")
        was = entry["status"]
        row = None
        if was == "running":
            why = f"{limits.STOPPED_EARLY}{early_stop.reason(stopped)})" if stopped else " (cancelled)"
            row = ledger.make_row(entry["commit"][:7], 0.0, 0.0, "crash",
                                  ledger.fit_description(entry["description"], why + core.sandbox_marker(entry)))
            _append_once(state, row)
            core.pool.cancel(run)
            result = result_of(core, state, entry)
            if stopped:
                result.status, result.tail = "crash", f"[stopped early: {early_stop.reason(stopped)}]"
                result.next = "nothing to decide: logged as a crash row (stopped early); edit train.py and try another idea"
            if isinstance(entry.get("started_at"), (int, float)):  # its slot time, which no report will bring
                entry["wall_seconds"] = round(time.time() - entry["started_at"], 2)
                cost.add_slot_time(state, entry["wall_seconds"], (read_report(core.root / entry["report"]) or {}).get("device"))
            core.write_record(state, entry, result, {"status": "crash", "at": time.time()}
                              | ({"stopped_early": early_stop.reason(stopped)} if stopped else {}))
        del state["runs"][str(run)]
        _restore_train(core, state, entry)
    core.mark_finished(run)
    dispatch(core)
    core.notifier.check(core)  # a crash row can complete a limit: its ping
    return CancelResult(run=run, was=was, row=row,
                        note=f"its code stays in commit {entry['commit'][:7]} ({RUN_REF_PREFIX}{run})")


def settle_reruns(core: LoopCore, runs: list[int], tool: str, what: str, then: str) -> list[RunResult]:
    """The results of measure_noise's or confirm's reruns once they ended, each logged as a discard (a crash row if
    it failed) unless another call decided it meanwhile (its record holds its result). Refused, the others logged
    and all that ran counted as extra runs, where stop(now=True) cancelled some while the tool waited (review 56:
    the tool failed on "already decided"): `what` was not completed, `then` says what to do."""
    results, cancelled = [], []
    for n in runs:
        state = core.state.load()
        if str(n) in (state.get("runs") or {}):
            results.append(result_of(core, state, state["runs"][str(n)]))
            discard(core, None, n)
            continue
        record = core.read_record(n)
        if record is None or record["result"].get("status") in IN_FLIGHT:
            cancelled.append(n)
        results.append(RunResult(**record["result"]) if record else None)
    if cancelled:
        with core.state.transaction() as state:
            state["extra_runs"] = state.get("extra_runs", 0) + sum(r is not None for r in results)
            why = core.ended(state) or "a run of the research run was cancelled"
        raise Refusal(f"The research run was stopped while {tool} waited ({why}): stop(now=True) cancelled rerun(s) "
                      f"{', '.join(map(str, cancelled))}, so {what}. {then}")
    return results


def stop(core: LoopCore, reason: str, now: bool = False) -> StopResult:
    """Ends the research run on purpose: no new runs start. Runs in flight finish and wait for a
    decision, or with now=True are cancelled (running ones are logged as crashes)."""
    reason = ledger.validate_description(reason, "reason")
    require_owner(core)
    with core.state.transaction() as state:
        if not state.get("branch"):
            raise Refusal("No research run is set up, so there is nothing to stop.")
        state["stopped"] = {"reason": reason, "at": time.time()}
        in_flight = [e["run"] for e in core.runs_of(state, *IN_FLIGHT)]
    cancelled = [run for run in in_flight if now and _cancelled_unless_ended(core, run)]
    core.notifier.check(core)
    status = overview.status(core)
    return StopResult(stopped=reason, cancelled=cancelled or None, running=status.running,
                      undecided=status.undecided, next=status.next)


def _cancelled_unless_ended(core: LoopCore, run: int) -> bool:
    """stop(now=True)'s cancel of a run it listed in flight; False where the run left the flight meanwhile (it
    ended, or another call cancelled it: review 63, the stop answered that refusal though the research run was
    stopped and the runs after it were left training). The answer's `undecided` lists one that waits."""
    try:
        return bool(cancel(core, run, ending=True))
    except Refusal:
        if (core.entry(run) or {}).get("status") in IN_FLIGHT:
            raise
        return False


def reapply(core: LoopCore, run: int) -> dict:
    """A stale candidate's change re-applied onto the current best, as a new run; the stale one
    is logged as a discard that names its successor. Check, submit and discard happen in one
    transaction (they nest), so of two calls at once the second finds the run decided and
    changes nothing. A nested transaction saves as it ends, so nothing that can fail comes after the submit:
    train.py goes back to the kept code after, where git lets it (stop 48: a git index lock failed the discard's
    restore, and the call answered "git failed ... retry" with the new run saved and training and the stale one
    undecided, so the retry trained the same code again)."""
    require_owner(core)
    with core.state.transaction() as state:
        core.research_state(state)
        entry = _undecided(core, state, run, "reapply")
        kept = state["kept_commit"]
        if entry["parent"] == kept:
            raise Refusal(f"Run {run} was measured on the current best {kept[:7]}: keep(run={run}) or "
                          f"discard(run={run}); there is nothing to re-apply.")
        merged = core.ws.merged_train(entry["parent"], entry["commit"], kept)
        if merged is None:
            raise Refusal(f"Run {run}'s change to train.py conflicts with what was kept since ({kept[:7]}): "
                          f"apply it by hand (git diff {entry['parent'][:7]} {entry['commit'][:7]} -- train.py), "
                          f"then run_experiment; discard(run={run}) logs the stale result.")
        description = ledger.fit_description(entry["description"], f" (re-applied on {kept[:7]})")
        new = submit(core, description, entry["timeout"], source=merged, replacing=run,
                     parent_note=f"Re-applies run {run} ({entry['commit'][:7]}).\n")
        discard(core, f"stale: re-applied as run {new['run']}", run=run, restore=False)
    try:
        _restore_train(core, core.state.load(), entry)
    except (git.GitCommandError, OSError):
        pass  # the stale code stays in train.py, and in its commit: the runs are recorded either way
    return new


def log_result(core: LoopCore, commit: str, val_bpb: float, memory_gb: float, status: str,
               description: str) -> LoggedRow:
    commit = validate_commit_arg(commit)
    row = ledger.make_row(commit[:7], val_bpb, memory_gb, status, description)
    ledger.refuse_markers(row.description)
    if status != "crash":  # the agent's number, not the harness's: the row says so, wherever it is shown (review 72:
        # a discard row unmarked read on the dashboard as an idea better than the best by what the agent logged)
        row.description = ledger.fit_description(row.description, limits.LOGGED_BY_HAND)
    full = core.ws.resolve_commit(commit)
    if full is None:
        raise Refusal(f"Commit {commit} does not exist in this repository: pass the hash of the "
                      "commit that was trained (git log --oneline).")
    require_owner(core)
    with core.state.transaction() as state:
        mine = [e for e in (state.get("runs") or {}).values() if e["commit"] == full]
        refs = core.ws.repo.git.for_each_ref("--format=%(refname)", "--points-at", full, RUN_REF_PREFIX)
        if mine or refs:
            number = mine[0]["run"] if mine else refs.splitlines()[0].rsplit("/", 1)[-1]
            raise Refusal(f"Commit {full[:7]} is run {number} of this server: its result is recorded by "
                          "keep() or discard(), not log_result.")
        branch = state.get("branch")
        tip = core.ws.branch_tip(branch) if branch else None
        for protected in PROTECTED_BRANCHES:
            protected_tip = core.ws.branch_tip(protected)
            if status == "keep" and protected_tip and core.ws.is_ancestor(full, protected_tip):
                raise Refusal(f"Commit {full[:7]} is on {protected}: only a research branch's commits can be kept.")
        if status == "keep":
            _check_external_keep(core, state, full, tip)
        elif tip and core.ws.is_ancestor(full, tip):
            raise Refusal(f"Commit {full[:7]} is on {branch}, whose commits are the kept ones: a {status} row for "
                          "it would contradict the branch.")
        rows = ledger.add_row(state, row)  # in the server's records: results.tsv is written from them
        if status == "keep":
            state["kept_commit"] = full
            state.pop("kept_log", None)  # logged by hand: no curve to compare with
    return LoggedRow(row=row, rows_in_ledger=len(rows))


def _check_external_keep(core: LoopCore, state: dict, full: str, tip: str | None) -> None:
    """A keep row logged by hand must leave the ledger and the branch agreeing: the commit is
    the research branch's tip, on top of the kept commit, with only train.py changed."""
    if not state.get("branch"):
        raise Refusal("No research run is set up: setup(tag) first, so a kept commit has a branch to be on.")
    kept = state["kept_commit"]
    if full != tip or not core.ws.is_ancestor(kept, full):
        raise Refusal(f"A keep row must be for the tip of {state['branch']}, on top of the kept commit "
                      f"{kept[:7]}; {full[:7]} is not. Log it as discard or crash, or commit it on the branch first.")
    changed = [p for p in core.ws.repo.git.diff("--name-only", kept, full).splitlines() if p != EDITABLE]
    if changed:
        raise Refusal(f"Commit {full[:7]} changes {', '.join(changed)}, not only train.py: it cannot be kept.")
    try:
        problem = unreadable_program(core.ws.train_at(full))
    except KeyError:  # no train.py: refused or failed further on, as before
        problem = None
    if problem:
        raise Refusal(f"Commit {full[:7]}'s train.py {problem}: as the best, a rerun of its program could not be told "
                      "from a change to it (a second draw of one program). Log it as a discard, or commit a train.py a "
                      "run takes.")
