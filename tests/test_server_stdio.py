"""The server as clients run it: `python -m mcp_server` over stdio (and HTTP), killed mid-run."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import anyio
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from mcp_server.core.state import State
from server_support import (
    REPO, answer, error, free_port, git, ledger_lines, make_cache, make_workspace, pid_alive, processes_in, processes_running,
    set_knobs, slot_dir, stdio_client_for, stdio_params, wait_until,
)

# for a server process to start: its imports took 3.5-3.8 s at a load of 7 on 2 cores (1.4 s of CPU), and 15 s was a
# limit a loaded CI machine could cross; one that fails to start exits, which ends the wait at once
SERVER_START_S = 120


@pytest.fixture
def ws_cache(tmp_path):
    return make_workspace(tmp_path), make_cache(tmp_path)


def state_of(ws) -> dict:
    return json.loads((ws / ".research-loop" / "state.json").read_text())


def running_entry(ws) -> dict | None:
    return next((e for e in state_of(ws)["runs"].values() if e["status"] == "running"), None)


def training_started(ws) -> bool:
    """The fake trainer spawned its grandchild and the worker wrote the pid report (either can come first)."""
    entry = running_entry(ws)
    return (slot_dir(ws) / "spawned.pid").exists() and entry is not None and (ws / entry["report"]).exists()


def run_processes(ws, entry) -> list[int]:
    """The run's worker, its training and what works in its slot (the grandchild the fake trainer
    spawned: the pid it wrote is its sandbox's, not the machine's)."""
    report = json.loads((ws / entry["report"]).read_text())
    return [entry["worker_pid"], report["pid"], *processes_in(slot_dir(ws))]


def assert_status_answers(server, request_id: int) -> None:
    """The server still answers a good call after the odd input before it."""
    server.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                            "params": {"name": "status", "arguments": {}}}))
    reply = server.answer(15)
    assert reply is not None and reply["id"] == request_id and not reply["result"].get("isError"), reply


def test_server_never_imports_torch_or_matplotlib_at_start():
    code = ("import sys, mcp_server.__main__, mcp_server.server, mcp_server.loop; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stdio_session_lists_tools_and_runs_a_cycle(ws_cache):
    ws, cache = ws_cache

    async def go():
        async with stdio_client(stdio_params(ws, cache)) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                names = {t.name for t in (await session.list_tools()).tools}
                setup = await session.call_tool("setup", {"tag": "stdio"})
                set_knobs(ws, steps=6, sleep=3)
                run = await session.call_tool("run_experiment", {"description": "baseline"},
                                              progress_callback=on_progress)
                results = [setup, run, await session.call_tool("keep", {}), await session.call_tool("keep", {})]
                return names, results
    progress = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))
    names, (setup, run, keep, keep_again) = anyio.run(go)
    assert len(progress) >= 2 and progress[-1][0] <= 100 and any("loss" in m for _, _, m in progress)
    assert {"setup", "run_experiment", "read_metrics", "keep", "discard", "log_result"} <= names
    assert answer(run)["val_bpb"] == 1.0 and answer(keep)["row"]["status"] == "keep"
    assert "no pending result" in error(keep_again)
    assert len(ledger_lines(ws)) == 2


class RawStdio:
    """The server as a process spoken to in raw JSON-RPC lines, to send what no SDK client sends."""

    def __init__(self, ws, cache):
        params = stdio_params(ws, cache)
        self.process = subprocess.Popen([params.command, *params.args], env=params.env, cwd=params.cwd,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}))
        assert self.answer(30)["id"] == 0
        self.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))

    def send(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def answer(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return json.loads(self.process.stdout.readline()) if ready else None

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=15)


def test_a_lone_surrogate_in_the_arguments_is_answered_with_an_error_and_the_server_goes_on(ws_cache):
    """"\\udcff" is a valid JSON escape but not valid Unicode: the SDK's parser drops such a line, and
    the call would hang until the client gave up."""
    server = RawStdio(*ws_cache)
    try:
        for n, (tool, arguments, said) in enumerate((
                ("setup", '{"tag": "night\\udcff"}', "unpaired surrogate escape (\\udcff)"),
                ("run_experiment", '{"description": "x \\ud800 y"}', "unpaired surrogate escape (\\ud800)")), 1):
            server.send(f'{{"jsonrpc": "2.0", "id": {n}, "method": "tools/call", '
                        f'"params": {{"name": "{tool}", "arguments": {arguments}}}}}')
            reply = server.answer(5)
            assert reply is not None, f"no answer within 5 s to {arguments}"
            assert reply["id"] == n and said in reply["error"]["message"]
        server.send("not json at all")
        reply = server.answer(5)
        assert reply["id"] is None and reply["error"]["code"] == -32700 and "not JSON" in reply["error"]["message"]
        server.send(json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                                "params": {"name": "status", "arguments": {}}}))
        reply = server.answer(15)
        assert reply["id"] == 9 and not reply["result"].get("isError")
    finally:
        server.close()
    assert not (ws_cache[0] / ".research-loop" / "state.json").exists()  # nothing was set up


def test_json_that_is_no_json_rpc_request_is_answered_if_it_has_an_id(ws_cache):
    """Valid JSON that the SDK cannot read as any JSON-RPC message is dropped by it: a request with
    an id would never be answered. Each gets an Invalid Request error (id null where it is no
    object); one without an id (a notification) gets nothing, and the server goes on."""
    server = RawStdio(*ws_cache)
    try:
        for line, request_id, said in (
                ('{"id": 1, "method": "tools/list"}', 1, "jsonrpc: Field required"),
                ('{"jsonrpc": "2.0", "id": 2}', 2, "method: Field required"),
                ('{"jsonrpc": "1.0", "id": "three", "method": "tools/list"}', "three", "jsonrpc: Input should be '2.0'"),
                ('{"jsonrpc": "2.0", "id": 4, "method": 5}', 4, "method: Input should be a valid string"),
                ('[{"jsonrpc": "2.0", "id": 6, "method": "tools/list"}]', None, "the message: Input should be"),
                ("7", None, "the message: Input should be")):
            server.send(line)
            reply = server.answer(5)
            assert reply is not None, f"no answer within 5 s to {line}"
            assert reply["id"] == request_id and reply["error"]["code"] == -32600, (line, reply)
            assert said in reply["error"]["message"] and '"method"' in reply["error"]["message"], (line, reply)
        server.send('{"jsonrpc": "2.0", "method": 5}')  # no id: a (broken) notification, not answered
        assert_status_answers(server, 9)
    finally:
        server.close()


def test_a_request_whose_id_the_sdk_cannot_read_is_answered_with_id_null(ws_cache):
    """The SDK reads a request with an id that is no integer or string as a notification and never
    answers it: the client would wait forever. Each gets an Invalid Request error with id null that
    names the id; a notification (no id) still gets nothing, and the next good call works."""
    server = RawStdio(*ws_cache)
    try:
        for wrong in ("1.5", "1.0", "true", "null", '{"n": 1}', "[1]"):
            server.send(f'{{"jsonrpc": "2.0", "id": {wrong}, "method": "tools/call", '
                        '"params": {"name": "setup", "arguments": {"tag": "night"}}}')
            reply = server.answer(5)
            assert reply is not None, f"no answer within 5 s to the id {wrong}"
            assert reply["id"] is None and reply["error"]["code"] == -32600, (wrong, reply)
            assert f"its id {wrong} is neither an integer nor a string" in reply["error"]["message"], reply
        server.send('{"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}')
        assert_status_answers(server, 9)
    finally:
        server.close()
    assert not (ws_cache[0] / ".research-loop" / "state.json").exists()  # no setup ran under a wrong id


def test_a_call_nested_too_deep_for_json_is_answered_and_the_server_stays(ws_cache):
    """Arguments nested 100,000 deep are valid JSON that Python's parser gives up on (RecursionError):
    the call is answered with a parse error, and the server goes on answering."""
    server = RawStdio(*ws_cache)
    try:
        server.send('{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "status", '
                    '"arguments": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}}")
        reply = server.answer(15)
        assert reply is not None and reply["error"]["code"] == -32700, reply
        assert_status_answers(server, 2)
    finally:
        server.close()


def test_setup_limits_sent_as_nan_or_infinity_are_refused(ws_cache):
    """JSON's NaN and Infinity reach the tool as floats (an SDK client would send null instead)."""
    server = RawStdio(*ws_cache)
    try:
        for n, limit in enumerate(('"hours": NaN', '"hours": Infinity', '"hours": -Infinity',
                                   '"target_val_bpb": NaN'), 1):
            server.send(f'{{"jsonrpc": "2.0", "id": {n}, "method": "tools/call", '
                        f'"params": {{"name": "setup", "arguments": {{"tag": "night", {limit}}}}}}}')
            reply = server.answer(15)
            assert reply["id"] == n and reply["result"]["isError"], reply
            assert "must be a number" in reply["result"]["content"][0]["text"]
    finally:
        server.close()
    assert git(ws_cache[0], "branch", "--list", "autoresearch/*") == ""


