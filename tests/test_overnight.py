"""Overnight, for real: stop conditions recorded with the research run, the stop tool, the Stop
hook that keeps Claude working (judged by the hook itself, then in real Claude Code sessions
with a scripted model), long tool calls that outlive their client, and the unattended runner."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from mcp_server.core import limits
from mcp_server.server import build_server
from plugin_support import (REPO, TOOL_PREFIX, ScriptedAgent, claude_env, install_claude_cli, uv_link_mode)
from server_support import (FAKE_PYTHON, Webhook, answer, git, ledger_lines, make_cache, make_workspace, pid_alive,
                            processes_in, set_knobs, stdio_client_for, wait_until)

HOOK = REPO / "hooks" / "research_loop_hook.py"


# --- limits, recorded by the server ---------------------------------------------------------
@pytest.mark.parametrize("limits_given, message", [
    ({"hours": -1}, "hours must be more than 0"),
    ({"hours": 0}, "hours must be more than 0"),
    ({"max_experiments": 0}, "max_experiments must be a whole number of at least 1"),
    ({"max_experiments": 2.5}, "max_experiments"),
    ({"target_val_bpb": -0.1}, "target_val_bpb must be above 0"),
    ({"max_failures_in_row": 0}, "max_failures_in_row"),
])
def test_limits_that_make_no_sense_are_refused_at_setup(lab, limits_given, message):
    refused = lab.refused("setup", tag="t", **limits_given)
    assert message in refused  # a value of the wrong type is refused by the tool schema itself
    assert git(lab.ws, "branch", "--show-current").strip() == "main"


def test_a_target_above_the_best_the_run_starts_from_is_refused(lab):
    lab.baseline()
    git(lab.ws, "checkout", "-q", "-b", "next")  # a new run from the kept commit (val_bpb 1.0)
    assert "not below the current best 1.000000" in lab.refused("setup", tag="t2", target_val_bpb=1.2)
    assert lab.ok("setup", tag="t2", target_val_bpb=0.9)["limits"] == "target val_bpb 0.9; 0 of 10 failures in a row"


def test_max_experiments_ends_the_run_and_status_says_so(lab):
    lab.ok("setup", tag="t", max_experiments=2)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    for value in (0.9, 0.95):
        assert "experiments left" in lab.ok("status")["limits"]
        set_knobs(lab.ws, val_bpb=value)
        lab.ok("run_experiment", description=f"try {value}")
        lab.ok("discard")
    status = lab.ok("status")
    assert status["ended"] == "2 experiments done" and status["next"].startswith("nothing: the research run has ended")
    assert "has ended (2 experiments done)" in lab.refused("run_experiment", description="one more")


def test_a_deadline_passing_mid_run_lets_that_run_finish_and_be_decided(lab):
    deadline = time.time() + 10  # room for the baseline on a busy machine; the next run trains past it
    lab.ok("setup", tag="t", hours=10 / 3600)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    set_knobs(lab.ws, val_bpb=0.9, sleep=max(deadline - time.time(), 0) + 2, steps=4)
    lab.ok("run_experiment", description="crosses the deadline", wait=False)
    assert wait_until(lambda: (lab.ok("status")["ended"] or "").startswith("the deadline passed"), 30)
    assert "has ended" in lab.refused("run_experiment", description="too late")
    result = lab.ok("wait")["results"][0]
    assert result["status"] == "ok" and lab.ok("keep", unconfirmed=True)["row"]["val_bpb"] == 0.9


def test_failures_in_a_row_end_the_run(lab):
    lab.ok("setup", tag="t", max_failures_in_row=2)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    for k in range(2):
        set_knobs(lab.ws, crash=1)  # again: discard restored the kept train.py
        lab.ok("run_experiment", description=f"broken {k}", rerun=True)  # the same broken code twice
        lab.ok("discard")
    assert "2 failures in a row" in lab.ok("status")["ended"]


def test_the_target_ends_the_run(lab):
    lab.ok("setup", tag="t", target_val_bpb=0.95)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    set_knobs(lab.ws, val_bpb=0.94)
    lab.ok("run_experiment", description="reaches it")
    lab.ok("keep", unconfirmed=True)
    assert "target val_bpb 0.95 is reached" in lab.ok("status")["ended"]


def test_stop_lets_a_run_finish_or_cancels_it_now(lab, hold):
    hold(2)  # in flight until stop has answered (it trained 2 s, which a loaded machine's stop could come after)
    lab.restart()
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9, steps=4)
    assert lab.ok("run_experiment", description="finishes after stop", wait=False)["run"] == 2
    said = lab.refused("stop", reason=" ")  # review 93: it asked for "what this run changes"
    assert "why the research run ends" in said and "this run changes" not in said, said
    stopped = lab.ok("stop", reason="enough for tonight")
    assert stopped["running"] and stopped["stopped"] == "enough for tonight"
    assert "stopped: enough for tonight" in lab.refused("run_experiment", description="more")
    hold.release()
    assert lab.ok("wait")["results"][0]["val_bpb"] == 0.9
    lab.ok("keep", unconfirmed=True)
    assert lab.ok("status")["next"].startswith("nothing")

    git(lab.ws, "checkout", "-q", "-b", "again")
    lab.ok("setup", tag="t2")
    set_knobs(lab.ws, sleep=60, steps=60)
    running = lab.ok("run_experiment", description="cancelled by stop", wait=False)
    stopped = lab.ok("stop", reason="now", now=True)
    assert stopped["cancelled"] == [running["run"]]
    assert ledger_lines(lab.ws)[-1].endswith("crash\tcancelled by stop (cancelled)")


def test_a_run_waited_on_that_stop_now_cancels_answers_that_it_ended(fake_env):
    """Found by review 93: run_experiment(wait=true) whose run stop(now=True) cancelled while it waited answered
    "running" (with "wait() for its result"), though the run was logged as a crash and had left the flight."""
    ws, cache = make_workspace(fake_env), make_cache(fake_env)

    async def play() -> dict:
        answers = {}
        async with stdio_client_for(ws, cache) as client:
            for name, args in (("setup", {"tag": "t"}), ("run_experiment", {"description": "baseline"}), ("keep", {})):
                answer(await client.call_tool(name, args))
            set_knobs(ws, val_bpb=0.9, sleep=60, steps=60)

            async def waited():
                answers["run"] = await client.call_tool("run_experiment", {"description": "cancelled while waited on"})
            with anyio.fail_after(120):
                async with anyio.create_task_group() as calls:
                    calls.start_soon(waited)
                    while "run 2" not in (answer(await client.call_tool("status", {})).get("running") or ""):
                        await anyio.sleep(0.2)
                    answers["stop"] = await client.call_tool("stop", {"reason": "morning", "now": True})
        return answers
    answers = anyio.run(play)
    assert answer(answers["stop"])["cancelled"] == [2]
    ran = answer(answers["run"])
    assert ran["status"] == "crash" and "wait()" not in ran["next"], ran
    assert "cancelled" in ran["tail"] and ran["next"].startswith("nothing to decide"), ran
    assert ledger_lines(ws)[-1].endswith("crash\tcancelled while waited on (cancelled)")


def test_limits_are_judged_the_same_way_by_the_hook_and_the_server():
    state = {"limits": limits.make_limits(hours=1, max_experiments=3, target_val_bpb=0.5, now=1000.0)}
    rows = [("keep", 1.0), ("discard", 1.1), ("crash", 0.0)]
    assert limits.ended(state, rows, now=1000.0 + 1800) is None
    assert limits.left(state, rows, now=1000.0 + 1800) == ("0.5 h of 1 h left; 1 of 3 experiments left; target "
                                                           "val_bpb 0.5 (best 1.000000); 1 of 10 failures in a row")
    assert limits.ended(state, rows, now=1000.0 + 3600) == "the deadline passed (1 h)"
    assert limits.ended(state, rows + [("discard", 1.2)], now=0) == "3 experiments done"


# --- the Stop hook, on its own ---------------------------------------------------------------
def stop_hook(cwd: Path, session: str = "s1", transcript: Path | None = None, active: bool = False) -> dict | None:
    event = {"hook_event_name": "Stop", "cwd": str(cwd), "session_id": session, "stop_hook_active": active,
             "transcript_path": str(transcript) if transcript else None}
    done = subprocess.run([sys.executable, str(HOOK), "stop"], input=json.dumps(event), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def test_stop_hook_does_nothing_outside_an_active_research_run(lab, tmp_path):
    assert stop_hook(tmp_path) is None  # not a repository
    assert stop_hook(lab.ws) is None  # a workspace not set up
    lab.baseline()
    git(lab.ws, "checkout", "-q", "main")
    assert stop_hook(lab.ws) is None  # another branch


def test_stop_hook_sends_claude_back_with_the_next_step_until_it_is_stuck(lab, tmp_path):
    lab.ok("setup", tag="t", max_experiments=5)
    transcript = tmp_path / "transcript.jsonl"
    transcript.write_text('{"type":"assistant","message":{"content":[{"type":"tool_use","name":"x"}]}}\n')
    first = stop_hook(lab.ws, transcript=transcript)
    assert first["decision"] == "block" and "5 of 5 experiments left" in first["reason"]
    assert "run_experiment" in first["reason"] and "/research-loop:stop" in first["reason"]
    # working between stops (a tool call each time): never let go, stop_hook_active or not
    for _ in range(5):
        with open(transcript, "a") as f:
            f.write('{"type":"assistant","message":{"content":[{"type":"tool_use","name":"x"}]}}\n')
        assert stop_hook(lab.ws, transcript=transcript, active=True)["decision"] == "block"
    # stuck: stops with no tool call in between are let go after three blocks
    assert [stop_hook(lab.ws, transcript=transcript, active=True).get("decision") for _ in range(3)] == \
        ["block", "block", None]


def test_stop_hook_lets_claude_stop_once_a_limit_is_met_or_the_run_was_stopped(lab):
    lab.ok("setup", tag="t", max_experiments=1)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    assert stop_hook(lab.ws)["decision"] == "block"
    lab.ok("run_experiment", description="the one experiment", rerun=True)
    lab.ok("discard")
    answer = stop_hook(lab.ws)
    assert "decision" not in answer and "has ended (1 experiments done)" in answer["systemMessage"]
    git(lab.ws, "checkout", "-q", "-b", "more")
    lab.ok("setup", tag="t2")
    assert stop_hook(lab.ws)["decision"] == "block"
    lab.ok("stop", reason="the user said so")
    assert "stopped: the user said so" in stop_hook(lab.ws)["systemMessage"]


# --- a long tool call that its client gives up on ----------------------------------------------
def test_a_run_outlives_the_call_that_started_it_and_its_result_is_kept(lab, hold):
    # the client gives up once the run trains, and the run trains until status has answered: given up after 1 s, a
    # loaded machine's call could be cut before it had started the run, and a 3 s run could end before status
    hold(2)
    lab.restart()
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9, steps=3)

    async def cut_off():
        async with Client(build_server(lab.loop)) as client:
            async with anyio.create_task_group() as calling:
                calling.start_soon(client.call_tool, "run_experiment", {"description": "outlives its call"})
                with anyio.fail_after(60):
                    while not any(e["status"] == "running" for e in (lab.loop.state.load().get("runs") or {}).values()):
                        await anyio.sleep(0.05)
                calling.cancel_scope.cancel()  # the client gives up on the call
            return (await client.call_tool("status", {})).structured_content
    status = anyio.run(cut_off)
    hold.release()
    assert "outlives its call" in status["running"]  # the client gave up, the run goes on
    result = lab.ok("wait")["results"][0]
    assert result["val_bpb"] == 0.9 and lab.ok("keep", unconfirmed=True)["row"]["description"] == "outlives its call"


# --- real Claude Code sessions, the model scripted -------------------------------------------------
@pytest.fixture(scope="module")
def claude():
    return str(install_claude_cli())


@pytest.fixture(scope="module")
def plugin_clone(tmp_path_factory) -> Path:
    clone = tmp_path_factory.mktemp("plugin") / "research-loop"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    return clone


@pytest.fixture
def session_env(tmp_path, plugin_clone, fake_env):
    env = claude_env(tmp_path / "claude-home") | uv_link_mode(plugin_clone)
    return env | {"AUTORESEARCH_CACHE": str(fake_env / "cache"),
                  "RESEARCH_LOOP_TRAIN_COMMAND": f"{FAKE_PYTHON} fake_train.py"}


def session(claude, plugin, workspace, env, prompt, steps) -> tuple[ScriptedAgent, subprocess.CompletedProcess]:
    with ScriptedAgent(steps) as agent:
        done = subprocess.run([claude, "--plugin-dir", str(plugin), "-p", prompt], cwd=workspace,
                              env=agent.env(env), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return agent, done


def call(tool: str, **arguments) -> tuple[str, dict]:
    return TOOL_PREFIX + tool, arguments


def test_claude_is_sent_back_to_work_until_the_limit_then_let_go(claude, plugin_clone, session_env, fake_env):
    ws = make_workspace(fake_env)
    steps = [call("setup", tag="night", max_experiments=3), call("run_experiment", description="baseline"),
             call("keep"), call("run_experiment", description="one", rerun=True), call("discard"),
             call("run_experiment", description="two", rerun=True), call("discard"),
             None,  # tries to end its turn after two experiments: sent back
             call("run_experiment", description="three", rerun=True), call("discard"),
             None]  # the third was the last: let go
    agent, _ = session(claude, plugin_clone, ws, session_env, "/research-loop:autoresearch night --max-experiments 3",
                       steps)
    feedback = agent.stop_feedback()
    assert len(feedback) == 1 and "1 of 3 experiments left" in feedback[0], feedback
    assert [line.split("\t")[4] for line in ledger_lines(ws)[1:]] == ["baseline", "one", "two", "three"]


def test_a_stuck_agent_is_let_go_and_the_stop_command_ends_the_run(claude, plugin_clone, session_env, fake_env):
    ws = make_workspace(fake_env)
    agent, _ = session(claude, plugin_clone, ws, session_env, "/research-loop:autoresearch night",
                       [call("setup", tag="night")])  # then only tries to stop
    assert len(agent.stop_feedback()) == 3  # three blocks, then the fourth stop goes through
    agent, _ = session(claude, plugin_clone, ws, session_env, "/research-loop:stop the user is done",
                       [call("stop", reason="the user is done")])
    assert agent.stop_feedback() == []
    assert json.loads((ws / ".research-loop" / "state.json").read_text())["stopped"]["reason"] == "the user is done"


def test_a_call_longer_than_the_clients_tool_timeout_completes(claude, plugin_clone, session_env, fake_env):
    """MCP_TOOL_TIMEOUT (a hard limit in Claude Code 2.1.332, not extended by progress) is 5 s here;
    the plugin's own server timeout lets an 8 s training run through."""
    ws = make_workspace(fake_env)
    (ws / "train.py").write_text("VAL_BPB = 0.97\nSLEEP = 8\nSTEPS = 1\n")
    git(ws, "commit", "-q", "-am", "a slow, silent training run")
    steps = [call("setup", tag="slow"), call("run_experiment", description="silent for 8 s")]
    agent, _ = session(claude, plugin_clone, ws, session_env | {"MCP_TOOL_TIMEOUT": "5000"},
                       "/research-loop:autoresearch slow", steps + [call("stop", reason="done")])
    answer = json.dumps(agent.requests[-1])
    assert "0.97" in answer and "timed out" not in answer.lower()


