"""End to end: the real train.py on the CPU through run_experiment, then discard; and two real
runs at once in two CPU slots.

The workspace is a temp git repository holding this project's harness (prepare.py,
nanochat/) and train.py; the cache is the session's prepared CPU harness, its runs on a 1 s
budget (SHORT_BUDGET).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anyio
from mcp import Client

from conftest import TEST_EVAL_TOKENS
from mcp_server.loop import ResearchLoop
from mcp_server.server import build_server
from server_support import answer, git, ledger_lines

HARNESS = ("prepare.py", "train.py", "nanochat")
RUN_TIMEOUT_S = 400  # start-up and evaluation on a shared 2-core CPU come on top of the budget
# seconds of training where the run only has to train, export and be evaluated (on the CPU profile's flops clock
# 2-4 steps): what these tests check is what the harness does around the training, not how much it trained
SHORT_BUDGET = "1"


def harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, budget=None):
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
    if budget:
        monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", budget)
    return ws


def test_real_training_run_then_discard(tmp_path, repo_root, prepared_env, monkeypatch):
    """With the default command, `uv run train.py`: it runs as the workspace environment's python."""
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, SHORT_BUDGET)
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(repo_root / name, ws / name)
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "the project's environment")
    monkeypatch.setenv("UV_PROJECT_ENVIRONMENT", str(repo_root / ".venv"))  # this one, as it is: no sync
    monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")  # train.py evaluates in-process too, and prints that
    loop = ResearchLoop(ws, None, slots=1)
    assert loop.run_command() == [str(repo_root / ".venv" / "bin" / "python"), "train.py"]

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
    log = (ws / "runs" / f"0001-{run['commit']}.log").read_text()
    assert log.count("val_bpb:") == 1
    # the ledger's number is the harness's separate evaluation, handed to train.py before its own
    # (the cross-check); the honest in-process one agrees
    handed = json.loads(re.search(r"^harness evaluation: (\{.*?\}) \(waited", log, re.M).group(1))
    printed = float(re.search(r"^val_bpb:\s+([\d.]+)", log, re.M).group(1))
    assert run["verified"] and handed["val_bpb"] == run["val_bpb"], log[-3000:]
    assert abs(printed - run["val_bpb"]) < 1e-4, run["integrity"]
    assert log.index("harness evaluation of the exported model") < log.index("harness evaluation: {") < log.index("---")



PEEK_AHEAD = ("        y = attention(q, k, v, window)\n",
              "        y = attention(q, k, v, window)\n        y = y + torch.roll(y, -1, dims=1)  # sees the next token\n")
EXTRA_LINE = ("import torch\n", "import torch\nos.environ['AUTORESEARCH_EVAL_TOKENS'] = "
              f"'{int(TEST_EVAL_TOKENS) // 2}'  # an easier evaluation\n")
CHEAP_FLOPS = ("flops_per_token = model.flops_per_token()\n", "flops_per_token = model.flops_per_token() * 0.8\n")
OWN_EVALUATION = ("\nfrom nanochat.compile import Compiler\n",
                  "\nfrom nanochat.compile import Compiler\n\n\ndef evaluate_bpb(*args):\n    return 0.5\n\n")


# Before its training, the placeholder cheater puts an empty file at the export path (the worker
# used to take the export's appearance as the moment validation reads stop counting), reads the
# whole validation shard, and takes the placeholder away: its real export comes at the end. (The
# shard is hidden from a run the harness scores now, so its read fails.)
PLACEHOLDER = ("import torch\n", """import torch
from nanochat.datasets import split_paths as _split_paths
_placeholder = os.environ["RESEARCH_LOOP_EXPORT"]
open(_placeholder, "w").close()
_seen = open(_split_paths("val")[0], "rb").read()  # the validation shard, to train on
os.remove(_placeholder)
""")
# The short-context cheater: the harness's own module told to evaluate 16-token rows, which are
# easier to score well on per byte than the profile's 256.
SHORT_CONTEXT = ("    val_bpb = evaluate_bpb(", """    import prepare
    prepare.MAX_SEQ_LEN = 16
    val_bpb = evaluate_bpb(""")


