"""Runs one training command for the research loop and reports how it ended.

    python worker.py --log FILE --report FILE --timeout SECONDS [--watch-stdin] [--cpus 0,1]
        [--sandbox JSON [--unsandboxed]] [--export FILE --val-shard FILE --evaluate JSON] -- COMMAND...
    python worker.py --warm --watch-stdin [--cpus ...] [--sandbox JSON ...] -- PYTHON SCRIPT.py

--log - writes the output to this process's own stdout instead (a cluster job, whose engine keeps its stdout as the
job's log). A plain script with the standard library only: it starts fast and runs wherever the training runs (this
machine's slots, a Ray or SLURM node). It

- makes itself the child subreaper (Linux), so a descendant that double-forks or starts a new
  session is re-parented here instead of escaping, and kills every descendant when the command
  ends: no process outlives its run, and the report says how many were left behind;
- copies the command's output into its own log file, capped (a run that prints gigabytes keeps
  the head and the tail: bounded disk and memory, and the summary block is in the tail);
- enforces the hard timeout (SIGTERM to the whole tree, SIGKILL after a grace period), and stops
  the same way on SIGTERM (a cancel) or, with --watch-stdin, when its parent, the server, dies
  (the socket on stdin reaches end of file);
- runs the command in a sandbox (--sandbox: the workspace, the harness, the prepared cache and the
  environments read-only, the run's own folders writable; bubblewrap, or sandbox-exec on macOS),
  so the training can write neither the server's records nor the harness; where no sandbox can
  run, it refuses to start the command unless told --unsandboxed (the user's opt-in);
- copies what the harness's evaluation reads (the validation shard, the tokenizer) before the
  training starts, checking each against the content the server pinned, and hands the copies to
  the evaluator as open files that have no name: nothing the run does later can change them;
- hides the validation shard from a run the harness scores (validation_hidden), or, where nothing
  can hide it, watches it (inotify): an open before the harness took its own copy of the exported
  model means the model may have seen the validation data;
- runs the harness's separate evaluation of its copy of the exported model (--evaluate), with its
  own timeout, as soon as the model is exported (train.py waits for its number);
- measures the wall time itself, and writes one JSON report, atomically, with what it saw.

--warm (the server's pool starts the slot's next worker ahead, issue 27): the sandbox and, inside it, the command's
interpreter on warm_train.py (started without site, which warm_train.py then does through the server's importer),
which imports torch and waits; then one JSON line on stdin, {"argv": this script's options for the run, "env": the
run's environment} (with --files-on-stdin, a second line: the commit's files, which the interpreter copies, checked,
and runs from: checkout_copy.py; a cold worker reads that line alone), and the run goes on as above with that
interpreter running the script (the timeout and the wall time count from then). A lost warm interpreter is replaced
by a fresh one; end of file instead of the line: it was never used, and it ends with everything it started.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import argparse
import collections
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

try:
    from mcp_server.scripts import compile_programs as programs, inotify_events, sandbox
    from mcp_server.scripts.process_tree import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, kill_everything, \
        left_behind, prctl, signal_tree
    from mcp_server.scripts.harness_eval import MARK, HarnessEvaluation, on_this_device, open_log, socket_channel
    from mcp_server.scripts.trusted_import import read_in_background
except ImportError:  # run as a script, or on a node: sandbox.py, harness_eval.py... are beside this file
    import compile_programs as programs
    import inotify_events
    import sandbox
    from process_tree import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, kill_everything, left_behind, prctl, \
        signal_tree
    from harness_eval import MARK, HarnessEvaluation, on_this_device, open_log, socket_channel
    from trusted_import import read_in_background

TERM_GRACE_SECONDS = 5.0
MAX_LOG_BYTES = 64 * 2**20  # head of a runaway log kept on disk
TAIL_BYTES = 1 * 2**20  # and its tail, kept in memory once the head is full
READ_CHUNK = 65536
EXPORT_ENV = "RESEARCH_LOOP_EXPORT"  # where the harness writes the trained model (nanochat/export.py)
ANSWER_ENV = "RESEARCH_LOOP_ANSWER"  # where this worker writes the harness's number for train.py to print
# set for a run whose sandbox hides the validation shard (validation_hidden); the server's own setting shows it
VAL_HIDDEN_ENV, CROSSCHECK_ENV = "RESEARCH_LOOP_VAL_HIDDEN", "AUTORESEARCH_EVAL_CROSSCHECK"
COMPILE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # where a run compiles (nanochat/compile.py): its own (compile_programs)
DATA_ORDER_ENV = "AUTORESEARCH_DATA_ORDER"  # which stretch of the data a rerun trains on (nanochat/dataloader.py)
# before the SHA-256 of the final report, on the server's socket (final_report; executors/executor.py reads it)
REPORT_DIGEST_MARK = b"report-sha256 "
WARM_STUB = Path(__file__).resolve().parent / "warm_train.py"  # the interpreter a --warm worker starts ahead
# The worker's stdin as it was started: the server's socket (the hand-over line, the end of file of a
# server gone, and the final report's digest back), moved by server_channel() to a descriptor that no
# child inherits
SERVER_FD: int | None = 0


class LogPump(threading.Thread):
    """Copies the command's output to the log: the first max_bytes, then only a rolling tail."""

    def __init__(self, source, log_path: Path, max_bytes: int):
        super().__init__(daemon=True, name="log-pump")
        self.source, self.max_bytes = source, max_bytes
        self.log = open_log(log_path)
        self.last = collections.deque(maxlen=64)  # the latest chunks, for --report-tail
        self.written = 0
        self.dropped = 0
        self.tail = collections.deque()
        self.tail_bytes = 0

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.source, READ_CHUNK)
            except OSError:
                break
            if not chunk:
                break
            self.last.append(chunk)
            room = self.max_bytes - self.written
            if room > 0:
                self.log.write(chunk[:room])
                self.written += min(room, len(chunk))
                chunk = chunk[room:]
            if chunk:
                self.tail.append(chunk)
                self.tail_bytes += len(chunk)
                while self.tail_bytes - len(self.tail[0]) >= TAIL_BYTES:
                    self.dropped += len(self.tail[0])
                    self.tail_bytes -= len(self.tail.popleft())

    def close(self) -> None:
        if self.tail:
            if self.dropped:
                self.note(f"{self.dropped} bytes of output dropped here (log capped at {self.max_bytes} bytes)")
            self.log.write(b"".join(self.tail))
        self.log.close()

    def note(self, text: str) -> None:
        self.log.write(f"\n{MARK} {text}\n".encode())

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def last_text(self, size: int) -> str:
        return b"".join(self.last)[-size:].decode("utf-8", errors="replace")