# --- the unattended runner ---------------------------------------------------------------------
def runner(claude, ws, env, *args, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mcp_server.cli", "overnight", "--workspace", str(ws),
                             "--claude", claude, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=preexec_fn)


@pytest.mark.parametrize("flags, said", [
    (["--hours", "nan"], "--hours: hours must be a number, got nan"),
    (["--hours", "inf"], "--hours: hours must be a number, got inf"),
    (["--hours", "-1"], "--hours: hours must be more than 0"),
    (["--hours", "0"], "--hours: hours must be more than 0"),
    (["--max-experiments", "0"], "--max-experiments: max_experiments must be a whole number of at least 1"),
    (["--target", "nan"], "--target: target_val_bpb must be a number, got nan"),
    (["--max-failures", "-3"], "--max-failures: max_failures_in_row must be a whole number of at least 1"),
    (["--tag", "HEAD"], "--tag: Tag 'HEAD' is a name git reserves"),
    (["--max-gpu-hours", "nan"], "--max-gpu-hours: max_gpu_hours must be a number, got nan"),
    (["--max-gpu-hours", "-2"], "--max-gpu-hours: max_gpu_hours must be more than 0"),
    (["--max-cost", "nan"], "--max-cost must be a number of dollars above 0, got nan"),
    (["--max-cost", "-5"], "--max-cost must be a number of dollars above 0, got -5.0"),
    (["--max-cost", "0"], "--max-cost must be a number of dollars above 0, got 0.0"),
    (["--notify", "slack"], "--notify needs an http:// or https:// webhook URL"),
    (["--track", "neptune"], "--track (or RESEARCH_LOOP_TRACK) must be one of mlflow, wandb, got 'neptune'"),
    (["--track", "wandb", "--mlflow-uri", "http://127.0.0.1:5000"], "--mlflow-uri (or RESEARCH_LOOP_MLFLOW_URI) is "
                                                                    "for --track mlflow, not wandb"),
])
def test_the_runner_refuses_limits_that_set_none_and_reserved_tags_before_any_session(fake_env, flags, said):
    """--hours nan would be no deadline at all, and a tag setup refuses would fail every session: the
    runner would start sessions all night."""
    ws = make_workspace(fake_env)
    claude = fake_env / "claude"
    claude.write_text(f"#!/bin/sh\ntouch {fake_env / 'session-started'}\n")
    claude.chmod(0o755)
    proc = runner(str(claude), ws, dict(os.environ), "--tag", "night", *flags)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and said in out, out
    assert not (fake_env / "session-started").exists()


