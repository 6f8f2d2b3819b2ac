"""Recording and reading a run's result: the log and the worker's report become a RunResult.

A finished run's result: its status from the worker's report, the val_bpb the harness measured
(or train.py's, marked), the delta against the best it was measured on, whether the two runs are
comparable (the same GPU model, the same throughput), the noise verdict, and whether the gain must
be confirmed before keep accepts it. Written beside the log as the run's record. Also what
run_experiment answers about a run at any point of its life.

Imports the core (runs) only.
"""
import io
import math
import shutil
from pathlib import Path

from mcp_server.core import integrity, ledger, limits, logparse, noise
from mcp_server.core.programs import same_program
from mcp_server.scripts import sandbox
from mcp_server.core.models import Refusal, Row, RunResult
from mcp_server.phases.runs import IN_FLIGHT, LOG_TAIL_BYTES, RUN_LOG, LoopCore
from mcp_server.core.workspace import budget_clock, prepared_info, time_budget


# MFU of a run against its best's run: beyond this share apart, the machine's speed may explain the
# delta (on a 2-core CPU, one busy process beside a wall-clock run cost it 35% of its steps)
THROUGHPUT_TOLERANCE = 0.15
CONFIRM_WIDTHS = 3.0  # a gain within this many noise thresholds is confirmed before keep accepts it
SHOWN_CHANGES = 5  # changed paths of the environment named in a run's answer
NOT_COMPARED = "not compared: measured on"  # a result of another GPU model than its best's (the report reads it)


def unrecordable(entry: dict, why: str) -> RunResult:
    return RunResult(run=entry["run"], commit=entry["commit"][:7], description=entry["description"],
                     status="crash", parent=entry["parent"][:7], log=entry["log"], tail=why,
                     next="discard(), then fix the cause")


def record(core: LoopCore, state: dict, entry: dict, report: dict | None, slot: str | None, note: str | None = None) -> RunResult:
    """The run's result from its log and its worker's report, written beside the log and
    copied to run.log (upstream's name for the latest run's log)."""
    log = core.root / entry["log"]
    text = logparse.read_tail_bytes(log, LOG_TAIL_BYTES) if log.exists() else ""
    result = _result(core, entry, text, report, slot)
    if note:
        result.warnings = (result.warnings or []) + [note]
    shutil.rmtree(core.root / integrity.EXPORTS_DIR / str(entry["run"]), ignore_errors=True)  # the model: large
    core.write_record(state, entry, result)
    if log.exists():
        copy_as_run_log(log, core.root)
    return result


def copy_as_run_log(log: Path, root: Path) -> None:
    """run.log, upstream's copy of the latest run's log: made under a fresh name, then renamed over
    whatever lies at run.log (a FIFO the agent put there failed the copy, and with it every run's
    record). A copy that cannot be made is left out: the run's own log is in runs/, and is read only where
    it is a plain file (a FIFO put at its name, which the agent knows, blocked a plain open under the lock), and at
    most as much as a log of the worker's holds (a sparse terabyte put there was copied whole, under the lock)."""
    try:
        source = logparse.open_plain(log)
    except OSError:
        return
    if source is None:
        return
    with source:
        try:
            ledger.replace_with(root / RUN_LOG, io.BytesIO(source.read(logparse.MAX_TEXT_BYTES)))
        except OSError:
            pass


