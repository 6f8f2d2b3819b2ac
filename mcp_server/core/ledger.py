"""results.tsv, the experiment ledger in upstream's format.

The rows that decide (the best, what is logged) are the server's own: a list in its state
(mcp_server/core/state.py), where they are added. results.tsv is written from that list: a new row is
appended with one write() on an O_APPEND descriptor followed by fsync, so a crash of the server
or of the training never leaves a half-written row; a file someone else changed is archived and
written again whole from the list, and never read back as a record.
"""
import hashlib
import io
import math
import os
import re
import shutil
import stat as stat_module
import tempfile
import time
import unicodedata
from pathlib import Path

from mcp_server.core import limits
from mcp_server.core.models import Refusal, Row

LEDGER_NAME = "results.tsv"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
STATUSES = ("keep", "discard", "crash")
COMMIT_RE = re.compile(r"^[0-9a-f]{7}$")
MAX_DESCRIPTION = 300


ELLIPSIS = "..."
# what the server reads of a record the agent can replace (results.tsv, state.json): more is an edit
MAX_RECORD_BYTES = 256 << 20


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it (taken at import, before any thread)
    os.umask(mask)
    return mask


# a rewritten record's mode: what open() would give a new one, the user's umask applied (mkstemp makes 0600)
RECORD_MODE = 0o644 & ~_umask()


def _breaks_a_row(char: str) -> bool:
    """Tabs, line breaks of any kind (what str.splitlines splits on) and other control characters."""
    return unicodedata.category(char) in ("Cc", "Zl", "Zp")


def _hides_text(char: str) -> bool:
    """Invisible format characters (Cf: bidi overrides and isolates such as U+202E, zero-width
    spaces and joiners, the BOM) and unpaired surrogates: a row holding one can read otherwise
    than it is written, or not be written at all."""
    return unicodedata.category(char) in ("Cf", "Cs")


def written_out(text: str) -> tuple[str, list[str]]:
    """The text with each invisible character (above) and control character other than a tab or a line break
    written as <U+XXXX>, and their names: code shown to a person must read as it runs ("trojan source")."""
    hidden = sorted({c for c in text if _hides_text(c) or (_breaks_a_row(c) and c not in "\t\n\r")})
    for char in hidden:
        text = text.replace(char, f"<U+{ord(char):04X}>")
    return text, [f"U+{ord(c):04X} {unicodedata.name(c, '(unnamed)')}" for c in hidden]


def validate_description(text: str, what: str = "description") -> str:
    if not isinstance(text, str):
        raise Refusal(f"The {what} must be text.")
    text = text.strip()
    if not text:
        # review 93: stop's reason was asked for "what this run changes"
        raise Refusal(f"The {what} is empty: say in a few words "
                      + ("why the research run ends." if what == "reason" else "what this run changes."))
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


def refuse_markers(text: str, what: str = "description", wrapped: bool = False) -> str:
    """The agent's words, refused where they hold a marker of a number the harness did not measure as the row will
    read them (a note is written in parentheses: "unverified" would be one). Review 62: a measured keep row whose
    description held " (unverified)" was taken for train.py's own number and left out of the noise estimate. Stop 48:
    a crash row holding the early stop's marker is no failure, so a discard reason "stopped early: ..." kept a night of
    crashes off max_failures_in_row."""
    # review 80: a row's description is followed by " (" where the server adds a marker or the agent's note, so a
    # description ending "(stopped early:" made the marker whole with either
    shown = f" ({text})" if wrapped else f" {text} ("
    marker = next((m for m in (limits.UNVERIFIED, limits.LOGGED_BY_HAND, limits.STOPPED_EARLY) if m in shown), None)
    if marker:
        shown = marker if marker.endswith(")") else f"{marker}...)"
        raise Refusal(f"The {what} would read{shown} in the ledger, the server's own marker of a number the harness "
                      "did not measure or of a run its early stop ended (it adds it where that applies): reword it.")
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
    """results.tsv with its header where it is missing or empty. Review 96: a FIFO there (empty to stat) before the
    first setup blocked the append's open for ever, under the state lock; what is no plain file is replaced whole."""
    if not read_plain(path):
        replace_bytes(path, HEADER.encode())


# path -> (size, mtime_ns, rows, malformed): tools read the ledger on every call, and a
# night's ledger has thousands of rows; it is re-parsed only when someone else changed it.
_parsed: dict[Path, tuple[int, int, list[Row], int]] = {}