def test_setup_refuses_a_branch_name_git_already_reads_as_another_ref_and_makes_nothing(ws_cache):
    """Found by review 93: setup(tag) made autoresearch/<tag> beside a tag of that name, which every later git command
    read as the tag (git reads tags before branches), and a remote's branch of that name the same; beside a branch
    autoresearch/<tag>/x it failed in git ("Fix the repository"). Each is refused naming the clash, nothing made."""
    ws, cache = ws_cache
    git(ws, "tag", "autoresearch/night")
    git(ws, "update-ref", "refs/remotes/autoresearch/far", "HEAD")
    git(ws, "branch", "autoresearch/deep/x")
    refs = git(ws, "for-each-ref")

    async def play() -> tuple[list, str, str]:
        async with stdio_client_for(ws, cache) as client:
            refused = [await client.call_tool("setup", {"tag": tag}) for tag in ("night", "far", "deep")]
            after = git(ws, "for-each-ref") + git(ws, "branch", "--show-current")
            return refused, after, await client.call_tool("setup", {"tag": "fine"})
    refused, after, fine = anyio.run(play)
    for result, clash, tag in zip(refused, ("already names the tag autoresearch/night",
                                            "already names the remote's branch autoresearch/far",
                                            "cannot be made beside the branch autoresearch/deep/x"),
                                  ("night", "far", "deep")):
        said = error(result)
        assert clash in said and f"pick another tag (e.g. {tag}-2). Nothing was set up" in said, said
    assert after == refs + "main\n"
    assert answer(fine)["branch"] == "autoresearch/fine"  # a name of its own is set up


