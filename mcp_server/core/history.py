"""What has been tried: each decided run's change to train.py, summarised so an agent can scan a
night of ideas in a few lines and not repeat a dead end after a compaction or a new session.

A change is described by the train.py constants it changed ("MATRIX_LR 0.04->0.06") plus a
count of other changed lines. It is computed once, when the run is decided, and stored in the
run's record under runs/; reading the history only reads those records.

runs/ is the agent's to write, so a record is believed only where the server vouches for it: as
it writes runs/<n>-<commit>.json, the server keeps a digest of the bytes in its checked state
(`record_digests`, {file name: first 32 hex of the SHA-256}: under 100 bytes a run, some 50 kB
for a night of 500 runs). Only the files named there are read (bounded, plain files only:
limits.read_record), and only those whose bytes match; a record edited, replaced, deleted, planted
as a FIFO or a giant is left out of every answer, report and figure, and named in `refused` (the
server tells it in status and in its next answer, as it does for a ledger changed by hand).
Keeping digests rather than the records' fields keeps the state small and the records the one
place their content lives; the figures a forged record could shrink by being deleted (slot time)
are summed into the state itself (mcp_server/core/cost.py).

Run logs the same way (`log_digests`, {log path: digest}): digested once, when the run is first
recorded (its worker has ended), and believed by a reader that decides from a log (the early stop's
reference curves) only while their bytes match.
"""
import ast
import difflib
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from mcp_server.core import limits, logparse
from mcp_server.core.programs import UNPARSABLE

CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
MAX_VALUE_CHARS = 24  # of a constant's right-hand side in a summary
DIGESTS = "record_digests"  # the state's key: {record file name: digest of its bytes}
RECORD_NAME = re.compile(r"^\d+-[0-9a-f]+\.json$")  # runs/<n>-<commit7>.json; not the worker's .report.json
LOG_DIGESTS = "log_digests"  # the state's key: {run log's path in the workspace: digest of its bytes}
DIGEST_CHARS = 32  # 128 bits of SHA-256: no forgery finds a match, and the state stays small
# old x new lines beyond which a change's other lines are counted without matching them: SequenceMatcher is about
# quadratic where lines repeat (0.2 s at 2,000 x 2,000, 20 s at 60,000 x 60,000 of repeated lines)
MATCHED_LINES = 2000 * 2000


def find_constants(source: str) -> dict[str, ast.Assign | None]:
    """Module-level upper-case single-name assignments, by name (None: assigned more than once)."""
    found: dict[str, ast.Assign | None] = {}
    seen_twice: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if CONSTANT_NAME.match(name):
                if name in found:
                    seen_twice.add(name)
                found[name] = node
    # A name assigned twice can't be edited safely: which one wins depends on code in between.
    for name in seen_twice:
        found[name] = None
    return found


def _values(source: str) -> tuple[dict[str, str], set[int]]:
    """Each constant's right-hand side as written, and the lines those assignments span."""
    values, lines = {}, set()
    for name, node in find_constants(source).items():
        if node is None:
            continue
        text = " ".join((ast.get_source_segment(source, node.value) or "?").split())
        values[name] = text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 3] + "..."
        lines.update(range(node.lineno, node.end_lineno + 1))
    return values, lines


def describe_change(old: str, new: str) -> dict:
    """{"constants": {NAME: [old, new]}, "other_lines": n} for a change of train.py."""
    try:
        before, before_lines = _values(old)
        after, after_lines = _values(new)
    except UNPARSABLE:  # nested too deep for the parser: no constants
        # (review 83: RecursionError failed every discard of such a run, which then held the research run for good)
        before, before_lines, after, after_lines = {}, set(), {}, set()
    constants = {name: [before.get(name), after.get(name)] for name in sorted(before.keys() | after.keys())
                 if before.get(name) != after.get(name)}
    old_rest = [line for i, line in enumerate(old.splitlines(), 1) if i not in before_lines]
    new_rest = [line for i, line in enumerate(new.splitlines(), 1) if i not in after_lines]
    return {"constants": constants, "other_lines": changed_lines(old_rest, new_rest)}


