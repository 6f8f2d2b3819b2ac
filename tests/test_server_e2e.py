"""End to end: the real train.py on the CPU through run_experiment, then discard.

The workspace is a temp git repository holding this project's harness (prepare.py,
nanochat/) and train.py; the cache is the session's prepared CPU harness (4 s budget).
"""
import shutil
import sys

import anyio
from mcp import Client

from mcp_server.loop import ResearchLoop
from mcp_server.server import build_server
from server_support import answer, git, ledger_lines

HARNESS = ("prepare.py", "train.py", "nanochat")
RUN_TIMEOUT_S = 400  # start-up and evaluation on a shared 2-core CPU come on top of the budget


def test_real_training_run_then_discard(tmp_path, repo_root, prepared_env, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in HARNESS:
        source = repo_root / name
        if source.is_dir():
            shutil.copytree(source, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, ws / name)
    git(ws, "init", "-q", "-b", "main")
    git(ws, "config", "user.email", "test@example.com")
    git(ws, "config", "user.name", "test")
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "harness and train.py")
    for key in ("AUTORESEARCH_CACHE", "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS", "AUTORESEARCH_COMPILE"):
        monkeypatch.setenv(key, prepared_env[key])
    loop = ResearchLoop(ws, [sys.executable, "train.py"])

    async def go():
        async with Client(build_server(loop)) as client:
            setup = answer(await client.call_tool("setup", {"tag": "e2e"}))
            run = answer(await client.call_tool("run_experiment", {"description": "baseline on cpu",
                                                                   "timeout_seconds": RUN_TIMEOUT_S}))
            discard = answer(await client.call_tool("discard", {"reason": "e2e test"}))
            return setup, run, discard
    setup, run, discard = anyio.run(go)

    assert run["status"] == "ok", run.get("tail")
    assert 0 < run["val_bpb"] < 20 and run["num_steps"] >= 1 and run["training_seconds"] > 0
    assert 0 < run["eval_seconds"] < run["total_seconds"] - run["training_seconds"]  # the split the demo prints
    assert run["compile_cache"] == "off (AUTORESEARCH_COMPILE=0)" and run["recompiles"] == 0  # as train.py said
    assert discard["row"]["status"] == "discard" and discard["kept_commit"] == setup["base_commit"]
    assert ledger_lines(ws)[1] == (f"{run['commit']}\t{run['val_bpb']:.6f}\t{run['memory_gb']:.1f}\t"
                                   "discard\tbaseline on cpu (e2e test)")
    assert git(ws, "rev-parse", "--short=7", "HEAD").strip() == setup["base_commit"]
    assert git(ws, "status", "--porcelain") == ""
    assert (ws / "runs" / f"0001-{run['commit']}.log").read_text().count("val_bpb:") == 1