def sigkill_server_mid_run(ws, cache) -> tuple[dict, dict]:
    """Starts a slow run over stdio, SIGKILLs the server; returns the state and the run entry."""
    killed = {}

    async def go():
        try:
            async with stdio_client_for(ws, cache) as client:
                answer(await client.call_tool("setup", {"tag": "kill"}))
                set_knobs(ws, sleep=120, steps=120, spawn=1)
                answer(await client.call_tool("run_experiment", {"description": "doomed", "wait": False}))
                assert wait_until(lambda: training_started(ws), 10)
                killed.update(state_of(ws))
                os.kill(running_entry(ws)["server_pid"], signal.SIGKILL)
        except Exception:
            if not killed:
                raise  # only the transport breaking after the kill is expected
    anyio.run(go)
    return killed, next(iter(killed["runs"].values()))


def test_sigkilled_server_leaves_no_training_and_next_start_recovers(ws_cache):
    ws, cache = ws_cache
    state, entry = sigkill_server_mid_run(ws, cache)
    commit = entry["commit"]
    processes = run_processes(ws, entry)
    assert wait_until(lambda: not any(pid_alive(p) for p in processes), 10), processes
    assert not processes_running(str(ws))  # the server itself is gone too

    async def recover():
        async with stdio_client_for(ws, cache) as client:
            status = answer(await client.call_tool("status", {}))
            refused = error(await client.call_tool("run_experiment", {"description": "next"}))
            discarded = answer(await client.call_tool("discard", {}))
            return status, refused, discarded
    status, refused, discarded = anyio.run(recover)
    assert f"interrupted run {commit[:7]}" in status["interrupted"]
    assert f"interrupted run {commit[:7]}" in refused
    assert discarded["row"]["description"] == "doomed (interrupted)" and discarded["row"]["status"] == "crash"
    assert ledger_lines(ws)[-1] == f"{commit[:7]}\t0.000000\t0.0\tcrash\tdoomed (interrupted)"
    assert git(ws, "rev-parse", "HEAD").strip() == state["kept_commit"]
    assert git(ws, "rev-parse", "refs/research-loop/runs/1").strip() == commit  # its code is kept


