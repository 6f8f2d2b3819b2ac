"""A research run's stop conditions, and whether one is met.

Standard library only and plain data in, plain data out: the MCP server and the Stop hook (which
runs on the system Python, without the project's environment) judge with this same code.

Limits are recorded at setup: a deadline (from hours), a number of experiments, a target val_bpb,
a number of failures (crashes and timeouts) in a row, 10 unless set otherwise, so a broken
setup does not spin all night, and GPU-hours (the runs' slot time, which the server keeps in the
state as `slot_hours` as each run ends: mcp_server/core/cost.py). A run is also over once stopped on purpose (the stop tool).
"""
from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path

from mcp_server.scripts import sandbox  # standard library only too

STOPPED_EARLY = " (stopped early: "  # the crash row's marker of a run the early stop ended
# a row with a number log_result wrote: the agent's word, never the harness's, so a keep reaches no target
LOGGED_BY_HAND = " (logged by hand)"
# a kept row whose number is train.py's own (keep(unverified=true)): it reaches no target either. The agent's
# note may follow it in the row, so it is looked for anywhere (a description that holds it only misses a target)
UNVERIFIED = " (unverified)"
DEFAULT_MAX_FAILURES_IN_ROW = 10
# The server's state, its own copy first (in the git directory, where neither a run nor the edit hook
# reaches; mcp_server/core/state.py writes both): its rows decide, results.tsv only shows them
STATE_PATH = ".research-loop/state.json"
RECORDS_DIR = "research-loop/records"  # in the git directory: out of the working tree and of every run's reach
# The most of a record (state.json, results.tsv, a hook's own) that is read: 50,000 ledger rows, far
# more than years of nights. A larger one was planted to exhaust the reader's memory or time.
MAX_RECORD_BYTES = 16 << 20