def changed_lines(old: list[str], new: list[str]) -> int:
    """Lines removed plus lines added (unmatched): ndiff's count, without its pairing of similar lines, which is
    quadratic and more (2,000 lines rewritten took 58 s inside a decision's transaction: review 83)."""
    removed, added = unmatched(old, new)
    return len(removed) + len(added)


def unmatched(old: list[str], new: list[str]) -> tuple[list[int], list[int]]:
    """The indexes of the lines a change removed from `old` and added in `new`: those the longest matching blocks
    leave out (SequenceMatcher, whose autojunk sets aside a line over 1% of a long file: without it, 2,000 lines of
    one text against the same alternating with another took 81 s), or beyond MATCHED_LINES, each line's occurrences
    beyond those the other side holds (a moved line left out)."""
    if len(old) * len(new) > MATCHED_LINES:
        return _beyond(old, new), _beyond(new, old)
    # the longer text second: autojunk sets aside the second's popular lines only, and only in one of 200 lines or
    # more (review 84: 20,000 lines of the best against 199 took 12 s, the lines of the long one never set aside)
    swapped = len(old) > len(new)
    first, second = (new, old) if swapped else (old, new)
    removed, added = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, first, second).get_opcodes():
        if tag != "equal":
            removed += range(i1, i2)
            added += range(j1, j2)
    return (added, removed) if swapped else (removed, added)


def _beyond(side: list[str], other: list[str]) -> list[int]:
    left = Counter(other)
    found = []
    for index, line in enumerate(side):
        if left[line]:
            left[line] -= 1
        else:
            found.append(index)
    return found


def change_text(change: dict | None) -> str:
    if not change:
        return "?"
    parts = [f"{name} {old if old is not None else '(new)'}->{new if new is not None else '(removed)'}"
             for name, (old, new) in change.get("constants", {}).items()]
    if change.get("other_lines"):
        parts.append(f"{change['other_lines']} other line(s)")
    return "; ".join(parts) or "no change"


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]


def vouch(state: dict, name: str, raw: bytes) -> None:
    """Notes in the server's state that it wrote these bytes as runs/<name>."""
    digests = state.get(DIGESTS)
    if not isinstance(digests, dict):
        digests = state[DIGESTS] = {}
    digests[name] = digest(raw)


def adopt(runs_dir: Path, state: dict) -> int:
    """A state from before digests (a workspace of an older server): the run records in runs/ that
    read cleanly now (bounded, plain files, JSON) are vouched for once, as they are, so a resumed
    night keeps its history and report; from then on only the server's own writes count. Returns
    how many were adopted."""
    state[DIGESTS] = {}
    for path in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
        if not RECORD_NAME.match(path.name):
            continue
        try:
            raw = limits.read_record(path)
            json.loads(raw)
        except (OSError, ValueError, RecursionError):
            continue
        vouch(state, path.name, raw)
    return len(state[DIGESTS])


def vouch_log(state: dict, root: Path, name: str) -> None:
    """Notes the run log's bytes as they are now, once: a later record of the run (its decision)
    leaves the first digest, so an edit in between is not vouched for."""
    digests = state.get(LOG_DIGESTS)
    if not isinstance(digests, dict):
        digests = state[LOG_DIGESTS] = {}
    if name not in digests:
        try:
            digests[name] = digest(logparse.read_bytes(root / name))
        except OSError:
            pass  # no log to vouch for: none is believed


def adopt_logs(root: Path, state: dict, records: list[dict]) -> None:
    """A state from before log digests: the logs its vouched records name are vouched for as they are."""
    state[LOG_DIGESTS] = {}
    for record in records:
        name = record["result"].get("log")
        if isinstance(name, str) and name:
            vouch_log(state, root, name)


def log_digests(state: dict) -> dict[str, str]:
    """{run log name: the digest the server took of it when it recorded the run}."""
    digests = state.get(LOG_DIGESTS)
    return digests if isinstance(digests, dict) else {}


