"""Runs on a real Ray cluster through the MCP tools: a head on 127.0.0.1 with 2 CPUs and 2 logical
GPUs, started once for the session (conftest.ray_head); the fast fake trainer, and one real
train.py run."""
import json
import sys

import anyio
import pytest

import cluster_support as cluster
from mcp_server.executors import ray_executor
from server_support import (TRAIN_COMMAND, Lab, answer, free_port, git, ledger_lines, make_cache, make_workspace, set_knobs,
                            stdio_client_for, wait_until)
from test_server_e2e import RUN_TIMEOUT_S, SHORT_BUDGET, harness_workspace

pytest.importorskip("ray", reason="the ray extra is not installed: uv sync --extra ray")


def on_ray(head, capacity=2, train_command=None):
    return lambda ws: ray_executor.RayExecutor(ws, train_command or TRAIN_COMMAND, capacity, head.address)


@pytest.fixture
def ray_lab(fake_env, ray_head, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lab = Lab(make_workspace(fake_env), slots=2, executor=on_ray(ray_head))
    yield lab
    lab.loop.shutdown()


def visible(lab, result) -> str:
    line = next(l for l in (lab.ws / result["log"]).read_text().splitlines() if l.startswith("visible:"))
    return line.split()[1].split("=")[1]


def record(lab, result) -> dict:
    return json.loads((lab.ws / result["log"].replace(".log", ".json")).read_text())


def trainers(head) -> list[int]:
    """The fake trainers and what they spawned, wherever Ray runs them (all under the head's folder)."""
    return cluster.trainers(head.folder)


def test_two_jobs_at_once_on_their_own_gpus_and_a_third_waits(ray_lab, ray_head):
    ray_lab.baseline()
    ids = []
    for k, value in enumerate((0.91, 0.92, 0.93)):
        set_knobs(ray_lab.ws, val_bpb=value, sleep=3, steps=3)
        ids.append(ray_lab.ok("run_experiment", description=f"idea {k}", wait=False))
    assert [r["status"] for r in ids] == ["running", "running", "queued"]
    results = ray_lab.ok("wait", all=True)["results"]
    assert sorted(r["val_bpb"] for r in results) == [0.91, 0.92, 0.93]
    first, second, third = (ray_lab.loop.answer_for(r["run"]).model_dump() for r in ids)
    assert {visible(ray_lab, first), visible(ray_lab, second)} == {"0", "1"}  # Ray's pinning
    a, b = record(ray_lab, first)["run"], record(ray_lab, second)["run"]
    assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
    assert record(ray_lab, third)["run"]["started_at"] >= min(a["ended_at"], b["ended_at"]) - 0.5
    assert first["slot"].startswith("ray job research-loop-") and " GPU " in first["slot"]
    assert first["device"] and a["device"] == first["device"] and a["host"]
    assert "RESEARCH_LOOP_RESULT" in (ray_lab.ws / first["log"]).read_text()
    for r in ids:
        ray_lab.ok("discard", run=r["run"])
    assert len(ledger_lines(ray_lab.ws)) == 5


def test_cancel_and_timeout_kill_the_jobs_whole_process_tree(ray_lab, ray_head):
    ray_lab.baseline()
    set_knobs(ray_lab.ws, sleep=120, steps=120, spawn=1, escape=1)
    cancelled = ray_lab.ok("run_experiment", description="to cancel", wait=False)
    # each job: the trainer, its grandchild, and a daemon that left its session. The timed job is sent once the first
    # one's are there: sent together, the two jobs' trees showed 5.4 s after (load 4.4), and a loaded machine that
    # starts one job more than ~7 s after the other saw the timed one end at its 8 s before the other's were there
    assert wait_until(lambda: len(trainers(ray_head)) >= 3, 90), trainers(ray_head)
    timed = ray_lab.ok("run_experiment", description="to time out", wait=False, timeout_seconds=8, rerun=True)
    assert wait_until(lambda: len(trainers(ray_head)) >= 6, 90), trainers(ray_head)
    row = ray_lab.ok("cancel", run=cancelled["run"])["row"]
    assert row["status"] == "crash" and row["description"] == "to cancel (cancelled)"
    result = ray_lab.ok("wait")["results"][0]
    assert result["run"] == timed["run"] and result["status"] == "timeout", result
    assert "killed after the 8s timeout" in result["tail"]
    assert wait_until(lambda: not trainers(ray_head), 30), trainers(ray_head)
    ray_lab.ok("discard")


def test_a_restarted_server_reattaches_to_its_jobs(ray_lab):
    ray_lab.baseline()
    set_knobs(ray_lab.ws, val_bpb=0.8, sleep=6, steps=6)
    run = ray_lab.ok("run_experiment", description="outlives its server", wait=False)
    assert wait_until(lambda: "step" in (ray_lab.ws / run["log"]).read_text(), 60)
    ray_lab.restart()  # the job goes on in Ray; the new server finds it by its submission id
    assert ray_lab.loop.entry(run["run"])["status"] == "running"
    result = ray_lab.ok("wait")["results"][0]
    assert result["run"] == run["run"] and result["status"] == "ok" and result["val_bpb"] == 0.8
    assert ray_lab.ok("keep", unconfirmed=True)["kept_commit"] == run["commit"]


def test_a_job_lost_by_ray_is_a_crash_with_the_reason(ray_lab, ray_head):
    ray_lab.baseline()
    set_knobs(ray_lab.ws, sleep=60, steps=60)
    run = ray_lab.ok("run_experiment", description="lost", wait=False)
    job = ray_lab.loop.entry(run["run"])["job"]
    assert wait_until(lambda: "step" in (ray_lab.ws / run["log"]).read_text(), 60)
    ray_executor.connect(ray_head.address).stop_job(job)  # as if the engine dropped it
    result = ray_lab.ok("wait")["results"][0]
    assert result["status"] == "crash" and "the ray job was stopped outside this server (STOPPED" in result["tail"]
    assert ray_lab.ok("discard")["row"]["status"] == "crash"


def test_an_unreachable_cluster_is_a_crash_row_with_the_reason(fake_env):
    nowhere = f"http://127.0.0.1:{free_port()}"
    lab = Lab(make_workspace(fake_env), executor=lambda ws: ray_executor.RayExecutor(ws, TRAIN_COMMAND, 1, nowhere))
    try:
        lab.ok("setup", tag="t")
        result = lab.ok("run_experiment", description="baseline")
        assert result["status"] == "crash" and "Cannot reach the Ray cluster" in result["tail"]
        assert "ray start --head" in result["tail"]
        assert lab.ok("discard")["row"]["status"] == "crash"
        assert git(lab.ws, "cat-file", "-t", "refs/research-loop/runs/1").strip() == "commit"
    finally:
        lab.loop.shutdown()


def test_real_train_py_through_ray(tmp_path, repo_root, prepared_env, monkeypatch, ray_head):
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, SHORT_BUDGET)
    command = [sys.executable, "train.py"]
    lab = Lab(ws, executor=on_ray(ray_head, 1, command), train_command=command)
    try:
        lab.ok("setup", tag="ray")
        run = lab.ok("run_experiment", description="baseline on ray", timeout_seconds=RUN_TIMEOUT_S)
        assert run["status"] == "ok", run.get("tail")
        assert 0 < run["val_bpb"] < 20 and run["num_steps"] >= 1 and run["slot"].startswith("ray job")
        log = (ws / run["log"]).read_text()
        assert "training on" in log and "preparing the data" not in log  # this node was prepared already
        # the node evaluated the exported model from its own harness copy, as a slot here does
        assert run["verified"] is True and "harness evaluation" in run["integrity"], run["integrity"]
        assert "harness evaluation of the exported model" in log
        assert lab.ok("keep")["row"]["status"] == "keep"
    finally:
        lab.loop.shutdown()