def test_a_run_whose_server_was_killed_counts_its_slot_time(ws_cache):
    """max_gpu_hours counts each run's slot time as it ends, and a cancelled run's too; a run whose server was
    SIGKILLed mid-run was settled as interrupted with none: killing the server before each run's end (and
    discarding the interrupted run) trained on the GPU for nothing on the budget. The time it may have trained
    counts, bounded by its own limits, from the server's state alone."""
    ws, cache = ws_cache
    state, entry = sigkill_server_mid_run(ws, cache)
    ran = time.time() - entry["started_at"]
    assert state.get("slot_hours", 0) == 0

    async def recover():
        async with stdio_client_for(ws, cache) as client:
            answer(await client.call_tool("status", {}))
    anyio.run(recover)
    spent = state_of(ws).get("slot_hours", 0) * 3600
    assert ran <= spent <= ran + 60 and state_of(ws).get("slot_runs") == 1, (ran, spent)


def test_client_closing_stdio_mid_run_kills_the_training(ws_cache):
    ws, cache = ws_cache

    async def go():
        async with stdio_client_for(ws, cache) as client:
            answer(await client.call_tool("setup", {"tag": "close"}))
            set_knobs(ws, sleep=120, steps=120, spawn=1)
            answer(await client.call_tool("run_experiment", {"description": "abandoned", "wait": False}))
            assert wait_until(lambda: training_started(ws), 10)
            return run_processes(ws, running_entry(ws))
    processes = anyio.run(go)
    assert wait_until(lambda: not any(pid_alive(p) for p in processes), 10), processes
    assert not processes_running(str(ws))

    async def after():
        async with stdio_client_for(ws, cache) as client:
            return answer(await client.call_tool("status", {}))
    assert "interrupted run" in anyio.run(after)["interrupted"]


