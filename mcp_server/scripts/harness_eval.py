"""The harness's separate evaluation, from the worker's side, and the slots' warm evaluators.

Standard library only, beside worker.py wherever it runs (cluster.package ships it to the nodes).

- The inputs (the validation shard, the tokenizer) are copied before the training starts (into sealed
  memfds: no one can write into them through /proc, nor into the program's copy once taken) and
  checked against the content the server pinned; the evaluator gets the copies as open files.
- Cold: the evaluator (nanochat/evaluate_export.py, from the pristine harness copy, -I -S -B) starts
  with the run and imports torch while the training starts, then evaluates on "go".
- Warm: a slot's evaluator imported torch and the harness's evaluation once (the server's pool
  starts it, WarmEvaluator); for each run the worker passes it the same descriptors over a socket
  and it forks a child that evaluates exactly as a cold one does. On the 2-core CPU a cold
  evaluator's imports (~9 CPU-seconds) ran beside the run's own start-up; the warm one pays them
  once per slot. A warm evaluator that is gone or refuses costs the run a cold start, nothing else.
- Afterwards the harness copy must still be exactly its commit (or, on a node, its manifest):
  harness_copy.py.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import errno
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

try:
    from mcp_server.scripts.export_copy import copy_regular_file, export_folder, export_seconds, exported
    from mcp_server.scripts.harness_copy import harness_problem, manifest_problem
    from mcp_server.scripts.trusted_import import DIGESTS_ENV, follow
except ImportError:  # on a node: beside this file
    from export_copy import copy_regular_file, export_folder, export_seconds, exported
    from harness_copy import harness_problem, manifest_problem
    from trusted_import import DIGESTS_ENV, follow

MARK = "[research-loop]"  # prefix of the lines the worker adds to the log
EXIT_GRACE_S = 5.0  # for the evaluator's interpreter to exit once it answered
WARM_ENV = "RESEARCH_LOOP_WARM_EVALUATOR"  # "0": every run starts its own evaluator (bench/bench_startup.py)
WARM_FDS = ("val", "tokenizer")  # the inputs a warm request carries (nanochat/evaluate_export.py REQUEST_FDS)
MAX_REPLY_BYTES = 4096
# a sealed copy can be neither written, resized nor unsealed (Linux; elsewhere the names are missing)
COPY_SEALS = sum(getattr(fcntl, name, 0) for name in ("F_SEAL_WRITE", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL"))
# The evaluator's interpreter: isolated (-I: no PYTHON* variables, no user site, no script folder on the
# path), without site (-S: no .pth file or sitecustomize runs), writing no bytecode (-B) and reading none
# either: its bytecode folder is under a device, where nothing can be created, so it compiles every module
# from its source (a .pyc crafted with its source's size and mtime in a __pycache__ would run: bytecode_archive.py)
NOWHERE = "/dev/null/no-bytecode"
ISOLATED = ("-I", "-S", "-B", "-X", f"pycache_prefix={NOWHERE}")
# ...and its imports go through this importer, which reports the digest of every source it compiled
TRUSTED_IMPORT = Path(__file__).resolve().parent / "trusted_import.py"
# What the harness's evaluation takes from the worker's environment, not the server's: the slot's GPU
# (the pool sets CUDA_VISIBLE_DEVICES per slot) and where libcuda is found
DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
# In the prepared cache (nanochat/cache.py's layout): the data sets' sources, which no run may read
DOWNLOADS, OFFLINE_SEED_FILE = "downloads", "offline_seed"
OFFLINE_SEED_ENV = "AUTORESEARCH_OFFLINE_SEED"  # how a node's prepare gets the server's seed (nanochat/datasets.py)


def evaluator_command(python: str, evaluator: Path) -> list[str]:
    """The harness's evaluator on that interpreter, isolated and through the server's importer."""
    return [python, *ISOLATED, str(TRUSTED_IMPORT), str(evaluator)]


def open_log(path: Path):
    """The log file, appended to; "-" is this process's stdout (a duplicate, so closing it is safe)."""
    if str(path) == "-":
        return os.fdopen(os.dup(1), "ab", buffering=0)
    return open(path, "ab", buffering=0)


