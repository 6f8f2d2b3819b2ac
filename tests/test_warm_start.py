"""The warm start of issue 27: each slot's warm evaluator (mcp_server/scripts/harness_eval.py) scores an export
exactly as a cold evaluator does, a gone one leaves the run a cold one; a run handed to the slot's
pre-started worker (executors/executor.py, scripts/warm_train.py) scores as a cold one, sees its own
environment, keeps its sandbox, its timeout (from the hand-over) and the kill of its whole tree, and
no pre-started worker outlives the server. Real exports of the real train.py (the session's
prepared CPU harness), a real server over MCP.
"""
import contextlib
import hashlib
import importlib.util
import json
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import TEST_EVAL_TOKENS
from mcp_server.executors import cluster, executor
from mcp_server.scripts import harness_copy, harness_eval, sandbox
from nanochat.profiles import PROFILES
from mcp_server.core.integrity import site_packages
from mcp_server.loop import ResearchLoop
from mcp_server.server import build_server
from mcp_server.core.workspace import Workspace
from server_support import FAKE_PYTHON, answer, git, make_workspace, pid_alive, processes_in, wait_until
from test_server_e2e import RUN_TIMEOUT_S, SHORT_BUDGET, harness_workspace

# the hanging run's timeout: long enough for its warm interpreter (torch imported) to say what it saw and start its
# daemon after the hand-over. A timeout counted from the worker's start instead ends it at least HANG_DELAY_S (and
# the run before's evaluation) short of it, whatever its length: the margin that catches that is HANG_DELAY_S's
HANG_TIMEOUT_S = 5
HANG_DELAY_S = 4  # between the run before the hanging one and its submission: its worker waits, started ahead (a timeout counted from its start would end the run ~4 s short of HANG_TIMEOUT_S)


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
    # one budget second (a few steps on the flops clock): these tests need an export of the real model, not a trained one
    subprocess.run([sys.executable, "train.py"], cwd=repo_root, check=True, capture_output=True,
                   env=dict(prepared_env, RESEARCH_LOOP_EXPORT=str(export), AUTORESEARCH_TIME_BUDGET=SHORT_BUDGET))
    assert export.is_file() and Path(f"{export}.json").is_file()
    return harness, export


def evaluation_spec(harness: Path, prepared_env: dict, eval_tokens: str = TEST_EVAL_TOKENS) -> dict:
    """What the server's integrity.evaluation_spec makes, for a harness copy outside git (a node's)."""
    cache = Path(prepared_env["AUTORESEARCH_CACHE"])
    record = json.loads((cache / "prepared.json").read_text())
    val = cache / "data" / record["val_shard"]["name"]
    return {"argv": [*harness_eval.evaluator_command(sys.executable, harness / "nanochat" / "evaluate_export.py"),
                     "--profile", "cpu", "--eval-tokens", eval_tokens, "--site-packages", *site_packages()],
            "env": {"PATH": os.environ["PATH"], "AUTORESEARCH_CACHE": str(cache)}, "harness": str(harness),
            "harness_manifest": harness_copy.file_manifest(str(harness)), "timeout": 300.0,
            "inputs": harness_eval.evaluation_inputs(cache, val, record)}


def evaluate(spec: dict, export: Path, log: Path, warm: harness_eval.WarmEvaluator | None = None) -> dict:
    """One evaluation of the export as a run's worker makes it (the answer file beside the log)."""
    sock = socket.socket(fileno=os.dup(warm.fileno())) if warm is not None else None
    evaluation = harness_eval.HarnessEvaluation(spec, log, export, log.with_suffix(".answer.json"), sock)
    evaluation.start_if_exported(None)
    return evaluation.finish(5.0)


# The page-fault check's evaluation: four batches, so that all its logits (what a malloc that gave each
# call's back faulted in three times over) take more pages than the evaluator's start-up and one batch's
PAGES_EVAL_TOKENS = "16384"
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
    # what each compiled, streamed by the server's importer: torch's sources as they are
    torch_source = Path(importlib.util.find_spec("torch").origin)
    for imported in (cold["imported"], warm.imported.digests):
        assert imported[str(torch_source)] == hashlib.sha256(torch_source.read_bytes()).hexdigest()
        assert len(imported) > 500, len(imported)
    assert "imported" not in first and "imported" not in again  # a warm evaluator's are the pool's


