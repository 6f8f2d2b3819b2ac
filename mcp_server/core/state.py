"""The server's own memory, in <workspace>/.research-loop/: state.json and two locks.

- state.json is changed only inside `transaction()`: a thread lock plus an exclusive flock on
  state.lock, so two servers on one workspace (two sessions, stdio plus HTTP) never interleave a
  load-modify-save, and each write goes through a temporary file of its own (pid and thread in
  its name), fsync and rename: a server killed at any moment leaves the old state or the new one.
  A tool call that has saved nothing yet waits at most LOCK_WAIT_S for the locks, then is refused
  (a process holding state.lock would otherwise hang it); the server's own threads wait for good.
- state.json and results.tsv are checked, by the server that owns the workspace, against what it
  last wrote (kept in its memory, and in records/ under the git directory for its successor)
  before each use: a change it did not make (a run without a sandbox, an agent's edit) is never
  believed. The file found is archived, the server's own copy put back, and the next answer says
  so. The ledger's rows live in state.json; results.tsv is written from them (mcp_server/core/ledger.py).
- owner.lock is held (flock) by the one server that runs experiments in the workspace, for as
  long as it lives. The kernel drops a flock when its process dies, however it dies, so "is the
  owner alive" needs no pid bookkeeping: a server that can take the lock knows the previous
  owner is gone and takes over its runs.
"""
import contextlib
import contextvars
import fcntl
import json
import os
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from mcp_server.core import ledger, limits
from mcp_server.core.limits import records_dir
from mcp_server.core.models import Refusal, RunResult

STATE_DIR = ".research-loop"
STATE_FILE = "state.json"
STATE_LOCK = "state.lock"
LOCK_WAIT_S = 30.0  # a tool call's longest wait for the state's locks: a server's own transactions take milliseconds
# the tool call being answered ({"saved": whether it saved the state yet}), set by answering(); anyio's worker threads
# get a copy of the caller's context, a thread the server starts (a run's end, the early stop) none
CALL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("research_loop_call", default=None)
OWNER_LOCK = "owner.lock"
ARCHIVE_DIR = "archive"
LEDGER_DIGEST = "results.sha256"
MAX_FOUND = 10  # changes found that status keeps listing


@contextlib.contextmanager
def answering(call: str):
    """Marks what runs inside as answering a tool call: until it saves the state, its waits for the state's locks
    are bounded, so that it is refused having changed nothing; once it saved, it waits to finish what it began."""
    token = CALL.set({"call": call, "saved": False})
    try:
        yield
    finally:
        CALL.reset(token)


def _bounded() -> bool:
    call = CALL.get()
    return call is not None and not call["saved"]


def _read(path: Path) -> bytes | None:
    return ledger.read_plain(path)  # a FIFO planted there would block every call


def _parse(raw: bytes | None, path: Path) -> dict:
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        data = None
    if not isinstance(data, dict):
        raise Refusal(f"{path} is not valid JSON (edited by hand?): move it away and call "
                      "setup(tag) for a new research branch; results.tsv is untouched.")
    return data


def malformed(data: dict) -> str | None:
    """limits.malformed, and each run's result one the server's model of a result takes (review 80: a forged result's
    val_bpb of "x", or one missing its fields, failed status and wait with an internal error, the owner's too)."""
    if problem := limits.malformed(data):
        return problem
    for key, entry in (data.get("runs") or {}).items():
        try:
            if entry.get("result") is not None:
                RunResult.model_validate(entry["result"])
        except ValidationError as exc:
            return f"run {key}: its result is none the server writes ({', '.join(map(str, exc.errors()[0]['loc']))})"
    return None