def read_plain(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """A record's bytes (None where it is missing), read without blocking: a FIFO or device planted
    in its place (an open or a read that never ends) reads as b"", a giant file as its first
    limit + 1 bytes; neither is what the server wrote, so it is told and written again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    if not stat_module.S_ISREG(os.fstat(fd).st_mode):  # before open(): a folder raised there, naming no file
        os.close(fd)
        return b""
    with open(fd, "rb") as f:
        return f.read(limit + 1)


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
    for line in (read_plain(path) or b"").decode("utf-8", errors="replace").split("\n")[1:]:
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
        val_bpb, memory_gb = float(fields[1]), float(fields[2])
    except ValueError:
        return None
    if not (math.isfinite(val_bpb) and math.isfinite(memory_gb)):  # nan from a ledger older than the server's rows:
        return None  # no result, and a tool's answer cannot carry it (its schema's number has no NaN)
    return Row(commit=fields[0], val_bpb=val_bpb, memory_gb=memory_gb, status=fields[3], description=fields[4])


# The entries last made into rows, and those rows: tools read the rows several times per call, and a night has
# thousands. A list that begins with those entries extends them. Review 72: the count and the two ends named a list,
# so a forged copy of the state read by the report (its first rows, the best's value changed) was taken for the
# server's own rows, and the server's longer list for one grown from it.
_made: tuple[tuple, list[Row]] = ((), [])


def rows_of(state: dict) -> list[Row]:
    """The rows the server recorded (in its state): these decide; results.tsv only shows them.
    Each was validated when it was made, and the state is checked before it is read: none again."""
    global _made
    entries = tuple(map(tuple, state.get("rows") or []))
    made, rows = _made
    if entries != made:
        count = len(made)
        grew = 0 < count < len(entries) and entries[:count] == made
        rows = (rows if grew else []) + [Row.model_construct(commit=c, val_bpb=v, memory_gb=m, status=s, description=d)
                                         for c, v, m, s, d in entries[count if grew else 0:]]
        _made = (entries, rows)
    return list(rows)


def add_row(state: dict, row: Row) -> list[Row]:
    """Records a row in the state unless its commit is already logged; returns all rows after.
    results.tsv gets it when the state is saved."""
    if any(entry[0] == row.commit for entry in state.get("rows") or []):
        raise Refusal(f"Commit {row.commit} is already in {LEDGER_NAME}; each run is logged once.")
    state.setdefault("rows", []).append([row.commit, row.val_bpb, row.memory_gb, row.status, row.description])
    return rows_of(state)


def render(rows: list[Row]) -> bytes:
    return (HEADER + "".join(format_row(r) for r in rows)).encode()


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def mirror(path: Path, rows: list[Row], written: str | None, archive: Path) -> tuple[str, str | None]:
    """Makes results.tsv show the recorded rows. `written`: the digest of the file as the server
    last wrote it. Rows the file lacks are appended to a file the server wrote; a file anyone else
    changed (or deleted) is moved to `archive` and written again whole. Returns the digest of the
    file now and, when it had been changed by hand, what was found and done."""
    want = render(rows)
    have = read_plain(path)
    if have == want:
        return digest(want), None
    ours = digest(have) == written
    if ours and have is not None and want.startswith(have) and have.endswith(b"\n"):
        _append_bytes(path, want[len(have):])
        return digest(want), None
    notice = None
    if not ours and have is not None:
        kept = _archive_copy(have, archive)
        lines = want.decode().split("\n")[1:]
        found = have.decode("utf-8", errors="replace").split("\n")[1:]
        missing = len({line for line in lines if line} - set(found))
        extra = len({line for line in found if line.strip()} - set(lines))
        notice = (f"{LEDGER_NAME} was changed outside the server ({missing} recorded row(s) missing or altered, "
                  f"{extra} line(s) the server never wrote): the server's own records decide, so it was written "
                  f"again from them, and the file found is kept at {kept}. A run managed outside the server is "
                  "logged with log_result.")
    elif not ours:
        notice = (f"{LEDGER_NAME} was deleted outside the server: it was written again from the server's own "
                  "records, which decide.")
    replace_bytes(path, want)
    return digest(want), notice


def _archive_copy(data: bytes, archive: Path) -> str:
    make_folder(archive)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        target = archive / (f"results-edited-{stamp}.tsv" if k == 0 else f"results-edited-{stamp}-{k}.tsv")
        try:
            with open(target, "xb") as f:  # never overwrites an earlier copy
                f.write(data)
            return str(target.relative_to(archive.parent.parent))
        except FileExistsError:
            continue
    raise Refusal(f"Too many copies named results-edited-{stamp}*.tsv in {archive}.")


def replace_bytes(path: Path, data: bytes) -> None:
    """path holds data, whole or not at all (replace_with)."""
    replace_with(path, io.BytesIO(data))


def replace_with(path: Path, source) -> None:
    """path holds what the file object source holds, whole or not at all (a temp file beside it, flushed,
    then renamed). The temp file is made new under an unguessable name (mkstemp: O_EXCL), never opened
    where it lies: a FIFO planted at a name the agent can predict blocked the open, under the state lock."""
    make_folder(path.parent)
    if _is_folder(path):  # os.replace cannot replace a folder: every call failed while one lay at a record's name
        move_aside(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, RECORD_MODE)
            shutil.copyfileobj(source, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_folder(path: Path) -> bool:
    try:
        return stat_module.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def make_folder(path: Path) -> None:
    """path as a folder of the server's (its records, their archive); something else at its name (a file) is
    moved aside first: mkdir failed there in every call."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        move_aside(path)
        path.mkdir()


def move_aside(path: Path) -> None:
    """What lies at path (the agent's: a folder where a record goes, a file where a folder goes) is moved into a
    fresh folder beside it, kept as it was (never followed, never deleted)."""
    holder = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".moved")
    os.rename(path, Path(holder) / path.name)


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
    """The best: the last kept row, what the research branch holds and status() names. Not the lowest
    keep: a keep moves the best, a worse one too, and a lower row may be the agent's own number."""
    return next((r for r in reversed(rows) if r.status == "keep"), None)
