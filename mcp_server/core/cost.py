"""What a research run has spent: slot time, and the overnight runner's Claude Code sessions.

Slot time is each finished run's wall time on its slot (`wall_seconds`, measured by the run's
worker, else the server's own clock), summed into the server's checked state as each run ends
(`add_slot_time`): `slot_hours` (all of it: what the `max_gpu_hours` limit counts), its share on
GPUs (`gpu_hours`) and the runs counted (`slot_runs`). GPU-hours are for runs on a GPU,
slot-hours for runs on a CPU (a slot there is a share of the cores) or on a device not named.
`run_hours` reads that sum; status, the dashboard, the morning report, the overnight runner and
the limit all use it. runs/*.json, which a shell can delete or edit, never move it.

A headless Claude Code session ends its stream-json output with a `result` event carrying its
token `usage` and `total_cost_usd`; the runner stores them per session in sessions.jsonl, and
`sessions_spent` sums them for a tag.
"""
from __future__ import annotations

import collections
import json
import math
import os
import threading
from pathlib import Path

from mcp_server.core import limits, logparse

SESSIONS_FILE = ".research-loop/overnight/sessions.jsonl"
TAIL_LINES = 64  # of a session's output, kept for the runner's note when it gives up
SETTLE_S = 5.0  # the longest the runner waits for the rest of an exited session's output
TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def on_cpu(device) -> bool:
    """worker.device_name: a GPU's name, else "cpu" or "cpu: <model>"; unknown counts as a slot."""
    return not isinstance(device, str) or device == "cpu" or device.startswith("cpu:")


def run_hours(state: dict | None) -> dict:
    """{"gpu_hours", "slot_hours", "runs"}: the slot time of the finished runs of the research run
    in the server's state (those that ended since its setup)."""
    state = state or {}
    total, gpu = limits.slot_hours(state), _number(state.get("gpu_hours"))
    runs = state.get("slot_runs")
    return {"gpu_hours": gpu, "slot_hours": round(max(0.0, total - gpu), 6),
            "runs": runs if isinstance(runs, int) and not isinstance(runs, bool) else 0}


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def add_slot_time(state: dict, seconds, device=None) -> None:
    """What the max_gpu_hours limit counts (GPU-hours, or slot-hours on a CPU), kept in the server's
    state as each run ends: the runs/ records a shell can delete or edit never move the limit.
    device: what the run trained on (worker.device_name; None: a slot)."""
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds) and seconds > 0:
        state["slot_hours"] = round(limits.slot_hours(state) + seconds / 3600, 6)
        if not on_cpu(device):
            state["gpu_hours"] = round(_number(state.get("gpu_hours")) + seconds / 3600, 6)
        state["slot_runs"] = run_hours(state)["runs"] + 1


def hours_text(hours: dict) -> str | None:
    if not hours["runs"]:
        return None
    parts = [f"{hours['gpu_hours']:.2f} GPU-hours"] if hours["gpu_hours"] else []
    if hours["slot_hours"] or not parts:
        parts.append(f"{hours['slot_hours']:.2f} slot-hours on the CPU")
    return " + ".join(parts) + f" over {hours['runs']} run{'s' if hours['runs'] != 1 else ''}"


# --- Claude Code sessions ------------------------------------------------------------------------
def read_tail(path: Path, limit: int = limits.MAX_RECORD_BYTES) -> str:
    """The end of a file of the runner's (at most limit bytes), read without blocking and only where it is a
    plain file: its folder is the agent's to write, and a FIFO put there (or a link to /dev/zero) hung the
    runner and the dashboard. OSError where there is no such file."""
    f = logparse.open_plain(path)
    if f is None:
        raise OSError(f"{path} is not a plain file")
    with f:
        size = os.fstat(f.fileno()).st_size
        return os.pread(f.fileno(), min(size, limit), max(0, size - limit)).decode(errors="replace")