def sandboxed(command: list[str], spec: dict, cwd: str, private: dict | None = None) -> tuple[list[str], bool]:
    """The command in this machine's sandbox (sandbox.wrap), or as it is where spec is empty or no
    sandbox is usable: the caller refuses that unless the user opted in."""
    if not spec:
        return command, False
    command, kind = sandbox.wrap(command, spec, cwd, private)
    return command, kind is not None


def validation_hidden(args: argparse.Namespace) -> tuple[dict, bool]:
    """(the sandbox's spec for this run, whether it hides the validation shard). Where the harness scores the
    run's export, a sandbox hides the shard from the run altogether: a run that read it, even after its export,
    could leave its text where later runs read (the compile cache, its log, its slot's folder) for them to train
    on, verified (review 87). Only AUTORESEARCH_EVAL_CROSSCHECK=1 in the server's environment (a platform's
    check: train.py evaluates in-process too) shows it, as a watched copy. Without a usable sandbox nothing
    hides it: the shard is watched instead."""
    spec = args.sandbox or {}
    # --val-shard comes only where the harness scores the export (--evaluate is given at a warm worker's hand-over)
    scored = bool(args.export and args.val_shard and args.val_shard.exists())
    if not (scored and spec and sandbox.usable()[0]) or os.environ.get(CROSSCHECK_ENV) == "1":
        return args.sandbox, False
    return dict(spec, hidden=[*spec.get("hidden", []), str(args.val_shard)]), True