def test_the_runner_starts_new_sessions_until_the_limit(claude, session_env, fake_env, tmp_path):
    ws = make_workspace(fake_env)
    # each session sets up (refused after the first), runs the kept code again and keeps it (the baseline, in the
    # first) or discards it (after: the best's own program is no change to keep); then the agent is stuck: the hook
    # lets it go, the runner starts another session
    steps = [call("status"), call("setup", tag="night", max_experiments=2), call("run_experiment", description="x", rerun=True),
             call("keep"), call("discard")]
    with ScriptedAgent(steps) as agent:
        env = agent.env(session_env) | {"PYTHONUNBUFFERED": "1"}
        proc = runner(claude, ws, env, "--tag", "night", "--max-experiments", "2")
        out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "the research run has ended: 2 experiments done" in out
    assert out.count("session ") and "session 3 started" in out and "session 4 started" not in out
    assert len(ledger_lines(ws)) == 4 and git(ws, "branch", "--show-current").strip() == "autoresearch/night"
    assert "progress chart:" in out and (ws / "progress.png").exists()


def test_ctrl_c_on_the_runner_leaves_no_process_behind(claude, session_env, fake_env):
    ws = make_workspace(fake_env)
    (ws / "train.py").write_text("VAL_BPB = 1.0\nSLEEP = 600\nSTEPS = 600\n")
    git(ws, "commit", "-q", "-am", "a long run")
    steps = [call("setup", tag="night"), call("run_experiment", description="long", wait=False),
             call("wait")]
    with ScriptedAgent(steps) as agent:
        # started as a script's background job would start it: with SIGINT ignored
        proc = runner(claude, ws, agent.env(session_env), "--tag", "night",
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        state = ws / ".research-loop" / "state.json"
        assert wait_until(lambda: state.exists() and '"status": "running"' in state.read_text(), 120)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)  # bounds, not targets: CI's full suite loads 2 cores
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Run the same command to resume" in out
    # a bound far inside the run's own 600 s: a run the runner left alive would still be there
    assert wait_until(lambda: not processes_in(ws), 120), processes_in(ws)
    assert ledger_lines(ws)[0].startswith("commit")