def _result(core: LoopCore, entry: dict, text: str, report: dict | None, slot: str | None) -> RunResult:
    summary = logparse.parse_summary(text)
    result = RunResult(run=entry["run"], commit=entry["commit"][:7], description=entry["description"],
                       status="crash", parent=entry["parent"][:7], slot=slot, log=entry["log"],
                       timeout_seconds=entry["timeout"], next="")
    if summary is not None:
        for key in ("training_seconds", "timed_seconds", "total_seconds", "eval_seconds", "num_steps",
                    "compile_seconds", "compile_cache", "recompiles", "mfu_percent"):
            setattr(result, key, getattr(summary, key))
        # the clock the run is judged by is the harness's, fixed at submission, never the one its summary names
        # (review 52: a train.py on the flops clock that said `wall` had its reruns filed where the data-order
        # check never looked, and skipped the flops check); a run submitted before entries kept it: the
        # harness's as read now
        result.budget_clock = entry.get("clock") or budget_clock()
    report = report or {}
    result.exit_code = report.get("exit_code")
    result.wall_seconds = report.get("wall_seconds")
    result.warnings = worker_warnings(report) or None
    if report.get("sandbox") is False or core.runs_unsandboxed():
        result.unsandboxed = sandbox.RUN_NOTE
    if core.split_cpu:
        result.warnings = (result.warnings or []) + [
            f"{core.slots} slots share this machine's CPUs, so each run trains on a part of them: "
            "compare only with runs made with the same number of slots"]
    problem = None
    if not report:
        problem = "the run's worker left no report it vouched for (killed: from outside, or by the server when it outlived its timeout)"
    elif report.get("report_changed"):
        problem = report["report_changed"]
    elif report.get("timed_out"):
        result.status = "timeout"
        problem = f"killed after the {entry['timeout']:.0f}s timeout"
    elif report.get("stopped"):
        problem = f"stopped: {report['stopped']}"
    elif report.get("data_folder_problem"):
        problem = f"not a result: {report['data_folder_problem']}"
    elif changed := report.get("environment_changed") or integrity.data_changes(entry.get("data_stat")):
        problem = environment_problem(changed)
    elif report.get("exit_code") != 0:
        problem = None  # the log's tail says why
    elif logparse.failed(text):
        problem = None
    elif summary is None:
        problem = "the run exited 0 but printed no summary block (val_bpb: ...)"
    else:
        problem, value = _measured(core, entry, summary, report, result, text)
        if problem is None:
            problem = _invalid(entry, value, summary)
        if problem is None:
            result.status = "ok"
    if result.status != "ok":
        result.tail = ((f"[{problem}]\n" if problem else "") + logparse.tail(text)).strip()
        result.next = (f"read the tail; discard() logs a crash and restores train.py (the code stays in "
                       f"commit {entry['commit'][:7]}); then fix and rerun")
        return result
    result.val_bpb = value
    result.memory_gb = round((summary.peak_vram_mb or 0.0) / 1024, 1)
    result.device = report.get("device")
    base = core.kept_row(entry["parent"])
    if base:
        result.best_val_bpb, result.best_commit = base.val_bpb, base.commit
        base_device = core.device_of(entry["parent"])
        if result.device and base_device and base_device != result.device:
            # another GPU model gives another val_bpb for the same code: no silent delta
            result.noise = f"{NOT_COMPARED} {result.device}, the best {base.commit} on {base_device}"
            result.warnings = (result.warnings or []) + [
                f"{result.noise}; results on different GPU models are not comparable: keep the research run "
                "on one GPU model (a SLURM --constraint, a Ray node label), or judge this one by hand"]
        else:
            result.delta = round(value - base.val_bpb, 6)
            _compare_throughput(core, result, summary, base.commit)
    state = core.state.load()
    estimate = noise.for_device(state, result.device)
    whose = limits.not_measured(base.description) if base else None
    if whose and result.delta is not None:
        # review 62: a gain over a number logged by hand read "better by 97.96, beyond noise" here and on the
        # dashboard's card; the difference stands, the verdict on it does not
        result.noise = (f"{'better' if result.delta < 0 else 'worse' if result.delta > 0 else 'equal'} by "
                        f"{abs(result.delta):.6f} than the best's val_bpb {base.val_bpb:.6f}, which is {whose}: "
                        "not compared with the noise")
    elif result.verified is False and result.delta is not None:
        # review 74: train.py's own number (no export to evaluate) read "better by 0.5, beyond noise" in the answer, on
        # the dashboard's card and, once kept, as its evidence in the ping, the report and the pull request's commit
        result.noise = (f"{'better' if result.delta < 0 else 'worse' if result.delta > 0 else 'equal'} by "
                        f"{abs(result.delta):.6f} by train.py's own number, not measured by the harness: "
                        "not compared with the noise")
    if result.noise is None:  # naming the model only matters once estimates are kept per model
        result.noise = noise.verdict(result.delta, estimate, result.device if state.get("noise_by_device") else None)
    result.next = "keep() if it is better beyond noise, else discard()"
    if result.verified is False:  # keep refuses it without the flag, and no noise judges it (review 75)
        result.next = (f"keep(run={entry['run']}, unverified=true) if train.py's own number is good enough for you "
                       f"(the harness did not measure it, so no noise judges it), else discard(run={entry['run']})")
    unchanged = no_change(core, entry)  # before the other model's advice: keep refuses it all the same (review 80)
    if unchanged:
        result.next = unchanged
        return result
    if result.delta is None and base and result.noise.startswith(NOT_COMPARED):
        own = "unverified=true, " if result.verified is False else ""  # keep refuses it without either flag
        result.next = (f"not comparable with the best: discard(run={entry['run']}) and run it again on {base_device} "
                       f"(run_experiment(..., rerun=true)), or keep(run={entry['run']}, {own}unconfirmed=true) on "
                       "your own judgement")
        return result
    result.confirm_first = confirmation_needed(result.model_dump(), estimate, base)
    if result.confirm_first:
        result.next = one_program_pair(core, entry) or (f"confirm(run={entry['run']}) before keep "
                                                         f"({result.confirm_first}); or discard() if the gain does "
                                                         "not matter")
    return result


