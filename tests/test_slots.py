"""Several runs at once: slots with worktrees of their own, pinned GPUs, a queue, stale bases
re-applied, cancels, and a server killed with runs in flight (fake trainer, real git)."""
import json
import os
import signal
import sys

import anyio
import pytest
from mcp import Client

from mcp_server.server import build_server
from server_support import (
    Lab, answer, git, ledger_lines, make_workspace, set_knobs, slot_dir, stdio_client_for, wait_until,
)
from test_loop_properties import training_processes


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # two logical GPUs: pinning, without GPUs


@pytest.fixture
def duo(fake_env, two_gpus):
    lab = Lab(make_workspace(fake_env), slots=2)
    yield lab
    lab.loop.shutdown()


def record(lab, result) -> dict:
    return json.loads((lab.ws / result["log"].replace(".log", ".json")).read_text())


def visible(lab, result) -> str:
    line = next(l for l in (lab.ws / result["log"]).read_text().splitlines() if l.startswith("visible:"))
    return line.split()[1].split("=")[1]


def test_two_slots_overlap_on_their_own_gpus_and_a_third_run_queues(duo):
    duo.baseline()
    ids = []
    for k, value in enumerate((0.91, 0.92, 0.93)):
        # the first two long enough that the third call comes while both still run, on a loaded machine too;
        # the third, queued behind them, has nothing to prove by training long
        set_knobs(duo.ws, val_bpb=value, sleep=8 if k < 2 else 0, steps=4)
        ids.append(duo.ok("run_experiment", description=f"idea {k}", wait=False))
    assert [r["status"] for r in ids] == ["running", "running", "queued"] and ids[2]["queue_position"] == 1
    assert (duo.ws / "train.py").read_text().startswith("VAL_BPB = 0.93")  # the agent's tree is its own
    results = duo.ok("wait", all=True)["results"]
    assert sorted(r["val_bpb"] for r in results) == [0.91, 0.92, 0.93]
    first, second, third = (duo.loop.answer_for(r["run"]).model_dump() for r in ids)
    assert {visible(duo, first), visible(duo, second)} == {"0", "1"}
    a, b = record(duo, first)["run"], record(duo, second)["run"]
    assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]  # they overlapped
    assert record(duo, third)["run"]["started_at"] >= min(a["ended_at"], b["ended_at"]) - 0.5
    assert "slot 0 (GPU 0)" in {first["slot"], second["slot"]}
    for r in ids:
        duo.ok("discard", run=r["run"])
    assert len(ledger_lines(duo.ws)) == 5


def test_next_names_the_run_while_another_can_finish_before_the_call(duo):
    """One result waits and another run trains: a bare keep() would be refused if that run ended
    before the call (two results then wait), so status().next names the run."""
    duo.baseline()
    set_knobs(duo.ws, val_bpb=0.9)
    done = duo.ok("run_experiment", description="quick", wait=False)
    duo.ok("wait")
    set_knobs(duo.ws, val_bpb=0.95, sleep=3, steps=6)
    slow = duo.ok("run_experiment", description="slow", wait=False)
    n = done["run"]  # no noise measured: its gain is confirmed first
    assert duo.ok("status")["next"] == f"confirm(run={n}), then keep(run={n}) if the gain holds; or discard(run={n})"
    duo.ok("wait", all=True)  # the slow one ends: two results wait, and the named call still works
    assert duo.ok("keep", unconfirmed=True, run=done["run"])["kept_commit"] == done["commit"]
    duo.ok("discard", run=slow["run"])