def private_val_copy(val_shard: Path, report: Path) -> Path | None:
    """A copy of the validation shard for this run alone, where bubblewrap can show it in place of
    the shared one: inotify reports every process's opens of a file, so with several slots a watch
    on the shared shard would blame a run for another run's evaluation."""
    if sandbox.usable()[0] != sandbox.BUBBLEWRAP:
        return None
    # under /tmp, which every sandbox replaces with its own: no other run can read it unwatched
    copy = Path(tempfile.mkdtemp(prefix="research-loop-val-", dir="/tmp")) / val_shard.name
    shutil.copyfile(val_shard, copy)
    return copy


def device_name(env: dict) -> str:
    """The accelerator this run sees, for the run's record: a GPU's name, else the CPU's."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    try:
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        if visible:
            query += ["-i", visible.split(",")[0]]
        out = subprocess.run(query, capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def write_report(path: Path, report: dict) -> bytes:
    """The report written (its bytes returned): to a temporary file first, then put in place whole."""
    data = json.dumps(report).encode()
    # a name no one can guess: a planted file or folder at a predictable one would make this write fail
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return data


def server_channel():
    """The worker's stdin (the server's socket) kept on a descriptor of its own that no child process
    inherits, /dev/null in its place: on that socket the server believes the last report digest it
    reads, and any program the worker starts (git, nvidia-smi, a program .git/config names) would
    otherwise inherit it as its stdin and could write one. Returns it as a file for reading (None
    where the worker has no stdin)."""
    global SERVER_FD
    try:
        SERVER_FD = os.dup(0)  # not inheritable (PEP 446)
    except OSError:
        SERVER_FD = None
        return None
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
    finally:
        os.close(null)
    return open(SERVER_FD, "rb", closefd=False)


def final_report(args, report: dict) -> None:
    """The run's last report, and with --watch-stdin its SHA-256 sent back to the server on stdin (the
    server's socket, which no other process can open): the report lies in runs/, which the agent can
    write between this worker's exit and the server's read, and the server believes only a report
    with this digest."""
    data = write_report(args.report, report)
    if args.watch_stdin and SERVER_FD is not None:
        try:
            os.write(SERVER_FD, REPORT_DIGEST_MARK + hashlib.sha256(data).hexdigest().encode() + b"\n")
        except OSError:
            pass  # the server is gone: no one reads it


def parse_args(argv):
    p = argparse.ArgumentParser(description="Run one training command with a hard timeout and a report.")
    p.add_argument("--log", type=Path)
    p.add_argument("--report", type=Path)
    p.add_argument("--timeout", type=float)
    p.add_argument("--grace", type=float, default=TERM_GRACE_SECONDS)
    p.add_argument("--max-log-bytes", type=int, default=MAX_LOG_BYTES)
    p.add_argument("--watch-stdin", action="store_true", help="stop the run when stdin reaches end of file")
    p.add_argument("--cpus", help="comma-separated CPU ids the command may use")
    p.add_argument("--sandbox", type=json.loads, default={}, help="JSON: read-only and writable paths (bubblewrap)")
    p.add_argument("--unsandboxed", action="store_true",
                   help="the user accepts running the command without a sandbox where none can run here")
    p.add_argument("--export", type=Path, help="where the harness exports the trained model")
    p.add_argument("--val-shard", type=Path, help="the validation shard, watched until the export appears")
    p.add_argument("--val-shared", action="store_true",
                   help="other runs read the validation shard too: watch only a private copy (needs bubblewrap)")
    p.add_argument("--evaluate", type=json.loads, help="JSON: the harness evaluation to run after training")
    p.add_argument("--compile-cache", type=Path,
                   help="the shared compile cache, read-only to runs: under bubblewrap a run compiles in a folder of "
                        "its own, filled from its program's folder in there and saved back to it (compile_programs.py)")
    p.add_argument("--compile-program", help="the run's program: its train.py's git blob id")
    p.add_argument("--compile-seed", help="the program whose folder a new program's starts from: its best's")
    p.add_argument("--warm-evaluator-fd", type=int,
                   help="a socket to the slot's warm evaluator, which evaluates the export instead of a cold one")
    p.add_argument("--report-tail", type=int, default=0, help="bytes of the output's end to put in the report")
    p.add_argument("--data-folder", help="device:inode:path of the prepared data folder the server checked: the "
                                         "folder a bubblewrap sandbox shows at that path must be that one")
    p.add_argument("--data-order", type=int, default=0,
                   help="train on another stretch of the data (a rerun: nanochat/dataloader.py)")
    p.add_argument("--warm", action="store_true",
                   help="start the sandbox and the command's interpreter now; the run's options come on stdin")
    p.add_argument("--trusted-import", action="store_true",
                   help="run the command's script as --warm does (warm_train.py, through the server's importer, "
                        "which reports what it compiled), handing the run over at once")
    p.add_argument("--files-on-stdin", action="store_true",
                   help="with --warm or --trusted-import: the run's commit's files come on stdin after the options, "
                        "one JSON line {path: [git mode, SHA-256, size]}; warm_train.py runs from its own copy of them")
    p.add_argument("--bytecode-fd", type=int,
                   help="with --warm or --trusted-import: the server's sealed bytecode archive, which the "
                        "interpreter imports with (bytecode_archive.py)")
    args = parse_with_command(p, argv)
    if not args.warm and None in (args.log, args.report, args.timeout):
        p.error("--log, --report and --timeout are required (but with --warm, where the run's options bring them)")
    return args


def parse_with_command(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The options, then `-- COMMAND...` (the node's script shares this: its command runs under a worker)."""
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given")
    return args


