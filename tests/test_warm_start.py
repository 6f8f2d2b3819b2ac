"""The warm start of issue 27: each slot's warm evaluator (mcp_server/scripts/harness_eval.py) scores an export
exactly as a cold evaluator does, a gone one leaves the run a cold one; a run handed to the slot's
pre-started worker (executors/executor.py, scripts/warm_train.py) scores as a cold one, sees its own
environment, keeps its sandbox, its timeout (from the hand-over) and the kill of its whole tree, and
no pre-started worker outlives the server. Real exports of the real train.py (the session's
prepared CPU harness), a real server over MCP.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import TEST_EVAL_TOKENS
from mcp_server.executors import cluster, executor
from mcp_server.scripts import harness_eval
from nanochat.profiles import PROFILES
from mcp_server.core.integrity import site_packages
from mcp_server.loop import ResearchLoop
from mcp_server.server import build_server
from mcp_server.core.workspace import Workspace
from server_support import answer, git, make_workspace, pid_alive, processes_in, wait_until
from test_server_e2e import RUN_TIMEOUT_S, harness_workspace

HANG_TIMEOUT_S = 20
HANG_DELAY_S = 10  # between the run before the hanging one and its submission: its worker waits, started ahead


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


def test_the_evaluator_neither_spins_nor_faults_in_fresh_pages_for_every_call(exported, prepared_env, tmp_path):
    """OpenMP's default spins 300,000 times at every barrier: beside the slot's next interpreter
    importing torch on 2 cores, that spinning took the evaluation 5x the CPU-seconds; the OpenMP
    runtime itself says what it runs with (OMP_DISPLAY_ENV), in the run's log. And glibc's malloc
    gave each call's logits back to the kernel: the evaluation faulted in about three times the
    pages of all its logits; kept, it faults in fewer than they take once."""
    harness, export = exported
    spec = evaluation_spec(harness, prepared_env)
    spec["env"]["OMP_DISPLAY_ENV"] = "VERBOSE"
    result = evaluate(spec, export, tmp_path / "run.log")
    log = (tmp_path / "run.log").read_text()
    logits_pages = int(TEST_EVAL_TOKENS) * PROFILES["cpu"]["vocab_size"] * 4 // os.sysconf("SC_PAGE_SIZE")  # fp32, once
    assert result["causal"] is True and 0 < result["cpu_seconds"], result
    assert {"passive": "OMP_WAIT_POLICY = 'PASSIVE'" in log and "GOMP_SPINCOUNT = '1000'" in log,
            "pages below the logits'": result["page_faults"] < logits_pages} == \
        {"passive": True, "pages below the logits'": True}, (result, logits_pages, log[:3000])


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
# Says what it saw at import, leaves a daemon in a session of its own, then hangs: the timeout must end both.
HANGS = """import os, subprocess, sys, time
print("AT IMPORT run", os.environ.get("RESEARCH_LOOP_RUN"), "export", os.environ.get("RESEARCH_LOOP_EXPORT"),
      "torch already", "torch" in sys.modules, flush=True)
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open("daemon.pid", "w").write(str(daemon.pid))
print("hanging", flush=True)
time.sleep(600)
"""


def report_of(ws: Path, result: dict) -> dict:
    return json.loads((ws / result["log"].replace(".log", ".report.json")).read_text())


def test_on_the_warm_path_the_sandbox_holds_and_a_hanging_run_is_killed_whole(tmp_path, repo_root, prepared_env,
                                                                                 monkeypatch):
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch)
    monkeypatch.delenv(harness_eval.WARM_ENV, raising=False)
    monkeypatch.delenv(executor.WARM_START_ENV, raising=False)
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1)
    source = (ws / "train.py").read_text()
    home = Path.home()

    async def go():
        async with Client(build_server(loop)) as client:
            answer(await client.call_tool("setup", {"tag": "warm"}))
            (ws / "train.py").write_text("print('a first run, cold')\n")
            first = answer(await client.call_tool("run_experiment", {"description": "first",
                                                                     "timeout_seconds": RUN_TIMEOUT_S}))
            answer(await client.call_tool("discard", {}))
            ahead_pid = loop.pool.ahead[0].proc.pid  # started ahead once the first run ended
            (ws / "train.py").write_text(source.replace(WRITES_OUTSIDE[0], WRITES_OUTSIDE[1].format(home=home), 1))
            writes = answer(await client.call_tool("run_experiment", {"description": "writes outside",
                                                                      "timeout_seconds": RUN_TIMEOUT_S}))
            answer(await client.call_tool("discard", {}))
            warm_pid = loop.pool.evaluators[0].proc.pid
            (ws / "train.py").write_text(HANGS)
            await anyio.sleep(HANG_DELAY_S)
            submitted = time.monotonic()
            hung = answer(await client.call_tool("run_experiment", {"description": "hangs",
                                                                    "timeout_seconds": HANG_TIMEOUT_S}))
            return first, ahead_pid, writes, warm_pid, hung, time.monotonic() - submitted
    try:
        first, ahead_pid, writes, warm_pid, hung, hung_seconds = anyio.run(go)
        assert pid_alive(warm_pid) and loop.pool.evaluators[0].proc.pid == warm_pid  # kept for the next run
        unused = loop.pool.ahead[0].proc.pid  # started ahead after the hanging run: never used
        assert pid_alive(unused)
    finally:
        loop.shutdown()
    slot = ws / ".git" / "research-loop" / "slots" / "0"
    assert not pid_alive(warm_pid) and not pid_alive(unused)  # the server's end: none is left
    assert wait_until(lambda: not processes_in(slot), 5), processes_in(slot)
    assert not report_of(ws, first)["warm_start"] and not pid_alive(ahead_pid)  # it ran the second run, then ended
    log = (ws / writes["log"]).read_text()
    assert writes["status"] == "ok" and writes["verified"], writes
    assert "WROTE" not in log and log.count("REFUSED") == 3, log[:3000]
    assert "planted" not in (ws / "results.tsv").read_text() and not (Path.home() / "warm-escape").exists()
    report = report_of(ws, writes)
    assert report["sandbox"] and report["warm_start"] and report["evaluation"]["evaluator"] == "warm", report
    report, log = report_of(ws, hung), (ws / hung["log"]).read_text()
    assert hung["status"] == "timeout" and report["warm_start"], (hung, report)
    # the run's own environment at import (its number and export path are set only at the hand-over)
    assert f"AT IMPORT run {hung['run']} export {ws / '.research-loop' / 'exports'}" in log, log[:2000]
    assert "torch already True" in log, log[:2000]
    # the timeout counts from the hand-over, not from the worker's start HANG_DELAY_S earlier
    assert hung_seconds >= HANG_TIMEOUT_S and report["wall_seconds"] >= HANG_TIMEOUT_S, (hung_seconds, report)
    assert (slot / "daemon.pid").exists()  # the daemon started (its pid is the sandbox's own: PID namespace)


def test_a_warm_run_scores_as_a_cold_one_and_the_switch_gives_the_cold_path(tmp_path, repo_root, prepared_env,
                                                                              monkeypatch):
    """The real train.py three times, the same code and seed: cold (the slot's first run), warm, then
    with RESEARCH_LOOP_WARM_START=0 cold again, and nothing started ahead after it."""
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch)
    monkeypatch.delenv(executor.WARM_START_ENV, raising=False)
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1)

    async def go():
        async with Client(build_server(loop)) as client:
            answer(await client.call_tool("setup", {"tag": "same"}))
            runs = [answer(await client.call_tool("run_experiment", {"description": "baseline",
                                                                     "timeout_seconds": RUN_TIMEOUT_S}))]
            answer(await client.call_tool("keep", {}))
            for switch in ("1", "0"):
                monkeypatch.setenv(executor.WARM_START_ENV, switch)
                runs.append(answer(await client.call_tool("run_experiment", {
                    "description": f"the same, warm start {switch}", "timeout_seconds": RUN_TIMEOUT_S,
                    "rerun": True})))
                answer(await client.call_tool("discard", {}))
            return runs
    try:
        runs = anyio.run(go)
        ahead_after_off = dict(loop.pool.ahead)
    finally:
        loop.shutdown()
    assert [report_of(ws, run)["warm_start"] for run in runs] == [False, True, False], runs
    assert ahead_after_off == {}
    assert all(run["status"] == "ok" and run["verified"] for run in runs), runs
    assert runs[0]["val_bpb"] == runs[1]["val_bpb"] == runs[2]["val_bpb"], [run["val_bpb"] for run in runs]


def test_a_hand_over_line_that_changes_the_sandbox_or_command_is_refused():
    """The waiting worker's stdin can be written by anyone with the server's uid (/proc/PID/fd/0): a
    line that changes what it was started with (no sandbox, another command, other CPUs) is not
    the server's, and runs nothing; the server's own line (only the run's log, report, timeout,
    evaluation and data order differ) is taken."""
    from mcp_server.scripts.worker import handed_args, parse_args
    base = ["--sandbox", '{"readonly": ["/"]}', "--cpus", "0", "--watch-stdin"]
    started = parse_args(["--warm", "--log", "a.log", "--report", "a.json", *base, "--", "python", "train.py"])
    run = ["--log", "b.log", "--report", "b.json", "--timeout", "30", "--data-order", "2", *base]

    def line(argv, env=None):
        return json.dumps({"argv": argv, "env": {"X": "1"} if env is None else env}).encode() + b"\n"

    handed = handed_args(line([*run, "--", "python", "train.py"]), started)
    assert handed is not None and str(handed[0].log) == "b.log" and handed[0].data_order == 2
    for forged in ([*run, "--unsandboxed", "--", "python", "train.py"],
                   [*run, "--", "python", "planted.py"],
                   [a.replace('{"readonly": ["/"]}', "{}") for a in run] + ["--", "python", "train.py"],
                   [a if a != "0" else "0,1" for a in run] + ["--", "python", "train.py"]):
        assert handed_args(line(forged), started) is None, forged
    assert handed_args(b"not json\n", started) is None
    assert handed_args(line([*run, "--", "python", "train.py"], env=["X"]), started) is None