def test_a_stale_candidate_is_refused_then_reapplied_onto_the_new_best(duo):
    base = "VAL_BPB = 1.0\nDEPTH = 4\nWINDOW = 'L'\nWARMDOWN = 0.5\nMATRIX_LR = 0.04\n"
    (duo.ws / "train.py").write_text(base)
    git(duo.ws, "commit", "-q", "-am", "a train.py with several constants")
    duo.baseline()
    (duo.ws / "train.py").write_text(base.replace("0.04", "0.05"))
    a = duo.ok("run_experiment", description="lr", wait=False)
    (duo.ws / "train.py").write_text(base.replace("1.0", "0.9").replace("DEPTH = 4", "DEPTH = 6"))
    b = duo.ok("run_experiment", description="depth", wait=False)
    duo.ok("wait", all=True)
    duo.ok("keep", unconfirmed=True, run=b["run"])
    message = duo.refused("keep", unconfirmed=True, run=a["run"])
    assert duo.ok("status")["next"] == f"reapply(run={a['run']}) or discard(run={a['run']})"
    assert "untested combination never becomes the best" in message and f"reapply(run={a['run']})" in message
    new = duo.ok("reapply", run=a["run"], wait=True)
    assert new["status"] == "ok" and new["parent"] == b["commit"] and "re-applied on" in new["description"]
    merged = git(duo.ws, "show", f"refs/research-loop/runs/{new['run']}:train.py")
    assert "MATRIX_LR = 0.05" in merged and "DEPTH = 6" in merged and "VAL_BPB = 0.9" in merged
    rows = [line.split("\t") for line in ledger_lines(duo.ws)[1:]]
    assert rows[-1][0] == a["commit"] and rows[-1][3] == "discard" and f"run {new['run']}" in rows[-1][4]
    assert duo.ok("keep", unconfirmed=True)["kept_commit"] == new["commit"]


def test_a_conflicting_reapply_is_a_clear_error_and_changes_nothing(duo):
    duo.baseline()
    set_knobs(duo.ws, val_bpb=0.95)
    a = duo.ok("run_experiment", description="a", wait=False)
    set_knobs(duo.ws, val_bpb=0.9)
    b = duo.ok("run_experiment", description="b", wait=False)
    duo.ok("wait", all=True)
    duo.ok("keep", unconfirmed=True, run=b["run"])
    rows = ledger_lines(duo.ws)
    assert "conflicts" in duo.refused("reapply", run=a["run"])
    status = duo.ok("status")
    assert ledger_lines(duo.ws) == rows and "pending" in json.dumps(status)
    # what status names next must work: not the reapply that cannot
    assert status["next"].startswith(f"discard(run={a['run']})") and "conflicts" in status["next"]
    assert duo.ok("discard", run=a["run"])["row"]["status"] == "discard"


def test_two_reapplies_of_one_run_at_once_make_one_new_run_and_the_refused_one_changes_nothing(duo):
    """Two reapply(run=N) calls in flight together, as an agent's parallel tool calls: one answers
    the new run, the other is refused, and no second run with the same code appears."""
    base = "VAL_BPB = 1.0\nDEPTH = 4\nWINDOW = 'L'\nWARMDOWN = 0.5\nMATRIX_LR = 0.04\n"
    (duo.ws / "train.py").write_text(base)
    git(duo.ws, "commit", "-q", "-am", "a train.py with several constants")
    duo.baseline()
    (duo.ws / "train.py").write_text(base.replace("0.04", "0.05"))
    a = duo.ok("run_experiment", description="lr", wait=False)
    (duo.ws / "train.py").write_text(base.replace("1.0", "0.9").replace("DEPTH = 4", "DEPTH = 6"))
    b = duo.ok("run_experiment", description="depth", wait=False)
    duo.ok("wait", all=True)
    duo.ok("keep", unconfirmed=True, run=b["run"])
    answers = []

    async def both():
        async with Client(build_server(duo.loop)) as client:
            async def one():
                answers.append(await client.call_tool("reapply", {"run": a["run"]}))
            async with anyio.create_task_group() as calls:
                calls.start_soon(one)
                calls.start_soon(one)
    anyio.run(both)
    made = [answer(r) for r in answers if not r.is_error]
    refused = [r.content[0].text for r in answers if r.is_error]
    assert len(made) == 1 and len(refused) == 1, [r.content[0].text for r in answers]
    assert f"Run {a['run']} is already decided" in refused[0]
    state = json.loads((duo.ws / ".research-loop" / "state.json").read_text())
    assert sorted(state["runs"]) == [str(made[0]["run"])] and state["seq"] == made[0]["run"]
    refs = git(duo.ws, "for-each-ref", "--format=%(refname)", "refs/research-loop/runs/").split()
    assert refs[-1].endswith(f"/{made[0]['run']}")
    rows = [line.split("\t") for line in ledger_lines(duo.ws)[1:]]
    assert [r[0] for r in rows].count(a["commit"]) == 1 and f"run {made[0]['run']}" in rows[-1][4]
    duo.ok("wait")
    duo.ok("discard")