# --- the runner's own rules, with a stand-in for Claude Code ---------------------------------------
FAKE_CLAUDE = '''#!{python}
"""A stand-in for Claude Code on PATH: records how it was started, then plays the plan for this
session (FAKE_CLAUDE_PLAN, comma-separated, the last repeated)."""
import json, os, subprocess, sys, time
from pathlib import Path

calls = Path(os.environ["FAKE_CLAUDE_CALLS"])
plans = os.environ["FAKE_CLAUDE_PLAN"].split(",")
session = len(calls.read_text().splitlines()) + 1 if calls.exists() else 1
plan = plans[min(session, len(plans)) - 1]
plugin = sys.argv[sys.argv.index("--plugin-dir") + 1] if "--plugin-dir" in sys.argv else None
hook = Path(plugin, "hooks", "research_loop_hook.py") if plugin else None
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "at": time.time(), "plan": plan,
          "hook": hook.read_text() if hook and hook.exists() else None,
          "track": [os.environ.get(k) for k in ("RESEARCH_LOOP_TRACK", "RESEARCH_LOOP_MLFLOW_URI")]}}
if plan == "fail":  # an API error at once, as a headless session reports it
    print(json.dumps({{"type": "result", "subtype": "error_during_execution",
                       "result": f"API Error: 401 invalid x-api-key (session {{session}})"}}))
elif plan in ("decide", "spend"):  # a short session that decided a run: working, not failing
    ledger = Path("results.tsv")
    with open(ledger, "a") as f:
        f.write(("" if ledger.stat().st_size else "commit\\tval_bpb\\tmemory_gb\\tstatus\\tdescription\\n")
                + f"abc{{session:04d}}\\t1.000000\\t1.0\\tdiscard\\tidea {{session}}\\n")
elif plan == "fifos":  # FIFOs at every name of the runner's folder it reads or appends to, its own output's too
    folder = Path(".research-loop/overnight")
    for name in ("sessions.jsonl", "runner.log", f"session-{{session:03d}}.jsonl", f"session-{{session + 1:03d}}.jsonl"):
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)
elif plan == "dirs":  # folders at the names the runner appends to, the next session's output's too
    folder = Path(".research-loop/overnight")
    for name in ("sessions.jsonl", "runner.log", f"session-{{session + 1:03d}}.jsonl"):
        (folder / name).unlink(missing_ok=True)
        (folder / name / "inside").mkdir(parents=True)
elif plan == "file":  # the runner's whole folder made a file (the session's output with it)
    folder = Path(".research-loop/overnight")
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.write_text("planted")
elif plan == "cheat":  # what the sessions cost, rewritten: the record of the spending gone, the output renamed
    folder = Path(".research-loop/overnight")
    (folder / "sessions.jsonl").unlink(missing_ok=True)
    (folder / "sessions.jsonl").write_text(json.dumps({{"tag": "night", "cost_usd": -1000}}) + "\\n")
    (folder / f"session-{{session:03d}}.jsonl").rename(folder / "elsewhere.jsonl")
    (folder / f"session-{{session:03d}}.jsonl").write_text(json.dumps({{"type": "result", "total_cost_usd": 0}}))
    print(json.dumps({{"type": "result", "subtype": "success", "result": "done", "total_cost_usd": 0.4,
                       "usage": {{"input_tokens": 100}}}}))
elif plan == "rewrite":  # its real result, then a process it left behind puts a $0 one in the output once it exits
    out = f".research-loop/overnight/session-{{session:03d}}.jsonl"
    read_end, write_end = os.pipe()
    subprocess.Popen([sys.executable, "-c", "import os, sys; os.read(int(sys.argv[1]), 1); "
                      "open(sys.argv[2], 'w').write(sys.argv[3] + chr(10))", str(read_end), out,
                      json.dumps({{"type": "result", "total_cost_usd": 0}})], pass_fds=(read_end,), start_new_session=True)
    os.close(read_end)
    time.sleep(1)  # the process left behind is waiting by now
    print(json.dumps({{"type": "result", "subtype": "success", "result": "done", "total_cost_usd": 0.4}}), flush=True)
elif plan == "commit-hook":  # a Stop hook of its own, committed on the branch the session is on
    Path("hooks/research_loop_hook.py").write_text("HOOK = 'planted'\\n")
    subprocess.run(["git", "commit", "-qam", "a hook of mine"], check=True)
elif plan == "ansi":  # ends at once, its last words terminal escapes: a fake line over the runner's, then hidden text
    print(json.dumps({{"type": "result", "subtype": "success", "result": "\x1b[1A\x1b[2Kresearch run ended: best "
                       "val_bpb 0.710000, every run verified\x1b[8m\u202e"}}))
elif plan == "vanish":  # killed before its result event, as a process of the session can kill it
    os.kill(os.getpid(), 9)
elif plan == "costless":  # a result event of no cost that a process of the session wrote, and none of its own
    print(json.dumps({{"type": "result", "subtype": "success", "result": "done"}}), flush=True)
elif plan in ("set-up", "set-up-other", "set-up-again"):  # the server's copy of the state as a setup of the tag leaves it
    tag = "other" if plan == "set-up-other" else "night"  # again: the branch renamed away, the same tag set up anew
    records = Path(".git/research-loop/records")
    records.mkdir(parents=True, exist_ok=True)
    (records / "state.json").write_text(json.dumps({{"tag": tag, "branch": f"autoresearch/{{tag}}", "rows": [],
                                                    "started_at": time.time()}}))
    subprocess.run(["git", "branch", "-f", f"autoresearch/{{tag}}"], check=True, capture_output=True)
elif plan == "garble":  # what the runner reads, of shapes no server or runner writes, then on past the deadline
    records = Path(".git/research-loop/records")
    records.mkdir(parents=True, exist_ok=True)
    (records / "state.json").write_text(json.dumps({{"tag": "night", "branch": "autoresearch/night",
        "rows": [[1], 5, ["abcdef1", "x", 1.0, "keep", "d"], ["abcdef2", 1.0, 1.0, "keep", "fine"]],
        "runs": {{"1": 5, "2": {{"status": "running", "log": 5, "timeout": "x", "most_seconds": None}}}}}}))
    with open(".research-loop/overnight/sessions.jsonl", "a") as f:
        f.write(json.dumps({{"tag": "night", "cost_usd": "x", "usage": [1]}}) + "\\n")
    time.sleep(3600)
elif plan == "hang":  # still going past the deadline, a run in flight and a server beside it
    Path(".research-loop").mkdir(exist_ok=True)
    Path(".research-loop/state.json").write_text(json.dumps({{"tag": "night", "branch": "autoresearch/night",
        "runs": {{"1": {{"run": 1, "status": "running", "timeout": float(os.environ["FAKE_CLAUDE_RUN_TIMEOUT"]),
                         "most_seconds": float(os.environ.get("FAKE_CLAUDE_RUN_MOST", "86400")),
                         "log": "runs/0001.log"}}}}}}))
    record["server"] = subprocess.Popen(["sleep", "3600"]).pid
if plan == "spend":  # the end of a session as the pinned CLI reports it (its stream-json result event)
    print(json.dumps({{"type": "result", "subtype": "success", "is_error": False, "result": "done",
                       "total_cost_usd": 0.4, "usage": {{"input_tokens": 100, "cache_creation_input_tokens": 20,
                       "cache_read_input_tokens": 1000, "output_tokens": 50, "service_tier": "standard"}}}}))
with open(calls, "a") as f:
    f.write(json.dumps(record) + "\\n")
if plan == "hang":
    time.sleep(3600)
sys.exit(1 if plan == "fail" else 0)
'''


