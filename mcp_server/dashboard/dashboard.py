"""What the dashboard shows, read from the workspace's own files: the server's state (its rows: the
ledger as the server recorded it, never results.tsv as anyone may have edited it), the run records
and logs under runs/.

Read-only by design: nothing here writes a file, takes a lock, or runs a git command that could
write (`--no-optional-locks`), so a page can watch a workspace while its server works, and read it
after the server has gone. Two views: `ledger_view` (the rows, the best, the kept changes; it
changes when a run is decided) and `live_view` (the runs in flight with their loss curves, the
limits, and what the research run has spent; it changes every step).
"""
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

from mcp_server.core import cost, history, ledger, limits, logparse, plot
from mcp_server.phases.runs import LOG_TAIL_BYTES, RUNS_DIR, unsandboxed_marker
from mcp_server.core.models import Refusal
from mcp_server.core.state import ARCHIVE_DIR, STATE_DIR, State, malformed, process_alive
from mcp_server.core.workspace import GIT_ENV, NO_AGENT_CODE, commit_named

CURVE_POINTS = 240  # of a loss curve sent to the page: enough for its width
LOG_CURVE_BYTES = 4 << 20  # of a log read for its curve (an H100 run's progress lines take ~150 kB)
MALFORMED_CHARS = 200  # of a malformed ledger line shown as it is
LABEL_CHARS = 34  # of a kept run's label on the chart, its marker aside
HEADLINE_CHARS = 60  # of the best's description in the page's headline, its markers aside
MAX_DIFF_CHARS = 200_000
GIT_TIMEOUT_S = 10
FULL_COMMIT = re.compile(r"[0-9a-f]{40,64}")
SKILL = "/research-loop:autoresearch"


def git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "--no-optional-locks", *NO_AGENT_CODE, "-C", str(root), *args], capture_output=True,
                              env={**os.environ, **GIT_ENV},
                              text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def read_state(root: Path) -> tuple[dict, str | None]:
    """The state as the server last wrote it: its own copy (in the git directory, where neither a run
    nor the edit hook writes) before state.json, which anyone can edit; read without the lock (each is
    replaced by a rename, so a read never sees half of it). The problem: state.json's, if unreadable."""
    store = State(root)
    try:
        found, problem = store.read_file(), None  # said where it is no JSON: the owner's next call puts it back
    except Refusal as exc:
        found, problem = {}, str(exc)
    try:
        own = json.loads(limits.read_record(store.copy))
    except (OSError, ValueError, RecursionError):
        own = None
    # a copy of another shape than the server writes (a row's description a number, written while the owner ran)
    # is believed in no part, as the server's readers do (core/state.py): its rows made the page fail
    if isinstance(own, dict) and not malformed(own):
        if problem:  # review 78: the server's advice (move it away, set up anew) is for a state with no copy
            problem = (f"{store.path} is not valid JSON (edited outside the server?): shown here is the server's own "
                       "copy of it, and the server that owns the workspace puts it back from that copy at its next "
                       f"tool call (the file found is kept in {STATE_DIR}/{ARCHIVE_DIR}/). Nothing to do.")
        return own, problem
    if malformed(found):
        return {}, problem or (f"neither {store.path} nor the server's copy of it is a state the server writes: the "
                               "server that owns the workspace writes both again at its next call")
    return found, problem


def server_rows(root: Path, state: dict) -> list[ledger.Row]:
    """The rows the server recorded; results.tsv's only for a state from before the server kept them."""
    if limits.recorded_rows(state) is None:
        return ledger.read_rows(root / ledger.LEDGER_NAME)[0]
    try:
        return ledger.rows_of(state)
    except (TypeError, ValueError):  # a state that is no server's
        return []


def ledger_problem(root: Path, rows: list[ledger.Row]) -> str | None:
    """A results.tsv that is not the server's rows (edited by hand) is said, never shown."""
    try:
        edited = limits.read_record(root / ledger.LEDGER_NAME) != ledger.render(rows)
    except (OSError, ValueError):
        edited = bool(rows)
    return (f"{ledger.LEDGER_NAME} is not what the server wrote (edited or deleted outside it): shown here are the "
            "server's own rows; its next tool call keeps the edited file in .research-loop/archive/ and writes "
            f"{ledger.LEDGER_NAME} again.") if edited else None


