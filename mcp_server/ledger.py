"""results.tsv, the experiment ledger in upstream's format.

Rows are validated, then appended with one write() on an O_APPEND descriptor followed by
fsync, so a crash of the server or of the training never leaves a half-written row.
"""
import math
import os
import re
import unicodedata
from pathlib import Path

from mcp_server.models import Refusal, Row

LEDGER_NAME = "results.tsv"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
STATUSES = ("keep", "discard", "crash")
COMMIT_RE = re.compile(r"^[0-9a-f]{7}$")
MAX_DESCRIPTION = 300


ELLIPSIS = "..."


def _breaks_a_row(char: str) -> bool:
    """Tabs, line breaks of any kind (what str.splitlines splits on) and other control characters."""
    return unicodedata.category(char) in ("Cc", "Zl", "Zp")


def _hides_text(char: str) -> bool:
    """Invisible format characters (Cf: bidi overrides and isolates such as U+202E, zero-width
    spaces and joiners, the BOM) and unpaired surrogates: a row holding one can read otherwise
    than it is written, or not be written at all."""
    return unicodedata.category(char) in ("Cf", "Cs")


def validate_description(text: str, what: str = "description") -> str:
    if not isinstance(text, str):
        raise Refusal(f"The {what} must be text.")
    text = text.strip()
    if not text:
        raise Refusal(f"The {what} is empty: say in a few words what this run changes.")
    bad = sorted({c for c in text if _breaks_a_row(c)})
    if bad:
        raise Refusal(f"The {what} contains a tab, a line break or another control character "
                      f"({', '.join(repr(c) for c in bad)}), which would break results.tsv; use one line of plain text.")
    hidden = sorted({c for c in text if _hides_text(c)})
    if hidden:
        named = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '(unnamed)')}" for c in hidden)
        raise Refusal(f"The {what} contains an invisible character ({named}), which can make "
                      "results.tsv read otherwise than it is written (a right-to-left override reverses what "
                      "follows it); use plain visible text.")
    if len(text) > MAX_DESCRIPTION:
        raise Refusal(f"The {what} is {len(text)} characters; keep it under {MAX_DESCRIPTION}.")
    return text


def fit_description(text: str, suffix: str = "", limit: int = MAX_DESCRIPTION) -> str:
    """A description the server composes (a note or a marker appended) shortened to the limit, the
    suffix kept whole: what the server writes always passes its own validation."""
    room = limit - len(suffix)
    if len(text) > room:
        text = text[:max(room - len(ELLIPSIS), 0)].rstrip() + ELLIPSIS
    return (text + suffix)[:limit]


def make_row(commit: str, val_bpb: float, memory_gb: float, status: str, description: str) -> Row:
    """A validated row; crash rows carry 0.000000 and 0.0 as upstream writes them."""
    if status not in STATUSES:
        raise Refusal(f"Unknown status {status!r}: use one of keep, discard, crash.")
    if not COMMIT_RE.match(commit):
        raise Refusal(f"Commit {commit!r} is not a 7-character lowercase hex hash.")
    description = validate_description(description)
    if status == "crash":
        return Row(commit=commit, val_bpb=0.0, memory_gb=0.0, status=status, description=description)
    for name, value in (("val_bpb", val_bpb), ("memory_gb", memory_gb)):
        # copysign: -0.0 (what a negative peak memory rounds to) is not >= 0 either
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or math.copysign(1.0, value) < 0:
            raise Refusal(f"{name} must be a finite number >= 0, got {value!r}; "
                          "log a run that produced no number with status crash.")
    if status != "crash" and round(val_bpb, 6) == 0:
        raise Refusal(f"val_bpb {val_bpb!r} is 0.000000 in results.tsv, which is only valid for a crash row; "
                      "pass the measured value.")
    return Row(commit=commit, val_bpb=float(val_bpb), memory_gb=round(float(memory_gb), 1),
               status=status, description=description)


def format_row(row: Row) -> str:
    return f"{row.commit}\t{row.val_bpb:.6f}\t{row.memory_gb:.1f}\t{row.status}\t{row.description}\n"


def ensure_ledger(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        _append_bytes(path, HEADER.encode())


# path -> (size, mtime_ns, rows, malformed): tools read the ledger on every call, and a
# night's ledger has thousands of rows; it is re-parsed only when someone else changed it.
_parsed: dict[Path, tuple[int, int, list[Row], int]] = {}


def read_rows(path: Path) -> tuple[list[Row], int]:
    """All well-formed rows, and how many lines were malformed (reported, never fatal)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return [], 0
    cached = _parsed.get(path)
    if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return list(cached[2]), cached[3]
    rows, bad = [], 0
    # rows end with "\n" only: splitlines() would also cut a row at a form feed or U+2028
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n")[1:]:
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        row = parse_line(line)
        if row is None:
            bad += 1
        else:
            rows.append(row)
    _parsed[path] = (stat.st_size, stat.st_mtime_ns, rows, bad)
    return list(rows), bad


def parse_line(line: str) -> Row | None:
    """One ledger line as a row, or None if it is malformed."""
    fields = line.split("\t")
    if len(fields) != 5 or fields[3] not in STATUSES or not COMMIT_RE.match(fields[0]):
        return None
    try:
        return Row(commit=fields[0], val_bpb=float(fields[1]), memory_gb=float(fields[2]),
                   status=fields[3], description=fields[4])
    except ValueError:
        return None


def append_row(path: Path, row: Row) -> list[Row]:
    """Appends a row unless its commit is already logged; returns all rows after."""
    rows, _ = read_rows(path)
    if any(r.commit == row.commit for r in rows):
        raise Refusal(f"Commit {row.commit} is already in {LEDGER_NAME}; each run is logged once.")
    ensure_ledger(path)
    before = path.stat()
    _append_bytes(path, format_row(row).encode())
    cached = _parsed.get(path)
    if cached and cached[:2] == (before.st_size, before.st_mtime_ns):
        after = path.stat()
        _parsed[path] = (after.st_size, after.st_mtime_ns, cached[2] + [row], cached[3])
    return rows + [row]


def _append_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(path):
            data = b"\n" + data  # a foreign editor left no final newline: never glue two rows
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def best_kept(rows: list[Row]) -> Row | None:
    kept = [r for r in rows if r.status == "keep"]
    return min(kept, key=lambda r: r.val_bpb) if kept else None
