"""Reporting: status and the next step, a run's metrics and live progress, the history of decisions.

Read-only: nothing here changes the state (status may take over a workspace whose owner has gone,
as every tool does).

Imports the core (runs) and dispatch.
"""
import re
import time
from pathlib import Path

from mcp_server.core import history as run_history
from mcp_server.core import budget_settings, cost, ledger, limits, logparse, noise
from mcp_server.scripts import sandbox
from mcp_server.phases.dispatch import take_over
from mcp_server.phases.results import confirmation_needed, no_change, one_program_pair
from mcp_server.core.models import HistoryResult, LiveRun, Metrics, NoiseEstimate, Refusal, StatusResult
from mcp_server.phases.runs import IN_FLIGHT, RUN_LOG, UNDECIDED, LoopCore, unsandboxed_marker
from mcp_server.core.workspace import prepared_info

RECENT_ROWS = 5
RUN_ARG_RE = re.compile(r"[0-9]{1,9}|[0-9a-fA-F]{7,40}")


def read_metrics(core: LoopCore, run: str | None = None) -> Metrics:
    state = core.state.load()
    if run is None:
        in_flight = core.runs_of(state, *IN_FLIGHT)
        if in_flight:
            return _live_metrics(core, in_flight)
        return _run_log_metrics(core, state)
    entry, record = _find_run(core, state, run)
    if entry is not None and entry["status"] in IN_FLIGHT:
        return _live_metrics(core, [entry])
    meta = (entry or {}).get("result") or (record or {}).get("result")
    name = (entry or {}).get("log") or (record or {}).get("result", {}).get("log") or ""
    return _metrics_of(core, state, name, meta)


def live(core: LoopCore, entry: dict) -> LiveRun:
    progress = None
    if entry["status"] == "running":
        log = core.root / entry["log"]
        progress = logparse.last_progress(logparse.read_tail_bytes(log)) if log.exists() else None
    started = entry.get("started_at")
    return LiveRun(run=entry["run"], commit=entry["commit"][:7], description=entry["description"],
                   status=entry["status"], slot=entry.get("slot"), progress=progress,
                   elapsed_s=int(time.time() - started) if started else None, timeout_s=int(entry["timeout"]))


def _live_metrics(core: LoopCore, in_flight: list[dict]) -> Metrics:
    runs = [live(core, e) for e in in_flight]
    first = next((r for r in runs if r.status == "running"), runs[0])
    note = f"run {first.run} ({first.commit}) {first.description}: {first.status}"
    if first.elapsed_s is not None:
        note += f", {first.elapsed_s}s of at most {first.timeout_s}s"
    return Metrics(source=in_flight[0]["log"], status="running", progress=first.progress,
                   runs=runs if len(runs) > 1 else None, note=note,
                   unsandboxed=sandbox.RUN_NOTE if any(map(unsandboxed_marker, in_flight)) else None)


def _metrics_of(core: LoopCore, state: dict, name: str, meta: dict | None, text: str | None = None) -> Metrics:
    """A recorded run's metrics from its log as the server recorded it (`text`, where the caller checked it); a log
    changed since (or never recorded: an interrupted run's) is not read: its numbers would be whoever wrote it."""
    if text is None and name:
        text = run_history.checked_log(core.root, state, name)
    status = meta["status"] if meta else "crash"
    metrics = Metrics(source=name, status=status, note=core.interrupted_summary(state),
                      unsandboxed=(meta or {}).get("unsandboxed"))
    if (meta or {}).get("verified") is False:  # review 72: a bare number here read as the harness's
        metrics.unverified = (f"val_bpb is train.py's own number, not measured by the harness "
                              f"({meta.get('integrity') or 'no harness evaluation'})")
    if text is None:
        metrics.note = (f"{name or 'its log'} is not the log the server recorded for this run (changed, replaced "
                        "or deleted since, or never recorded), so none of its text is believed: the status and "
                        "tail are the run's record" + (f"; {metrics.note}" if metrics.note else ""))
    else:
        _read_log_into(metrics, text, meta)
    if status != "ok":
        metrics.tail = (meta or {}).get("tail") or (logparse.tail(text) if text else None)
    return metrics


