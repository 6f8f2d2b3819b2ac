"""Reading train.py output: the summary block, the '\r'-separated progress lines, the tail.

The format is upstream autoresearch's: progress lines overwrite each other with '\r',
then a newline and a block starting with '---' holding `key: value` lines.
"""
import errno
import math
import os
import re
import stat

from pydantic import ValidationError

from mcp_server.core.models import Progress, Summary

PROGRESS_RE = re.compile(
    r"step (\d+) \(([\d.]+)%\) \| loss: (\S+) \|.*?(?:dt: (\d+)ms.*?)?remaining: (\d+)s"
)
TAIL_LINES = 30
TAIL_LINE_CHARS = 160  # long lines (tracebacks with tensors) would flood an answer
TAIL_BYTES_FOR_PROGRESS = 4096  # the last progress line always fits in this much
TEXT_FIELDS = {"compile_cache", "budget_clock"}  # summary values kept as text, not numbers
MAX_TEXT_BYTES = 80 * 2**20  # of a whole log read: the worker keeps at most 64 MiB of head plus a tail


def parse_summary(text: str) -> Summary | None:
    """The last summary block in the text, or None if there is none."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return None
    values = {}
    for line in lines[starts[-1] + 1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip() in Summary.model_fields:
            values[key.strip()] = value.strip() if key.strip() in TEXT_FIELDS else _number(value.strip())
    if "val_bpb" not in values:
        return None
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return Summary(**values)
    except ValidationError as exc:  # a whole number printed as a fraction (num_steps: 2.5): left out, as text is
        refused = {error["loc"][0] for error in exc.errors()}
        return Summary(**{k: v for k, v in values.items() if k not in refused})


def _number(text: str) -> float | int | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def last_progress(text: str) -> Progress | None:
    """The most recent progress line: the lines are separated by '\r', not newlines."""
    for segment in reversed(re.split(r"[\r\n]", text)):
        match = PROGRESS_RE.search(segment)
        if match:
            return _progress(match)
    return None


def _progress(match: re.Match) -> Progress:
    step, percent, loss, dt_ms, remaining = match.groups()
    return Progress(step=int(step), percent=float(percent), loss=_float_or_nan(loss),
                    remaining_s=int(remaining), dt_ms=int(dt_ms) if dt_ms else None)


def all_progress(text: str) -> list[Progress]:
    """Every progress line in the text, oldest first: a run's loss curve so far."""
    return [_progress(match) for match in filter(None, map(PROGRESS_RE.search, re.split(r"[\r\n]", text)))]


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def failed(text: str) -> bool:
    """train.py prints FAIL on its own line for a NaN or exploding loss."""
    return any(line.strip() == "FAIL" for line in text.splitlines())


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last lines as a person would see them: of each '\r' run only the last frame."""
    shown = []
    for line in text.rstrip("\n").split("\n")[-lines:]:
        frame = line.rstrip("\r ").rsplit("\r", 1)[-1].rstrip()
        if len(frame) > TAIL_LINE_CHARS:
            frame = frame[:TAIL_LINE_CHARS] + "..."
        shown.append(frame)
    return "\n".join(shown)


def open_plain(path):
    """The file for reading, or None where it is not a plain file (a FIFO or device planted in
    runs/ would block or never end); opening never blocks."""
    f = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        return f
    f.close()
    return None


def read_text(path) -> str:
    """The whole log with its '\r' intact (text mode would turn them into newlines), at most
    MAX_TEXT_BYTES (the worker caps a log below that); a log that is not a plain file is empty."""
    return read_bytes(path).decode("utf-8", errors="replace")


def read_bytes(path) -> bytes:
    """The log's bytes as read_text reads them (what the server digests: core/history.py)."""
    f = open_plain(path)
    if f is None:
        return b""
    with f:
        return f.read(MAX_TEXT_BYTES)


def read_for_upload(path) -> tuple[bytes | None, str | None]:
    """A run's log as tracking uploads it: only a plain file at that very path, not what a symbolic
    link the agent put in its place points to (~/.netrc, the offline seed), opened without waiting,
    at most MAX_TEXT_BYTES. (its bytes, None); (None, why not) where it is no such file; (None, None)
    where there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "it is a symbolic link, not the log the worker wrote"
        return None, f"it cannot be read ({exc.strerror})"
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "it is not a plain file"
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        return None, f"it is over {MAX_TEXT_BYTES >> 20} MiB, more than the worker writes"
    return data, None


def read_tail_bytes(path, size: int = TAIL_BYTES_FOR_PROGRESS) -> str:
    """The end of a (possibly growing, possibly huge) log without reading all of it."""
    f = open_plain(path)
    if f is None:
        return ""
    with f:
        f.seek(0, 2)
        end = f.tell()
        f.seek(max(0, end - size))
        return f.read().decode("utf-8", errors="replace")