class SessionOutput:
    """A session's stream-json output as the runner reads it: from its own pipe, each line copied to the
    session's log file as it comes. The log file stays the agent's to write through its name (a process the
    session left behind rewrote it with a $0 result once the session ended, before the runner read it); the
    pipe only takes lines: one a process of the session writes adds a result event, never takes the session's
    own away, so the session's cost is the largest any of its result events says."""

    def __init__(self, pipe, log):
        self.log, self.result = log, {}
        self.last = collections.deque(maxlen=TAIL_LINES)
        self.thread = threading.Thread(target=self._copy, args=(pipe,), daemon=True, name="session-output")
        self.thread.start()

    def _copy(self, pipe) -> None:
        with pipe, self.log:
            while line := pipe.readline(limits.MAX_RECORD_BYTES):
                try:
                    self.log.write(line)
                    self.log.flush()
                except (OSError, ValueError):  # the log gone, or closed for the next session: the pipe still counts
                    pass
                self.last.append(line.decode(errors="replace"))
                found = result_of(line)
                if found is not None and _dollars(found) >= _dollars(self.result):
                    self.result = found

    def settled(self, seconds: float = SETTLE_S) -> dict:
        """{"cost_usd", "usage"} of the session that has exited, once the pipe is read to its end (or for
        `seconds` at most: a process the session left behind may hold it open), or {} where it wrote none."""
        self.thread.join(seconds)
        return dict(self.result)


def _dollars(result: dict) -> float:
    return result["cost_usd"] if result and result.get("cost_usd") is not None else -1.0


def result_of(line) -> dict | None:
    """{"cost_usd", "usage"} of a stream-json line that is a `result` event, else None."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):  # a line nested past json's depth is no record
        return None
    if not isinstance(event, dict) or event.get("type") != "result":
        return None
    usage = event.get("usage") if isinstance(event.get("usage"), dict) else {}
    tokens = {k: usage[k] for k in TOKEN_KINDS if isinstance(usage.get(k), int)}
    spent = event.get("total_cost_usd")
    ok = isinstance(spent, (int, float)) and not isinstance(spent, bool) and 0 <= spent < math.inf
    return {"cost_usd": float(spent) if ok else None, "usage": tokens}


def sessions_spent(root: Path, tag: str | None) -> dict:
    """{"sessions", "cost_usd", "tokens": {kind: n}} over the runner's sessions for this tag (every
    invocation of the runner: a resumed night keeps counting)."""
    total = {"sessions": 0, "cost_usd": 0.0, "tokens": {k: 0 for k in TOKEN_KINDS}}
    try:
        lines = read_tail(Path(root) / SESSIONS_FILE).splitlines()
    except OSError:
        return total
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a line nested past json's depth is no record
            continue
        if isinstance(record, dict) and record.get("tag") == tag:
            add_session(total, record)
    return total


def add_session(total: dict, record: dict) -> None:
    """A session's record added to a sum of sessions_spent's shape: a record is a file's line the agent can
    write, so only a cost of 0 or more and a dict of whole token counts count (a list there raised out of the
    runner, a NaN or negative cost hid the rest)."""
    total["sessions"] += 1
    spent = record.get("cost_usd")
    if isinstance(spent, (int, float)) and not isinstance(spent, bool) and 0 <= spent < math.inf:
        total["cost_usd"] += spent
    usage = record.get("usage") if isinstance(record.get("usage"), dict) else {}
    for kind, count in usage.items():
        if kind in total["tokens"] and isinstance(count, int) and not isinstance(count, bool):
            total["tokens"][kind] += count


def sessions_text(spent: dict) -> str | None:
    if not spent["sessions"]:
        return None
    tokens = spent["tokens"]
    return (f"{spent['sessions']} Claude Code session(s): ${spent['cost_usd']:.2f}, "
            f"{tokens['input_tokens'] + tokens['cache_creation_input_tokens'] + tokens['cache_read_input_tokens']:,} "
            f"input tokens ({tokens['cache_read_input_tokens']:,} read from cache), "
            f"{tokens['output_tokens']:,} output tokens")