def test_a_reapply_whose_train_py_git_cannot_restore_makes_one_run_and_decides_the_stale_one(duo):
    """Stop 48: reapply's discard of the stale run restored train.py (which held the stale code) inside the call's
    transaction, after the new run was submitted, whose nested transaction had saved it; a git index lock (a git
    command of the agent's, or one killed) failed the restore, and the call answered "git failed ... retry" with the
    new run training and the stale one still undecided, so the retry trained the same code a second time."""
    base = "VAL_BPB = 1.0\nMEMORY_MB = 2048\nA = 1\nB = 2\nSTEPS = 5\n"
    (duo.ws / "train.py").write_text(base)
    git(duo.ws, "commit", "-q", "-am", "a train.py with several constants")
    duo.baseline()
    stale = base.replace("STEPS = 5", "STEPS = 6")
    (duo.ws / "train.py").write_text(stale)
    a = duo.ok("run_experiment", description="steps", wait=False)
    (duo.ws / "train.py").write_text(base.replace("1.0", "0.9"))
    b = duo.ok("run_experiment", description="better", wait=False)
    duo.ok("wait", all=True)
    duo.ok("keep", unconfirmed=True, run=b["run"])
    (duo.ws / "train.py").write_text(stale)  # the working file holds the stale run's code: discard restores it
    (duo.ws / ".git" / "index.lock").write_text("")
    made = duo.ok("reapply", run=a["run"])
    assert f"Run {a['run']} is already decided" in duo.refused("reapply", run=a["run"])
    state = json.loads((duo.ws / ".research-loop" / "state.json").read_text())
    assert sorted(state["runs"]) == [str(made["run"])] and state["seq"] == made["run"], state["runs"]
    assert ledger_lines(duo.ws)[-1].split("\t")[3:] == ["discard", f"steps (stale: re-applied as run {made['run']})"]
    assert (duo.ws / "train.py").read_text() == stale  # left as it was: git could not write it
    (duo.ws / ".git" / "index.lock").unlink()
    duo.ok("wait")
    duo.ok("discard")


def test_cancel_and_timeout_leave_no_process_behind(duo):
    duo.baseline()
    set_knobs(duo.ws, sleep=60, steps=60, spawn=1)
    running = duo.ok("run_experiment", description="to cancel", wait=False)
    # the timed run queues behind a second long run, and starts once that is cancelled: started at once, its 2 s
    # had passed on a loaded machine before the queued run was cancelled, which had started in the slot it freed
    blocker = duo.ok("run_experiment", description="holds the other slot", wait=False, rerun=True)
    queued = duo.ok("run_experiment", description="queued, then cancelled", wait=False, rerun=True)
    timed = duo.ok("run_experiment", description="to time out", wait=False, timeout_seconds=2, rerun=True)
    assert queued["status"] == timed["status"] == "queued"
    assert wait_until(lambda: len(training_processes(duo.ws)) >= 4, 10)  # two trainers, two sleepers
    assert duo.ok("cancel", run=queued["run"])["row"] is None
    assert duo.ok("cancel", run=blocker["run"])["row"]["description"] == "holds the other slot (cancelled)"
    cancelled = duo.ok("cancel", run=running["run"])
    assert cancelled["row"]["status"] == "crash" and cancelled["row"]["description"] == "to cancel (cancelled)"
    assert duo.ok("wait")["results"][0]["status"] == "timeout"
    assert wait_until(lambda: not training_processes(duo.ws), 15), training_processes(duo.ws)
    duo.ok("discard")
    for n in (running["run"], blocker["run"], timed["run"], queued["run"]):
        assert git(duo.ws, "cat-file", "-t", f"refs/research-loop/runs/{n}").strip() == "commit"


def test_a_damaged_slot_worktree_is_rebuilt(duo):
    duo.baseline()
    (slot_dir(duo.ws) / ".git").write_text("gitdir: /nowhere\n")
    set_knobs(duo.ws, val_bpb=0.9)
    assert duo.ok("run_experiment", description="after damage")["val_bpb"] == 0.9