def test_without_the_extra_the_executor_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    from mcp_server.core.models import Refusal
    with pytest.raises(Refusal, match=r"uv sync --extra ray"):
        ray_executor.ray_jobs()



def test_the_server_started_with_executor_ray_runs_on_the_cluster(tmp_path, ray_head, monkeypatch):
    """`python -m mcp_server --executor ray --ray-address ...` over stdio: the capacity comes from the
    cluster (2 GPUs), the run is a Ray job."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ws, cache = make_workspace(tmp_path), make_cache(tmp_path)

    async def go():
        async with stdio_client_for(ws, cache, "--executor", "ray", "--ray-address", ray_head.address) as client:
            answer(await client.call_tool("setup", {"tag": "cli"}))
            status = answer(await client.call_tool("status", {}))
            run = answer(await client.call_tool("run_experiment", {"description": "baseline"}))
            return status, run

    status, run = anyio.run(go)
    assert run["status"] == "ok" and run["slot"].startswith("ray job research-loop-"), run
    assert status["slots"] == 2, status


def test_a_server_without_the_clusters_token_is_told_how_to_give_it(tmp_path, ray_head, monkeypatch):
    """The session's cluster uses token authentication (conftest): a server started without the
    token reaches it, is turned away, and each run says what to set."""
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    ws, cache = make_workspace(tmp_path), make_cache(tmp_path)

    async def go():
        async with stdio_client_for(ws, cache, "--executor", "ray", "--ray-address", ray_head.address) as client:
            answer(await client.call_tool("setup", {"tag": "no-token"}))
            return answer(await client.call_tool("run_experiment", {"description": "baseline"}))

    run = anyio.run(go)
    assert run["status"] == "crash" and "uses token authentication" in run["tail"], run["tail"]
    assert "RAY_AUTH_TOKEN" in run["tail"]