def ledger_lines(path: Path) -> list[tuple[int, ledger.Row | None, str]]:
    """(line number, row or None when malformed, the line) for each line after the header."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for number, line in enumerate(text.split("\n")[1:], 2):  # as ledger.read_rows splits them
        line = line.removesuffix("\r")
        if line.strip():
            found.append((number, ledger.parse_line(line), line))
    return found


def ledger_view(root: Path) -> dict:
    """Every ledger line oldest first (a malformed one as such), each with its delta against the last row
    kept before it and, for the server's runs, the run number and what it changed in train.py."""
    state, problem = read_state(root)
    records = history.records_by_commit(root / RUNS_DIR, state)
    rows, best = [], None  # best: the last kept row's val_bpb, None where the harness did not measure it
    if limits.recorded_rows(state) is None:  # before the server kept rows, results.tsv is the record
        lines = ledger_lines(root / ledger.LEDGER_NAME)
    else:
        recorded = server_rows(root, state)
        lines = [(number, row, "") for number, row in enumerate(recorded, 2)]
        problem = problem or ledger_problem(root, recorded)
    for number, row, line in lines:
        if row is None:
            rows.append({"line": number, "status": "malformed", "text": line[:MALFORMED_CHARS]})
            continue
        record = records.get(row.commit)
        changes = (record.get("decision") or {}).get("changes") if record else None
        rows.append(row.model_dump() | {
            "line": number, "run": record["run"].get("run") if record else None,
            "rerun": history.rerun_kind(record),  # a noise repeat, confirmation or control: not an idea
            "changes": history.change_text(changes) if changes else None,
            # a kept number the harness did not measure, said apart: the marker ends a description the page cuts
            "not_measured": limits.not_measured(row.description) if row.status == "keep" else None,
            # the chart's label: cut before its marker, never through it (review 74: the page cut at 34 characters)
            "label": plot.label(row, LABEL_CHARS) if row.status == "keep" else None,
            # the headline's, cut before "(unsandboxed)" too (review 75: the page cut it at 60 characters)
            "headline": plot.label(row, HEADLINE_CHARS, plot.EVERY_MARKER) if row.status == "keep" else None,
            # no delta from or to a number the harness did not measure (review 62: after the agent's own 99.0 was
            # logged by hand, a worse run read as a gain of 97.96)
            "delta": round(row.val_bpb - best, 6) if best is not None and row.status != "crash"
            and limits.measured(row.description) else None})
        if row.status == "keep":  # the best is what the branch holds, as the server compares: a worse keep moves it
            best = row.val_bpb if limits.measured(row.description) else None
    branch = git(root, "symbolic-ref", "--short", "-q", "HEAD")
    return {"workspace": str(root), "branch": branch.strip() if branch else None, "tag": state.get("tag"),
            "set_up": bool(state.get("branch")), "rows": rows, "noise": state.get("noise"),
            "first_step": first_step(root, state, rows), "problem": problem}


def first_step(root: Path, state: dict, rows: list[dict]) -> str | None:
    """What to do first, for a workspace with nothing to show yet."""
    if not (root / "prepare.py").is_file() or not (root / "train.py").is_file() or git(root, "rev-parse") is None:
        return (f"{root} is not an autoresearch workspace (a git repository with prepare.py and train.py at its "
                "root): start the server or this page in one.")
    if rows:
        return None
    if not state.get("branch"):
        return (f"No research run here yet. Start one with `{SKILL} <tag>` in Claude Code, or setup(tag) from any "
                "MCP client (after `uv run prepare.py`, once). `uv run demo.py` shows a whole night's loop without "
                "an LLM.")
    return (f"The research run {state['branch']} is set up: its first run is the unchanged baseline "
            "(run_experiment('baseline'), then keep()).")


def live_view(root: Path, now: float | None = None) -> dict:
    """The runs nobody has decided yet (queued, running with their curve, pending, interrupted), what
    is left of the research run's limits, and what it has spent (GPU-hours; the overnight runner's
    sessions' tokens and cost)."""
    now = time.time() if now is None else now
    state, problem = read_state(root)
    rows = [(r.status, r.val_bpb, r.description) for r in server_rows(root, state)]
    entries = [e for e in (state.get("runs") or {}).values() if isinstance(e, dict)]
    return {"runs": [run_view(root, e, now) for e in sorted(entries, key=lambda e: e.get("run") or 0)],
            "limits": limits.left(state, rows, now), "ended": limits.ended(state, rows, now), "problem": problem,
            "spent": "; ".join(filter(None, (cost.hours_text(cost.run_hours(state)),
                                             cost.sessions_text(cost.sessions_spent(root, state.get("tag")))))) or None}


def run_view(root: Path, entry: dict, now: float) -> dict:
    view = {k: entry.get(k) for k in ("run", "description", "status", "slot")}
    view["commit"] = str(entry.get("commit") or "")[:7]
    view["timeout_s"] = entry.get("timeout")
    view["unsandboxed"] = bool(unsandboxed_marker(entry))  # no sandbox: the run could write the records
    if entry.get("status") == "running":
        server = entry.get("server_pid")
        view["server_gone"] = isinstance(server, int) and not process_alive(server)
        if isinstance(entry.get("started_at"), (int, float)):
            view["elapsed_s"] = round(now - entry["started_at"])
        points = log_progress(root / str(entry.get("log") or ""))
        if points:
            view["progress"] = points[-1].model_dump()
            view["curve"] = thin([[p.step, p.loss] for p in points], CURVE_POINTS)
    if isinstance(entry.get("result"), dict):
        view["result"] = {k: entry["result"].get(k) for k in ("status", "val_bpb", "delta", "noise", "verified")}
    return view