def test_the_evaluator_neither_spins_nor_faults_in_fresh_pages_for_every_call(exported, prepared_env, tmp_path):
    """OpenMP's default spins 300,000 times at every barrier: beside the slot's next interpreter
    importing torch on 2 cores, that spinning took the evaluation 5x the CPU-seconds; the OpenMP
    runtime itself says what it runs with (OMP_DISPLAY_ENV), in the run's log. And glibc's malloc
    gave each call's logits back to the kernel: the evaluation faulted in about three times the
    pages of all its logits; kept, it faults in fewer than they take once."""
    harness, export = exported
    spec = evaluation_spec(harness, prepared_env, PAGES_EVAL_TOKENS)
    spec["env"]["OMP_DISPLAY_ENV"] = "VERBOSE"
    result = evaluate(spec, export, tmp_path / "run.log")
    log = (tmp_path / "run.log").read_text()
    logits_pages = int(PAGES_EVAL_TOKENS) * PROFILES["cpu"]["vocab_size"] * 4 // os.sysconf("SC_PAGE_SIZE")  # fp32, once
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


# Run by the evaluator while it loads the export: its result gets the val_bpb train.py wants, all else as measured
FORGE = ("import json\n"
         "json.dumps = lambda o, *a, _dumps=json.dumps, **k: _dumps(dict(o, val_bpb=0.125) "
         "if isinstance(o, dict) and 'val_bpb' in o else o, *a, **k)\n")


class _Runs:
    def __reduce__(self):
        return exec, (FORGE,)


class _Second:
    """Unpickled as items[1], once items[0] (the code) has run."""

    def __init__(self, items):
        self.items = items

    def __reduce__(self):
        return operator.getitem, (self.items, 1)


def rewritten(export: Path, dest: Path, how: str) -> Path:
    """The export with code that runs as torch.export.load reads it: a weight pickled (torch.load without
    weights_only), or a size written as an expression (sympy.sympify evaluates it)."""
    import io
    import torch
    with zipfile.ZipFile(export) as src, zipfile.ZipFile(dest, "w") as out:
        changed = {}
        if how == "pickled weight":
            name = next(n for n in src.namelist() if n.endswith("_weights_config.json"))
            config = json.loads(src.read(name))
            fqn, meta = next(iter(config["config"].items()))
            weight = io.BytesIO()
            torch.save(_Second([_Runs(), torch.export.load(export).state_dict[fqn]]), weight)
            out.writestr(name.rsplit("/", 1)[0] + "/weight_pickled", weight.getvalue())
            config["config"][fqn] = dict(meta, use_pickle=True, path_name="weight_pickled")
            changed[name] = json.dumps(config)
        else:
            name = next(n for n in src.namelist() if n.endswith("/models/model.json"))
            model = json.loads(src.read(name))
            sizes = next(iter(model["graph_module"]["graph"]["tensor_values"].values()))["sizes"]
            sizes[0] = {"as_expr": {"expr_str": f"(exec({FORGE!r}) or {sizes[0]['as_int']})",
                                    "hint": {"as_int": sizes[0]["as_int"]}}}
            changed[name] = json.dumps(model)
        for info in src.infolist():
            out.writestr(info, changed.get(info.filename) or src.read(info.filename))
    shutil.copy(f"{export}.json", f"{dest}.json")
    return dest


@pytest.fixture(scope="module")
def warm_evaluator(exported, prepared_env):
    """One warm evaluator for the cases below (its start imports torch from source, ~9 CPU-s): each
    evaluation is a child of its own, forked from it, so a case's export never reaches the next."""
    warm = harness_eval.WarmEvaluator(evaluation_spec(exported[0], prepared_env))
    yield warm
    warm.close()