def environment_problem(changed: list) -> str:
    named = ", ".join(map(str, changed[:SHOWN_CHANGES])) + (" ..." if len(changed) > SHOWN_CHANGES else "")
    return (f"not a result: what this run's training or evaluation loads (an environment, the Python standard "
            f"library, the harness copy, the prepared data) changed between its check and its end ({named}), so it "
            "may have loaded what its commit does not hold. Restore what changed (the next run names what differs "
            "from setup's pin), then rerun it")


def _measured(core: LoopCore, entry: dict, summary, report: dict, result: RunResult,
              text: str) -> tuple[str | None, float | None]:
    """(why the run is no result, or None; the val_bpb the ledger gets). The harness's own
    evaluation of the exported model where the harness has one, else train.py's number, marked."""
    last = logparse.last_progress(text)
    budget = entry.get("budget") or time_budget(core.root)  # as submitted (a state from before: as it is now)
    problem = integrity.time_problem(summary, report, budget, last.dt_ms / 1000 if last and last.dt_ms else None,
                                     entry.get("most_seconds"), result.budget_clock)
    if problem:
        return problem, None
    if not entry.get("verifies"):
        result.integrity = "this harness does not export its model: val_bpb is the one train.py printed"
        return None, summary.val_bpb
    problem, value, note = integrity.evaluation_verdict(report)
    rate = report.get("flops_per_budget_second") or (
        entry["flops_rate"] if "flops_rate" in entry else (prepared_info() or {}).get("flops_per_budget_second"))
    problem = problem or integrity.flops_problem(summary, report.get("evaluation") or {}, rate, budget,
                                                 result.budget_clock)  # a cluster node's rate is its own
    result.integrity = note
    if problem:
        return f"not a result: {problem}", None
    result.verified = value is not None
    if value is None:
        return None, summary.val_bpb
    if summary.val_bpb is not None and abs(summary.val_bpb - value) > 1e-3 * max(value, 1.0):
        result.warnings = (result.warnings or []) + [
            f"train.py printed val_bpb {summary.val_bpb:.6f}; the harness measured {value:.6f}, which is recorded"]
    return None, value