def test_history_lists_what_was_tried_and_filters_by_constant(lab):
    lab.baseline()
    base = (lab.ws / "train.py").read_text()
    for text, decision in ((base + "MATRIX_LR = 0.08\n", "discard"), (base.replace("1.0", "0.9"), "keep"),
                           (base.replace("1.0", "0.9") + "DEPTH = 6\nprint('x')\n", "discard")):
        (lab.ws / "train.py").write_text(text)
        lab.ok("run_experiment", description=f"try {decision}")
        lab.ok(decision, **({"unconfirmed": True} if decision == "keep" else {}))
    everything = lab.ok("history")
    assert everything["total"] == 4 and everything["lines"][0].startswith("run 1 ")
    assert "MATRIX_LR (new)->0.08" in everything["lines"][1] and "| try discard" in everything["lines"][1]
    assert "VAL_BPB 1.0->0.9" in everything["lines"][2] and "keep 0.900000 (-0.100000)" in everything["lines"][2]
    assert "DEPTH (new)->6; 1 other line(s)" in everything["lines"][3]
    assert lab.ok("history", constant="MATRIX_LR")["total"] == 1
    assert lab.ok("history", status="keep")["total"] == 2
    assert "upper-case" in lab.refused("history", constant="lr; rm")


def test_sigkill_with_two_runs_in_flight_loses_no_row_and_no_commit(fake_env, two_gpus):
    ws = make_workspace(fake_env)
    cache = fake_env / "cache"
    killed = {}

    async def go():
        try:
            async with stdio_client_for(ws, cache, "--slots", "2") as client:
                answer(await client.call_tool("setup", {"tag": "kill"}))
                answer(await client.call_tool("run_experiment", {"description": "baseline"}))
                answer(await client.call_tool("keep", {"unconfirmed": True}))
                set_knobs(ws, val_bpb=0.9)
                answer(await client.call_tool("run_experiment", {"description": "fast", "wait": False}))
                set_knobs(ws, sleep=120, steps=120)
                for name in ("slow", "queued"):
                    answer(await client.call_tool("run_experiment", {"description": name, "wait": False,
                                                                      "rerun": True}))  # the same code twice
                state = json.loads((ws / ".research-loop" / "state.json").read_text())
                assert wait_until(lambda: json.loads((ws / ".research-loop" / "state.json").read_text())
                                  ["runs"]["2"]["status"] == "pending", 10)
                killed.update(state)
                os.kill(state["runs"]["3"]["server_pid"], signal.SIGKILL)
        except Exception:
            if not killed:
                raise
    anyio.run(go)
    assert wait_until(lambda: not training_processes(ws), 10)

    async def after():
        async with stdio_client_for(ws, cache, "--slots", "2") as client:
            status = answer(await client.call_tool("status", {}))
            kept = answer(await client.call_tool("keep", {"run": 2, "unconfirmed": True}))
            discarded = answer(await client.call_tool("discard", {"run": 3}))
            return status, kept, discarded
    status, kept, discarded = anyio.run(after)
    assert "run 2" in status["pending"] and "interrupted run" in status["interrupted"]
    # run 4 had started in the slot run 2 freed (interrupted by the kill), or was still queued and
    # starts under the new server: either way it is there to decide
    fourth = "queued, then started" if "run 4" in (status["running"] or status["queued"] or "") else "interrupted"
    assert fourth == "queued, then started" or status["interrupted"].count("interrupted run") == 2, status
    assert kept["row"]["val_bpb"] == 0.9 and discarded["row"]["description"] == "slow (interrupted)"
    for n in (2, 3, 4):
        assert git(ws, "cat-file", "-t", f"refs/research-loop/runs/{n}").strip() == "commit"


