"""The server as clients run it: `python -m mcp_server` over stdio (and HTTP), killed mid-run."""
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import anyio
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from server_support import (
    REPO, answer, error, git, group_members, ledger_lines, make_cache, make_workspace, pid_alive, processes_running,
    set_knobs, stdio_client_for, stdio_params, wait_until,
)


@pytest.fixture
def ws_cache(tmp_path):
    return make_workspace(tmp_path), make_cache(tmp_path)


def state_of(ws) -> dict:
    return json.loads((ws / ".research-loop" / "state.json").read_text())


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
    assert len(progress) >= 2 and progress[-1][0] <= 100 and "loss" in progress[-1][2]
    assert {"setup", "run_experiment", "read_metrics", "keep", "discard", "log_result"} <= names
    assert answer(run)["val_bpb"] == 1.0 and answer(keep)["row"]["status"] == "keep"
    assert "no pending result" in error(keep_again)
    assert len(ledger_lines(ws)) == 2


def sigkill_server_mid_run(ws, cache) -> dict:
    """Starts a slow run over stdio, SIGKILLs the server, returns the state it left."""
    killed = {}

    async def go():
        try:
            async with stdio_client_for(ws, cache) as client:
                answer(await client.call_tool("setup", {"tag": "kill"}))
                set_knobs(ws, sleep=120, steps=120, spawn=1)
                answer(await client.call_tool("run_experiment", {"description": "doomed", "wait": False}))
                assert wait_until(lambda: (ws / "spawned.pid").exists(), 10)
                killed.update(state_of(ws))
                os.kill(killed["running"]["server_pid"], signal.SIGKILL)
        except Exception:
            if not killed:
                raise  # only the transport breaking after the kill is expected
    anyio.run(go)
    return killed


def test_sigkilled_server_leaves_no_training_and_next_start_recovers(ws_cache):
    ws, cache = ws_cache
    state = sigkill_server_mid_run(ws, cache)
    commit = state["running"]["commit"]
    grandchild = int((ws / "spawned.pid").read_text())
    assert wait_until(lambda: not group_members(state["running"]["pgid"]) and not pid_alive(grandchild), 8), \
        group_members(state["running"]["pgid"])
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
    assert not (ws / ".research-loop" / "run.lock").exists()
    assert git(ws, "rev-parse", "HEAD").strip() == state["kept_commit"]


def test_client_closing_stdio_mid_run_kills_the_training(ws_cache):
    ws, cache = ws_cache

    async def go():
        async with stdio_client_for(ws, cache) as client:
            answer(await client.call_tool("setup", {"tag": "close"}))
            set_knobs(ws, sleep=120, steps=120, spawn=1)
            answer(await client.call_tool("run_experiment", {"description": "abandoned", "wait": False}))
            assert wait_until(lambda: (ws / "spawned.pid").exists(), 10)
            return state_of(ws)["running"]["pgid"]
    group = anyio.run(go)
    grandchild = int((ws / "spawned.pid").read_text())
    assert wait_until(lambda: not group_members(group) and not pid_alive(grandchild), 8), group_members(group)
    assert not processes_running(str(ws))

    async def after():
        async with stdio_client_for(ws, cache) as client:
            return answer(await client.call_tool("status", {}))
    assert "interrupted run" in anyio.run(after)["interrupted"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    params = stdio_params(ws, cache, "--http", "--port", str(port), "--token", token)
    server = subprocess.Popen([params.command, *params.args], env=params.env, cwd=params.cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        assert wait_until(listening, 15)
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=5)
        assert refused.value.code == 401

        async def go():
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
                async with Client(streamable_http_client(url, http_client=http)) as client:
                    return answer(await client.call_tool("status", {}))
        assert anyio.run(go)["workspace"] == str(ws)
    finally:
        server.terminate()
        server.wait(timeout=10)