def read_record(path: Path) -> bytes:
    """A record's bytes: OSError where it is missing or no plain file (a FIFO would block the open),
    ValueError where it is over MAX_RECORD_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a plain file")
        data = f.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"{path} is over {MAX_RECORD_BYTES >> 20} MiB: no record of the server's is that large")
    return data


def records_dir(workspace: Path) -> Path:
    """Where the server keeps its copy of what it last wrote: the git directory (a linked worktree's own, named
    by its `.git` file), else beside state.json."""
    dot_git = Path(workspace) / ".git"
    if dot_git.is_file():
        try:
            text = dot_git.read_text().strip()
        except (OSError, ValueError):  # unreadable: no git directory to keep records in
            text = ""
        dot_git = (Path(workspace) / text[len("gitdir:"):].strip()) if text.startswith("gitdir:") else dot_git
    return dot_git / RECORDS_DIR if dot_git.is_dir() else Path(workspace) / ".research-loop" / "records"


def recorded_state(workspace: Path) -> dict:
    """The state as the server last wrote it, or {} where there is none to read. Review 72: the copy is found
    where the server keeps it (a linked worktree's own git directory), or a forged state.json stood."""
    for path in (records_dir(workspace) / "state.json", Path(workspace) / STATE_PATH):
        try:
            state = json.loads(read_record(path))
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep to parse
            continue
        if isinstance(state, dict):
            return state
    return {}


NUMBER = (int, float)
# What the readers of a state take its keys to be (review 74: a forged copy whose row's description was no string
# made a reading server's status fail); null stands for a missing key, and keys not named here are not looked at
STATE_TYPES = {"rows": list, "runs": dict, "noise": dict, "noise_by_device": dict, "limits": dict, "stopped": dict,
               "tag": str, "branch": str, "kept_commit": str, "start_commit": str, "kept_log": str,
               "fingerprint": str,
               "harness_changed": str, "settings_changed": str, "seq": int, "extra_runs": int, "data_orders": int,
               "started_at": NUMBER, "slot_hours": NUMBER, "gpu_hours": NUMBER, "early_stop": bool}
ROW_TYPES = (str, NUMBER, NUMBER, str, str)  # commit, val_bpb, memory_gb, status, description
RUN_TYPES = {"run": int, "commit": str, "parent": str, "description": str, "status": str, "log": str, "result": dict,
             "confirmation": dict}
CONFIRMATION_TYPES = {"confirmed": bool, "paired_deltas": list, "runs": list, "reason": str}
COMMIT_KEYS = ("kept_commit", "start_commit", "commit", "parent")  # full git object ids where the server writes them
ID_LENGTHS = (40, 64)  # SHA-1's and SHA-256's, in hex
ESTIMATE_TYPES = {"values": list, "std": NUMBER, "spread": NUMBER, "threshold": NUMBER}


def _is(value, kind) -> bool:
    if isinstance(value, float) and not math.isfinite(value):  # Python's json reads NaN, Infinity and 1e999; the
        return False  # server writes none, and a tool's answer cannot carry one (its schema's number has none)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # json's true is no number


def _kind(value) -> str:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else type(value).__name__


def _odd(entry, types: dict) -> str | None:
    """What of a record's keys is of another type than its types say (null: as missing), or None."""
    if not isinstance(entry, dict):
        return f"it is {_kind(entry)}"
    return next((f"{key} is {_kind(entry[key])}" for key, kind in types.items()
                 if entry.get(key) is not None and not _is(entry[key], kind)), None)


def _not_an_id(entry: dict) -> str | None:
    """Which of an entry's commits is no full git object id (review 80: a kept_commit of "zzzz" failed every call)."""
    return next((f"{key} is no commit id" for key in COMMIT_KEYS if isinstance(entry.get(key), str)
                 and (len(entry[key]) not in ID_LENGTHS or entry[key].strip("0123456789abcdef"))), None)


def malformed(state: dict) -> str | None:
    """What in a state read from a file is of another type than the server writes, or None: such a state is no
    record of the server's (a forgery, or a file broken otherwise), and is believed in no part. A run's result is
    checked against its model where the server reads states (state.malformed): this module is the hook's too."""
    if odd := _odd(state, STATE_TYPES) or _not_an_id(state):
        return odd
    for i, row in enumerate(state.get("rows") or [], 1):
        if not isinstance(row, list) or len(row) != len(ROW_TYPES) or not all(map(_is, row, ROW_TYPES)):
            return f"row {i} is not [commit, val_bpb, memory_gb, status, description] (a string, two finite numbers, " \
                   "two strings)"
    for key, entry in (state.get("runs") or {}).items():
        if odd := _odd(entry, RUN_TYPES) or _not_an_id(entry) or _odd(entry.get("confirmation") or {},
                                                                       CONFIRMATION_TYPES):
            return f"run {key}: {odd}"
        if not all(_is(d, NUMBER) for d in (entry.get("confirmation") or {}).get("paired_deltas") or []):
            return f"run {key}: a paired delta of its confirmation is no number"
    for estimate in filter(None, [state.get("noise"), *(state.get("noise_by_device") or {}).values()]):
        odd = _odd(estimate, ESTIMATE_TYPES)
        if odd or not all(_is(value, NUMBER) for value in estimate.get("values") or []):
            return f"a noise estimate: {odd or 'a value is no finite number'}"
    return None


def recorded_rows(state: dict) -> list | None:
    """The ledger's rows in the server's state ([commit, val_bpb, memory_gb, status, description]
    each), or None for a state from before the server kept them (results.tsv is then the record)."""
    rows = state.get("rows")
    return rows if isinstance(rows, list) else None


def experiments_done(statuses: list[str]) -> int:
    """Ledger rows after the kept baseline (the first keep): every decided run counts."""
    return len(statuses) - 1 if "keep" in statuses else len(statuses)


def failures_in_row(rows: list[tuple]) -> int:
    """Crash rows at the end of the ledger. A run the early stop ended is a crash row in upstream's
    format, but no failure: it ran and was behind, as most ideas are late in a night. A discard or keep row
    log_result wrote is no run of the server's and ends no streak (review 96: one for a commit made by hand after
    each crash, or after the limit was reached, kept a night of crashes going)."""
    count = 0
    for row in reversed(rows):
        description = str(row[2] if len(row) > 2 else "")
        if row[0] != "crash" and description.endswith(LOGGED_BY_HAND):
            continue
        if row[0] != "crash" or STOPPED_EARLY in description:
            break
        count += 1
    return count


def measured(description: str) -> bool:
    """Whether a kept row's number is the harness's: a row log_result wrote holds the agent's number,
    an unverified one train.py's."""
    return not description.endswith(LOGGED_BY_HAND) and UNVERIFIED not in description


def not_measured(description: str) -> str | None:
    """Whose a kept row's number is where the harness did not measure it (its marker says), else None."""
    if measured(description):
        return None
    whose = "the agent's, logged by hand" if description.endswith(LOGGED_BY_HAND) else "train.py's own"
    return f"{whose}, not measured by the harness"


def caveat(description: str) -> str | None:
    """What is said beside a kept row's number wherever it stands apart from its row (status's best, the report's
    summary, the end's ping), where the row's marker says so: whose it is where the harness did not measure it, and
    that its run had no sandbox (review 72: both read as a bare number there)."""
    said = [not_measured(description)]
    if sandbox.MARKER in description:
        said.append(f"its run had no sandbox: {sandbox.RISK}")
    return "; ".join(filter(None, said)) or None


def measured_keeps(rows: list[tuple]) -> list[float]:
    """The val_bpb of each kept row the harness measured. Rows are (status, val_bpb[, description])."""
    return [row[1] for row in rows if row[0] == "keep" and measured(str(row[2] if len(row) > 2 else ""))]


def ended(state: dict, rows: list[tuple], now: float | None = None) -> str | None:
    """Why the research run is over, or None. rows: (status, val_bpb, description) of the ledger,
    oldest first (the description only tells an early stop from a failure)."""
    stopped = state.get("stopped")
    if isinstance(stopped, dict):
        return f"stopped: {stopped.get('reason') or 'on purpose'}"
    limits = state.get("limits")
    if not isinstance(limits, dict):
        return None
    now = time.time() if now is None else now
    statuses = [row[0] for row in rows]
    deadline = limits.get("deadline")
    if isinstance(deadline, (int, float)) and now >= deadline:
        return f"the deadline passed ({limits.get('hours')} h)"
    most = limits.get("max_experiments")
    if isinstance(most, int) and experiments_done(statuses) >= most:
        return f"{most} experiments done"
    target = limits.get("target_val_bpb")
    kept = measured_keeps(rows)
    if isinstance(target, (int, float)) and kept and min(kept) <= target:
        return f"the target val_bpb {target} is reached ({min(kept):.6f})"
    failures = limits.get("max_failures_in_row")
    if isinstance(failures, int) and failures_in_row(rows) >= failures:
        return f"{failures} failures in a row (crashes or timeouts): fix the cause before going on"
    budget, spent = limits.get("max_gpu_hours"), slot_hours(state)
    if isinstance(budget, (int, float)) and spent >= budget:
        return f"{spent:.3g} of {budget:g} GPU-hours spent"
    return None


def slot_hours(state: dict) -> float:
    spent = state.get("slot_hours")
    return spent if isinstance(spent, (int, float)) and not isinstance(spent, bool) else 0.0


def left(state: dict, rows: list[tuple], now: float | None = None) -> str | None:
    """What is left of each limit, in one line, or None when the run has no limits."""
    limits = state.get("limits")
    if not isinstance(limits, dict):
        return None
    now = time.time() if now is None else now
    statuses = [row[0] for row in rows]
    parts = []
    if isinstance(limits.get("deadline"), (int, float)):
        parts.append(f"{max(0.0, (limits['deadline'] - now) / 3600):.1f} h of {limits.get('hours')} h left")
    if isinstance(limits.get("max_experiments"), int):
        parts.append(f"{max(0, limits['max_experiments'] - experiments_done(statuses))} of "
                     f"{limits['max_experiments']} experiments left")
    if isinstance(limits.get("target_val_bpb"), (int, float)):
        kept = measured_keeps(rows)
        parts.append(f"target val_bpb {limits['target_val_bpb']}" + (f" (best {min(kept):.6f})" if kept else ""))
    if isinstance(limits.get("max_failures_in_row"), int):
        parts.append(f"{failures_in_row(rows)} of {limits['max_failures_in_row']} failures in a row")
    if isinstance(limits.get("max_gpu_hours"), (int, float)):
        parts.append(f"{slot_hours(state):.3g} of {limits['max_gpu_hours']:g} GPU-hours spent")
    return "; ".join(parts) or None


def make_limits(hours=None, max_experiments=None, target_val_bpb=None,
                max_failures_in_row=DEFAULT_MAX_FAILURES_IN_ROW, best=None, now=None, max_gpu_hours=None) -> dict:
    """Checked limits for setup; raises ValueError with the reason for any that make no sense.
    best: the val_bpb the run starts from, where known (a target must be below it)."""
    def number(value, name):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
                float("inf"), float("-inf")):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return value

    limits = {}
    if hours is not None:
        if number(hours, "hours") <= 0 or hours > 24 * 366:
            raise ValueError(f"hours must be more than 0 (and under a year), got {hours}")
        limits["hours"] = hours
        limits["deadline"] = (time.time() if now is None else now) + hours * 3600
    if max_experiments is not None:
        if isinstance(max_experiments, bool) or not isinstance(max_experiments, int) or max_experiments < 1:
            raise ValueError(f"max_experiments must be a whole number of at least 1, got {max_experiments!r}")
        limits["max_experiments"] = max_experiments
    if target_val_bpb is not None:
        if number(target_val_bpb, "target_val_bpb") <= 0:
            raise ValueError(f"target_val_bpb must be above 0, got {target_val_bpb}")
        if best is not None and target_val_bpb >= best:
            raise ValueError(f"target_val_bpb {target_val_bpb} is not below the current best {best:.6f}: the run "
                             "would end at once; give a lower target, or none")
        limits["target_val_bpb"] = target_val_bpb
    if max_failures_in_row is not None:
        if isinstance(max_failures_in_row, bool) or not isinstance(max_failures_in_row, int) or max_failures_in_row < 1:
            raise ValueError(f"max_failures_in_row must be a whole number of at least 1, got {max_failures_in_row!r}")
        limits["max_failures_in_row"] = max_failures_in_row
    if max_gpu_hours is not None:
        if number(max_gpu_hours, "max_gpu_hours") <= 0:
            raise ValueError(f"max_gpu_hours must be more than 0 (slot-hours where runs train on a CPU), "
                             f"got {max_gpu_hours}")
        limits["max_gpu_hours"] = max_gpu_hours
    return limits