def _read_log_into(metrics: Metrics, text: str, meta: dict | None) -> None:
    """The summary and progress of a log; a summary's val_bpb is train.py's print, so a recorded
    result's val_bpb (the harness's where it verified) stands in its place."""
    metrics.summary = logparse.parse_summary(text)
    metrics.progress = logparse.last_progress(text[-logparse.TAIL_BYTES_FOR_PROGRESS:])
    recorded = (meta or {}).get("val_bpb")
    if metrics.summary and recorded is not None and metrics.summary.val_bpb != recorded:
        printed, metrics.summary.val_bpb = metrics.summary.val_bpb, recorded
        said = f"train.py printed val_bpb {printed}; the recorded val_bpb is {recorded:.6f}"
        metrics.note = f"{said}; {metrics.note}" if metrics.note else said


def _run_log_metrics(core: LoopCore, state: dict) -> Metrics:
    """run.log: the copy of the last recorded run's log, or what a run by hand wrote there (judged by
    its own text, and said to be no run of the server's)."""
    path = core.root / RUN_LOG
    if not path.exists():
        return Metrics(source=RUN_LOG, status="missing", note=core.interrupted_summary(state) or
                       "no run log yet: call run_experiment(description)")
    raw = logparse.read_bytes(path)
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        return Metrics(source=RUN_LOG, status="empty", note="the log is empty: the run printed nothing")
    name = _recorded_log_named(state, raw)
    if name:
        record = core.vouched(state).get(Path(name).with_suffix(".json").name, {})
        metrics = _metrics_of(core, state, name, record.get("result"), text)
        metrics.source = RUN_LOG
        return metrics
    summary = logparse.parse_summary(text)
    status = "ok" if summary and not logparse.failed(text) else "crash"
    metrics = Metrics(source=RUN_LOG, status=status, summary=summary,
                      progress=logparse.last_progress(text[-logparse.TAIL_BYTES_FOR_PROGRESS:]),
                      note=core.interrupted_summary(state))
    if summary:  # a run by hand (uv run train.py > run.log), or an edit: train.py's print, not a result
        said = f"{RUN_LOG} is no log of a run the server recorded: its numbers are not the harness's"
        metrics.note = f"{said}; {metrics.note}" if metrics.note else said
    if status != "ok":
        metrics.tail = logparse.tail(text)
    return metrics


def _recorded_log_named(state: dict, raw: bytes) -> str | None:
    """The run log whose bytes, as the server recorded them, these are (run.log is a copy of it)."""
    found = run_history.digest(raw)
    return next((name for name, d in run_history.log_digests(state).items() if d == found), None)


def _find_run(core: LoopCore, state: dict, run: str) -> tuple[dict | None, dict | None]:
    """(the state's entry, the vouched record) of a run of this research run, by its number or commit:
    the server's records, never a log's file name (a planted runs/0099-0000000.log named no run)."""
    run = run.strip() if isinstance(run, str) else str(run)
    if not RUN_ARG_RE.fullmatch(run):
        raise Refusal(f"Run {run!r} is not a run number or a commit hash (see status()).")
    number = int(run) if len(run) < 7 else None

    def named(n, commit) -> bool:
        return n == number if number is not None else str(commit or "").lower().startswith(run.lower())
    entry = next((e for e in core.runs_of(state) if named(e["run"], e["commit"])), None)
    record = next((r for r in reversed(core.records(state, decided=False))
                   if named(r["run"].get("run"), r["run"].get("commit"))), None)
    if entry is None and record is None:
        raise Refusal(f"No run {run!r} in this research run's records: pass a run number or a 7+ character "
                      "commit from status() or history() (runs of earlier research runs are not among them).")
    return entry, record