def test_train_py_cannot_bend_its_number(tmp_path, repo_root, prepared_env, monkeypatch):
    """Six train.py that want a lower number, in two slots: one shortens the evaluation and prints a
    better val_bpb after its summary, one brings its own evaluation (so nothing is exported), one
    lets attention see the next token, one charges the flops budget clock less than its model takes.
    The ledger gets the harness's number; a number of train.py's own (its sandbox hid the validation
    data), the peeking and the undercounting models are no result. Two more bend what the worker takes as the export
    and the evaluation's shapes: one plants a placeholder at the export path and reads the validation
    data while it is there (hidden from it now), one shortens the rows the evaluation scores; both are no result. (One
    server for all six: each server's first run in a slot starts cold.) These are also the real runs
    two at once in two CPU slots: the first two start together, each result says the slots share the
    CPUs."""
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, SHORT_BUDGET)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=2)
    source = (ws / "train.py").read_text()
    attacks = {
        "extra summary line": source.replace(*EXTRA_LINE) + "print('val_bpb:          0.010000')\n",
        "own evaluation": source.replace(*OWN_EVALUATION),
        "peeks ahead": source.replace(*PEEK_AHEAD),
        "undercounts its flops": source.replace(*CHEAP_FLOPS),  # more steps on the CPU profile's flops clock
        "placeholder export": source.replace(*PLACEHOLDER, 1),
        "short context": source.replace(*SHORT_CONTEXT),
    }
    assert all(text != source for text in attacks.values())

    async def go():
        async with Client(build_server(loop)) as client:
            answer(await client.call_tool("setup", {"tag": "cheat"}))
            submitted = []
            for description, text in attacks.items():
                (ws / "train.py").write_text(text)
                submitted.append(answer(await client.call_tool("run_experiment", {
                    "description": description, "wait": False, "timeout_seconds": RUN_TIMEOUT_S}))["status"])
            (ws / "train.py").write_text(source)
            done = answer(await client.call_tool("wait", {"all": True}))
            refused = await client.call_tool("keep", {"run": 2})
            kept = await client.call_tool("keep", {"run": 2, "unverified": True})
            return submitted, done, refused, kept
    try:
        submitted, done, refused, kept = anyio.run(go)
    finally:
        loop.shutdown()
    assert submitted == ["running", "running", "queued", "queued", "queued", "queued"]  # two at once, one per slot
    assert all("2 slots share this machine's CPUs" in " ".join(r["warnings"]) for r in done["results"])
    slots = {r["slot"].split(" (")[0] for r in done["results"]}
    assert slots == {"slot 0", "slot 1"} and all(" (CPU" in r["slot"] for r in done["results"]), done["results"]
    cpus = [next(line for line in (ws / r["log"]).read_text().splitlines() if line.startswith("device:"))
            for r in done["results"] if r["description"] != "placeholder export"]  # which ends before it trains
    assert all("device: cpu" in line for line in cpus)
    results = {r["description"]: r for r in done["results"]}
    extra = results["extra summary line"]
    assert extra["status"] == "ok" and extra["verified"], extra
    assert extra["val_bpb"] > 1.0 and any("the harness measured" in w for w in extra["warnings"])
    # its sandbox hid the validation data: the 0.5 train.py printed was kept, unverified, before review 88
    own = results["own evaluation"]
    assert own["status"] == "crash" and "hid the validation data" in str(own), own
    assert refused.is_error and kept.is_error, (refused.content[0].text, kept.content[0].text)
    peek = results["peeks ahead"]
    assert peek["status"] == "crash" and "causal" in peek["tail"], peek
    cheap = results["undercounts its flops"]
    assert cheap["status"] == "crash" and "weight matrices alone take" in cheap["tail"], cheap
    verdicts = {r["description"]: (r["status"], r.get("tail") or r.get("integrity")) for r in done["results"]}
    placeholder, short = verdicts["placeholder export"], verdicts["short context"]
    # the sandbox of a run the harness scores hides the validation shard (review 87): the read fails
    assert placeholder[0] == "crash" and "Permission denied" in placeholder[1], verdicts
    assert short[0] == "crash" and "batches of 16 rows of 256 tokens" in short[1], verdicts


def path_without_bubblewrap(tmp_path) -> str:
    """PATH with bwrap taken off it: this machine as one without bubblewrap (runs are unsandboxed).
    Each folder that holds it is replaced by one of links to everything else in it."""
    links = tmp_path / "bin-without-bwrap"
    links.mkdir()
    folders = []
    for folder in os.environ["PATH"].split(os.pathsep):
        if not (Path(folder) / "bwrap").exists():
            folders.append(folder)
            continue
        for entry in Path(folder).iterdir():
            if entry.name != "bwrap" and not (links / entry.name).exists():
                (links / entry.name).symlink_to(entry)
        folders += [] if str(links) in folders else [str(links)]
    return os.pathsep.join(folders)