def _compare_throughput(core: LoopCore, result: RunResult, summary, best_commit: str) -> None:
    """Steps and MFU beside the best's run's: a val_bpb delta between runs that trained at
    different speeds may be the machine's, not the change's."""
    timed = summary.timed_seconds or summary.training_seconds
    if summary.total_tokens_M and timed:
        result.tokens_per_second = round(summary.total_tokens_M * 1e6 / timed)
    best = core.record_of(best_commit).get("result")
    if not isinstance(best, dict) or not best.get("mfu_percent") or not summary.mfu_percent:
        return
    result.best_num_steps, result.best_mfu_percent = best.get("num_steps"), best["mfu_percent"]
    if (best.get("budget_clock") or "wall") != (result.budget_clock or "wall"):
        result.comparable = False
        why = (f"this run's budget was on the {result.budget_clock or 'wall'} clock, the best's on the "
               f"{best.get('budget_clock') or 'wall'} clock")
    elif result.budget_clock == "flops":
        result.comparable = True  # the same FLOPs whatever the machine's speed: MFU is the code's business
    else:
        change = summary.mfu_percent / best["mfu_percent"] - 1
        result.comparable = abs(change) <= THROUGHPUT_TOLERANCE
        why = (f"this run trained at {abs(change):.0%} {'higher' if change > 0 else 'lower'} MFU than the best's "
               f"({summary.mfu_percent:.2f}% vs {best['mfu_percent']:.2f}%, {summary.num_steps} vs "
               f"{best.get('num_steps')} steps)")
    if not result.comparable:
        result.warnings = (result.warnings or []) + [
            f"not comparable: {why}. Unless the change itself explains it (a faster or slower model), the "
            "machine's speed changed: rerun the best beside it (measure_noise) before believing the delta"]


def _invalid(entry: dict, value, summary) -> str | None:
    """Why a summary cannot be a result: every ok result must make a valid ledger row."""
    memory = (summary.peak_vram_mb or 0.0) / 1024
    try:
        ledger.make_row(entry["commit"][:7], value, round(memory, 1) if math.isfinite(memory) else memory,
                        "keep", entry["description"])
    except Refusal as exc:
        return f"the summary is not a valid result: {exc}"
    return None


def answer_for(core: LoopCore, run: int) -> RunResult:
    """What run_experiment answers about a run: its result once it has one, else where it is."""
    state = core.state.load()
    entry = (state.get("runs") or {}).get(str(run))
    if entry is None:
        record = core.read_record(run)
        if record:
            return recorded_answer(record)
        raise Refusal(f"Run {run} is not known here (status() lists the runs in flight).")
    return result_of(core, state, entry)


def recorded_answer(record: dict) -> RunResult:
    """A decided run's answer, from its record. A run cancelled while it ran (cancel, stop(now=True)) is recorded with
    the result it had then, still in flight; its decision says how it ended (review 93: run_experiment(wait=true)
    answered "running", and "wait() for its result", for a run stop(now=True) had logged as a crash)."""
    result = RunResult(**record["result"])
    decided = (record.get("decision") or {}).get("status")
    if result.status in IN_FLIGHT and decided:
        result.status, result.queue_position = decided, None
        result.tail = "[cancelled while it ran (cancel or stop(now=True)): logged as a crash row]"
        result.next = "nothing to decide: it was cancelled and logged as a crash row; status() says what comes next"
    return result


def result_of(core: LoopCore, state: dict, entry: dict) -> RunResult:
    if entry.get("result"):
        return RunResult(**entry["result"])
    run = entry["run"]
    if entry["status"] == "interrupted":
        return RunResult(run=run, commit=entry["commit"][:7], description=entry["description"],
                         status="interrupted", parent=entry["parent"][:7], log=entry["log"],
                         next="discard() logs it as a crash")
    queued = core.runs_of(state, "queued")
    position = next((i + 1 for i, e in enumerate(queued) if e["run"] == run), None)
    return RunResult(run=run, commit=entry["commit"][:7], description=entry["description"],
                     status=entry["status"], parent=entry["parent"][:7], slot=entry.get("slot"),
                     queue_position=position, timeout_seconds=entry["timeout"], log=entry["log"],
                     next="wait() for its result (read_metrics() shows progress); then keep() or discard()")


def confirmation_needed(result: dict, noise: dict | None, base: Row | None = None) -> str | None:
    """Why a gain must be re-measured beside the best (its kept row: base) before it is kept, or None."""
    delta = result.get("delta")
    # review 75: train.py's own number is kept only with unverified=true, which says so already; confirm could not
    # measure it either (its reruns export nothing, so no pair is judged)
    if delta is None or delta >= 0 or result.get("verified") is False:
        return None
    whose = limits.not_measured(base.description) if base else None
    if whose:
        # review 58: a number logged by hand (99.0) made code worse than the measured best a gain "beyond the noise"
        return f"the best's val_bpb {base.val_bpb:.6f} is {whose}, so the gain over it is no measurement"
    if result.get("comparable") is False:
        return "it trained at a different speed than the best's run, so the machine may explain the gain"
    if not noise:
        # review 80: with no estimate, a no-op edit of the best (`_unused = 0`) was a second draw, kept on its luck
        return (f"the noise is not measured yet, so its gain {-delta:.6f} may be one run's luck (measure_noise() "
                "measures it; a gain beyond it is then kept without a pair)")
    if -delta <= CONFIRM_WIDTHS * noise["threshold"]:
        return (f"its gain {-delta:.6f} is within {CONFIRM_WIDTHS:g} noise thresholds "
                f"({CONFIRM_WIDTHS * noise['threshold']:.6f})")
    return None