def status(core: LoopCore) -> StatusResult:
    state = core.state.load()
    core.vouched(state)  # a run record changed by hand is found here, and listed below
    rows, bad = ledger.rows_of(state), ledger.read_rows(core.ledger_path)[1]
    counts = {s: sum(r.status == s for r in rows) for s in ledger.STATUSES}
    kept = state.get("kept_commit") or ""
    best = core.kept_row(kept) if kept else None
    result = StatusResult(workspace=str(core.root), branch=core.ws.branch(), set_up=bool(state.get("branch")),
                          best_val_bpb=best.val_bpb if best else None, best_commit=best.commit if best else None,
                          best_note=limits.caveat(best.description) if best else None,
                          kept_commit=kept[:7] or None, counts=counts, slots=core.slots,
                          recent=rows[-RECENT_ROWS:], malformed_ledger_lines=bad,
                          interrupted=core.interrupted_summary(state), extra_runs=state.get("extra_runs", 0),
                          dashboard=core.dashboard, records_changed=core.state.found or None,
                          harness_changed=state.get("harness_changed"), next="")
    if not core.state.owned and not take_over(core):
        owner = core.state.owner() or {}
        result.read_only = f"server pid {owner.get('pid', '?')} runs this workspace's experiments"
    if state.get("noise"):
        result.noise = NoiseEstimate(**state["noise"])
    running = [live(core, e) for e in core.runs_of(state, "running")]
    if running:
        result.running = "; ".join(f"run {r.run} ({r.commit}) {r.description}"
                                   + (f" on {r.slot}" if r.slot and core.slots > 1 else "")
                                   + (f": {r.elapsed_s}s of at most {r.timeout_s}s" if r.elapsed_s is not None else "")
                                   for r in running)
        result.progress = running[0].progress
    queued = core.runs_of(state, "queued")
    if queued:
        result.queued = ", ".join(f"run {e['run']} ({e['description'][:40]})" for e in queued)
    pending = core.runs_of(state, "pending")
    if pending:
        result.pending = "; ".join(
            f"run {e['run']} ({e['commit'][:7]}) {e['result']['status']}"
            + (f" val_bpb {e['result']['val_bpb']:.6f}" if e["result"].get("val_bpb") is not None else "")
            + (f" measured on {e['parent'][:7]}, not the current best" if e["parent"] != kept else "")
            for e in pending)
    result.undecided = [e["run"] for e in core.runs_of(state, *UNDECIDED)] or None
    unsandboxed = [e["run"] for e in core.runs_of(state, *IN_FLIGHT, *UNDECIDED) if unsandboxed_marker(e)]
    result.unsandboxed = core.runs_unsandboxed() or (
        f"runs {', '.join(map(str, unsandboxed))} ran unsandboxed: {sandbox.RISK}" if unsandboxed else None)
    result.limits = limits.left(state, [(r.status, r.val_bpb, r.description) for r in rows])
    result.ended = limits.ended(state, [(r.status, r.val_bpb, r.description) for r in rows])
    result.compute = cost.hours_text(cost.run_hours(state))
    result.budget_settings = _settings_text(core, state)
    result.next = _next_step(core, state, result)
    return result


def _settings_text(core: LoopCore, state: dict) -> str | None:
    """The research run's budget settings as recorded at setup, and what the server's environment would set instead."""
    pinned = budget_settings.recorded(state)
    if pinned is None:
        return None
    differ = budget_settings.differences(state, core.root, prepared_info() or {})
    changed = state.get(budget_settings.CHANGED)
    return (f"{budget_settings.describe(pinned)}: recorded at setup, every run of this research run trains and is "
            "evaluated at them" + (f"; {changed}" if changed else "") + (f"; {differ}" if differ else ""))