def private_copies(inputs: dict) -> dict:
    """{name: an open file with no name} holding a copy of each input, taken now and sealed; raises
    ValueError when the sealed copy's content is not the SHA-256 the server pinned (its bytes, not the
    source's: a write into the copy before the seal is caught too), OSError when a copy cannot be
    sealed. inputs: {name: {"path", "sha256"}}."""
    copies = {}
    try:
        for name, pinned in inputs.items():
            copy = copies[name] = unnamed_file()
            with open(pinned["path"], "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    copy.write(chunk)
            copy.flush()
            seal(copy)
            copy.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: copy.read(1 << 20), b""):
                digest.update(chunk)
            copy.seek(0)
            if digest.hexdigest() != pinned["sha256"]:
                raise ValueError(f"{pinned['path']} is not what prepare made (by content): the harness evaluates "
                                 "only the pinned validation data and tokenizer; restore the prepared cache (or "
                                 "prepare it again and set up a new research run) before the next run")
    except BaseException:
        for copy in copies.values():
            copy.close()
        raise
    return copies


def unnamed_file(label: str = "research-loop-copy"):
    """A file with no name for a private copy: a memfd that can be sealed (Linux), else a temporary file.
    label: what /proc/PID/fd shows of it."""
    try:
        return os.fdopen(os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING), "w+b")
    except (AttributeError, OSError):
        return tempfile.TemporaryFile()


def seal(copy) -> None:
    """No more writes to a private copy through any descriptor: a process of the same user can open
    /proc/PID/fd/N of a file with no name and write into it, not into a sealed memfd (EPERM). Raises
    OSError where a memfd cannot be sealed: the kernel refuses (EBUSY) while anyone holds a writable
    mapping of it, which only a process that opened it through /proc can."""
    try:
        fcntl.fcntl(copy.fileno(), fcntl.F_GET_SEALS)
    except (AttributeError, OSError):
        return  # a temporary file (not Linux): the copy stays writable by the same user
    try:
        fcntl.fcntl(copy.fileno(), fcntl.F_ADD_SEALS, COPY_SEALS)
    except OSError as exc:
        raise OSError(f"the harness's private copy could not be sealed ({exc.strerror}): another process "
                      "holds it open for writing") from None
    if fcntl.fcntl(copy.fileno(), fcntl.F_GET_SEALS) & COPY_SEALS != COPY_SEALS:
        raise OSError("the harness's private copy could not be sealed against writes")


def is_sealed(copy) -> bool:
    """Whether a copy is sealed against writes (False for a temporary file, where memfds are missing)."""
    try:
        seals = fcntl.fcntl(copy.fileno(), fcntl.F_GET_SEALS)
    except (AttributeError, OSError):
        return False
    return bool(COPY_SEALS) and seals & COPY_SEALS == COPY_SEALS


def socket_channel() -> tuple[int, int]:
    """(our end, the child's end) of a channel to a child process (the evaluator's result, the warm
    interpreter's hand-over): a socket pair, not a pipe, because any process of the same user can open
    a pipe's /proc/PID/fd/N and write into it (a result or a script of its own); a socket's cannot be
    opened (ENXIO)."""
    ours, theirs = socket.socketpair()
    return ours.detach(), theirs.detach()


def for_train_py(result: dict) -> dict:
    """What train.py is told of its evaluation: the number, or that there is none. Never why: an error raised while
    the program ran on validation batches can name a value computed from them (an index out of bounds), which the
    run could keep where later runs read (review 88); the run's result gives the agent the reason."""
    if "val_bpb" in result:
        return {"val_bpb": result["val_bpb"]}
    kind = "problem" if "problem" in result else "error"
    return {kind: "the harness did not score the exported model: the run's result says why"}


