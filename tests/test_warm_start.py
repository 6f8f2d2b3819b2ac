"""The warm start of issue 27: each slot's warm evaluator (mcp_server/scripts/harness_eval.py) scores an export
exactly as a cold evaluator does, a gone one leaves the run a cold one, and runs on the warm path
keep their sandbox and their timeout's kill of the whole tree. Real exports of the real train.py
(the session's prepared CPU harness), a real server over MCP.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import TEST_EVAL_TOKENS
from mcp_server.executors import cluster
from mcp_server.scripts import harness_eval
from mcp_server.core.integrity import site_packages
from mcp_server.loop import ResearchLoop
from mcp_server.server import build_server
from mcp_server.core.workspace import Workspace
from server_support import answer, git, make_workspace, pid_alive, processes_in, wait_until
from test_server_e2e import RUN_TIMEOUT_S, harness_workspace

HANG_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory, prepared_env, repo_root):
    """A pristine harness copy (prepare.py, nanochat/) and the real train.py's export, made once."""
    folder = tmp_path_factory.mktemp("warm")
    harness = folder / "harness"
    harness.mkdir()
    shutil.copy(repo_root / "prepare.py", harness / "prepare.py")
    shutil.copytree(repo_root / "nanochat", harness / "nanochat", ignore=shutil.ignore_patterns("__pycache__"))
    export = folder / "export" / "model.pt2"
    export.parent.mkdir()
    subprocess.run([sys.executable, "train.py"], cwd=repo_root, check=True, capture_output=True,
                   env=dict(prepared_env, RESEARCH_LOOP_EXPORT=str(export)))
    assert export.is_file() and Path(f"{export}.json").is_file()
    return harness, export


def evaluation_spec(harness: Path, prepared_env: dict) -> dict:
    """What the server's integrity.evaluation_spec makes, for a harness copy outside git (a node's)."""
    cache = Path(prepared_env["AUTORESEARCH_CACHE"])
    record = json.loads((cache / "prepared.json").read_text())
    val = cache / "data" / record["val_shard"]["name"]
    return {"argv": [sys.executable, "-I", "-S", "-B", str(harness / "nanochat" / "evaluate_export.py"),
                     "--profile", "cpu", "--eval-tokens", TEST_EVAL_TOKENS, "--site-packages", *site_packages()],
            "env": {"PATH": os.environ["PATH"], "AUTORESEARCH_CACHE": str(cache)}, "harness": str(harness),
            "harness_manifest": harness_eval.file_manifest(str(harness)), "timeout": 300.0,
            "inputs": harness_eval.evaluation_inputs(cache, val, record)}


def evaluate(spec: dict, export: Path, log: Path, warm: harness_eval.WarmEvaluator | None = None) -> dict:
    """One evaluation of the export as a run's worker makes it (the answer file beside the log)."""
    sock = socket.socket(fileno=os.dup(warm.fileno())) if warm is not None else None
    evaluation = harness_eval.HarnessEvaluation(spec, log, export, log.with_suffix(".answer.json"), sock)
    evaluation.start_if_exported(None)
    return evaluation.finish(5.0)


SCORE = ("val_bpb", "matmul_flops_per_token", "eval_tokens", "causal")


def test_a_warm_evaluators_result_equals_a_cold_ones_for_the_same_export(exported, prepared_env, tmp_path):
    harness, export = exported
    spec = evaluation_spec(harness, prepared_env)
    cold = evaluate(spec, export, tmp_path / "cold.log")
    warm = harness_eval.WarmEvaluator(spec)
    try:
        first = evaluate(spec, export, tmp_path / "warm1.log", warm)
        again = evaluate(spec, export, tmp_path / "warm2.log", warm)  # the same evaluator, a new child
        assert warm.alive()
    finally:
        warm.close()
    assert cold["evaluator"] == "cold" and first["evaluator"] == again["evaluator"] == "warm", (cold, first)
    assert cold["causal"] is True and cold["val_bpb"] > 0, cold
    assert {k: first[k] for k in SCORE} == {k: again[k] for k in SCORE} == {k: cold[k] for k in SCORE}
    assert "harness evaluation: {" in (tmp_path / "warm1.log").read_text()  # the child's output, in the run's log
    assert not pid_alive(warm.proc.pid)