@pytest.mark.parametrize("how", ["pickled weight", "sympy expression"])
def test_an_export_whose_loading_runs_code_is_no_result(exported, warm_evaluator, prepared_env, tmp_path, how):
    """torch.export.load runs what a pickled weight or constant holds (torch.load without weights_only)
    and evaluates a symbolic size's text (sympy.sympify): an export written so runs train.py's code in
    the harness's evaluator, outside the sandbox, which can write any result. Cold and warm, the
    harness loads no such export: no result, named."""
    harness, export = exported
    spec = evaluation_spec(harness, prepared_env)
    evil = rewritten(export, tmp_path / "model.pt2", how)
    cold = evaluate(spec, evil, tmp_path / "cold.log")
    warm_result = evaluate(spec, evil, tmp_path / "warm.log", warm_evaluator)
    assert warm_result["evaluator"] == "warm", warm_result  # the shared one answered, not a cold one in its place
    for result in (cold, warm_result):
        assert result.get("val_bpb") != 0.125, result  # without the check: the forged number, "causal"
        assert "val_bpb" not in result and "could not be loaded" in result["problem"], result


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
print("daemon started", daemon.pid, flush=True)  # not a file of its folder: that is its own copy, gone with it
print("hanging", flush=True)
time.sleep(600)
"""


def report_of(ws: Path, result: dict) -> dict:
    return json.loads((ws / result["log"].replace(".log", ".report.json")).read_text())


def test_on_the_warm_path_the_sandbox_holds_and_a_hanging_run_is_killed_whole(tmp_path, repo_root, prepared_env,
                                                                                 monkeypatch):
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, SHORT_BUDGET)  # the real run only has to run
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
            # started ahead once the first run ended and the server's bytecode archive is built
            assert wait_until(lambda: 0 in loop.pool.ahead, 300)
            assert "--bytecode-fd" in loop.pool.ahead[0].proc.args  # never one that compiles torch itself
            ahead_pid = loop.pool.ahead[0].proc.pid
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
    # the run's own environment at import (its number and export path are set only at the hand-over); it exports
    # into its private /tmp (review 48: the workspace's export folder is the agent's to write)
    assert f"AT IMPORT run {hung['run']} export {sandbox.RUN_EXPORT}" in log, log[:2000]
    assert "torch already True" in log, log[:2000]
    # the timeout counts from the hand-over, not from the worker's start HANG_DELAY_S earlier
    assert hung_seconds >= HANG_TIMEOUT_S and report["wall_seconds"] >= HANG_TIMEOUT_S, (hung_seconds, report)
    assert "daemon started" in log  # the daemon started (its pid is the sandbox's own: PID namespace)


# The three runs compared train this many budget seconds (the flops clock: the same steps however busy the
# machine), not the session's 4: equal numbers need the same training, not a long one
SCORED_BUDGET = "1"


def test_a_warm_run_scores_as_a_cold_one_and_the_switch_gives_the_cold_path(tmp_path, repo_root, prepared_env,
                                                                              monkeypatch):
    """The real train.py three times, the same code and seed: cold (the slot's first run), warm, then
    with RESEARCH_LOOP_WARM_START=0 cold again, and nothing started ahead after it."""
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch)
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", SCORED_BUDGET)
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


# The stand-ins of test_no_process_but_the_server_writes_a_workers_hand_over_or_an_evaluations_result: a
# train.py held at its start while a flag file exists, then exporting; an evaluator that says go was
# read (its pid in a file) and, the seconds it was given later, answers the value it was started with.
HELD_TRAIN = """import os, time
while os.path.exists({hold!r}):
    time.sleep(0.05)
export = os.environ["RESEARCH_LOOP_EXPORT"]
open(export + ".json", "w").write("{{}}")
open(export, "w").write("model")
print("val_bpb: 1.5")
"""
ANSWERING_EVALUATOR = ("import json, os, sys, time; sys.stdin.readline(); open(sys.argv[2], 'w').write(str(os.getpid())); "
                       "time.sleep(float(sys.argv[3])); os.write(int(sys.argv[sys.argv.index('--out-fd') + 1]), "
                       "json.dumps({'val_bpb': float(sys.argv[1])}).encode())")


def writable(pid: int, fd: str) -> bool:
    """Whether a process of the same user can open another's pipe or socket for writing (/proc)."""
    try:
        os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def test_no_process_but_the_server_writes_a_workers_hand_over_or_an_evaluations_result(fake_env, monkeypatch):
    """As the agent would, with the server's uid: open /proc/PID/fd/0 of a worker (cold, then one
    waiting warm for its hand-over) and write a hand-over of its own with another evaluation (one that
    answers 0.25), then, during the run's evaluation, write a result of its own into the worker's
    result channel and kill the evaluator. Neither can be opened (stdin, the warm interpreter's
    hand-over and the result are sockets, not pipes): the run is the server's, evaluated by the
    server's evaluator; and end of file on a worker's stdin still stops its run ("server gone")."""
    import queue
    monkeypatch.setenv(harness_eval.WARM_ENV, "0")  # the evaluator stand-in, started cold for each run
    monkeypatch.delenv(executor.WARM_START_ENV, raising=False)
    hold, said_go = fake_env / "hold", fake_env / "evaluating.pid"
    hold.touch()
    ws = make_workspace(fake_env, HELD_TRAIN.format(hold=str(hold)))
    harness = fake_env / "harness"
    git(ws, "worktree", "add", "-q", "--detach", str(harness))

    def evaluation(value: float) -> str:
        return json.dumps({"argv": [sys.executable, "-c", ANSWERING_EVALUATOR, str(value), str(said_go), "4"],
                           "env": dict(os.environ), "timeout": 60, "harness": str(harness), "harness_commit": None})

    def spec(run: int, value: float = 1.5) -> executor.RunSpec:
        export = ws / ".research-loop" / "exports" / str(run) / "model.pt2"
        return executor.RunSpec(run=run, commit=git(ws, "rev-parse", "HEAD").strip(),
                                command=[sys.executable, "train.py"], timeout=120, log=fake_env / f"{run}.log",
                                report=fake_env / f"{run}.report.json", after_seconds=60,
                                worker_args=["--export", str(export), "--evaluate", evaluation(value)])
    pool = executor.LocalPool(Workspace(ws), 1, env=dict(os.environ))
    outcomes = queue.Queue()
    try:
        pool.start(spec(1), lambda run, outcome: outcomes.put(outcome))
        cold = pool.procs[1]
        cold_writable = writable(cold.pid, "0")
        cold.stdin.close()  # as the server's end closes when it dies
        stopped = outcomes.get(timeout=60)
        # started ahead once run 1 ended (and the bytecode archive is built): it waits for the hand-over
        assert wait_until(lambda: 0 in pool.ahead, 300)
        ahead = pool.ahead[0]
        run = spec(2)
        forged = [*pool._worker_args(0, spec(2, value=0.25), None, ahead.staging), "--", *run.command]
        try:
            with open(f"/proc/{ahead.proc.pid}/fd/0", "wb") as stdin:
                stdin.write(json.dumps({"argv": forged, "env": pool._env(0, run)}).encode() + b"\n")
            hand_over_forged = True
        except OSError:
            hand_over_forged = False
        hold.unlink()
        pool.start(run, lambda run, outcome: outcomes.put(outcome))
        assert wait_until(said_go.exists, 60)
        worker = pool.procs[2]
        for fd in os.listdir(f"/proc/{worker.pid}/fd"):  # a result of its own, then no evaluator to answer
            with contextlib.suppress(OSError):
                with open(f"/proc/{worker.pid}/fd/{fd}", "wb") as channel:
                    channel.write(json.dumps({"val_bpb": 0.25}).encode())
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(said_go.read_text()), signal.SIGKILL)
        outcome = outcomes.get(timeout=120)
    finally:
        pool.shutdown()
    # the worker stopped its run; its report could not reach a server that is gone, so none believes it
    assert executor.read_report(fake_env / "1.report.json")["stopped"] == "server gone" and stopped.report is None
    assert outcome.report["warm_start"] and outcome.report.get("evaluation", {}).get("val_bpb") != 0.25, outcome.report
    assert not hand_over_forged and not cold_writable