@pytest.fixture
def fake_claude(fake_env, tmp_path, monkeypatch):
    """A `claude` program first on PATH; returns the file its sessions are recorded in."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    program = bin_dir / "claude"
    program.write_text(FAKE_CLAUDE.format(python=sys.executable))
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("RESEARCH_LOOP_CLAUDE", raising=False)
    calls = tmp_path / "claude-calls.jsonl"
    monkeypatch.setenv("FAKE_CLAUDE_CALLS", str(calls))
    return calls


def quick_night(ws: Path, monkeypatch, plan: str, seconds: float = 30) -> int:
    """The runner's exit code over a short night whose fake Claude sessions follow plan (FAKE_CLAUDE_PLAN)."""
    from mcp_server.overnight import overnight
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", plan)
    return overnight.Runner(runner_args(ws, "--hours", str(seconds / 3600)), overnight.preflight(ws, None),
                            backoff_s=(0.05,), poll_s=0.05).run()


def runner_args(ws: Path, *flags: str):
    from mcp_server.overnight import overnight
    parser = argparse.ArgumentParser()
    overnight.add_arguments(parser)
    return parser.parse_args(["--tag", "night", "--workspace", str(ws), *flags])


def sessions_of(calls: Path) -> list[dict]:
    return [json.loads(line) for line in calls.read_text().splitlines()]


def ended_within(runner, seconds: float) -> list:
    """runner.run() in a thread: [its exit code] if it ended within `seconds`, else [] (its session stopped)."""
    import threading
    done = []
    thread = threading.Thread(target=lambda: done.append(runner.run()), daemon=True)
    thread.start()
    thread.join(seconds)
    if not done:
        runner.stop_session()
    return done


def test_quick_failures_back_off_and_five_in_a_row_give_up(fake_claude, fake_env, monkeypatch, capsys):
    """Sessions that end at once with nothing decided: each waits longer before the next (the last
    delay repeats), a session that decided a run resets the count, and five in a row give up with
    what the last one said."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "fail,fail,decide,fail")
    claude = overnight.preflight(ws, None)  # found on PATH
    assert claude == str(fake_claude.parent / "fake-bin" / "claude")
    backoff = (0.2, 0.4, 0.6)
    code = overnight.Runner(runner_args(ws, "--max-experiments", "3"), claude, backoff_s=backoff, poll_s=0.05).run()
    out = capsys.readouterr().out
    assert code == 1, out
    sessions = sessions_of(fake_claude)
    assert [s["plan"] for s in sessions] == ["fail", "fail", "decide"] + ["fail"] * 5, out
    pauses = [float(p) for p in re.findall(r"the session ended early: a new one in ([\d.]+) s", out)]
    assert pauses == [0.2, 0.4, 0.2, 0.4, 0.6, 0.6]  # none after the session that decided a run
    after = [pauses[0], pauses[1], 0, *pauses[2:]]
    gaps = [b["at"] - a["at"] for a, b in zip(sessions, sessions[1:])]
    assert all(gap >= pause for gap, pause in zip(gaps, after)), (gaps, after)  # it really waited
    assert "giving up: 5 sessions in a row ended within 60 s" in out
    assert "API Error: 401 invalid x-api-key (session 8)" in out and "run the same command to resume" in out
    argv = sessions[0]["argv"]
    assert argv[:2] == ["-p", "/research-loop:autoresearch night --max-experiments 3"]
    assert "--plugin-dir" in argv and "--allowedTools" in argv and sessions[0]["cwd"] == str(ws)
    assert len((ws / ".research-loop" / "overnight" / "sessions.jsonl").read_text().splitlines()) == 8


def test_past_the_deadline_and_its_grace_the_session_is_stopped(fake_claude, fake_env, monkeypatch, capsys):
    """A session still going after --hours: it keeps the run in flight's timeout plus the grace to
    finish, then it is stopped (its whole process group, the server with it) and no new one starts."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "hang")
    monkeypatch.setenv("FAKE_CLAUDE_RUN_TIMEOUT", "2")
    hours, grace = 1.5 / 3600, 1.0
    runner = overnight.Runner(runner_args(ws, "--hours", str(hours)), overnight.preflight(ws, None),
                              backoff_s=(0.1,), grace_s=grace, poll_s=0.05)
    code = runner.run()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "the deadline passed long ago and the session is still going: stopping it" in out
    assert "the runner's deadline has passed" in out
    (session,) = sessions_of(fake_claude)  # no session starts after the deadline
    record = json.loads((ws / ".research-loop" / "overnight" / "sessions.jsonl").read_text())
    # not before the deadline, the run's 2 s timeout and the grace
    assert record["ended_at"] - runner.started >= hours * 3600 + 2 + grace
    assert record["exit_code"] == -signal.SIGTERM
    assert wait_until(lambda: not pid_alive(session["server"]), 10)  # the session's server went with it


def test_a_run_whose_timeout_the_agent_raised_keeps_no_session_past_the_deadline(fake_claude, fake_env, monkeypatch):
    """Review 46: past --hours the runner let a session finish its run in flight for that run's timeout, which the
    agent chooses (up to a day): a run started just before the deadline with timeout_seconds=86400 kept the
    session, and its spending, going a day past the night. The wait is at most the server's own timeout for the
    run's budget, past which the run would be no result anyway."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "hang")
    monkeypatch.setenv("FAKE_CLAUDE_RUN_TIMEOUT", "3600")
    monkeypatch.setenv("FAKE_CLAUDE_RUN_MOST", "2")
    runner = overnight.Runner(runner_args(ws, "--hours", str(1.5 / 3600)), overnight.preflight(ws, None),
                              backoff_s=(0.1,), grace_s=1.0, poll_s=0.05)
    assert ended_within(runner, 30) == [0], "the session was kept past the deadline for the run's own timeout"


def test_past_the_deadline_a_verifying_run_keeps_its_evaluations_time(fake_claude, fake_env):
    """Review 47: the grace past --hours was the run's training timeout only, so a run that trained to its
    timeout just before the deadline was stopped in its harness evaluation and lost. A run that verifies keeps
    the evaluation's own limit too (of its bounded timeout: the agent's day-long timeout buys no more)."""
    from mcp_server.core import integrity
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    runner = overnight.Runner(runner_args(ws, "--hours", "1"), overnight.preflight(ws, None), grace_s=1.0)

    def grace_with(**run) -> float:
        (ws / ".research-loop" / "state.json").write_text(json.dumps(
            {"tag": "night", "runs": {"1": {"run": 1, "status": "running", **run}}}))
        return runner.grace()

    assert grace_with(timeout=2.0, most_seconds=2.0) == 2.0 + 1.0  # nothing after training to wait for
    evaluation = integrity.evaluation_timeout(2.0)
    assert evaluation >= integrity.EVAL_TIMEOUT_MIN_S
    assert grace_with(timeout=2.0, most_seconds=2.0, verifies=True) == 2.0 + evaluation + 1.0
    assert grace_with(timeout=86400.0, most_seconds=2.0, verifies=True) == 2.0 + evaluation + 1.0


@pytest.mark.parametrize("planted", ["Infinity", "NaN"])
def test_a_run_planted_in_the_state_keeps_no_session_past_the_deadline(fake_claude, fake_env, monkeypatch, planted):
    """Review 49: the wait past --hours for a run in flight took the run's timeout and most_seconds from the state
    the runner reads, which the agent's session can write between the server's transactions: a running run planted
    with both infinite (or NaN: no comparison holds) kept the session going for good. The wait is at most the
    server's own timeout for the budget, which the runner takes before any session."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "hang")
    monkeypatch.setenv("FAKE_CLAUDE_RUN_TIMEOUT", planted)
    monkeypatch.setenv("FAKE_CLAUDE_RUN_MOST", planted)
    runner = overnight.Runner(runner_args(ws, "--hours", str(1.5 / 3600)), overnight.preflight(ws, None),
                              backoff_s=(0.1,), grace_s=1.0, poll_s=0.05)
    assert runner.most_seconds == 360  # the cache's 60 s budget: the server's default timeout
    runner.most_seconds = 2  # shortened for the test
    assert ended_within(runner, 30) == [0], "the planted run kept the session past the deadline"