def _shape_problem(raw: bytes, lenient: bool = False) -> str | None:
    """What makes bytes read as a state no state the server writes, or None. lenient: None where they are no JSON
    object at all (_parse refuses those itself, saying so)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None if lenient else "not valid JSON"
    if not isinstance(data, dict):
        return None if lenient else "not a JSON object"
    return malformed(data)


def _changed_keys(found: bytes | None, own: bytes) -> str:
    try:
        before, after = json.loads(own), json.loads(found or b"{}")
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(after, dict):
        return "not a JSON object"
    keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not keys:  # review 96: a byte-order mark or spacing added read "(changed: )"
        return "its bytes changed, none of its values"
    return "changed: " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")


def process_start_time(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    current = process_start_time(pid)
    return start_time is None or current is None or current == start_time


class State:
    def __init__(self, workspace: Path):
        self.dir = workspace / STATE_DIR
        self.path = self.dir / STATE_FILE
        self.mutex = threading.RLock()
        self._depth = 0  # transactions nest within a thread: only the outermost takes the flock
        self._lock_fd: int | None = None
        self._owner_fd: int | None = None
        self.records = records_dir(workspace)
        self.copy = self.records / STATE_FILE  # the server's own copy of state.json
        self.ledger = workspace / ledger.LEDGER_NAME
        self._written: bytes | None = None  # state.json as this owner last wrote or checked it
        self._ledger_digest: str | None = None  # results.tsv as this owner last wrote it
        self._ledger_stat: tuple | None = None  # ... and its stat then: an unchanged file is not read again
        self.notices: list[str] = []  # changes found and set right, not yet told in an answer
        self._telling = threading.Lock()  # not the state's mutex: answers never wait for a transaction
        self.found: list[str] = []  # the last MAX_FOUND of them, for status

    # --- state.json ------------------------------------------------------------------
    def load(self) -> dict:
        """The state. The owner believes only what it wrote: a state.json or results.tsv changed by
        anyone else is set right first (other servers only read, so they read the file as it is)."""
        if not self.owned:
            return self._owners_copy() or self._file_as_read()
        raw = _read(self.path)
        if raw is not None and raw == self._written and self._ledger_stat == self._stat_ledger():
            return _parse(raw, self.path)
        with self.mutex:  # a save in flight, a change, or the first look: checked under the lock
            return self._checked(check_ledger=self._depth == 0)

    def read_file(self) -> dict:
        """state.json as it is, believed or not ({} where it is missing; a Refusal where it is no JSON object)."""
        return _parse(_read(self.path), self.path)

    def _owners_copy(self) -> dict | None:
        """What the owner last wrote, as a reader that owns nothing reads it: its copy, out of the working tree
        (review 72: a second session's server read state.json as it was, and its status gave a best forged there
        between the owner's calls). None where there is no readable copy (a server from before copies)."""
        try:
            data = json.loads(_read(self.copy) or b"")
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        problem = malformed(data)  # review 74: a forged copy with a number for a description failed status
        if problem:
            notice = (f"the owner's copy of {STATE_FILE} ({self.copy}) is no state the server writes ({problem}): "
                      f"none of it was believed; {STATE_DIR}/{STATE_FILE} was read instead")
            if notice not in self.notices:  # once per answer, though a call reads the state several times
                self.tell(notice)
            return None
        return data

    def _file_as_read(self) -> dict:
        """state.json as a reader that owns nothing reads it: refused where it is malformed too."""
        data = self.read_file()
        problem = malformed(data)
        if problem:
            raise Refusal(f"{self.path} is no state the server writes ({problem}), nor is its copy: none of it is "
                          "believed. The server that owns the workspace writes both again at its next call; call "
                          "again then.")
        return data

    def _checked(self, check_ledger: bool) -> dict:
        ledger_unchanged = self._written is not None and self._ledger_stat == self._stat_ledger()
        raw = _read(self.path)
        own = self._written if self._written is not None else self._first_copy(raw)
        if own is None:  # nothing written by a server that keeps a copy: the file is the record
            data = _parse(raw, self.path)
            if raw is not None:
                self._write_copy(raw)
        else:
            if raw != own:
                self._restore(raw, own)
            data = _parse(own, self.path)
            self._keep_copy(own)
        self._written = own if own is not None else raw
        if check_ledger and not ledger_unchanged:
            self._check_ledger(data)
        return data

    def _first_copy(self, raw: bytes | None) -> bytes | None:
        """The copy a starting owner believes, or None where state.json is the record. A copy of another shape than
        the server writes (forged while no server ran: a description that is a number) is no record; it made every
        tool fail once believed. state.json is then the record where it is of the server's shape."""
        copy = _read(self.copy)
        problem = copy is not None and _shape_problem(copy)
        if copy is None and raw is not None:  # the copy deleted beside a state.json of another shape: no record
            problem = _shape_problem(raw, lenient=True)
            if problem:
                raise Refusal(f"{self.path} is no state the server writes ({problem}), and the server's copy of it "
                              f"({self.copy}) is missing: none of it is believed. Put back a state the server "
                              "wrote, or move it away and call setup(tag) for a new research branch; results.tsv "
                              "is untouched.")
        if not problem:
            return copy
        if raw is None or _shape_problem(raw):
            raise Refusal(f"neither {self.path} nor the server's copy of it ({self.copy}) is a state the server "
                          f"writes ({problem}): none of it is believed. Put back a state the server wrote, or move "
                          "both away and call setup(tag) for a new research branch; results.tsv is untouched.")
        self._archive(copy, "state-copy-malformed")
        self.tell(f"the server's copy of {STATE_FILE} ({self.copy}) is no state the server writes ({problem}): none "
                  f"of it was believed; {STATE_DIR}/{STATE_FILE} was taken as the record and the copy written again "
                  f"(the copy found is kept in {STATE_DIR}/{ARCHIVE_DIR}).")
        return None

    def _archive(self, found: bytes, kind: str) -> str:
        archive = self.dir / ARCHIVE_DIR
        ledger.make_folder(archive)
        target = archive / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}.json"
        target.write_bytes(found)
        return target.name

    def _restore(self, found: bytes | None, own: bytes) -> None:
        """state.json as the server wrote it, back in place; the file found, archived."""
        what = "deleted" if found is None else _changed_keys(found, own)
        where = ""
        if found is not None:
            where = f"; the file found is kept at {STATE_DIR}/{ARCHIVE_DIR}/{self._archive(found, 'state-edited')}"
        ledger.replace_bytes(self.path, own)
        self.tell(f"{STATE_DIR}/{STATE_FILE} was changed outside the server ({what}): none of it was believed; "
                  f"the server's own copy is back in place{where}.")

    def _keep_copy(self, own: bytes) -> None:
        """The copy a successor will believe holds what this server wrote, not a forgery made beside
        a forged state.json (memory told the forgery apart; a restart would not)."""
        if self._written is not None and _read(self.copy) != own:
            self._write_copy(own)
            self.tell(f"the server's copy of {STATE_FILE} (in {self.records}) was changed outside the server: "
                      "none of it was believed; it was written again.")

    def load_with_copy(self) -> dict:
        """load(), and the owner's copy put back where it is not what the owner wrote (between transactions only a
        reader of the copy sees it: the report, the runner, the hooks), said in the next answer."""
        data = self.load()
        with self.mutex:
            if self.owned and self._written is not None:
                self._keep_copy(self._written)
        return data

    def _check_ledger(self, data: dict) -> None:
        if "rows" not in data:
            if not self.ledger.exists():
                return
            # a research run begun before the server kept the rows: its ledger becomes the record, once
            rows = [[r.commit, r.val_bpb, r.memory_gb, r.status, r.description]
                    for r in ledger.read_rows(self.ledger)[0]]
            if rows:
                data["rows"] = rows
                self.save(data)
            else:
                self._ledger_stat = self._stat_ledger()  # a bare header: nothing to adopt, no state to write
            return
        if self._ledger_digest is None:
            self._ledger_digest = (_read(self.records / LEDGER_DIGEST) or b"").decode() or None
        written, notice = ledger.mirror(self.ledger, ledger.rows_of(data), self._ledger_digest, self.dir / ARCHIVE_DIR)
        if written != self._ledger_digest:
            ledger.replace_bytes(self.records / LEDGER_DIGEST, written.encode())
            self._ledger_digest = written
        self._ledger_stat = self._stat_ledger()
        if notice:
            self.tell(notice)

    def _stat_ledger(self) -> tuple | None:
        try:
            stat = self.ledger.stat()
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino  # ctime: no one can set it back

    def tell(self, notice: str) -> None:
        with self._telling:
            self.notices.append(notice)
            self.found = (self.found + [f"{time.strftime('%H:%M:%S')} {notice}"])[-MAX_FOUND:]

    def take_notices(self) -> list[str]:
        """What was found since the last answer; each is told once (status lists the last few)."""
        with self._telling:
            notices, self.notices = self.notices, []
            return notices

    def save(self, data: dict) -> None:
        """The server's copy first, then state.json, then results.tsv from the rows: a server killed
        in between leaves a copy that its successor puts back."""
        raw = json.dumps(data).encode()  # no indent: json's fast encoder (a night's rows are thousands)
        self._write_copy(raw)
        self._written = raw
        ledger.replace_bytes(self.path, raw)
        if "rows" in data and self.owned:
            self._check_ledger(data)

    def _write_copy(self, raw: bytes) -> None:
        ledger.replace_bytes(self.copy, raw)

    @contextlib.contextmanager
    def transaction(self):
        """Exclusive across threads and processes; yields the state, saved on exit if changed.
        A refusal raised inside leaves the file as it was."""
        with self._held_mutex():
            self._depth += 1
            try:
                if self._depth == 1:
                    ledger.make_folder(self.dir)
                    self._lock_fd = os.open(self.dir / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
                    self._flock(self._lock_fd)
                # before each decision: what the owner reads is what it wrote, ledger included
                data = self._checked(check_ledger=self._depth == 1) if self.owned else self.load()
                before = json.dumps(data, sort_keys=True)
                yield data
                if json.dumps(data, sort_keys=True) != before:
                    self.save(data)
                    if CALL.get() is not None:
                        CALL.get()["saved"] = True
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing drops the flock
                    self._lock_fd = None

    @contextlib.contextmanager
    def _held_mutex(self):
        if not self.mutex.acquire(timeout=LOCK_WAIT_S if _bounded() else -1):
            raise Refusal(f"The server is busy: another of its calls has held its state for {LOCK_WAIT_S:g} s. "
                          "Nothing was changed: call again shortly (status() shows what runs).")
        try:
            yield
        finally:
            self.mutex.release()

    def _flock(self, fd: int) -> None:
        """The state lock, waited for as long as it takes by the server's own threads (a run's end is recorded
        whenever the lock comes) and by a tool call that saved already, at most LOCK_WAIT_S by one that has not,
        which a process holding the lock would otherwise hang (found at stop 45: `flock state.lock sleep 1d`)."""
        if not _bounded():
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    self._lock_fd = None
                    raise self._locked() from None
                time.sleep(0.05)

    def _locked(self) -> Refusal:
        lock = self.dir / STATE_LOCK
        return Refusal(f"The server's state is locked: {lock} was not free for {LOCK_WAIT_S:g} s (another process "
                       "holds it: a command that took it, such as flock, or a second server stuck in a transaction). "
                       f"Nothing was changed. `fuser -v {lock}` names the process: end it, then call again.")

    def update(self, **changes) -> dict:
        with self.transaction() as data:
            data.update(changes)
            return data

    # --- ownership -------------------------------------------------------------------
    def try_own(self) -> bool:
        """Takes the owner lock if no live server holds it; True if this process holds it now."""
        with self.mutex:
            if self._owner_fd is not None:
                return True
            ledger.make_folder(self.dir)
            fd = os.open(self.dir / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "start": process_start_time(os.getpid())}).encode())
            self._owner_fd = fd
            return True

    @property
    def owned(self) -> bool:
        return self._owner_fd is not None

    def owner(self) -> dict | None:
        """The owning server's pid record, as it wrote it (None if unreadable: a FIFO or a giant planted
        in its place is read without waiting, and not believed)."""
        try:
            data = json.loads(ledger.read_plain(self.dir / OWNER_LOCK) or b"")
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        with self.mutex:
            if self._written is not None and self.owned:
                self._keep_copy(self._written)  # what the next owner starts from
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None