def start_warm(command: list[str], spec: dict, private: dict | None, output: int, in_child,
               archive: int | None = None):
    """The command's interpreter on warm_train.py, in the sandbox (as the command itself would be),
    importing torch now (with the server's bytecode archive, where given) and then waiting on a socket:
    (its process, the socket's end for the hand-over). Not a pipe: any process of the same user outside
    the sandbox could open a pipe's /proc/PID/fd/N and hand the interpreter a script of its own; a
    socket's cannot be opened (ENXIO)."""
    write_fd, read_fd = socket_channel()
    archived = [] if archive is None else [archive]
    # without site: warm_train.py does its work once the server's importer is installed (the .pth files' imports)
    stub, _ = sandboxed([command[0], "-S", str(WARM_STUB), str(read_fd), *map(str, archived)], spec, os.getcwd(),
                        private)
    try:
        proc = subprocess.Popen(stub, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                pass_fds=(read_fd, *archived), start_new_session=True, preexec_fn=in_child)
    except OSError:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    proc.imported = read_in_background(write_fd)
    return proc, write_fd


def handed_args(line: bytes, started: argparse.Namespace) -> tuple[argparse.Namespace, dict] | None:
    """The run's options and environment from the hand-over line, or None: no line, or one that
    changes what the waiting worker was started with (its command, sandbox, inputs, CPUs): the
    server's line never does (the pool's key holds them), a line written by anyone else may."""
    try:
        handed = json.loads(line)
        args = parse_args(handed["argv"])
        env = handed["env"]
    except (ValueError, KeyError, TypeError, SystemExit):
        return None
    fixed = ("command", "sandbox", "unsandboxed", "val_shard", "val_shared", "cpus", "files_on_stdin", "compile_cache")
    if not isinstance(env, dict) or any(getattr(args, k, None) != getattr(started, k, None) for k in fixed):
        return None
    return args, env


def hand_over(warm: subprocess.Popen, channel: int, command: list[str], env: dict,
              wait: float, files: dict | None = None, into: str | None = None) -> tuple[bool, dict | None]:
    """The run's script, folder, environment and commit's files (copied into `into`, checked, and run from
    there: checkout_copy.py) to the waiting interpreter once it has finished its imports (within `wait`
    seconds): (handed over, the digests of the sources it compiled, written as it compiled each, before
    that module's code ran, and read as they come: trusted_import.py)."""
    warm.imported.join(wait)
    with socket.socket(fileno=channel) as sock:
        if warm.poll() is not None or warm.imported.is_alive() or warm.imported.digests is None:
            return False, None
        try:
            sock.sendall(json.dumps({"argv": command[1:], "cwd": os.getcwd(), "env": env, "files": files,
                                     "into": into}).encode() + b"\n")
        except OSError:
            return False, None
    return True, warm.imported.digests


