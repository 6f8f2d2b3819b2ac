"""Helpers for the MCP server tests: a real git workspace in a temp folder, and clients.

The workspace has the autoresearch layout with stand-ins: prepare.py (a comment), a
nanochat/ file (more harness), and train.py holding knobs that tests/fake_train.py reads,
which is the training command. The cache holds a prepared.json so setup's check passes.
"""
import atexit
import functools
import html
import itertools
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.from_thread
from mcp import Client, StdioServerParameters

from mcp_server.loop import ResearchLoop
from mcp_server.server import build_server

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAKE_TRAIN = HERE / "fake_train.py"
TOOL_NAMES = {"setup", "run_experiment", "wait", "read_metrics", "keep", "discard", "cancel", "reapply", "history", "sweep",
              "stop", "log_result", "status", "plot_progress", "measure_noise", "confirm", "report"}


# The ports of the servers the tests start (MLflow, Ray, SLURM, the dashboard): each pytest process picks in a
# block of its own, below the kernel's ephemeral range (32768 up) and above Ray's worker ports (10002-19999),
# so no other test's server, and no port the kernel hands out, takes one between its pick and its bind
PORT_BLOCK = 3000
PORT_BLOCKS_FROM = 20000  # the main process's, then gw0's, gw1's, gw2's
_PORTS_TRIED = itertools.count()


def free_port() -> int:
    """A port of this pytest process's block that nothing listens on now."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") else 0
    first = PORT_BLOCKS_FROM + index % 4 * PORT_BLOCK
    for _ in range(PORT_BLOCK):
        port = first + next(_PORTS_TRIED) % PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"every port from {first} to {first + PORT_BLOCK - 1} is taken")


def _bare_python() -> str:
    """The fake trainer's interpreter: a venv without packages, made once per test process. The trainer
    imports the standard library only, and with the tests' own environment (torch's, 40,000 files) each
    run's environment checks walked all of it, about a third of a quick run's CPU."""
    folder = tempfile.mkdtemp(prefix="research-loop-fake-python-")
    atexit.register(shutil.rmtree, folder, True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    return os.path.join(folder, "bin", "python")


FAKE_PYTHON = _bare_python()
TRAIN_COMMAND = [FAKE_PYTHON, "fake_train.py"]
# The tests' servers accept runs without a sandbox where the machine can run none (they are not
# about the sandbox; where one runs, and in CI, runs are sandboxed all the same). The tests of the
# sandbox itself start theirs without it.
UNSANDBOXED = ["--unsandboxed"]


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout


def make_workspace(tmp_path: Path, train_source: str = "VAL_BPB = 1.0\n") -> Path:
    ws = tmp_path / "ws"
    (ws / "nanochat").mkdir(parents=True)
    (ws / "prepare.py").write_text("# harness stand-in\nMAX_SEQ_LEN = 256\n")
    (ws / "nanochat" / "common.py").write_text("# harness stand-in\n")
    (ws / "train.py").write_text(train_source)
    shutil.copy(FAKE_TRAIN, ws / "fake_train.py")
    git(ws, "init", "-q", "-b", "main")
    git(ws, "config", "user.email", "test@example.com")
    git(ws, "config", "user.name", "test")
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "initial")
    return ws


def exporting_workspace(tmp_path: Path) -> Path:
    """A workspace whose harness evaluates exports, where the fake trainer exports none: every result is
    train.py's own number (verified false)."""
    ws = make_workspace(tmp_path)
    for name in ("evaluate_export.py", "export.py"):
        (ws / "nanochat" / name).write_text("# harness stand-in\n")
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "an exporting harness")
    return ws


def make_cache(tmp_path: Path, budget: float = 60.0) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    (cache / "prepared.json").write_text(json.dumps({"profile": "cpu", "time_budget": budget}))
    return cache


def slot_dir(ws: Path, slot: int = 0) -> Path:
    """Where a slot's runs execute: a worktree of the workspace's repository, inside .git."""
    return ws / ".git" / "research-loop" / "slots" / str(slot)


def text(result) -> str:
    return result.content[0].text


def answer(result) -> dict:
    assert not result.is_error, text(result)
    return result.structured_content


def error(result) -> str:
    assert result.is_error, text(result)
    return text(result)


def ledger_lines(ws: Path) -> list[str]:
    return (ws / "results.tsv").read_text().splitlines()


def set_knobs(ws: Path, **knobs) -> None:
    (ws / "train.py").write_text("".join(f"{k.upper()} = {v}\n" for k, v in knobs.items()))


def stdio_params(ws: Path, cache: Path, *extra: str, train_command=None) -> StdioServerParameters:
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("AUTORESEARCH_TIME_BUDGET", None)
    command = " ".join(train_command or TRAIN_COMMAND)
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "mcp_server", "--workspace", str(ws), "--train-command", command,
                                       *UNSANDBOXED, *extra],
                                 env=env, cwd=str(REPO))


@asynccontextmanager
async def stdio_client_for(ws: Path, cache: Path, *extra: str):
    async with Client(stdio_params(ws, cache, *extra), mode="legacy") as client:
        yield client


FAKE_KNOBS = ("VAL_BPB", "MEMORY_MB", "STEPS", "SLEEP", "CRASH", "NAN", "NO_SUMMARY", "NOISE", "SPAWN", "ESCAPE",
              "SPAM_MB", "IGNORE_TERM", "CLAIM_SECONDS", "TAMPER", "MFU", "FLOPS_CLOCK",
              "ORDER_EFFECT", "LAG", "EXPORT", "IMPORTS", "READ", "HOLD", "RELEASE", "COMPILE", "POISON")