def test_a_warm_interpreter_that_reads_the_validation_data_before_its_hand_over_is_caught(tmp_path, bubblewrap,
                                                                                         monkeypatch):
    """The stand-in for a planted import in the training environment (a .pth, a patched module) that
    reads the validation data as the warm interpreter starts, before any run is handed to it: its
    interpreter (command[0]) reads the shard, then runs Python. With a private copy of the shard (the
    sandbox shows it in place of the shared one) the watch starts before the interpreter does: the
    run is a crash for reading the validation data. The same warm run with the plain interpreter is
    evaluated: the harness's own copy of the inputs (from the shared shard) is not counted. (The shard is
    shown, watched, with the cross-check's setting only; otherwise the sandbox hides it: test_integrity.py.)"""
    monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")
    from mcp_server.core.integrity import evaluation_verdict
    from test_server_units import EXPORT_THEN_WAIT, FAKE_EVALUATOR, REPO, clean_harness
    planted = tmp_path / "python3-planted"
    reports = {}
    # the bare venv (no torch to preload: the warm interpreter's start is not what is watched here, its reads are)
    for name, interpreter in (("honest", FAKE_PYTHON), ("planted", str(planted))):
        folder = tmp_path / name
        exports = folder / "exports"
        exports.mkdir(parents=True)
        val = folder / "val.parquet"
        val.write_bytes(b"validation")
        (folder / "train.py").write_text(EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer=""))
        planted.write_text(f"#!/bin/sh\ncat {val} > /dev/null\ntouch {exports / 'started'}\n"
                           f"exec {FAKE_PYTHON} \"$@\"\n")
        planted.chmod(0o755)
        if name == "honest":  # the interpreter says it started all the same
            (exports / "started").touch()
        evaluate = {"argv": [sys.executable, "-c", FAKE_EVALUATOR], "env": dict(os.environ), "timeout": 60,
                    "harness": str(clean_harness(folder)), "harness_commit": None,
                    "inputs": {"val": {"path": str(val), "sha256": harness_eval.sha256_of(val)}}}
        # the checkout (under /tmp in CI) and the bare venv (under /tmp), which the sandbox replaces
        sandbox_spec = {"readonly": [str(tmp_path), str(REPO), str(Path(FAKE_PYTHON).parent.parent)],
                        "writable": [str(exports)]}
        started = ["--watch-stdin", "--sandbox", json.dumps(sandbox_spec),
                   "--export", str(exports / "model.pt2"), "--val-shard", str(val)]
        report = folder / "report.json"
        worker = executor.with_socket_stdin([sys.executable, str(executor.WORKER), "--warm", *started, "--",
                                             interpreter, "train.py"], cwd=folder)
        assert wait_until((exports / "started").exists, 60)  # read before the hand-over, and put back
        run = ["--log", str(folder / "run.log"), "--report", str(report), "--timeout", "60",
               "--evaluate", json.dumps(evaluate), *started, "--", interpreter, "train.py"]
        worker.stdin.write(json.dumps({"argv": run, "env": dict(os.environ)}).encode() + b"\n")
        worker.stdin.flush()
        assert worker.wait(timeout=120) == 0
        worker.stdin.close()
        reports[name] = json.loads(report.read_text())
    honest, planted_run = reports["honest"], reports["planted"]
    assert honest["warm_start"] and honest["sandbox"] and planted_run["warm_start"], reports
    assert evaluation_verdict(honest)[:2] == (None, 1.5), honest
    assert evaluation_verdict(planted_run)[0] == ("the training opened the validation data before its model was "
                                                 "exported: it may have trained on it"), planted_run