def test_what_a_session_writes_of_the_spending_moves_no_max_cost(fake_claude, fake_env, monkeypatch, capsys):
    """Review 49: --max-cost summed sessions.jsonl and each session's output at its name, both in the runner's
    folder, which the session can write: sessions that deleted the record of the spending, added a line of a
    negative cost and put a $0 output where theirs was (renamed) started sessions for good at $0.40 each. The
    runner keeps its own sessions' records and reads each output through its own descriptor."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    folder = ws / ".research-loop" / "overnight"
    folder.mkdir(parents=True)
    (folder / "sessions.jsonl").write_text(json.dumps({"tag": "night", "cost_usd": 0.5}) + "\n")  # an earlier run
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "cheat")
    runner = overnight.Runner(runner_args(ws, "--max-cost", "1.5"), overnight.preflight(ws, None),
                              backoff_s=(0.05,), poll_s=0.05)
    assert runner.run() == 0
    assert "no new session: the sessions have cost $1.70 of --max-cost $1.5" in capsys.readouterr().out
    assert [s["plan"] for s in sessions_of(fake_claude)] == ["cheat"] * 3


@pytest.mark.parametrize("plan, said", [
    ("rewrite", "no new session: the sessions have cost $1.20 of --max-cost $1"),
    ("vanish", "no new session: session 1 ended without its result event"),
    ("costless", "no new session: session 1 ended without its result event"),
])
def test_no_session_hides_its_cost_from_max_cost(fake_claude, fake_env, monkeypatch, capsys, plan, said):
    """Review 50: the runner read each session's cost from the output file it had opened, but that file stays
    the agent's to write through its name: a process the session left behind rewrote it once the session ended,
    with a $0 result, before the runner read it; and a session killed before its result event counted $0. The
    runner reads the output from its own pipe, a session's cost being the largest its result events say, and a
    session that ended without one leaves the cost unknown: no new session under --max-cost."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", plan)
    runner = overnight.Runner(runner_args(ws, "--max-cost", "1"), overnight.preflight(ws, None),
                              backoff_s=(0.05,), poll_s=0.05)
    assert runner.run() == 0
    assert said in capsys.readouterr().out
    assert runner.sessions == (3 if plan == "rewrite" else 1)


def test_a_session_that_sets_up_another_research_run_ends_the_night(fake_claude, fake_env, monkeypatch, capsys):
    """Stop 48's review: once the night's research run had ended (max_gpu_hours, max_experiments, stop), a session's
    setup of another tag began a research run with fresh limits, and the runner, which judged only its own tag's,
    started sessions on it until --hours. A research run other than the runner's, after the runner's own was set up,
    ends the night."""
    ws = make_workspace(fake_env)
    assert quick_night(ws, monkeypatch, "set-up,set-up-other") == 0
    out = capsys.readouterr().out
    assert "a session set up another research run (other) after night" in out, out
    assert [s["plan"] for s in sessions_of(fake_claude)] == ["set-up", "set-up-other"]


def test_a_session_that_sets_up_the_runners_own_tag_again_ends_the_night(fake_claude, fake_env, monkeypatch, capsys):
    """Review 80: the runner ended on a setup of another tag, but not of its own: once the night's research run had
    ended on its limits, a session renamed the branch away (`git branch -m`) and called setup of the same tag, a
    research run with fresh limits that the runner, judging its tag alone, went on with until --hours. A research run
    of the runner's tag set up after the one it saw ends the night too."""
    ws = make_workspace(fake_env)
    assert quick_night(ws, monkeypatch, "set-up,set-up-again,set-up-again") == 0
    out = capsys.readouterr().out
    assert "a session set up research run night again" in out, out
    assert [s["plan"] for s in sessions_of(fake_claude)] == ["set-up", "set-up-again"]
    (limits.records_dir(ws) / "state.json").write_text(json.dumps({"tag": "night", "branch": "autoresearch/gone",
                                                                  "rows": [], "started_at": 1.0}))
    fake_claude.unlink()  # the user's own: a research run of the tag whose branch they deleted, begun anew
    quick_night(ws, monkeypatch, "set-up,decide", seconds=2)
    assert "again" not in capsys.readouterr().out and len(sessions_of(fake_claude)) >= 2


def test_records_of_shapes_no_server_writes_stop_no_runner(fake_claude, fake_env, monkeypatch):
    """Review 49: the runner reads the server's copy of the state and sessions.jsonl, which the agent's session
    can write while no transaction of the server's puts the copy back: a row that is no row, a run that is no
    dict, a log or timeout of another type, a usage that is a list raised out of the runner, which left the
    session running unwatched, past --hours and every limit. Such entries are skipped; the session is stopped at
    the deadline."""
    import threading
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "garble")
    runner = overnight.Runner(runner_args(ws, "--hours", str(1.5 / 3600)), overnight.preflight(ws, None),
                              backoff_s=(0.1,), grace_s=1.0, poll_s=0.05)
    runner.grace = lambda: 1.0  # the wait for a run in flight is the next test's
    done = []
    thread = threading.Thread(target=lambda: done.append(runner.run()), daemon=True)
    thread.start()
    thread.join(30)
    try:
        assert done == [0], "the runner stopped on what the session wrote, and left the session running"
        assert runner.session.poll() is not None
        assert [r.commit for r in runner.rows()] == ["abcdef2"]
        runner.status_line()
        runner.summary()
        overnight.Runner.grace(runner)
    finally:
        runner.stop_session()