def received_files(args, from_server, bubblewrap: bool) -> tuple[dict | None, str | None]:
    """With --files-on-stdin, (the run's commit's files, the server's line after the options; where its interpreter
    copies them: the sandbox's private /tmp under bubblewrap, else a folder of this worker's), else (None, None)."""
    try:
        files = json.loads(from_server.readline() or "null") if args.files_on_stdin and from_server else None
    except ValueError:
        files = None
    if not isinstance(files, dict):
        return None, None
    return files, sandbox.RUN_COPY if bubblewrap else tempfile.mkdtemp(prefix="research-loop-commit-")


def not_started(args, message: str, exit_code: int, started_at: float, subreaper: bool) -> int:
    """The log's line and the report of a command that never ran."""
    with open_log(args.log) as log:
        log.write(f"{MARK} {message}\n".encode())
    final_report(args, {"exit_code": exit_code, "timed_out": False, "stopped": None, "started_at": started_at,
                        "wall_seconds": 0.0, "stray_processes": 0, "unkillable": 0,
                        "log_truncated": False, "host": socket.gethostname(),
                        "device": device_name(dict(os.environ)), "subreaper": subreaper})
    return exit_code


def main(argv=None) -> int:
    args = parse_args(argv)
    from_server = server_channel()
    # the first reason wins; a plain list, because a signal handler that takes a lock (Event.set) can
    # deadlock against the main thread it interrupted
    stop_reason = []
    signal.signal(signal.SIGTERM, lambda *_: stop_reason.append("cancelled"))
    subreaper = prctl(PR_SET_CHILD_SUBREAPER, 1)
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    read_end, write_end = os.pipe()
    started_at, t0 = time.time(), time.monotonic()

    def in_child():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # should this worker itself be killed
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    val_watch = val_copy = evaluation = evaluated = stub = None
    spec, hide_val = validation_hidden(args)
    hid = sandbox.identity(args.val_shard) if hide_val else None  # what the sandbox made now hides
    # no probe of the sandbox where none is asked for: its namespace's last process is reparented here, a zombie
    spec, compiling = programs.run_folder(args.compile_cache, spec,
                                          bool(spec) and sandbox.usable()[0] == sandbox.BUBBLEWRAP)
    if compiling is not None:  # inherited by the interpreter started now, warm or cold
        os.environ[COMPILE_ENV] = str(compiling)
    watch_val = bool(args.export and args.val_shard and args.val_shard.exists()) and not hide_val
    if watch_val and args.sandbox:
        val_copy = private_val_copy(args.val_shard, args.report)
    private = {args.val_shard: val_copy} if val_copy else None
    command, in_sandbox = sandboxed(args.command, spec, os.getcwd(), private)
    if args.sandbox and not in_sandbox and not args.unsandboxed:  # never without a sandbox unasked
        os.close(write_end)
        if args.warm:  # the pool starts this run's worker cold, which says why in the run's log
            return 126
        return not_started(args, f"refused to run {args.command[0]!r}: {sandbox.missing()}", 126, started_at,
                           subreaper)
    env = dict(os.environ)
    # A private copy is the run's alone (the harness copies the shared shard): watched from before any
    # interpreter starts, as a warm one's imports come before its run. The shared shard is watched
    # only once the harness has its copies, below.
    if watch_val and val_copy:
        try:
            val_watch = inotify_events.start_watch(val_copy)
        except OSError as exc:
            os.close(write_end)
            shutil.rmtree(val_copy.parent, ignore_errors=True)
            return 126 if args.warm else not_started(args, f"refused to run {args.command[0]!r}: {exc}", 126,
                                                     started_at, subreaper)
    started_warm = args.warm  # the hand-over's options below are the run's own, without --warm
    if args.warm:
        stub, stub_pipe = start_warm(args.command, spec, private, write_end, in_child, args.bytecode_fd)
        line = from_server.readline() if from_server is not None else b""
        handed = handed_args(line, args)
        if handed is None:  # never used (the server threw it away or is gone), or not the server's line
            os.close(stub_pipe)
            os.close(write_end)
            kill_everything(stub.pid)
            if val_watch is not None:
                val_watch.stop()
            if val_copy is not None:
                shutil.rmtree(val_copy.parent, ignore_errors=True)
            if compiling is not None:
                programs.release(compiling)
            return 0 if not line else 2
        args, env = handed
        started_at, t0 = time.time(), time.monotonic()  # the run starts now, not when its interpreter did
        if validation_hidden(args)[1] and sandbox.identity(args.val_shard) != hid:  # its sandbox does not hide it
            kill_everything(stub.pid)
            return not_started(args, "refused: the validation shard came back or was replaced after this run's "
                               "interpreter started, which its sandbox then shows; run it again", 126, started_at,
                               subreaper)
    # a bubblewrap run copies its commit into, and exports from, its private /tmp, which the agent cannot write
    bubblewrap = in_sandbox and sandbox.usable()[0] == sandbox.BUBBLEWRAP
    files, into = received_files(args, from_server, bubblewrap)
    if hide_val:  # prepare.evaluate_bpb then says why a run the harness could not score has no number
        env[VAL_HIDDEN_ENV] = "1"
    if compiling is not None:  # filled now, when the run's program is known (a warm worker started before)
        env[COMPILE_ENV] = str(compiling)
        programs.fill(compiling, args.compile_cache / programs.FOLDER, args.compile_program, args.compile_seed)
    if args.data_order:
        env[DATA_ORDER_ENV] = str(args.data_order)
    else:  # the usual order, whatever the server's environment named (review 80: a run recorded on it trained on 1)
        env.pop(DATA_ORDER_ENV, None)
    if args.export:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        export = Path(sandbox.RUN_EXPORT) if bubblewrap and args.evaluate else args.export  # what the harness scores
        env[EXPORT_ENV] = str(export)
        if args.evaluate:
            answer = export.with_name(export.name + ".answer.json")
            warm = socket.socket(fileno=args.warm_evaluator_fd) if args.warm_evaluator_fd is not None else None
            evaluation = HarnessEvaluation(on_this_device(args.evaluate, os.environ), args.log, export, answer,
                                           warm, private=bubblewrap)
            env[ANSWER_ENV] = str(answer)
    warm_start, handed, imported, why = False, None, None, None
    try:
        if watch_val and not val_copy and not args.val_shared:
            val_watch = inotify_events.start_watch(args.val_shard)
        # A harness run's interpreter says what it compiled before it is handed the run; one that does not (exited,
        # killed, hung) is never replaced by a plain one, which compiles an edit unseen: a lost warm one by a fresh one
        if args.files_on_stdin and files is None:
            raise OSError("the server never sent the run's commit's files")
        for attempt in range(2 if started_warm else 1 if args.trusted_import else 0):
            if stub is None:
                stub, stub_pipe = start_warm(args.command, spec, private, write_end, in_child, args.bytecode_fd)
            handed, imported = hand_over(stub, stub_pipe, args.command, env, args.timeout - (time.monotonic() - t0),
                                         files, into)
            if handed:
                warm_start = started_warm and attempt == 0
                break
            why = "did not finish its imports" if stub.poll() is None else f"had exited (code {stub.poll()})"
            kill_everything(stub.pid)
            stub = None
        if why and not handed:
            raise OSError(f"its interpreter on warm_train.py {why}, before it said what it compiled "
                          "(scripts/trusted_import.py)")
        child = stub if handed else subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=write_end,
                                                     stderr=write_end, start_new_session=True,
                                                     preexec_fn=in_child, env=env)
    except OSError as exc:
        os.close(write_end)
        if evaluation is not None:
            evaluation.finish(args.grace)
        if compiling is not None:  # filled above, and nothing ran to save: a copy of the program's folder
            programs.release(compiling)
        return not_started(args, f"could not start {args.command[0]!r}: {exc}", 127, started_at, subreaper)
    os.close(write_end)
    # the command's group, for whoever finds this run without its worker (a server restart)
    running = {"running": True, "pid": child.pid, "worker_pid": os.getpid(), "started_at": started_at}
    write_report(args.report, running)
    evaluating, data_problem = False, ""
    pump = LogPump(read_end, args.log, args.max_log_bytes)
    pump.start()
    if args.watch_stdin:
        def watch():
            while from_server is not None and from_server.read(1):
                pass
            stop_reason.append("server gone")
        threading.Thread(target=watch, daemon=True, name="stdin-watch").start()

    timed_out = False
    while child.poll() is None:
        try:
            child.wait(timeout=0.2)  # as a sleep, but the run's end is seen at once
        except subprocess.TimeoutExpired:
            pass
        if stop_reason:
            break
        if evaluation is not None:
            if not evaluation.located:
                evaluation.inside(sandbox.private_root(child.pid))
            evaluation.start_if_exported(val_watch)
            if evaluation.started_at is not None and not evaluating:  # the pool may start the slot's next worker
                evaluating = True
                write_report(args.report, running | {"evaluating": True})
        # one look, while its pid is still the sandbox's (not reaped): the binds as they stand then (docs/trust.md)
        if args.data_folder and bubblewrap and data_problem == "" and child.returncode is None:
            data_problem = sandbox.data_folder_problem(sandbox.private_root(child.pid), args.data_folder)
        if time.monotonic() - t0 - (evaluation.seconds() if evaluation else 0.0) > args.timeout:
            timed_out = True
            break
    if child.poll() is None:  # timeout or stop: ask the whole tree to end, then make it
        signal_tree(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=args.grace)
        except subprocess.TimeoutExpired:
            pass
    if evaluation is not None:  # an export in the run's last moments is still evaluated
        if not (timed_out or stop_reason):
            evaluation.start_if_exported(val_watch)
        evaluated = evaluation.finish(args.grace)
    strays = [] if (timed_out or stop_reason) else left_behind(child.pid, bubblewrap)  # the run ended: child is reaped
    unkillable = kill_everything(child.pid)
    exit_code = child.wait()
    wall = time.monotonic() - t0
    pump.join(timeout=10)  # the pipe is closed once every writer is dead
    if timed_out or stop_reason:
        pump.note(f"killed after the {args.timeout:.0f}s timeout" if timed_out else f"stopped: {stop_reason[0]}")
    elif strays:
        pump.note(f"{len(strays)} process(es) started by the run were still running when it ended; killed")
    if compiling is not None and watch_val:  # the shard's text could be in what it compiled, for later runs to read
        pump.note("shown the validation data (AUTORESEARCH_EVAL_CROSSCHECK=1): what the run compiled is not kept")
    pump.close()
    if val_watch is not None:
        val_watch.stop()
    if val_copy is not None:
        shutil.rmtree(val_copy.parent, ignore_errors=True)
    if compiling is not None:  # every process of the run is gone: what it compiled is its program's alone (or none's)
        programs.save(compiling, args.compile_cache / programs.FOLDER, None if watch_val else args.compile_program)
    if into is not None and into != sandbox.RUN_COPY:
        shutil.rmtree(into, ignore_errors=True)
    tail = {"log_tail": pump.last_text(args.report_tail)} if args.report_tail else {}
    report = tail | {
        "exit_code": 128 - exit_code if exit_code < 0 else exit_code, "timed_out": timed_out,
        "stopped": stop_reason[0] if stop_reason else None, "started_at": started_at, "wall_seconds": round(wall, 3),
        "stray_processes": 0 if (timed_out or stop_reason) else len(strays), "unkillable": unkillable,
        "log_truncated": pump.truncated, "host": socket.gethostname(), "device": device_name(dict(os.environ)),
        "subreaper": subreaper, "sandbox": in_sandbox, "warm_start": warm_start,
    }
    if args.export:
        report["exported"] = args.export.exists() or bool(evaluation and evaluation.started_at is not None)
        report["val_hidden"], report["val_replaced"] = hide_val, hide_val and sandbox.identity(args.val_shard) != hid
        report["val_watched"] = val_watch is not None
        report["val_opened_before_export"] = val_watch.opened_before_export if val_watch else None
    if data_problem:
        report["data_folder_problem"] = data_problem
    if evaluated is not None and report["exit_code"] == 0 and not (timed_out or stop_reason):
        report["evaluation"] = evaluated
    # what the interpreters compiled (trusted_import.py), which the server checks against its pins
    report["imported"] = {"training": imported, "evaluator": (evaluated or {}).pop("imported", None)}
    final_report(args, report)
    return 0


if __name__ == "__main__":
    # os._exit: a normal exit would wait on the daemon thread blocked reading stdin
    os._exit(main())