def log_progress(path: Path) -> list[logparse.Progress]:
    if not path.is_file():
        return []
    return logparse.all_progress(logparse.read_tail_bytes(path, LOG_CURVE_BYTES))


def thin(points: list, most: int) -> list:
    """At most `most` points spread evenly over the list, its first and last always among them."""
    if len(points) <= most:
        return points
    return [points[round(i * (len(points) - 1) / (most - 1))] for i in range(most)]


def kept_change(root: Path, commit: str) -> dict:
    """A kept run's change, as `git diff <parent> <commit> -- train.py` (its parent: the best
    before it). Raises LookupError for anything but a kept row of the ledger."""
    if not isinstance(commit, str) or not ledger.COMMIT_RE.match(commit):
        raise LookupError(f"{commit!r} is not a 7-character commit from results.tsv")
    state = read_state(root)[0]
    rows = server_rows(root, state)
    if not any(r.commit == commit and r.status == "keep" for r in rows):
        raise LookupError(f"{commit} is not a kept run in results.tsv")
    records = history.records_by_commit(root / RUNS_DIR, state)
    record = records.get(commit)
    if record:
        full, parent = record["run"].get("commit"), record["run"].get("parent")
    else:  # logged by log_result: against the best before it (review 85: not its commit's parent, which may be a
        # commit of the agent's own between the two, its train.py edit then left out of the diff shown)
        full = full_commit(root, commit)
        parent = best_before(root, state, rows, records, commit) or (
            (git(root, "rev-parse", "--verify", "-q", f"{full}^") or "").strip() if full else "")
    if not all(isinstance(c, str) and FULL_COMMIT.fullmatch(c) for c in (full, parent)):
        raise LookupError(f"{commit} or its parent is not in this repository")
    diff = git(root, "diff", "--no-color", "--no-ext-diff", "--no-textconv", parent, full, "--", "train.py")
    if diff is None:
        raise LookupError(f"git could not diff {commit} against its parent {parent[:7]}")
    diff = ledger.written_out(diff)[0]  # a right-to-left override shown as <U+202E>: the code as it runs
    return {"commit": commit, "parent": parent[:7], "diff": diff[:MAX_DIFF_CHARS],
            "truncated": len(diff) > MAX_DIFF_CHARS}


def best_before(root: Path, state: dict, rows: list[ledger.Row], records: dict, commit: str) -> str | None:
    """The full commit of the best a kept row replaced (records: the runs' records by commit): the kept row before it,
    else the research run's start (None for a state from before setup recorded it)."""
    at = max(i for i, r in enumerate(rows) if r.commit == commit and r.status == "keep")
    before = next((r.commit for r in reversed(rows[:at]) if r.status == "keep"), None)
    if before is None:
        return state.get("start_commit")
    record = records.get(before)
    return record["run"].get("commit") if record else full_commit(root, before)


def full_commit(root: Path, short: str) -> str:
    """The one commit whose hash begins with `short`, else "" (workspace.commit_named: never a ref of that name)."""
    return commit_named(lambda *args: git(root, *args), short) or ""


def run_tail(root: Path, commit: str) -> dict:
    """The end of a logged run's log, as the agent was shown it (its record's tail, else its log's)."""
    if not isinstance(commit, str) or not ledger.COMMIT_RE.match(commit):
        raise LookupError(f"{commit!r} is not a 7-character commit from results.tsv")
    state = read_state(root)[0]
    if not any(r.commit == commit for r in server_rows(root, state)):
        raise LookupError(f"{commit} is not in results.tsv")
    record = history.records_by_commit(root / RUNS_DIR, state).get(commit)
    name = (record or {}).get("result", {}).get("log")
    tail = (record or {}).get("result", {}).get("tail")
    if tail is None and isinstance(name, str):  # the log as the server recorded it, never one changed since
        text = history.checked_log(root, state, name)
        tail = logparse.tail(text[-LOG_TAIL_BYTES:]) if text is not None else (
            f"{name} is not the log the server recorded for this run (changed or deleted since): not shown")
    return {"commit": commit, "log": name if isinstance(name, str) else None,
            "tail": tail if tail is not None else missing_record(state, commit)}


def missing_record(state: dict, commit: str) -> str:
    """Why a logged row has no tail: the server's record of its run is gone or not what it wrote (review 78: the
    records' folder replaced read as a row logged by hand), else no run of the server's made it."""
    digests = state.get(history.DIGESTS)
    names = sorted(n for n in (digests if isinstance(digests, dict) else {}) if n.endswith(f"-{commit}.json"))
    if not names:
        return "no log was kept for this run (logged with log_result?)"
    return (f"the server's record of this run ({RUNS_DIR}/{names[-1]}) is missing or not what the server wrote (the "
            f"{RUNS_DIR}/ folder replaced, or the file edited or deleted since): its log is not shown. Put back the "
            f"{RUNS_DIR}/ folder the server wrote to see it.")


def plain(value):
    """JSON for a browser: NaN and infinities (a diverged loss, a hand-edited ledger) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