# An evaluator that says go was read (its pid in the file named first), waits, then answers 1.5 only
# where the program and validation copies it was given are still what the harness copied.
COPY_CHECKING_EVALUATOR = (
    "import json, os, sys, time; sys.stdin.readline(); open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(3); "
    "fd = lambda name: int(sys.argv[sys.argv.index(name) + 1]); "
    "seen = [os.pread(fd(name), 64, 0) for name in ('--program-fd', '--val-fd')]; "
    "os.write(fd('--out-fd'), json.dumps({'val_bpb': 1.5 if seen == [b'model', b'validation'] else 0.25}).encode())")


def copy_fds() -> list[int]:
    """This process's descriptors of the harness's private copies (memfds by name)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone once listed
            if "research-loop-copy" in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(int(fd))
    return found


def test_a_copy_written_into_or_mapped_before_its_seal_is_refused(tmp_path):
    """The race before the seal, as the agent would play it: (1) bytes written into the harness's copy
    through /proc while it is being copied are caught (the digest is of the sealed copy, not of what
    was read); (2) a writable mapping taken before the seal makes the seal fail (EBUSY), and that is
    an error, not a copy that stays writable."""
    import mmap
    import threading
    source = tmp_path / "val.fifo"
    os.mkfifo(source)
    content = os.urandom(3 << 20)
    pinned = {"val": {"path": str(source), "sha256": __import__("hashlib").sha256(content).hexdigest()}}

    def feed():  # the first MiB, then a write into the copy past its end, then the rest
        with open(source, "wb") as fifo:
            fifo.write(content[:1 << 20])
            fifo.flush()
            (fd,) = copy_fds()
            forged = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
            os.pwrite(forged, b"EASY-TOKENS", len(content) + 10)
            os.close(forged)
            fifo.write(content[1 << 20:])
    feeder = threading.Thread(target=feed)
    feeder.start()
    with pytest.raises(ValueError, match="is not what prepare made"):
        harness_eval.private_copies(pinned)
    feeder.join(10)
    assert not copy_fds()  # closed, nothing left open

    copy = harness_eval.unnamed_file()
    copy.write(b"validation")
    copy.flush()
    held = os.open(f"/proc/self/fd/{copy.fileno()}", os.O_RDWR)
    mapping = mmap.mmap(held, 0, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)
    with pytest.raises(OSError, match="could not be sealed"):
        harness_eval.seal(copy)
    mapping.close()
    os.close(held)
    harness_eval.seal(copy)  # with no one else holding it writable, the seal holds
    forged = os.open(f"/proc/self/fd/{copy.fileno()}", os.O_WRONLY)
    with pytest.raises(PermissionError):
        os.write(forged, b"forged")
    os.close(forged)
    copy.close()


def test_the_harnesss_private_copies_cannot_be_written_through_proc(tmp_path):
    """The harness's copies of the exported program and of the validation data are files with no
    name, checked when copied: as the agent would, with the server's uid, open each through
    /proc/<evaluator pid>/fd/N while the evaluator waits, and write into it. They are sealed memfds:
    nothing is written, and the evaluation is of what the harness copied."""
    from test_server_units import clean_harness
    export, val, said_go = tmp_path / "model.pt2", tmp_path / "val.parquet", tmp_path / "evaluating.pid"
    export.write_text("model")
    (tmp_path / "model.pt2.json").write_text("{}")
    val.write_bytes(b"validation")
    spec = {"argv": [sys.executable, "-c", COPY_CHECKING_EVALUATOR, str(said_go)], "env": dict(os.environ),
            "timeout": 60, "harness": str(clean_harness(tmp_path)), "harness_commit": None,
            "inputs": {"val": {"path": str(val), "sha256": harness_eval.sha256_of(val)}}}
    evaluation = harness_eval.HarnessEvaluation(spec, tmp_path / "run.log", export, tmp_path / "answer.json")
    evaluation.start_if_exported(None)
    assert wait_until(said_go.exists, 60)
    evaluator = int(said_go.read_text())
    written = []
    for fd in os.listdir(f"/proc/{evaluator}/fd"):
        target = os.readlink(f"/proc/{evaluator}/fd/{fd}")
        if target.endswith("(deleted)"):
            with contextlib.suppress(OSError):
                forged = os.open(f"/proc/{evaluator}/fd/{fd}", os.O_WRONLY)
                try:
                    os.write(forged, b"forged")
                    written.append(target)
                finally:
                    os.close(forged)
    result = evaluation.finish(5.0)
    assert result.get("val_bpb") == 1.5 and written == [], (result, written)