def test_a_client_gone_before_its_answer_leaves_a_quiet_exit(ws_cache):
    """The demo's Ctrl-C closes the client while a call is running: the server's answer meets a
    closed pipe, and it ends with status 0 and no traceback on the user's terminal."""
    ws, cache = ws_cache
    params = stdio_params(ws, cache)
    server = subprocess.Popen([params.command, *params.args], env=params.env, cwd=params.cwd, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def call(message: dict, answered: bool = True) -> None:
        server.stdin.write((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())
        server.stdin.flush()
        if answered:
            assert b'"result"' in server.stdout.readline()
    try:
        call({"id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                                          "clientInfo": {"name": "test", "version": "0"}}})
        call({"method": "notifications/initialized"}, answered=False)
        call({"id": 2, "method": "tools/call", "params": {"name": "setup", "arguments": {"tag": "gone"}}})
        set_knobs(ws, sleep=3)
        call({"id": 3, "method": "tools/call", "params": {"name": "run_experiment", "arguments": {"description": "x"}}},
             answered=False)
        assert wait_until(lambda: (slot_dir(ws) / "train.py").exists(), 10)
        server.stdout.close()  # the client is gone; its run's answer comes in about 3 s
        assert wait_until(lambda: server.poll() is not None or running_entry(ws) is None, 20)
        server.stdin.close()
        assert server.wait(timeout=30) == 0
        assert b"Traceback" not in server.stderr.read()
    finally:
        server.kill()
        server.wait()


def test_a_dead_servers_run_is_interrupted_whatever_its_log_says(ws_cache):
    """Killed after the training printed its summary but before the result was recorded: the log and
    the report were last written while no server watched (an agent can kill the server, then write
    both), so the next server believes neither: the run is interrupted, its commit kept for a rerun."""
    ws, cache = ws_cache

    async def go():
        async with stdio_client_for(ws, cache) as client:
            answer(await client.call_tool("setup", {"tag": "late"}))
            set_knobs(ws, val_bpb=0.93)
            run = answer(await client.call_tool("run_experiment", {"description": "finished", "wait": False}))
            assert wait_until(lambda: (ws / "runs" / f"0001-{run['commit']}.log").exists() and "depth:" in
                              (ws / "runs" / f"0001-{run['commit']}.log").read_text(), 10)
            return run
    # the server records the run within a second; replay the moment before it did
    run = anyio.run(go)
    with_state = state_of(ws)
    entry = with_state["runs"]["1"]
    entry.update(status="running", result=None)
    (ws / entry["report"]).write_text(json.dumps({"running": True, "pid": 2 ** 22 + 7, "worker_pid": 2 ** 22 + 8}))
    State(ws).save(with_state)  # as the server wrote it then: a state.json edited by hand is not believed

    async def after():
        async with stdio_client_for(ws, cache) as client:
            status = answer(await client.call_tool("status", {}))
            return status, await client.call_tool("keep", {})
    status, kept = anyio.run(after)
    assert status["interrupted"] and run["commit"][:7] in status["interrupted"], status
    assert "0.930000" not in json.dumps(status) and kept.is_error


def test_two_servers_one_workspace_the_second_takes_over_when_the_first_dies(ws_cache):
    ws, cache = ws_cache
    first = subprocess.Popen([stdio_params(ws, cache).command, *stdio_params(ws, cache).args],
                             env=stdio_params(ws, cache).env, cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lock = ws / ".research-loop" / "owner.lock"
        assert wait_until(lambda: first.poll() is not None or lock.exists() and str(first.pid) in lock.read_text(),
                          SERVER_START_S) and first.poll() is None

        async def second_server():
            async with stdio_client_for(ws, cache) as client:
                refused = error(await client.call_tool("setup", {"tag": "two"}))
                status = answer(await client.call_tool("status", {}))
                first.kill()  # the owner dies
                first.wait()
                setup = answer(await client.call_tool("setup", {"tag": "two"}))
                run = answer(await client.call_tool("run_experiment", {"description": "baseline"}))
                return refused, status, setup, run
        refused, status, setup, run = anyio.run(second_server)
    finally:
        first.kill()
        first.wait()
    assert f"pid {first.pid}" in refused and "read-only" in refused
    assert f"pid {first.pid}" in status["read_only"]
    assert setup["branch"] == "autoresearch/two" and run["status"] == "ok"



def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on a port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_http_transport_binds_loopback_and_checks_the_token(ws_cache):
    ws, cache = ws_cache
    port, token = free_port(), "s3cret-token"
    params = stdio_params(ws, cache, "--http", "--port", str(port))
    flagged = subprocess.run([params.command, *params.args, "--token", token], env=params.env, cwd=params.cwd,
                             capture_output=True, text=True, timeout=30)
    assert flagged.returncode == 2 and "unrecognized arguments: --token" in flagged.stderr  # never on a command line
    server = subprocess.Popen([params.command, *params.args], env=dict(params.env, RESEARCH_LOOP_TOKEN=token),
                              cwd=params.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        assert wait_until(lambda: server.poll() is not None or listening(), SERVER_START_S) and server.poll() is None
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=5)
        assert refused.value.code == 401

        async def go():
            headers = {"Authorization": f"bearer {token}"}  # the scheme is case-insensitive
            async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
                async with Client(streamable_http_client(url, http_client=http)) as client:
                    return answer(await client.call_tool("status", {}))
        assert anyio.run(go)["workspace"] == str(ws)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_lone_surrogate_over_http_is_answered_at_once(ws_cache):
    ws, cache = ws_cache
    port = free_port()
    params = stdio_params(ws, cache, "--http", "--port", str(port))
    server = subprocess.Popen([params.command, *params.args], env=dict(params.env, RESEARCH_LOOP_TOKEN="t0k"),
                              cwd=params.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {"Authorization": "Bearer t0k", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    try:
        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        assert wait_until(lambda: server.poll() is not None or listening(), SERVER_START_S) and server.poll() is None
        with httpx2.Client(headers=headers, timeout=5) as http:
            opened = http.post(url, content=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}))
            session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
            http.post(url, headers=session, content='{"jsonrpc": "2.0", "method": "notifications/initialized"}')
            reply = http.post(url, headers=session, content='{"jsonrpc": "2.0", "id": 2, "method": "tools/call", '
                              '"params": {"name": "setup", "arguments": {"tag": "night\\udcff"}}}')
        assert reply.status_code == 400 and "surrogate" in reply.json()["error"]["message"]
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert not (ws / ".research-loop" / "state.json").exists()


def test_http_without_a_token_says_so_loudly(ws_cache):
    ws, cache = ws_cache
    port = free_port()
    params = stdio_params(ws, cache, "--http", "--port", str(port))
    env = {k: v for k, v in params.env.items() if k != "RESEARCH_LOOP_TOKEN"}
    server = subprocess.Popen([params.command, *params.args], env=env, cwd=params.cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        assert "WARNING: no token set" in line and f"127.0.0.1:{port}" in line
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("argv, said", [
    (["-m", "mcp_server", "--http", "--port", "99999"], "argument --port: a port is a number from 0 to 65535"),
    (["-m", "mcp_server.cli", "dashboard", "--port", "99999"], "argument --port: a port is a number from 0 to 65535"),
    (["-m", "mcp_server", "--train-command", "uv run 'train.py"], "--train-command (or env RESEARCH_LOOP_TRAIN_COMMAND)"),
])
def test_a_port_or_train_command_no_server_can_use_is_refused_before_it_starts(tmp_path, argv, said):
    """Review 57: a --port past 65535 raised OverflowError from the socket's bind once the server (or the
    dashboard) had started, and a --train-command with an unclosed quote raised ValueError from shlex: a
    traceback each. Now argparse's usage error, naming the flag and what it takes, and nothing started."""
    done = subprocess.run([sys.executable, *argv, "--workspace", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert said in done.stderr, done.stderr


@pytest.mark.parametrize("argv, program", [(["-m", "mcp_server", "--http", "--port", "0"], "research-loop-mcp"),
                                           (["-m", "mcp_server.cli", "dashboard", "--port", "0"], "research-loop dashboard")])
def test_a_token_file_that_is_a_fifo_or_a_folder_is_refused_at_once(tmp_path, argv, program):
    """--token-file read with a plain open: a FIFO at that name (the agent can write where the user keeps it) blocked
    the server's start, and the dashboard's, without a word. Now a token file that is not a plain file is refused,
    saying what to give. Review 93: the dashboard's refusals began "research-loop-mcp:", the server's name, where its
    other errors say "research-loop dashboard:", and an empty file's said nothing of what to do."""
    (tmp_path / "ws").mkdir()
    os.mkfifo(tmp_path / "token")
    (tmp_path / "empty").write_text("\n")
    for planted in (tmp_path / "token", tmp_path / "ws", tmp_path / "empty"):
        done = subprocess.run([sys.executable, *argv, "--workspace", str(tmp_path / "ws"), "--token-file", str(planted)],
                              cwd=REPO, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        said = (f"--token-file {planted} is empty: write the token in it, or leave --token-file out to take the token "
                "from RESEARCH_LOOP_TOKEN") if planted.name == "empty" else \
            f"cannot read --token-file {planted}: not a plain file: give a plain file"
        assert done.stderr.startswith(f"{program}: {said}"), done.stderr


@pytest.mark.parametrize("env, said", [
    ({"RESEARCH_LOOP_SLOTS": "0"}, "the slots (--slots, or env RESEARCH_LOOP_SLOTS) are a whole number of 1 or more"),
    ({"RESEARCH_LOOP_SLOTS": "two"}, "the slots (--slots, or env RESEARCH_LOOP_SLOTS) are a whole number of 1 or more"),
    ({"RESEARCH_LOOP_EXECUTOR": "SLURM"}, "--executor (or env RESEARCH_LOOP_EXECUTOR) must be one of local, ray, slurm"),
    ({"RESEARCH_LOOP_NOTIFY_FORMAT": "xml"}, "--notify-format (or env RESEARCH_LOOP_NOTIFY_FORMAT) must be one of"),
])
def test_a_setting_from_the_environment_no_server_can_use_is_refused_before_it_starts(tmp_path, env, said):
    """The server's flags are checked by argparse, but a default taken from the environment is not: RESEARCH_LOOP_SLOTS=0
    made a server whose every run_experiment was refused ("0 results are not decided yet (runs ), as many as there are
    slots"), =two a traceback; RESEARCH_LOOP_EXECUTOR=SLURM ran every run on this machine, unsaid; and
    RESEARCH_LOOP_NOTIFY_FORMAT=xml a traceback (the overnight runner's too). Now each is a usage error naming the
    variable, and nothing started."""
    for argv in (["-m", "mcp_server", "--workspace", str(tmp_path)], ["-m", "mcp_server.cli", "overnight", "--tag", "t",
                                                                      "--workspace", str(tmp_path)]):
        if "RESEARCH_LOOP_NOTIFY_FORMAT" not in env and argv[1] == "mcp_server.cli":
            continue  # the runner hands the others to its sessions' servers as they are
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=dict(os.environ, **env))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert said in done.stderr, done.stderr