def test_preflight_names_what_to_install_when_claude_is_missing(fake_env, tmp_path):
    """The real command, with no claude anywhere: an error that says how to install it, and nothing started."""
    ws = make_workspace(fake_env)
    bin_dir = tmp_path / "bin"  # uv and git only
    bin_dir.mkdir()
    for name in ("uv", "git"):
        (bin_dir / name).symlink_to(shutil.which(name))
    env = {k: v for k, v in os.environ.items() if k != "RESEARCH_LOOP_CLAUDE"} | {"PATH": str(bin_dir)}
    for extra in ([], ["--claude", str(tmp_path / "no-such-claude")]):
        done = subprocess.run([sys.executable, "-m", "mcp_server.cli", "overnight", "--tag", "night", "--workspace",
                               str(ws), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "error: Claude Code is not installed: `npm install -g @anthropic-ai/claude-code@2.1.332` " \
               "(or pass --claude)" in done.stderr
    assert not (ws / ".research-loop").exists()  # no log folder, no session


@pytest.mark.parametrize("flags, track", [
    (["--track", "wandb"], ["wandb", None]),
    (["--mlflow-uri", "http://127.0.0.1:5000"], ["mlflow", "http://127.0.0.1:5000"]),
    ([], [None, None]),
])
def test_the_sessions_server_gets_the_runners_tracking(fake_claude, fake_env, monkeypatch, flags, track):
    """--track (and --mlflow-uri, which implies mlflow) reach each session's server through its environment;
    without them the server is told nothing."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "spend")  # $0.40: past --max-cost, so one session
    for name in ("RESEARCH_LOOP_TRACK", "RESEARCH_LOOP_MLFLOW_URI"):
        monkeypatch.delenv(name, raising=False)
    args = runner_args(ws, "--max-cost", "0.1", *flags)
    assert overnight.tracking.arguments_problem(args) is None
    claude = overnight.preflight(ws, None, track=args.track)
    assert overnight.Runner(args, claude, backoff_s=(0.05,), poll_s=0.05).run() == 0
    assert sessions_of(fake_claude)[0]["track"] == track


@pytest.mark.parametrize("plan", ["fifos", "dirs", "file"])
def test_what_a_session_plants_in_the_runners_folder_stops_no_runner(fake_claude, fake_env, monkeypatch, plan):
    """Review 46: the runner reads a session's output (its cost, its last words), sums sessions.jsonl and
    appends to it and to runner.log, all in .research-loop/overnight, which the agent's session can write:
    a FIFO at any of those names, or at the next session's output, blocked the runner for good after the
    session ended (no new session, no summary, no ping: the rest of the night lost). Review 47: what is no
    plain file there is made again, but a folder could not be unlinked and raised out of the runner. A file put in
    place of the whole folder raised out of it too (and out of the runner started again to resume)."""
    import threading
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", plan)
    runner = overnight.Runner(runner_args(ws), overnight.preflight(ws, None), backoff_s=(0.05,), poll_s=0.05)
    done = []
    thread = threading.Thread(target=lambda: done.append(runner.run()), daemon=True)
    thread.start()
    thread.join(60)
    try:
        assert done == [1], f"{plan} in the runner's folder stopped or hung the runner"  # gave up after 5 quick sessions
        assert len(sessions_of(fake_claude)) == 5
        if plan == "file":  # left in place of the folder by the last session: the runner run again to resume starts
            assert overnight.Runner(runner_args(ws), overnight.preflight(ws, None)).logs.is_dir()
    finally:
        folder = ws / ".research-loop" / "overnight"
        for path in folder.iterdir() if folder.is_dir() else []:
            if path.is_fifo():
                os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))  # a hung open or read ends


def test_the_runner_pings_when_it_gives_up(fake_claude, fake_env, monkeypatch, capsys):
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "fail")
    hook = Webhook()
    try:
        runner = overnight.Runner(runner_args(ws, "--notify", hook.url), overnight.preflight(ws, None),
                                  backoff_s=(0.05,), poll_s=0.05)
        assert runner.run() == 1
        assert wait_until(lambda: hook.posts, 15)
        (ping,) = hook.messages()
        assert ping.startswith("the overnight runner gave up: 5 sessions in a row ended within 60 s")
        assert "API Error: 401 invalid x-api-key (session 5)" in ping and ping.endswith("[ws]")
    finally:
        hook.close()


def test_max_cost_stops_starting_sessions_once_spent_and_the_summary_shows_it(fake_claude, fake_env, monkeypatch,
                                                                              capsys):
    """$0.40 a session and --max-cost 1: the third session crosses it, no fourth starts (nor any when the
    same command is run again: the tag's sessions count), and the tokens and cost are summed."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "spend")
    hook = Webhook()
    try:
        args = runner_args(ws, "--max-cost", "1", "--notify", hook.url)
        runner = overnight.Runner(args, overnight.preflight(ws, None), backoff_s=(0.05,), poll_s=0.05)
        assert runner.run() == 0
        runner.summary()
        out = capsys.readouterr().out
        assert len(sessions_of(fake_claude)) == 3, out
        assert "no new session: the sessions have cost $1.20 of --max-cost $1" in out
        assert "spent: 3 Claude Code session(s): $1.20, 3,360 input tokens (3,000 read from cache), 150 output " \
               "tokens" in out
        assert wait_until(lambda: hook.posts, 15)
        assert hook.messages() == ["the overnight runner stopped starting sessions: the sessions have cost $1.20 of "
                                   "--max-cost $1 [ws]"]
        again = overnight.Runner(args, overnight.preflight(ws, None), poll_s=0.05)
        assert again.run() == 0 and len(sessions_of(fake_claude)) == 3
        assert wait_until(lambda: len(hook.posts) == 2, 15)  # it says so again, then leaves the webhook alone
        records = [json.loads(line) for line in
                   (ws / ".research-loop" / "overnight" / "sessions.jsonl").read_text().splitlines()]
        assert records[0]["cost_usd"] == 0.4 and records[0]["usage"]["output_tokens"] == 50
        assert "service_tier" not in records[0]["usage"]
    finally:
        hook.close()


def plugin_checkout(fake_env: Path) -> Path:
    """A workspace that is also the plugin's checkout (a pyproject, the skill, a hook), committed."""
    ws = make_workspace(fake_env)
    (ws / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.10"\n'
                                       'dependencies = []\n')
    (ws / "skills" / "autoresearch").mkdir(parents=True)
    shutil.copy(REPO / "skills" / "autoresearch" / "SKILL.md", ws / "skills" / "autoresearch" / "SKILL.md")
    (ws / "hooks").mkdir()
    (ws / "hooks" / "research_loop_hook.py").write_text("HOOK = 'real'\n")
    git(ws, "add", ".")
    git(ws, "commit", "-qm", "the plugin")
    return ws


def test_a_plugin_edit_the_agent_commits_on_the_research_branch_is_not_the_next_sessions(fake_claude, fake_env,
                                                                                          monkeypatch):
    """Review 57: where the workspace is this checkout, each session loads a copy of the plugin rebuilt from
    HEAD, and HEAD is the research branch, where the agent may commit (git is among its tools): a Stop hook
    (or a server) of its own, committed there, was what the next session loaded. The copy is of the commit
    the runner started on."""
    from mcp_server.overnight import overnight
    ws = plugin_checkout(fake_env)
    monkeypatch.setattr(overnight, "PLUGIN_ROOT", ws.resolve())  # the workspace is the plugin's checkout
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "commit-hook,fail")
    runner = overnight.Runner(runner_args(ws), overnight.preflight(ws, None), backoff_s=(0.05,), poll_s=0.05)
    assert ended_within(runner, 120) == [1]  # five quick sessions: it gives up
    assert git(ws, "show", "HEAD:hooks/research_loop_hook.py") == "HOOK = 'planted'\n"
    assert [s["hook"] for s in sessions_of(fake_claude)] == ["HOOK = 'real'\n"] * 5


def test_a_runner_resumed_on_the_research_branch_loads_no_plugin_the_agent_committed(fake_claude, fake_env,
                                                                                      monkeypatch, capsys):
    """Found by review 62: the runner took its plugin commit from HEAD as it started, and run again "to resume" (as
    it says after an interruption or a failed plugin copy) it started on the research branch's tip, where the agent
    had committed a Stop hook of its own: every session loaded it. Resuming a research run whose harness HEAD no
    longer holds, the plugin comes from the run's best, whose harness it was set up with."""
    from server_support import Lab
    from mcp_server.overnight import overnight
    ws = plugin_checkout(fake_env)
    lab = Lab(ws)
    try:
        lab.ok("setup", tag="night")  # the research run the runner resumes, set up on the plugin's commit
        lab.ok("run_experiment", description="baseline")
        best = lab.ok("keep")["kept_commit"]
    finally:
        lab.loop.shutdown()
    (ws / "hooks" / "research_loop_hook.py").write_text("HOOK = 'planted'\n")  # the agent's, in a session
    git(ws, "commit", "-qam", "a hook of mine")
    monkeypatch.setattr(overnight, "PLUGIN_ROOT", ws.resolve())  # the workspace is the plugin's checkout
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "fail")
    runner = overnight.Runner(runner_args(ws), overnight.preflight(ws, None), backoff_s=(0.05,), poll_s=0.05)
    assert ended_within(runner, 120) == [1]  # the same command, run again: five quick sessions, then it gives up
    assert [s["hook"] for s in sessions_of(fake_claude)] == ["HOOK = 'real'\n"] * 5
    assert f"the plugin comes from {best}, research run night's best" in capsys.readouterr().out


def test_a_plugin_copy_that_cannot_be_made_ends_the_runner_with_what_to_fix(fake_claude, fake_env, monkeypatch, capsys):
    """Review 57: where the workspace is this checkout, each session's plugin copy runs `uv sync`; when it failed
    (a pyproject.toml uv cannot read, no network for a new dependency, a full disk) CalledProcessError came out
    of the runner: a traceback, no summary and no ping, at whatever hour. Now it says what failed and stops."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    (ws / "pyproject.toml").write_text("[project\nname = \n")  # no TOML uv can read
    (ws / "skills" / "autoresearch").mkdir(parents=True)
    shutil.copy(REPO / "skills" / "autoresearch" / "SKILL.md", ws / "skills" / "autoresearch" / "SKILL.md")
    git(ws, "add", ".")
    git(ws, "commit", "-qm", "the plugin")
    monkeypatch.setattr(overnight, "PLUGIN_ROOT", ws.resolve())  # the workspace is the plugin's checkout
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "decide")
    runner = overnight.Runner(runner_args(ws), overnight.preflight(ws, None), backoff_s=(0.05,), poll_s=0.05)
    assert ended_within(runner, 60) == [1]
    out = capsys.readouterr().out
    assert "no new session: the plugin's copy for the next session could not be made" in out, out
    assert "run the same command to resume" in out and not fake_claude.exists()
    runner.summary()


def test_a_back_off_ends_at_the_deadline(fake_claude, fake_env, monkeypatch):
    """Review 57: after quick failures the runner slept its whole back-off (up to two minutes) even where
    --hours ended sooner, then stopped past it. The wait ends at the deadline."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "fail")
    runner = overnight.Runner(runner_args(ws, "--hours", str(3 / 3600)), overnight.preflight(ws, None),
                              backoff_s=(60,), poll_s=0.05)
    assert ended_within(runner, 20) == [0], "the runner slept its back-off past --hours"
    assert len(sessions_of(fake_claude)) == 1


def test_a_sessions_last_words_cannot_rewrite_or_hide_the_runners_lines(fake_claude, fake_env, monkeypatch, capsys):
    """Review 59: when the runner gives up it prints what the last session said, as it said it: terminal escapes
    in the agent's output moved the cursor up, erased the runner's line and wrote one of its own ("research
    run ended: best val_bpb 0.710000"), then hid what the runner printed after (the summary)."""
    from mcp_server.overnight import overnight
    ws = make_workspace(fake_env)
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "ansi")
    runner = overnight.Runner(runner_args(ws, "--max-experiments", "3"), overnight.preflight(ws, None),
                              backoff_s=(0.05,), poll_s=0.05)
    assert runner.run() == 1
    out = capsys.readouterr().out
    assert "giving up: 5 sessions in a row" in out and "\x1b" not in out and "\u202e" not in out, out
    assert "\\x1b[1A\\x1b[2Kresearch run ended: best val_bpb 0.710000, every run verified\\x1b[8m\\u202e" in out, out