class HarnessEvaluation:
    """The harness's separate evaluation of the exported model. It evaluates as soon as the model is
    exported, while train.py waits in prepare.evaluate_bpb for the answer (written to answer_path),
    so the validation set is evaluated once. spec: {"argv", "env", "timeout", "harness",
    "harness_commit", "inputs"}. The inputs are copied and checked here, before the training starts.
    Cold, the evaluator starts now and imports torch while training runs; it gets --out-fd N (its
    result), --program-fd and an --NAME-fd for each input (the private copies), and reads one line
    on stdin: go (end of file: nothing to evaluate). Warm (warm: the socket to the slot's warm
    evaluator), the same descriptors go over the socket once the program is copied."""

    def __init__(self, spec: dict, log_path: Path, export: Path, answer_path: Path,
                 warm: socket.socket | None = None, private: bool = False):
        self.spec, self.log_path, self.export, self.answer_path = spec, log_path, export, answer_path
        self.located = not private  # a sandbox's private export is found once its sandbox has a root (inside)
        self.folder: int | None = None  # then a descriptor of the export's folder in it, held (inside)
        self.folder_problem: OSError | None = None  # or why that folder could not be held
        self.result: dict | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.thread: threading.Thread | None = None
        self.proc = None
        self.warm_pid: int | None = None  # the warm evaluator's child that evaluates this run
        self.imported = None  # a cold evaluator's digest stream (trusted_import.follow); a warm one's is the pool's
        self.read_end: int | None = None
        self.program = unnamed_file()  # the harness's copy of the export, once there is one (then sealed)
        self.inputs: dict = {}
        self.warm: socket.socket | None = None
        try:
            self.inputs = private_copies(spec.get("inputs", {}))
        except (OSError, KeyError, ValueError) as exc:
            self.result = {"problem": f"the harness evaluation's inputs: {exc}"} if isinstance(exc, ValueError) \
                else {"error": f"the harness evaluation's inputs could not be copied: {exc!r}"}
            return
        # a missing input makes the evaluator fail, as a cold one says in the log
        self.warm = warm if warm is not None and set(self.inputs) == set(WARM_FDS) else None
        if self.warm is None:
            self._start_cold()

    def _start_cold(self) -> None:
        self.read_end, write_end = socket_channel()
        digests, their_digests = socket_channel()
        fds = {"--program-fd": self.program.fileno(),
               **{f"--{name}-fd": copy.fileno() for name, copy in self.inputs.items()}, "--out-fd": write_end}
        try:
            with open_log(self.log_path) as log:
                # its own session: the training's process group can be killed without it
                self.proc = subprocess.Popen([*self.spec["argv"], *(a for k, fd in fds.items() for a in (k, str(fd)))],
                                             env=dict(self.spec["env"], **{DIGESTS_ENV: str(their_digests)}),
                                             stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                             pass_fds=(*fds.values(), their_digests), start_new_session=True)
            self.imported = follow(digests)
        except OSError as exc:
            self.result = {"error": f"the harness evaluation could not start: {exc}"}
            os.close(self.read_end)
            os.close(digests)
            self.read_end = None
        finally:
            os.close(write_end)
            os.close(their_digests)
            self._close_inputs()  # the evaluator holds its own descriptors

    def _close_inputs(self) -> None:
        for copy in self.inputs.values():
            copy.close()
        self.inputs = {}

    def seconds(self) -> float:
        """How long it has evaluated: time the training's timeout does not count."""
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at

    def inside(self, root: str | None) -> None:
        """The export and the answer at the same paths inside the sandbox whose root the machine sees at root
        (sandbox.private_root): the run exports into its private /tmp, out of the agent's reach (review 48: a
        program the agent put in the workspace's export folder was evaluated as the run's). Its folder is held open
        from now on, reached through no link (export_folder): a look by the pid of the sandbox's first process once
        the run has ended (an export in its last moments) named a pid free by then, which the agent's process may
        have taken (its root is the machine's, whose /tmp/export the agent writes)."""
        if root is None:
            return
        try:
            held = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone before it was held: looked for again at the next poll
            return
        try:
            self.folder = export_folder(self.export, held)
        except OSError as exc:
            self.folder_problem = exc
        finally:
            os.close(held)
        self.located = True

    def _folder(self, path: Path) -> int:
        """A descriptor of the folder of the export or the answer (beside it): a sandbox's, held (inside); else by
        path."""
        if self.folder is not None:
            return os.dup(self.folder)
        if self.folder_problem is not None:
            raise self.folder_problem
        return export_folder(path)

    def _exported(self) -> bool:
        """Whether the program and its note are in place; where a link or a file took the sandbox's export folder's
        place, True: the copy then refuses it, saying why."""
        try:
            folder = self._folder(self.export)
        except OSError as exc:
            return exc.errno in (errno.ELOOP, errno.ENOTDIR) and exc is self.folder_problem
        try:
            return exported(folder, self.export.name)
        finally:
            os.close(folder)

    def start_if_exported(self, watch) -> None:
        """Once export.py has put the program and its notes in place: the harness copies the program
        now, and what it copied is what it evaluates; opens of the validation data until now count
        as before the export, whatever the run put at the export path earlier."""
        if not self.located:
            return
        if self.thread is None and self._exported():
            self.started_at = time.monotonic()
            self.thread = threading.Thread(target=self._evaluate, args=(watch,), daemon=True,
                                           name="harness-evaluation")
            self.thread.start()

    def _evaluate(self, watch) -> None:
        try:
            try:
                self._evaluate_export(watch)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the number is none and the check still runs
                self.result = {"error": f"the harness evaluation failed: {exc!r}"[:500],
                               "wall_seconds": round(time.monotonic() - self.started_at, 2)}
                self._hand_back({"error": self.result["error"]})
            # After the answer, while train.py prints its summary: the harness the evaluator ran
            # from must be its commit, with nothing added (a planted module or bytecode) or hidden.
            problem = self._copy_problem()
            if problem:
                self.result = {"error": problem, "wall_seconds": (self.result or {}).get("wall_seconds")}
        finally:
            if self.proc is not None:  # its interpreter's exit, after the answer
                try:
                    self.proc.wait(timeout=EXIT_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self._take_digests()
            self.finished_at = time.monotonic()

    def _evaluate_export(self, watch) -> None:
        """The copy, the evaluation and the answer for train.py; the harness check follows it whatever happens here."""
        seconds = None
        try:
            folder = self._folder(self.export)
            try:
                copy_regular_file(self.export.name, self.program, folder)
                seconds = export_seconds(folder, self.export.name)
            finally:
                os.close(folder)
            seal(self.program)
        except OSError as exc:
            self.result = {"problem": f"the exported model could not be read: {exc}"}
        if watch is not None:
            watch.mark_exported()
        self.result = self._outcome()
        self.result["wall_seconds"] = round(time.monotonic() - self.started_at, 2)
        self.result.setdefault("export_seconds", seconds)
        self._hand_back(for_train_py(self.result))

    def _copy_problem(self) -> str | None:
        """Why the harness copy is not what it was made from (its commit, or on a node its manifest), or
        None; it raises nothing, so that a failed check is a problem too."""
        try:
            if "harness_manifest" in self.spec:
                return manifest_problem(self.spec["harness"], self.spec["harness_manifest"])
            return harness_problem(self.spec["harness"], self.spec.get("harness_commit"))
        except Exception as exc:  # noqa: BLE001
            return f"the harness copy could not be checked: {exc!r}"

    def _take_digests(self) -> None:
        """The cold evaluator's digests, read from its stream until it exited, into the result (a line
        no importer wrote: no result)."""
        if self.imported is None or self.result is None:
            return
        self.imported.join(EXIT_GRACE_S)
        if self.imported.forged or self.imported.is_alive():
            self.result = {"error": "the harness evaluator's digest stream held a line its importer did not "
                                    "write, or did not end with it", "wall_seconds": self.result.get("wall_seconds")}
        else:
            self.result["imported"] = dict(self.imported.digests)

    def _hand_back(self, answer: dict) -> None:
        """The answer for train.py, in the run's own (writable) export folder: written to a new file
        that no link planted by the run can redirect, then renamed into place (over a planted link,
        not through it), in the folder reached through no link (_folder). Where the run made that impossible, it
        waits until its timeout."""
        name = self.answer_path.name
        tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            folder = self._folder(self.answer_path)
        except OSError:
            return
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(answer))
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError:
            pass
        finally:
            os.close(folder)

    def _outcome(self) -> dict:
        if self.result is not None:  # nothing it could evaluate
            self.finish_unused(EXIT_GRACE_S)
            return self.result
        # one deadline: a warm evaluator still importing (a slot's first run) waits as a cold one would
        deadline = time.monotonic() + self.spec["timeout"]
        with open_log(self.log_path) as log:
            log.write(f"\n{MARK} harness evaluation of the exported model\n".encode())
            if self.warm is not None:
                self._go_warm(log, deadline)
        if self.proc is not None:
            try:
                self.proc.stdin.write(b"go\n")
                self.proc.stdin.close()
            except OSError:
                pass  # it ended already: its exit and output say why
        if self.read_end is None:
            return self.result
        text = self._read_result(deadline)
        if text is None:
            self._kill()
            return {"error": f"the harness evaluation took over {self.spec['timeout']:.0f}s"}
        try:
            result = json.loads(text)
        except ValueError:
            exit_code = self.proc.wait() if self.proc is not None else "(warm)"
            return {"error": f"the harness evaluation exited {exit_code} without a result (its output is in "
                             "the log)"}
        result.pop("imported", None)  # the evaluator's word for it: its digests come from their stream only
        return dict(result, evaluator="cold" if self.proc is not None else "warm")

    def _go_warm(self, log, deadline: float) -> None:
        """The request to the slot's warm evaluator; where it fails, a cold evaluator instead."""
        read_end, write_end = socket_channel()
        request_id = os.urandom(8).hex()
        fds = [write_end, self.program.fileno(), *(self.inputs[name].fileno() for name in WARM_FDS), log.fileno()]
        try:
            socket.send_fds(self.warm, [json.dumps({"id": request_id, "timeout": self.spec["timeout"]}).encode()],
                            fds)
            while True:  # a reply to an earlier run's request (its worker died first) is not ours
                self.warm.settimeout(max(0.01, deadline - time.monotonic()))
                reply = json.loads(self.warm.recv(MAX_REPLY_BYTES))
                if reply.get("id") in (request_id, None):
                    break
            if not isinstance(reply.get("pid"), int):
                raise ValueError(reply.get("error") or "no child")
            self.warm_pid, self.read_end = reply["pid"], read_end
            self._close_inputs()
        except (OSError, ValueError, AttributeError) as exc:
            os.close(read_end)
            log.write(f"{MARK} the slot's warm evaluator did not answer ({exc}): a cold one evaluates\n".encode())
            self.warm = None
            self._start_cold()
        finally:
            os.close(write_end)

    def _kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        elif self.warm_pid is not None:
            for kill in (os.killpg, os.kill):  # its group, or itself before it made one
                try:
                    kill(self.warm_pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _read_result(self, deadline: float) -> bytes | None:
        """What the evaluator writes to its result socket, once it closes it (or dies); None at the deadline."""
        chunks = []
        with os.fdopen(self.read_end, "rb", buffering=0) as pipe:
            while (left := deadline - time.monotonic()) > 0:
                if select.select([pipe], [], [], left)[0]:
                    chunk = pipe.read(65536)
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)
        return None

    def finish(self, grace: float) -> dict | None:
        """The evaluation's result once it has ended; None where nothing was exported."""
        if self.thread is not None:
            self.thread.join()
        else:
            self.finish_unused(grace)
        if self.folder is not None:
            os.close(self.folder)
            self.folder = None
        return self.result if self.thread is not None else None

    def finish_unused(self, grace: float) -> None:
        """End of file on stdin: a cold evaluator exits without evaluating; a warm one is never asked."""
        self._close_inputs()
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=grace)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.read_end is not None:
            os.close(self.read_end)
            self.read_end = None