def is_recorded_log(state: dict, name: str, raw: bytes) -> bool:
    """Whether these bytes are the run log `name` as the server recorded it."""
    recorded = log_digests(state).get(name)
    return recorded is not None and digest(raw) == recorded


def last_keeps(rows: list) -> dict:
    """{commit: its last keep row} of the server's ledger rows, made in one pass: the bases shown_delta looks up
    (review 75: a scan of the rows for each record made history and the report quadratic in a night's length)."""
    return {r.commit: r for r in rows if r.status == "keep"}


def shown_delta(record: dict, kept: dict) -> float | None:
    """A decided run's delta against the best it was measured on, where both numbers are the harness's: none where the
    run's is train.py's own or the best's is not measured (review 72: "What was tried" and history gave a run at 1.04
    after the agent's own 99.0 logged by hand as -97.96). kept: last_keeps of the server's ledger rows."""
    result, parent = record["result"], str(record["run"].get("parent") or "")
    base = kept.get(parent[:7])
    if result.get("verified") is False or (base is not None and not limits.measured(base.description)):
        return None
    return result.get("delta")


def checked_log(root: Path, state: dict, name: str) -> str | None:
    """The run log's text where its bytes are those the server digested; None where it never did,
    or the file is not what it was (edited, replaced, deleted, not a plain file)."""
    if name not in log_digests(state):
        return None
    try:
        raw = logparse.read_bytes(root / name)
    except OSError:
        return None
    return raw.decode("utf-8", errors="replace") if is_recorded_log(state, name, raw) else None


def checked(runs_dir: Path, state: dict, fresh: dict | None = None) -> tuple[dict[str, dict], list[str]]:
    """({file name: record} of the records the server's state vouches for, oldest first; the names
    it vouches for whose file is not what it wrote: changed, deleted, not a plain file, too large).
    fresh: digests this server wrote but has not saved in its state yet."""
    digests = state.get(DIGESTS) if isinstance(state.get(DIGESTS), dict) else {}
    digests = digests | (fresh or {})
    found, refused = {}, []
    for name in sorted(digests):
        try:
            raw = limits.read_record(runs_dir / name)
            record = json.loads(raw) if digest(raw) == digests[name] else None
        except (OSError, ValueError, RecursionError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("run"), dict) and isinstance(record.get("result"), dict):
            found[name] = record
        else:
            refused.append(name)
    return found, refused


def records(runs_dir: Path, state: dict, decided: bool = True, fresh: dict | None = None) -> list[dict]:
    """Every decided run's record (decided=False: every run's) that the server vouches for, oldest first."""
    return [r for r in checked(runs_dir, state, fresh)[0].values() if r.get("decision") or not decided]


def records_by_commit(runs_dir: Path, state: dict) -> dict[str, dict]:
    """The decided runs' records by their commit."""
    return {r["result"]["commit"]: r for r in records(runs_dir, state)}


def rerun_commits(runs_dir: Path, state: dict, commits) -> dict[str, str]:
    """{commit: rerun kind} of these commits' runs that re-measured code rather than try an idea."""
    commits = set(commits)
    return {commit: kind for commit, record in records_by_commit(runs_dir, state).items()
            if commit in commits and (kind := rerun_kind(record))}


RERUN_KINDS = ("noise repeat", "confirmation", "control")


def is_rerun(run: dict) -> bool:
    """Whether the server queued the run to measure again (measure_noise's repeats, confirm's pairs): a rerun
    is that tool's to decide, never an idea to keep, cancel or stop early."""
    return run.get("rerun_of") is not None or bool(run.get("data_order"))


def rerun_kind(record: dict | None) -> str | None:
    """What a rerun re-measured, from the fields the server set when it queued the run (an idea's
    description is the agent's, so an idea named "noise repeat" stays an idea): a noise repeat of
    the best, a confirmation of a candidate, or a control (the best again, beside a confirmation;
    a rerun's description is the server's own); None for an idea."""
    run = (record or {}).get("run") or {}
    if run.get("rerun_of") is not None:
        return "control" if str(run.get("description", "")).startswith("control ") else "confirmation"
    return "noise repeat" if run.get("data_order") else None