def no_change(core: LoopCore, entry: dict) -> str | None:
    """Why a candidate is nothing to keep or confirm: its train.py is the program of the best it was measured on (byte
    for byte, or but for comments and layout), whose number the harness measured, so its delta is two runs' luck (stop
    48: run_experiment(rerun=true) of the best unchanged, kept once its luck went its way, read "gain +0.010000" beside
    "no change" in the morning report). None where the program differs, or where the best's number is no measurement
    (the baseline after a setup, a best logged by hand or train.py's own), which a run of the same code gives it, unless
    a best the harness measured before it is that program too (review 79: log_result(keep) of the best's own program,
    a comment added, made the best one logged by hand, and its rerun was a lucky draw to keep again; review 80: so was
    it where a worse idea was kept, measured, between the two)."""
    measured = _measured_keeps(core, entry["parent"])
    program = core.ws.train_at(entry["commit"])
    if not measured or not same_program(core.ws.train_at(entry["parent"]), program):
        return None
    whose = ""
    if measured[0].commit != entry["parent"][:7]:
        same = next((r for r in measured if same_program(core.ws.train_at(r.commit), program)), None)
        if same is None:
            return None
        whose = (f" (its number is not the harness's; {same.commit}, a best the harness measured before it, is that "
                 "program)")
    return (f"run {entry['run']}'s train.py is the program of the best {entry['parent'][:7]} it was measured on (but for "
            f"comments and layout, if any){whose}: its val_bpb against the best's is the luck of two runs of one program, "
            f"no change to keep or confirm. discard(run={entry['run']}); measure_noise() measures that luck")


def one_program_pair(core: LoopCore, entry: dict) -> str | None:
    """Why confirm has nothing to measure for a candidate whose train.py is its best's own program where no_change lets
    it keep (the best's number is not the harness's: logged by hand, or train.py's own; or the research run's start,
    which has none), and what to do; else None. Confirm would rerun that one program beside itself, a coin flip
    (review 83: its win read "confirmed" on the draw the agent chose)."""
    n, best = entry["run"], entry["parent"][:7]
    if not same_program(core.ws.train_at(entry["parent"]), core.ws.train_at(entry["commit"])):
        return None
    first = (f"keep(run={n}) keeps it as the first result of the research run" if core.kept_row(entry["parent"]) is None
             else f"keep(run={n}, unconfirmed=true) keeps its val_bpb as the first measurement of the best {best}'s own "
                  "program (the best's number is not the harness's)")
    return (f"{first}, or discard(run={n}): its train.py is the program of {best} (but for comments and layout, if any), "
            "so confirm would rerun that one program beside itself, a coin flip")


def _measured_keeps(core: LoopCore, parent: str) -> list[Row]:
    """The keep rows the harness measured up to the best `parent`'s own, latest first (the first is the best's own
    where the harness measured its number); none where the best has no keep row."""
    kept = [r for r in core.rows() if r.status == "keep"]
    at = max((i for i, r in enumerate(kept) if r.commit == parent[:7]), default=None)
    return [] if at is None else [r for r in reversed(kept[:at + 1]) if limits.measured(r.description)]


def worker_warnings(report: dict) -> list[str]:
    warnings = []
    if report.get("stray_processes"):
        warnings.append(f"{report['stray_processes']} process(es) started by the run were still running when it "
                        "ended; they were killed")
    if report.get("unkillable"):
        warnings.append(f"{report['unkillable']} process(es) of the run could not be killed")
    if report.get("log_truncated"):
        warnings.append("the log was capped: the middle of its output was dropped")
    return warnings
