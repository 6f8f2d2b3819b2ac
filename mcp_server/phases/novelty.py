"""No repeated runs: a candidate whose train.py was already tried on the same best is answered
from that run instead of training again, unless the caller asks for a rerun.

An agent after a compaction or in a new session does not remember what it tried; a rerun of the
same bytes on the same parent (the same harness, since candidates are the kept commit's tree plus
train.py) measures the same thing again and spends a slot for nothing. So run_experiment:
- refuses a repeat of a run still queued, running or pending, naming it: its answer is coming,
  and answering with another run would silently drop this call's description and double-decide;
- refuses the kept code unchanged once it was measured: that is a noise repeat, which
  measure_noise and confirm make on fresh data orders and record as such;
- answers with a decided run's result and decision (nothing trained, no row, no run number taken)
  where that run measured something: a result, or a crash of the code itself. A timeout, an
  interrupted or cancelled run, or a run that could not start says nothing about the code, so the
  candidate runs again, and the answer says so.
- points out, for a candidate that is not byte-identical, the decided runs that set the same
  train.py constants to the same values (history's record of each change), with their results.

What is trusted: the run's decision and val_bpb are the server's own ledger rows (its state); a
record under runs/ (which the agent can write) is used only where it agrees with its row, and
the commit's parent and train.py are read from git, not from the record.
"""
from typing import NamedTuple

import git

from mcp_server.core import history, ledger
from mcp_server.core.models import Refusal, RunResult
from mcp_server.phases.runs import LoopCore

MAX_SIMILAR = 3  # earlier runs named in one answer


class Found(NamedTuple):
    answer: RunResult | None  # the earlier run's result: answer with it, train nothing
    note: str | None  # earlier runs of the same change, for the new run's answer


def check(core: LoopCore, state: dict, source: bytes, rerun: bool) -> Found:
    """What the tries so far say about a candidate `source` on the kept commit. Refuses a repeat
    of a run in flight or of the best itself; rerun=True skips every one of these answers."""
    if rerun:
        return Found(None, None)
    kept = state["kept_commit"]
    ws = core.ws
    for entry in core.runs_of(state, "queued", "running", "pending"):
        if entry["parent"] == kept and ws.train_at(entry["commit"]) == source:
            raise Refusal(f"train.py is identical to run {entry['run']} ({entry['commit'][:7]}, {entry['status']}) on "
                          f"the same best: {_where_its_answer_is(entry)}. run_experiment(..., rerun=true) runs it "
                          "again anyway (another measurement of the same code).")
    best = core.kept_row(kept)
    if best is not None and ws.train_at(kept) == source:
        raise Refusal(f"train.py is the kept code {kept[:7]} unchanged (val_bpb {best.val_bpb:.6f}): running it again "
                      "is a noise repeat. measure_noise() reruns it on fresh data orders and stores the noise; "
                      "confirm(run) re-measures a pending gain beside it; edit train.py to try an idea. "
                      "run_experiment(..., rerun=true) runs it anyway.")
    rows = {row.commit: row for row in ledger.rows_of(state)}
    tried, changes = [], None
    for record in core.records(state):
        run, result = record.get("run") or {}, record.get("result") or {}
        row = rows.get(str(result.get("commit")))
        if row is None or not _agrees(record, row):
            continue  # not this research run's, or a record the server's row does not back
        if run.get("parent") == kept and _same_code(ws, run.get("commit"), kept, source):
            if _says_something(record):
                return Found(_answer(record, row), None)
            tried.append(f"run {result['run']} ({result['commit']}) with this same train.py ended "
                         f"{result.get('status')} (not the code's doing, as far as the server knows), so it trains again")
            continue
        constants = (record["decision"].get("changes") or {}).get("constants")
        if constants:
            if changes is None:
                changes = _constants_set(history.describe_change(_text(ws.train_at(kept)), _text(source)))
            if changes and _constants_set({"constants": constants}) == changes:
                tried.append(_similar(record, row, kept))
    return Found(None, "; ".join(tried[-MAX_SIMILAR:]) or None)


def _where_its_answer_is(entry: dict) -> str:
    if entry["status"] == "pending":
        return f"its result is pending: keep(run={entry['run']}) or discard(run={entry['run']})"
    return "wait() returns its result (read_metrics() shows its progress)"


def _agrees(record: dict, row) -> bool:
    decision, result = record.get("decision") or {}, record.get("result") or {}
    if decision.get("status") != row.status:
        return False
    return row.status == "crash" or result.get("val_bpb") == row.val_bpb


def _same_code(ws, commit: str | None, kept: str, source: bytes) -> bool:
    """The commit is a candidate on `kept` holding exactly `source` (read from git)."""
    try:
        candidate = ws.repo.commit(commit)
        return [p.hexsha for p in candidate.parents] == [kept] and ws.train_at(candidate.hexsha) == source
    except (git.BadName, git.GitCommandError, ValueError, KeyError, TypeError):
        return False


def _says_something(record: dict) -> bool:
    """A measurement of the code: a result, an early stop against the best, or the code's own crash
    (it ran and exited non-zero, or printed FAIL or no summary)."""
    result, decision = record["result"], record["decision"]
    if result.get("status") == "ok" or decision.get("stopped_early"):
        return True
    return result.get("status") == "crash" and result.get("exit_code") is not None


def _answer(record: dict, row) -> RunResult:
    result = RunResult(**record["result"])
    decided = record["decision"]["status"]
    early = record["decision"].get("stopped_early")
    result.repeat_of = (f"identical train.py on the same best as run {result.run} ({result.commit}), decided {decided}"
                        + (f" (stopped early: {early})" if early else "")
                        + ": its result, nothing was trained and nothing logged")
    result.val_bpb = row.val_bpb if row.status != "crash" else None
    result.slot = result.queue_position = result.confirm_first = None
    result.next = ("edit train.py and try another idea; run_experiment(description, rerun=true) measures the same "
                   "code again (a fresh measurement, then keep or discard as usual)")
    return result


def _constants_set(change: dict) -> dict:
    """{name: new value} of a change's constants: what it sets, whatever it was set from."""
    return {name: values[1] for name, values in (change.get("constants") or {}).items()}


def _similar(record: dict, row, kept: str) -> str:
    result, run = record["result"], record.get("run") or {}
    constants = history.change_text({"constants": record["decision"]["changes"]["constants"]})
    on = "this best" if run.get("parent") == kept else f"an earlier best {str(run.get('parent'))[:7]}"
    value = "no val_bpb" if row.status == "crash" else f"val_bpb {row.val_bpb:.6f}" + (
        f" ({result['delta']:+.6f})" if result.get("delta") is not None else "")
    return f"run {result['run']} ({result['commit']}) set the same ({constants}) on {on}: {row.status}, {value}"


def _text(data: bytes) -> str:
    return data.decode(errors="replace")