class Lab:
    """A workspace, a ResearchLoop on it, and a way to call its tools through a real client."""

    def __init__(self, ws, slots: int = 1, executor=None, train_command=None, unsandboxed: bool = True):
        """executor: a factory of the executor from the Workspace (Ray, SLURM); default the local pool.
        unsandboxed: the user's opt-in to runs without a sandbox (see UNSANDBOXED)."""
        self.ws, self.slots, self.executor, self.unsandboxed = ws, slots, executor, unsandboxed
        self.train_command = train_command or TRAIN_COMMAND
        self.loop = self.new_loop()

    def new_loop(self) -> ResearchLoop:
        return ResearchLoop(self.ws, self.train_command, self.slots, self.executor, unsandboxed=self.unsandboxed)

    def server(self):
        """The loop's server, built once per loop (building one costs most of a quick call), as one
        server process answers all of a session's calls."""
        if getattr(self, "served", None) is not self.loop:  # tests may swap in a new loop
            self.built, self.served = build_server(self.loop), self.loop
        return self.built

    def client(self):
        """One client of the loop's server for all of the test's calls, as a session of Claude Code's
        has (a client of its own for each call listed the tools and compiled their output schemas
        again: ~40 ms of CPU a call, thousands of calls in the suite); closed when the test ends
        (close_clients, conftest)."""
        with _CONNECTING:  # tests call from threads of their own too
            server = self.server()
            if getattr(self, "connected", (None,))[0] is not server:
                self.disconnect()
                opened = _portal().wrap_async_context_manager(Client(server))
                self.connected = (server, opened, opened.__enter__())
                _CONNECTED.append(self)
            return self.connected[2]

    def disconnect(self):
        _, opened, _ = getattr(self, "connected", (None, None, None))
        self.connected = (None, None, None)
        if opened is not None:  # a call still in flight (a test's thread, a hung tool) holds the close: left to end
            closing = threading.Thread(target=opened.__exit__, args=(None, None, None), daemon=True)
            closing.start()
            closing.join(CLOSE_WAIT_S)

    def call(self, name, progress=None, **args):
        client = self.client()
        return _portal().call(functools.partial(client.call_tool, name, args, progress_callback=progress))

    def ok(self, name, **args):
        return answer(self.call(name, **args))

    def refused(self, name, **args):
        return error(self.call(name, **args))

    def restart(self):
        """The server exits (its runs die with it) and a new one starts on the workspace."""
        self.loop.shutdown()
        self.loop = self.new_loop()

    def head(self):
        return git(self.ws, "rev-parse", "HEAD").strip()

    def baseline(self):
        self.ok("setup", tag="t")
        run = self.ok("run_experiment", description="baseline")
        assert run["status"] == "ok", run  # the baseline's crash, with its log's tail, not keep's refusal of it
        return self.ok("keep")


_PORTAL: list = []  # the event loop the Labs' clients live in, on a thread of its own: its end is the process's
_CONNECTED: list = []  # Labs whose client is open
_CONNECTING = threading.RLock()
CLOSE_WAIT_S = 10  # for a Lab's client to close as its test ends


def _portal() -> anyio.from_thread.BlockingPortal:
    if not _PORTAL:
        ready = queue.Queue()

        async def serve():
            async with anyio.from_thread.BlockingPortal() as portal:
                ready.put(portal)
                await portal.sleep_until_stopped()
        threading.Thread(target=anyio.run, args=(serve,), daemon=True, name="lab-clients").start()
        _PORTAL.append(ready.get())
    return _PORTAL[0]


def close_clients() -> None:
    """Every Lab's client closed (a test's end)."""
    while _CONNECTED:
        _CONNECTED.pop().disconnect()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """The predicate's first true value within the timeout, else its last (false) one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(interval)
    return predicate()


def processes_running(pattern: str) -> list[int]:
    """Pids whose command line contains `pattern` (a unique temp path), excluding this process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmdline and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def processes_in(folder: Path) -> list[int]:
    """Live processes working in the folder or below it, or naming it on their command line
    (Claude Code, the MCP server, run workers and training), excluding this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd.is_relative_to(folder) or str(folder) in cmdline) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class Webhook:
    """A webhook receiver on 127.0.0.1 for the --notify tests: records each POST (its body, content
    type and time). mode: "ok" answers 200, "500" answers 500, "hang" holds every request until
    release() (then 200)."""

    def __init__(self, mode: str = "ok"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.mode, self.posts, self.released = mode, [], threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hook.posts.append({"body": body, "type": self.headers.get("content-type"), "at": time.time()})
                if hook.mode == "hang":
                    hook.released.wait(120)
                self.send_response(500 if hook.mode == "500" else 200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def messages(self) -> list[str]:
        """Each JSON post's message: Slack's `text` read as Slack shows it, which must be what Discord shows of
        its `content` (with no mention allowed to ping)."""
        found = []
        for post in list(self.posts):
            body = json.loads(post["body"])
            shown = html.unescape(body["text"])
            assert shown == re.sub(r"\\(.)", r"\1", body["content"]) and body["allowed_mentions"] == {"parse": []}, body
            found.append(shown)
        return found

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