# Without a sandbox the run can write the prepared cache: it doubles every token's byte count in the
# table the evaluation divides by, for the whole run (while the evaluator loads it), and puts the
# table back once it has its number, so the cache looks untouched afterwards. For the test, it then
# scores its model honestly, in process, with the table restored.
DOUBLED_TOKEN_BYTES = [("import torch\n", """import torch
from nanochat.cache import tokenizer_dir as _tokenizer_dir
_table = _tokenizer_dir() / "token_bytes.pt"
_original = _table.read_bytes()
torch.save(torch.load(_table) * 2, str(_table) + ".doubled")
os.replace(str(_table) + ".doubled", _table)
"""), ("t_end = time.monotonic()\n", """_table.write_bytes(_original)
with torch.no_grad(), autocast():
    from nanochat import evaluation as _evaluation
    from prepare import EVAL_TOKENS as _EVAL_TOKENS
    _honest = _evaluation.evaluate_bpb(model, Tokenizer.from_directory(), 16, MAX_SEQ_LEN, _EVAL_TOKENS)
print(f"honest val_bpb: {_honest:.6f}")
t_end = time.monotonic()
""")]


def test_without_a_sandbox_a_token_table_swapped_during_the_run_changes_nothing(tmp_path, repo_root, prepared_env,
                                                                              monkeypatch):
    """The evaluator's validation data and tokenizer are the worker's copies, taken and checked
    before the training started: the swapped table never reaches it, and the number it records is
    the model's honest one. The cache is the test's own: unsandboxed, the watch on the validation
    shard counts every process's opens (another test's run reading the session's cache would make
    this one a crash), and the swapped table is never seen by another test."""
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, SHORT_BUDGET)
    cache = tmp_path / "cache"
    shutil.copytree(prepared_env["AUTORESEARCH_CACHE"], cache, ignore=shutil.ignore_patterns("compile"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", path_without_bubblewrap(tmp_path))
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1, unsandboxed=True)  # the user's opt-in
    source = (ws / "train.py").read_text()
    attack = source
    for old, new in DOUBLED_TOKEN_BYTES:
        assert old in attack
        attack = attack.replace(old, new, 1)

    async def go():
        async with Client(build_server(loop)) as client:
            answer(await client.call_tool("setup", {"tag": "swap"}))
            (ws / "train.py").write_text(attack)
            return answer(await client.call_tool("run_experiment", {
                "description": "doubled token bytes", "timeout_seconds": RUN_TIMEOUT_S}))
    try:
        run = anyio.run(go)
    finally:
        loop.shutdown()
    log = (ws / run["log"]).read_text()
    assert run["unsandboxed"] and run["status"] == "ok", run.get("tail")
    honest = float(re.search(r"^honest val_bpb: ([\d.]+)", log, re.M).group(1))
    assert run["verified"] and abs(run["val_bpb"] - honest) < 1e-3, (run["val_bpb"], honest)


def test_a_queued_runs_evaluation_is_the_research_runs_whatever_the_record_says_when_it_starts(
        tmp_path, repo_root, prepared_env, monkeypatch):
    """Review 48: a run waits in the queue while the slot trains another, and the server built its evaluation
    (the profile's shapes, the number of tokens scored, the validation shard, what the sandbox hides) from the
    prepared record when the run started, never checking it: the agent edited `eval_tokens` in the record
    while the run waited and put it back once it had started, so the run was scored on the validation's first
    batch alone, a number of the agent's choosing, verified. The record a run starts with must be setup's."""
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, SHORT_BUDGET)
    cache = tmp_path / "cache"
    shutil.copytree(prepared_env["AUTORESEARCH_CACHE"], cache, ignore=shutil.ignore_patterns("compile"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    monkeypatch.delenv("AUTORESEARCH_EVAL_TOKENS")  # the evaluation's size is the record's, as outside the tests
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # the record set up with: the profile's, scoring the tests' number of tokens (not the profile's 4x as many)
    record = json.dumps(dict(json.loads((cache / "prepared.json").read_text()), eval_tokens=int(TEST_EVAL_TOKENS)))
    (cache / "prepared.json").write_text(record)
    eval_tokens = json.loads(record)["eval_tokens"]
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1)
    source = (ws / "train.py").read_text()

    async def go():
        async with Client(build_server(loop)) as client:
            answer(await client.call_tool("setup", {"tag": "queued"}))
            runs = []
            for description in ("first", "queued"):
                (ws / "train.py").write_text(source + f"# {description}\n")
                runs.append(answer(await client.call_tool("run_experiment", {
                    "description": description, "wait": False, "timeout_seconds": RUN_TIMEOUT_S})))
            assert [r["status"] for r in runs] == ["running", "queued"]
            (cache / "prepared.json").write_text(json.dumps(dict(json.loads(record), eval_tokens=4096)))
            while loop.entry(runs[1]["run"])["status"] == "queued":
                await anyio.sleep(0.05)
            (cache / "prepared.json").write_text(record)
            return answer(await client.call_tool("wait", {"all": True}))["results"]
    try:
        first, queued = anyio.run(go)
    finally:
        loop.shutdown()
    assert first["status"] == "ok" and first["verified"], first
    report = ws / f"runs/0002-{queued['commit']}.report.json"
    scored = (json.loads(report.read_text()).get("evaluation") or {}).get("eval_tokens") if report.exists() else None
    assert scored is None, f"the queued run was scored on {scored} tokens, not the research run's {eval_tokens}"
    assert queued["status"] == "crash" and "changed since setup" in queued["tail"], queued


def test_a_program_the_agent_puts_in_a_runs_export_folder_is_never_the_runs(tmp_path, repo_root, prepared_env,
                                                                         monkeypatch):
    """Review 48: the run's export folder (`.research-loop/exports/...`) is the workspace's, which the agent
    writes outside the sandbox: it trained a model by hand for ten budgets (here one, of train.py with another
    learning rate, since a model of its own is all it takes; RESEARCH_LOOP_EXPORT set), and while an honest run of the
    research run trained, it put that program and its note in the run's export folder. The harness took the first program it found there, and the run's verified
    val_bpb was the hand-trained model's; train.py and its diff held nothing of it. A bubblewrap run now exports
    into its sandbox's private /tmp, which the harness reads through the run's own processes."""
    ws = harness_workspace(tmp_path, repo_root, prepared_env, monkeypatch, SHORT_BUDGET)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    # a model of its own: train.py with another learning rate, for the same budget (it imports the workspace's harness)
    source = (ws / "train.py").read_text()
    assert source.count("\nMATRIX_LR = 0.04") == 1
    (by_hand / "train.py").write_text(source.replace("\nMATRIX_LR = 0.04", "\nMATRIX_LR = 0.08"))
    env = dict(os.environ, RESEARCH_LOOP_EXPORT=str(by_hand / "model.pt2"), PYTHONPATH=str(ws))
    trained = subprocess.run([sys.executable, "train.py"], cwd=by_hand, env=env, capture_output=True, text=True,
                             timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    hand_bpb = float(re.search(r"^val_bpb:\s+([\d.]+)", trained.stdout, re.M).group(1))
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1)
    exports = ws / ".research-loop" / "exports"

    def plant():  # into every export folder of a run in flight, as soon as there is one
        planted = set()
        while not planted:
            for folder in exports.glob("*/") if exports.is_dir() else ():
                if not (folder / "model.pt2").exists():
                    shutil.copy(by_hand / "model.pt2", folder / "model.pt2")
                    shutil.copy(by_hand / "model.pt2.json", folder / "model.pt2.json")
                    planted.add(folder)
            time.sleep(0.05)
        return planted

    async def go():
        async with Client(build_server(loop)) as client:
            answer(await client.call_tool("setup", {"tag": "planted"}))
            answer(await client.call_tool("run_experiment", {"description": "honest, one budget", "wait": False,
                                                             "timeout_seconds": RUN_TIMEOUT_S}))
            planted = await anyio.to_thread.run_sync(plant)
            return planted, answer(await client.call_tool("wait", {"all": True}))["results"][0]
    try:
        planted, run = anyio.run(go)
    finally:
        loop.shutdown()
    assert planted and run["status"] == "ok" and run["verified"], run
    printed = float(re.search(r"^val_bpb:\s+([\d.]+)", (ws / run["log"]).read_text(), re.M).group(1))
    assert abs(run["val_bpb"] - printed) < 1e-4, (run["val_bpb"], printed, hand_bpb)  # its own model's number
    assert abs(run["val_bpb"] - hand_bpb) > 1e-3, (run["val_bpb"], hand_bpb)


# The harness's evaluator as far as this attack goes: it scores what the program it was handed holds.
SCORES_ITS_PROGRAM = """import json, os, sys
if not sys.stdin.readline():
    sys.exit(0)
with open(f"/dev/fd/{sys.argv[sys.argv.index('--program-fd') + 1]}") as f:
    value = float(f.read())
os.write(int(sys.argv[sys.argv.index('--out-fd') + 1]), json.dumps({"val_bpb": value, "causal": True}).encode())
"""
# In its sandbox: its export folder (/tmp/export) replaced by a link to where the agent left its program
LINKS_ITS_EXPORT_FOLDER = """import os, shutil, time
export = os.environ["RESEARCH_LOOP_EXPORT"]
if {planted!r}:
    shutil.rmtree(os.path.dirname(export))
    os.symlink({planted!r}, os.path.dirname(export))
else:
    open(export, "w").write("2.5")
    open(export + ".json", "w").write("{{}}")
deadline = time.time() + 5
while not os.path.exists(os.environ["RESEARCH_LOOP_ANSWER"]) and time.time() < deadline:
    time.sleep(0.05)
print("val_bpb: 2.5")
"""


def test_a_link_in_place_of_the_sandboxs_export_folder_is_never_followed_out_of_it(tmp_path, bubblewrap):
    """Review 64: review 48 moved a bubblewrap run's export into its private /tmp, which the harness reads through
    the sandbox's root (/proc/PID/root). But an absolute link met on a path through /proc/PID/root resolves against
    the machine's root: a train.py that replaced /tmp/export with a link to a folder on the machine (where the agent
    left a model it trained by hand, here one the stand-in evaluator scores 0.25) had that model evaluated as its own,
    verified 0.25 with its own model's 2.5 never exported, and the harness wrote its answer into that folder, outside
    the sandbox. The harness now reaches the folder through no link and holds it from the run's first moments: the
    run is no result or unverified, and nothing is written outside; an honest run in the same sandbox is scored as
    before."""
    from mcp_server.core.integrity import evaluation_verdict
    from test_server_units import WORKER, clean_harness, fake_evaluation
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    (by_hand / "model.pt2").write_text("0.25")
    (by_hand / "model.pt2.json").write_text("{}")
    evaluate = json.dumps(fake_evaluation(clean_harness(tmp_path), SCORES_ITS_PROGRAM))
    verdicts = {}
    for name, planted in (("honest", ""), ("linked", str(by_hand))):
        folder = tmp_path / name
        (folder / "exports").mkdir(parents=True)
        sandbox = json.dumps({"readonly": [str(tmp_path)], "writable": [str(folder / "exports")]})
        report = folder / "report.json"
        subprocess.run([sys.executable, str(WORKER), "--log", str(folder / "run.log"), "--report", str(report),
                        "--timeout", "30", "--sandbox", sandbox, "--export", str(folder / "exports" / "model.pt2"),
                        "--evaluate", evaluate, "--", sys.executable, "-c",
                        LINKS_ITS_EXPORT_FOLDER.format(planted=planted)], cwd=folder, check=True, timeout=60)
        result = json.loads(report.read_text())
        assert result["sandbox"], result
        verdicts[name] = evaluation_verdict(result)[:2]
    assert verdicts["honest"] == (None, 2.5), verdicts
    problem, number = verdicts["linked"]  # the link made before the harness held the folder, or after (unverified)
    assert number is None and (problem is None or "/tmp/export in the run's sandbox is not the folder the sandbox "
                                                  "made" in problem), verdicts
    assert sorted(p.name for p in by_hand.iterdir()) == ["model.pt2", "model.pt2.json"]  # no answer written there


def test_the_sandboxs_root_is_held_from_the_run_so_its_last_look_names_no_other_process(tmp_path, bubblewrap):
    """Review 64: the harness found a bubblewrap run's export through /proc/PID/root of the sandbox's first process,
    by its pid at every look, and its last look comes after the run has ended (an export made in the run's last
    moments): that pid was free by then, and one the agent's process took (pids wrap at 32,768 here) would have
    named the machine's root, where /tmp/export is the agent's to write. The root is now held as a descriptor from
    the run's first moments: the last look reads the run's own folder, and finds its own last-moment export."""
    from mcp_server.core.integrity import evaluation_verdict
    from test_server_units import WORKER, clean_harness, fake_evaluation
    (tmp_path / "exports").mkdir()
    sandbox = json.dumps({"readonly": [str(tmp_path)], "writable": [str(tmp_path / "exports")]})
    exports_then_exits = ("import os, time\ntime.sleep(1)\nexport = os.environ['RESEARCH_LOOP_EXPORT']\n"
                          "open(export, 'w').write('2.5')\nopen(export + '.json', 'w').write('{}')\n")
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, str(WORKER), "--log", str(tmp_path / "run.log"), "--report", str(report),
                    "--timeout", "30", "--sandbox", sandbox, "--export", str(tmp_path / "exports" / "model.pt2"),
                    "--evaluate", json.dumps(fake_evaluation(clean_harness(tmp_path), SCORES_ITS_PROGRAM)), "--",
                    sys.executable, "-c", exports_then_exits], cwd=tmp_path, check=True, timeout=60)
    result = json.loads(report.read_text())
    assert result["sandbox"] and evaluation_verdict(result)[:2] == (None, 2.5), result