def _next_step(core: LoopCore, state: dict, s: StatusResult) -> str:
    if not s.set_up:
        return "setup(tag)"
    undecided = core.runs_of(state, *UNDECIDED)
    in_flight = core.runs_of(state, *IN_FLIGHT)
    # a bare keep()/discard() is right only while no other run can finish before the call
    single = len(undecided) == 1 and not in_flight
    which = (lambda e: "") if single else (lambda e: f"run={e['run']}")
    for e in undecided:
        if e["status"] == "interrupted":
            return f"discard({which(e)}) to log the interrupted run"
    for e in undecided:
        if e["result"]["status"] != "ok":
            return f"discard({which(e)})"
        if run_history.is_rerun(e):
            return f"discard({which(e)}): a rerun of measure_noise or confirm, which keep refuses"
        if e["parent"] != state["kept_commit"]:
            if core.ws.merged_train(e["parent"], e["commit"], state["kept_commit"]) is None:
                return (f"discard(run={e['run']}): its change conflicts with what was kept since "
                        "(apply it by hand afterwards if it still matters)")
            return f"reapply(run={e['run']}) or discard(run={e['run']})"
        asked = _what_keep_asks(core, state, e)
        if asked:
            return asked
    if undecided:
        return "keep() or discard()" if single else \
            f"keep(run={undecided[0]['run']}) or discard(run={undecided[0]['run']})"
    if s.ended:
        return ("wait: wait() returns the last results, then keep or discard them" if in_flight else
                f"nothing: the research run has ended ({s.ended}); stop here")
    if in_flight and len(in_flight) >= core.slots:
        return "wait: wait() returns the next result (read_metrics() follows the runs)"
    if not s.counts["keep"] and not in_flight:
        return "run_experiment('baseline') with train.py unchanged"
    if in_flight:
        return f"edit train.py, then run_experiment(description, wait=False) ({core.slots - len(in_flight)} slot(s) free), or wait()"
    return "edit train.py, then run_experiment(description)"


def _what_keep_asks(core: LoopCore, state: dict, e: dict) -> str | None:
    """The next step for a result that a plain keep refuses (review 58: next said keep() for a gain keep
    refused until confirmed, for a failed confirmation, for train.py's own number), or None."""
    result, n = e["result"], e["run"]
    confirmation = e.get("confirmation")
    if unchanged := no_change(core, e):
        return f"discard(run={n}): {unchanged.split(': ', 1)[0]}"
    if confirmation and not confirmation.get("confirmed"):
        return f"discard(run={n}): its confirmation failed (keep(run={n}, unconfirmed=true) keeps it against that)"
    estimate = noise.for_device(state, result.get("device"))
    if not confirmation and confirmation_needed(result, estimate, core.kept_row(e["parent"])):
        return one_program_pair(core, e) or f"confirm(run={n}), then keep(run={n}) if the gain holds; or discard(run={n})"
    if result.get("verified") is False:
        # not compared with the best (another GPU model): keep asks unconfirmed=true too
        uncompared = ", unconfirmed=true" if result.get("delta") is None and result.get("best_val_bpb") is not None \
            else ""
        return (f"keep(run={n}, unverified=true{uncompared}) or discard(run={n}): its val_bpb is train.py's own, "
                "not the harness's")
    return None


def history(core: LoopCore, constant: str | None = None, status: str | None = None, limit: int = 30) -> HistoryResult:
    """Every decided run, oldest first, as one line: what it changed and how it did."""
    if status is not None and status not in ledger.STATUSES:
        raise Refusal(f"status must be one of {', '.join(ledger.STATUSES)}, got {status!r}.")
    if not 1 <= limit <= 500:
        raise Refusal("limit must be between 1 and 500.")
    if constant is not None and not run_history.CONSTANT_NAME.match(constant):
        raise Refusal(f"constant must be an upper-case train.py constant such as MATRIX_LR, got {constant!r}.")
    lines, kept = [], run_history.last_keeps(core.rows())
    for record in core.records():
        decision, result, run = record["decision"], record["result"], record["run"]
        changes = decision.get("changes") or {}
        if constant and constant not in changes.get("constants", {}):
            continue
        if status and decision.get("status") != status:
            continue
        value = f"{result['val_bpb']:.6f}" if result.get("val_bpb") and decision["status"] != "crash" else "-"
        shown = run_history.shown_delta(record, kept)
        delta = f" ({shown:+.6f})" if shown is not None and value != "-" else ""
        lines.append(f"run {run['run']} {result['commit']} {decision['status']} {value}{delta} "
                     f"{run_history.change_text(changes)} | {result['description']}")
    return HistoryResult(total=len(lines), lines=lines[-limit:])