def test_the_servers_watchdog_waits_for_the_harness_evaluation(fake_env, monkeypatch):
    """The worker evaluates the exported model after training, under its own limit: the server's
    safety net must not kill it at the training's timeout (it did, under load, in the demo)."""
    import queue
    from mcp_server.executors import executor
    from mcp_server.core.workspace import Workspace
    ws = make_workspace(fake_env)
    harness = fake_env / "harness"
    git(ws, "worktree", "add", "-q", "--detach", str(harness))  # a clean checkout, as the real harness copy
    monkeypatch.setattr(executor, "WORKER_GRACE_SECONDS", 0.5)
    export = fake_env / "exports" / "model.pt2"
    # the evaluator's protocol: a line on stdin says go, the result goes to the descriptor after --out-fd
    slow_evaluation = ("import json, os, sys, time; sys.stdin.readline(); time.sleep(3); "
                       "os.write(int(sys.argv[sys.argv.index('--out-fd') + 1]), json.dumps({'val_bpb': 1.5}).encode())")
    evaluate = {"argv": [sys.executable, "-c", slow_evaluation], "env": dict(os.environ), "timeout": 20,
                "harness": str(harness), "harness_commit": None}
    train = (f"open({str(export) + '.json'!r}, 'w').write('{{}}'); open({str(export)!r}, 'w').write('model'); "
             "print('---'); print('val_bpb: 1.5')")
    spec = executor.RunSpec(run=1, commit=git(ws, "rev-parse", "HEAD").strip(), command=[sys.executable, "-c", train],
                            timeout=2, log=fake_env / "run.log", report=fake_env / "report.json",
                            worker_args=["--export", str(export), "--evaluate", json.dumps(evaluate)],
                            after_seconds=10)
    pool = executor.LocalPool(Workspace(ws), 1, env=dict(os.environ))
    outcomes = queue.Queue()
    try:
        pool.start(spec, lambda run, outcome: outcomes.put(outcome))
        outcome = outcomes.get(timeout=60)
    finally:
        pool.shutdown()
    assert outcome.report["evaluation"]["val_bpb"] == 1.5, outcome.report


def test_each_slots_harness_evaluation_runs_on_that_slots_gpu(fake_env, two_gpus, monkeypatch):
    """The server makes the evaluation's spec for every slot alike, from its own environment (both
    GPUs): each evaluation must still get its own slot's GPU, not GPU 0 beside slot 0's timed
    training, and the library path where libcuda may be found only through it."""
    import queue
    from mcp_server.core import integrity
    from mcp_server.executors import executor
    from mcp_server.core.workspace import Workspace
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/driver/lib")
    ws = make_workspace(fake_env)
    harness = fake_env / "harness"
    git(ws, "worktree", "add", "-q", "--detach", str(harness))
    # the evaluator's protocol, answering with the environment it was started with
    evaluator = ("import json, os, sys; sys.stdin.readline(); os.write(int(sys.argv[sys.argv.index('--out-fd') + 1]), "
                 "json.dumps({'val_bpb': 1.5, 'gpus': os.environ.get('CUDA_VISIBLE_DEVICES'), "
                 "'libraries': os.environ.get('LD_LIBRARY_PATH')}).encode())")
    pool = executor.LocalPool(Workspace(ws), 2, env=dict(os.environ))
    outcomes = queue.Queue()
    try:
        for run in (1, 2):
            export = fake_env / "exports" / str(run) / "model.pt2"
            spec = integrity.evaluation_spec(harness, None, timeout=20)
            spec["argv"] = [sys.executable, "-c", evaluator]
            train = (f"import time; open({str(export) + '.json'!r}, 'w').write('{{}}'); "
                     f"open({str(export)!r}, 'w').write('model'); time.sleep(1); print('---'); print('val_bpb: 1.5')")
            pool.start(executor.RunSpec(
                run=run, commit=git(ws, "rev-parse", "HEAD").strip(), command=[sys.executable, "-c", train],
                timeout=30, log=fake_env / f"run{run}.log", report=fake_env / f"report{run}.json",
                worker_args=["--export", str(export), "--evaluate", json.dumps(spec)], after_seconds=20),
                lambda run, outcome: outcomes.put(outcome))
        evaluations = [outcomes.get(timeout=60).report["evaluation"] for _ in range(2)]
    finally:
        pool.shutdown()
    assert sorted(e["gpus"] for e in evaluations) == ["0", "1"], evaluations
    assert all(e["libraries"] == "/opt/driver/lib" for e in evaluations), evaluations