def test_a_runner_resumed_with_other_budget_settings_goes_on_at_the_research_runs(lab, fake_claude, monkeypatch,
                                                                                  capsys):
    """The user changes the clock and the budget between two runs of the runner on research run `night`, set up on
    the flops clock at the cache's 60 s budget. Its sessions' servers keep the research run's settings
    (tests/test_budget_settings.py), and so does the runner: it says the night goes on at them, and its wait for a
    run in flight past --hours is the server's timeout for the research run's budget, not the environment's."""
    from mcp_server.overnight import overnight
    monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "flops")
    lab.ok("setup", tag="night")
    lab.loop.shutdown()  # the night's earlier session has ended
    monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "wall")
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "10")
    monkeypatch.setenv("FAKE_CLAUDE_PLAN", "fail")
    runner = overnight.Runner(runner_args(lab.ws, "--hours", str(1 / 3600)), overnight.preflight(lab.ws, None),
                              backoff_s=(60,), poll_s=0.05)  # one session, then the back-off ends at the deadline
    assert runner.most_seconds == 360  # the research run's 60 s budget (the environment's 10 s gives 310)
    assert ended_within(runner, 30) == [0]
    said = capsys.readouterr().out
    assert "AUTORESEARCH_BUDGET_CLOCK gives wall, the research run recorded flops" in said, said
    assert "AUTORESEARCH_TIME_BUDGET gives 10 s, the research run recorded 60 s" in said, said
    assert "the night goes on at research run night's settings" in said, said