class WarmEvaluator:
    """A slot's warm evaluator, kept by the server's pool: the harness's evaluator (spec["argv"], its
    clean environment, outside every run's sandbox) started once with --serve-fd; each run's worker
    gets the pool's end of the socket (fileno()). key: what it was started with; another spec (a new
    harness commit, evaluation size or device) needs another one. imported: the digests of what it and
    its children compiled, streamed as they compile it (trusted_import.py)."""

    def __init__(self, spec: dict):
        self.key = WarmEvaluator.key_of(spec)
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        digests, their_digests = socket_channel()
        try:
            # its own session, as a cold evaluator's; its output is its children's only (the runs' logs)
            self.proc = subprocess.Popen([*spec["argv"], "--serve-fd", str(theirs.fileno())],
                                         env=dict(spec["env"], **{DIGESTS_ENV: str(their_digests)}),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(), their_digests),
                                         start_new_session=True)
        except OSError:
            self.socket.close()
            os.close(digests)
            raise
        finally:
            theirs.close()
            os.close(their_digests)
        # what it and its children compile, for its whole life (trusted_import.follow): the pool checks it
        self.imported = follow(digests)

    @staticmethod
    def key_of(spec: dict) -> str:
        return json.dumps([spec["argv"], spec["env"], spec.get("harness_commit")], sort_keys=True)

    def fileno(self) -> int:
        return self.socket.fileno()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """End of file on its socket ends it; whatever is left of its session is killed."""
        self.socket.close()
        try:
            self.proc.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def on_this_device(spec: dict, env: dict) -> dict:
    """The evaluation's spec with the device variables of a slot's environment: the server made it
    for every slot alike, and an evaluation on another slot's GPU would slow that slot's timed
    training (or run out of its memory) and be slowed by it."""
    device = {name: env[name] for name in DEVICE_ENV if name in env}
    return dict(spec, env=dict(spec["env"], **device))