def test_a_warm_evaluator_that_is_gone_leaves_the_run_a_cold_one(exported, prepared_env, tmp_path):
    harness, export = exported
    spec = evaluation_spec(harness, prepared_env)
    warm = harness_eval.WarmEvaluator(spec)
    warm.proc.kill()
    warm.proc.wait()
    try:
        result = evaluate(spec, export, tmp_path / "run.log", warm)
    finally:
        warm.close()
    assert result["evaluator"] == "cold" and result["causal"] is True and result["val_bpb"] > 0, result
    assert "warm evaluator did not answer" in (tmp_path / "run.log").read_text()


def test_the_packaged_node_scripts_import_what_they_need_with_a_bare_python(tmp_path):
    """cluster.package ships the modules worker.py imports: a node has no mcp_server package."""
    ws = make_workspace(tmp_path)
    dest = tmp_path / "job"
    cluster.package(Workspace(ws), git(ws, "rev-parse", "HEAD").strip(), dest, "token")
    for script in ("worker.py", "node.py"):
        done = subprocess.run([sys.executable, "-S", f"research-loop-node/{script}", "--help"], cwd=dest,
                              capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert done.returncode == 0, done.stderr


# Before it trains, it tries to write outside its folder: the workspace's ledger, the harness copy.
WRITES_OUTSIDE = ("import torch\n", """import torch
for _target in ("../../../../results.tsv", "../../harness/prepare.py", "{home}/warm-escape"):
    try:
        with open(_target, "a") as _f:
            _f.write("planted")
        print("WROTE", _target, flush=True)
    except OSError as _exc:
        print("REFUSED", _target, type(_exc).__name__, flush=True)
""")
# Leaves a daemon in a session of its own, then hangs: the timeout must end both.
HANGS = """import os, subprocess, sys, time
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open("daemon.pid", "w").write(str(daemon.pid))
print("hanging", flush=True)
time.sleep(600)
"""


def test_on_the_warm_path_the_sandbox_holds_and_a_hanging_run_is_killed_whole(tmp_path, repo_root, prepared_env,
                                                                                 monkeypatch):
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch)
    monkeypatch.delenv(harness_eval.WARM_ENV, raising=False)
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1)
    source = (ws / "train.py").read_text()
    home = Path.home()

    async def go():
        async with Client(build_server(loop)) as client:
            answer(await client.call_tool("setup", {"tag": "warm"}))
            (ws / "train.py").write_text(source.replace(WRITES_OUTSIDE[0], WRITES_OUTSIDE[1].format(home=home), 1))
            first = answer(await client.call_tool("run_experiment", {"description": "writes outside",
                                                                     "timeout_seconds": RUN_TIMEOUT_S}))
            answer(await client.call_tool("discard", {}))
            warm_pid = loop.pool.evaluators[0].proc.pid
            (ws / "train.py").write_text(HANGS)
            hung = answer(await client.call_tool("run_experiment", {"description": "hangs",
                                                                    "timeout_seconds": HANG_TIMEOUT_S}))
            return first, warm_pid, hung
    try:
        first, warm_pid, hung = anyio.run(go)
        assert pid_alive(warm_pid) and loop.pool.evaluators[0].proc.pid == warm_pid  # kept for the next run
    finally:
        loop.shutdown()
    assert not pid_alive(warm_pid)  # the server's end closed: the warm evaluator is gone with it
    log = (ws / first["log"]).read_text()
    assert first["status"] == "ok" and first["verified"], first
    assert "WROTE" not in log and log.count("REFUSED") == 3, log[:3000]
    assert "planted" not in (ws / "results.tsv").read_text() and not (Path.home() / "warm-escape").exists()
    report = json.loads((ws / first["log"].replace(".log", ".report.json")).read_text())
    assert report["sandbox"] and report["evaluation"]["evaluator"] == "warm", report
    assert hung["status"] == "timeout", hung
    slot = ws / ".git" / "research-loop" / "slots" / "0"
    assert (slot / "daemon.pid").exists()  # the daemon started (its pid is the sandbox's own: PID namespace)
    assert wait_until(lambda: not processes_in(slot), 5)