def evaluation_inputs(cache: Path, val_shard: Path | None, record: dict | None) -> dict:
    """What the harness's evaluation reads besides the program ({name: {"path", "sha256"}}: the
    evaluator's --NAME-fd), each with the SHA-256 its content must have: the validation shard's as
    prepare pinned it (hashed now where the record has none), the tokenizer's merges' as they are
    before the run (the server's cache fingerprint holds them since setup). A missing file is left
    out: the evaluator then fails, and the run is unverified."""
    inputs = {}
    tokenizer = cache / "tokenizer" / "tokenizer.pkl"  # the cache's layout (nanochat/cache.py)
    if tokenizer.is_file():
        inputs["tokenizer"] = {"path": str(tokenizer), "sha256": sha256_of(tokenizer)}
    if val_shard is not None and val_shard.is_file():
        pinned = (record or {}).get("val_shard") or {}
        same = pinned.get("name") == val_shard.name and pinned.get("sha256")
        inputs["val"] = {"path": str(val_shard), "sha256": pinned["sha256"] if same else sha256_of(val_shard)}
    return inputs


def hidden_from_runs(cache: Path, record: dict | None) -> list[str]:
    """What a run must not read at all: where the data sets' text comes from (the downloads, a folder
    data set, the secret that picks the offline corpus's files; nanochat/cache.py's layout). The
    validation text is cut from there, and a run that could read it could train on it; the shards
    stay readable (the worker hides the validation shard from a run the harness scores)."""
    hidden = [str(cache / DOWNLOADS), str(cache / OFFLINE_SEED_FILE)]
    dataset = (record or {}).get("dataset")
    if isinstance(dataset, str) and os.path.isabs(dataset):  # a folder data set, as prepare resolved it
        hidden.append(dataset)
    return hidden


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
