"""Review 88: the validation shard hidden from a run the harness scores (worker.py validation_hidden), played where
the run's interpreter starts before the run is handed to it: a slot's next worker, started ahead (--warm); and what
else could carry validation text to a run: the harness's reasons, and the runs' logs."""
import json
import os
import subprocess
import sys
import time

import pytest

from mcp_server.core import integrity
from mcp_server.core.integrity import evaluation_verdict
from mcp_server.executors import executor
from mcp_server.scripts import harness_eval, sandbox
from server_support import Lab, answer, git, make_workspace, set_knobs, wait_until
from test_server_units import EXPORT_THEN_WAIT, FAKE_EVALUATOR, REPO, clean_harness, fake_evaluation, run_worker


def test_a_warm_interpreter_cannot_read_the_validation_data_before_its_hand_over(tmp_path, bubblewrap):
    """The stand-in for a planted import in the training environment that copies the validation shard into a folder
    the run writes as the warm interpreter starts, long before any run is handed to it: the warm worker's sandbox
    hides the shard too (start_warm gets the spec validation_hidden made), so the copy is empty and the run is scored
    as any other. (With the cross-check's setting the shard is shown and watched: test_warm_start.py.)"""
    exports, val = tmp_path / "exports", tmp_path / "val.parquet"
    exports.mkdir()
    val.write_bytes(b"validation")
    (tmp_path / "train.py").write_text(EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer=""))
    planted = tmp_path / "python3-planted"
    planted.write_text(f"#!/bin/sh\ncat {val} > {exports / 'stash'} 2>/dev/null\ntouch {exports / 'started'}\n"
                       f"exec {sys.executable} \"$@\"\n")
    planted.chmod(0o755)
    evaluate = {"argv": [sys.executable, "-c", FAKE_EVALUATOR], "env": dict(os.environ), "timeout": 60,
                "harness": str(clean_harness(tmp_path)), "harness_commit": None,
                "inputs": {"val": {"path": str(val), "sha256": harness_eval.sha256_of(val)}}}
    spec = {"readonly": [str(tmp_path), str(REPO)], "writable": [str(exports)]}
    started = ["--watch-stdin", "--sandbox", json.dumps(spec), "--export", str(exports / "model.pt2"),
               "--val-shard", str(val)]
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_EVAL_CROSSCHECK"}
    worker = executor.with_socket_stdin([sys.executable, str(executor.WORKER), "--warm", *started, "--",
                                         str(planted), "train.py"], cwd=tmp_path, env=env)
    assert wait_until((exports / "started").exists, 60)  # it read before the hand-over
    report = tmp_path / "report.json"
    run = ["--log", str(tmp_path / "run.log"), "--report", str(report), "--timeout", "60",
           "--evaluate", json.dumps(evaluate), *started, "--", str(planted), "train.py"]
    worker.stdin.write(json.dumps({"argv": run, "env": env}).encode() + b"\n")
    worker.stdin.flush()
    assert worker.wait(timeout=120) == 0
    worker.stdin.close()
    result = json.loads(report.read_text())
    assert result["warm_start"] and result["sandbox"] and result["val_hidden"], result
    assert (exports / "stash").read_bytes() == b"", "the warm interpreter read the validation shard"
    assert evaluation_verdict(result)[:2] == (None, 1.5), result


def test_train_py_is_told_no_reason_an_evaluation_of_validation_batches_gave(tmp_path, monkeypatch):
    """Review 88: an error raised while the program ran on validation batches can name a value computed from them
    (torch's "index 4321 is out of bounds"), and the harness's answer handed train.py its text, for the run to print or
    keep where later runs read. train.py is told only that there is no number; the run's result keeps the reason."""
    monkeypatch.chdir(tmp_path)
    evaluator = FAKE_EVALUATOR.replace("json.dumps({'val_bpb': 1.5, 'causal': True})",
                                       "json.dumps({'problem': 'index 4321 is out of bounds'})")
    code = EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer="").replace("handed['val_bpb']", "handed")
    report, log = run_worker(tmp_path, code, "--timeout", "30", "--export", str(tmp_path / "model.pt2"),
                             "--evaluate", json.dumps(fake_evaluation(clean_harness(tmp_path), evaluator)))
    assert "4321" not in log and "the run's result says why" in log, log  # train.py printed what it was told
    assert evaluation_verdict(report)[0] == "index 4321 is out of bounds", report


def test_a_run_reads_no_earlier_runs_log(fake_env, bubblewrap, monkeypatch):
    """A run's log holds what it printed and the notes the worker adds, the harness's reasons among them: the runs'
    logs and records (the workspace's runs/ folder) are hidden from every run."""
    ws = make_workspace(fake_env)
    logs = str(ws / "runs" / "*")
    monkeypatch.setenv("FAKE_READ", logs)
    lab = Lab(ws, unsandboxed=False)
    try:
        answer(lab.call("setup", tag="logs"))
        first = answer(lab.call("run_experiment", description="base"))
        lab.ok("keep")
        set_knobs(lab.ws, VAL_BPB=0.8)
        second = answer(lab.call("run_experiment", description="reads the earlier logs"))
    finally:
        lab.loop.shutdown()
    for run in (first, second):
        log = (ws / run["log"]).read_text()
        assert run["status"] == "ok" and f"glob {logs}: []" in log, log
    assert len(list((ws / "runs").glob("*.log"))) == 2


@pytest.mark.parametrize("change", ["put back", "replaced"])
def test_a_shard_changed_before_a_warm_hand_over_is_not_read_by_its_run(tmp_path, bubblewrap, change):
    """The warm worker's sandbox hides the shard as it is when the interpreter starts. Put back: review 88's note, the
    agent's shell moved it away while the slot's next worker started and put it back before the hand-over, and the
    run's sandbox showed it, unhidden and unwatched. Replaced: review 91, the shell renamed a copy over it (or put a
    link there): the kernel undoes the sandbox's bind over a file renamed over from outside, so the run read the copy,
    validation text, at the hidden path. The worker refuses both runs, saying why."""
    exports, val = tmp_path / "exports", tmp_path / "val.parquet"
    exports.mkdir()
    if change == "replaced":
        val.write_bytes(b"validation")
    (tmp_path / "train.py").write_text(f"import shutil\nshutil.copyfile({str(val)!r}, {str(exports / 'stash')!r})\n")
    evaluate = {"argv": [sys.executable, "-c", FAKE_EVALUATOR], "env": dict(os.environ), "timeout": 60,
                "harness": str(clean_harness(tmp_path)), "harness_commit": None, "inputs": {}}
    spec = {"readonly": [str(tmp_path), str(REPO)], "writable": [str(exports)]}
    started = ["--watch-stdin", "--sandbox", json.dumps(spec), "--export", str(exports / "model.pt2"),
               "--val-shard", str(val)]
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_EVAL_CROSSCHECK"}
    worker = executor.with_socket_stdin([sys.executable, str(executor.WORKER), "--warm", *started, "--",
                                         sys.executable, "train.py"], cwd=tmp_path, env=env)
    report, log = tmp_path / "report.json", tmp_path / "run.log"
    run = ["--log", str(log), "--report", str(report), "--timeout", "60", "--evaluate", json.dumps(evaluate),
           *started, "--", sys.executable, "train.py"]
    time.sleep(2)  # its interpreter is starting
    if change == "replaced":
        replace_shard(val)
    else:
        val.write_bytes(b"validation")
    worker.stdin.write(json.dumps({"argv": run, "env": env}).encode() + b"\n")
    worker.stdin.flush()
    worker.wait(timeout=120)
    worker.stdin.close()
    assert not (exports / "stash").exists(), "the run read the validation shard"
    assert json.loads(report.read_text())["exit_code"] != 0 and "came back or was replaced" in log.read_text(), \
        log.read_text()


# The harness's evaluator (the worker's protocol) for the fake trainer's "model", the number it holds: past 5 it fails
# with a reason naming a value, as an exported program's out-of-bounds index into the validation batch would
NAMING_EVALUATOR = """import json, os, sys
if not sys.stdin.readline():
    sys.exit(0)
with open(f"/dev/fd/{sys.argv[sys.argv.index('--program-fd') + 1]}") as f:
    value = float(f.read())
out = {"val_bpb": value, "causal": True} if value < 5 else {"problem": "index " + "4321" * 2 + " is out of bounds"}
os.write(int(sys.argv[sys.argv.index("--out-fd") + 1]), json.dumps(out).encode())
"""
# the training command: names every file under the workspace (and its .git) holding the reason, then trains
SEEKER = """import os, runpy, sys
for folder, _, files in os.walk(sys.argv[1]):
    for name in files:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                if b"4321" * 2 in f.read():
                    print("found the reason in", os.path.join(folder, name))
        except OSError:
            pass
sys.argv = ["fake_train.py"]
runpy.run_path("fake_train.py", run_name="__main__")
"""


def naming_workspace(fake_env, script: str, source: str):
    """A workspace whose harness's evaluator names a value in its reason (NAMING_EVALUATOR, as an exported program's
    out-of-bounds index did: review 88), with `script` (source) for the runs to start, and a plain environment."""
    ws = make_workspace(fake_env, "VAL_BPB = 1.0\nEXPORT = 1\n")
    (ws / "nanochat" / "evaluate_export.py").write_text(NAMING_EVALUATOR)
    (ws / "nanochat" / "export.py").write_text("# harness stand-in\n")
    (ws / script).write_text(source)
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "a harness that evaluates exports")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fake_env / "venv")], check=True)
    return ws


def crash_naming_a_value(lab: Lab, ws, tag: str) -> dict:
    """setup, a verified baseline kept, then a run whose reason names the value: its answer (the agent is told)."""
    answer(lab.call("setup", tag=tag))
    assert answer(lab.call("run_experiment", description="base", wait=True))["verified"]
    answer(lab.call("keep"))
    set_knobs(ws, VAL_BPB=9.0, EXPORT=1)
    return answer(lab.call("run_experiment", description="names a value", wait=True))


def test_a_run_reads_no_reason_of_an_undecided_run_in_the_state(fake_env, bubblewrap):
    """Review 90: with runs/ hidden (review 88), the state (`.research-loop/state.json`) and the server's copy of it
    (in `.git/research-loop/records`) still held each undecided run's result, its log's tail and the harness's reason
    among it, readable by every run: a run started while a crash stood undecided (a second slot) read the value the
    reason named. Both folders are hidden from runs; the export folders inside `.research-loop` stay writable."""
    ws = naming_workspace(fake_env, "seeker.py", SEEKER)
    lab = Lab(ws, slots=2, unsandboxed=False, train_command=[str(fake_env / "venv" / "bin" / "python"), "seeker.py",
                                                             str(ws)])
    try:
        crash = crash_naming_a_value(lab, ws, "reasons")
        assert crash["status"] == "crash" and "4321" * 2 in crash["tail"], crash  # the agent is told
        set_knobs(ws, VAL_BPB=0.99, EXPORT=1)
        later = answer(lab.call("run_experiment", description="reads the state", wait=True))
    finally:
        lab.loop.shutdown()
    log = (ws / later["log"]).read_text()
    assert later["status"] == "ok" and later["verified"], later  # its export still reached the harness
    assert "found the reason in" not in log, log


def replace_shard(val) -> None:
    """The agent's shell: a copy of the shard renamed over it, a new file at the path the sandbox hid."""
    copy = val.with_name("copy.parquet")
    copy.write_bytes(val.read_bytes())
    os.replace(copy, val)


def test_a_shard_replaced_while_a_run_lives_leaves_it_no_number(tmp_path, bubblewrap):
    """Review 91, played: the same rename while a run lives (any worker, warm or cold): the run, waiting on the
    hidden path, read the validation text once its sandbox's bind was undone, and its exported model was scored as
    any other. Such a run is no result now."""
    exports, val = tmp_path / "exports", tmp_path / "val.parquet"
    exports.mkdir()
    val.write_bytes(b"validation")
    stash = exports / "stash"
    waits = (f"import shutil\nopen({str(exports / 'exported')!r}, 'w')\n"  # hidden: unreadable until replaced
             f"for _ in range(600):\n    try:\n"
             f"        shutil.copyfile({str(val)!r}, {str(stash)!r})\n        break\n"
             f"    except OSError:\n        time.sleep(0.05)\n")
    (tmp_path / "train.py").write_text(EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer=waits))
    evaluate = {"argv": [sys.executable, "-c", FAKE_EVALUATOR], "env": dict(os.environ), "timeout": 60,
                "harness": str(clean_harness(tmp_path)), "harness_commit": None, "inputs": {}}
    spec = {"readonly": [str(tmp_path), str(REPO)], "writable": [str(exports)]}
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_EVAL_CROSSCHECK"}
    worker = executor.with_socket_stdin([sys.executable, str(executor.WORKER), "--log", str(tmp_path / "run.log"),
                                         "--report", str(report), "--timeout", "60", "--watch-stdin", "--evaluate",
                                         json.dumps(evaluate), "--sandbox", json.dumps(spec), "--export",
                                         str(exports / "model.pt2"), "--val-shard", str(val), "--",
                                         sys.executable, "train.py"], cwd=tmp_path, env=env)
    assert wait_until((exports / "exported").exists, 60)
    replace_shard(val)
    assert worker.wait(timeout=120) == 0
    worker.stdin.close()
    result = json.loads(report.read_text())
    assert stash.read_bytes() == b"validation", "the run never read it: the play did not happen"
    assert "replaced" in (evaluation_verdict(result)[0] or ""), result


# the training command: names each file under the folders it is given (the workspace, the agent's records) that holds
# the reason, then trains
READER = SEEKER.replace("for folder, _, files in os.walk(sys.argv[1]):",
                        "for folder, _, files in (w for top in sys.argv[1:] for w in os.walk(top)):")


# {case: (the client's folder the run searches, where it keeps the session, under the home), relative to the home}
CLIENTS = {"home": (".claude", ".claude/projects/-workspace/session.jsonl"),
           "codex": (".codex", ".codex/sessions/2026/12/07/rollout.jsonl"),
           "linked": ("elsewhere", "elsewhere/-workspace/session.jsonl"),  # ~/.claude/projects links here
           "gemini": (".gemini", ".gemini/tmp/0123abcd/chats/session.json"),
           "vscode": (".config/Code", ".config/Code/User/workspaceStorage/0123abcd/chatSessions/session.json"),
           "opencode": (".local/share/opencode", ".local/share/opencode/storage/part/msg_1/prt_1.json"),
           # $TMPDIR outside /tmp (below): where a client keeps its shell's output (the agent's `cat` of a log)
           "TMPDIR": ("scratch", "scratch/claude/-workspace/tasks/shell.output")}


@pytest.mark.parametrize("where", ["CLAUDE_CONFIG_DIR", "CLAUDE_CODE_TMPDIR", *CLIENTS])
def test_a_run_reads_no_reason_in_the_agents_own_transcript(fake_env, bubblewrap, monkeypatch, where, outside_tmp):
    """Review 92: reviews 88 and 90 hid every file of the workspace that holds the harness's reasons (a reason can name
    a value computed from validation batches), but the agent is told each one in its tool's answer, and Claude Code
    keeps every answer in the session's transcript (`~/.claude/projects/<workspace>/<session>.jsonl`, under
    $CLAUDE_CONFIG_DIR where that is set), which bubblewrap showed every run read-only: a later run found the value
    there (Codex keeps its sessions in `~/.codex/sessions`). The clients' folders are hidden from runs. Review 94: so
    is a folder a link inside them leads to (`~/.claude/projects` kept on another disk), and the session folders of
    the other MCP clients `most clients` in docs/other-agents.md takes in (Gemini CLI, VS Code, opencode)."""
    home = outside_tmp / "home"  # not under /tmp, which every sandbox replaces with its own
    monkeypatch.setenv("HOME", str(home))  # the server's home: where Claude Code's records are
    for name in ("CLAUDE_CONFIG_DIR", "CLAUDE_CODE_TMPDIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    if where.startswith("CLAUDE_"):  # the config folder, or where Claude Code keeps its shell's output
        config = outside_tmp / where.lower()
        transcript = config / ("projects/s.jsonl" if where == "CLAUDE_CONFIG_DIR" else "claude/-ws/tasks/b1.output")
        monkeypatch.setenv(where, str(config))
    else:
        config, transcript = (home / part for part in CLIENTS[where])
    transcript.parent.mkdir(parents=True)
    if where == "TMPDIR":
        monkeypatch.setenv("TMPDIR", str(config))
    if where == "linked":
        (home / ".claude").mkdir()
        (home / ".claude" / "projects").symlink_to(config)
    ws = naming_workspace(fake_env, "seeker.py", READER)
    lab = Lab(ws, unsandboxed=False, train_command=[str(fake_env / "venv" / "bin" / "python"), "seeker.py",
                                                    str(config)])
    try:
        crash = crash_naming_a_value(lab, ws, "transcript")
        assert crash["status"] == "crash" and "4321" * 2 in crash["tail"], crash  # the agent is told
        transcript.write_text(json.dumps({"type": "user", "toolUseResult": crash}) + "\n")  # as Claude Code keeps it
        answer(lab.call("discard"))
        set_knobs(ws, VAL_BPB=0.99, EXPORT=1)
        later = answer(lab.call("run_experiment", description="reads the transcript", wait=True))
    finally:
        lab.loop.shutdown()
    log = (ws / later["log"]).read_text()
    assert later["status"] == "ok" and later["verified"], later  # its export still reached the harness
    assert "found the reason in" not in log, log


# MLflow's quick start; a database elsewhere (`postgresql://`, `mysql://`: review 94 played it with SQLite's in-memory
# one, through the same MLflow code), whose artifacts MLflow still keeps in `./mlruns`; a file store named bare
@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "sqlite://", "mlruns"])
def test_a_run_reads_no_reason_in_a_tracker_store_the_user_named(fake_env, bubblewrap, monkeypatch, uri):
    """Review 92: the workspace's own MLflow store is in the hidden .research-loop (review 90), but a store the user
    names (`MLFLOW_TRACKING_URI=sqlite:///mlflow.db`, MLflow's quick start) is a database in the server's folder, the
    workspace, with MLflow's artifacts beside it in `./mlruns`: each run's record and log, the harness's reason among
    them, and its tags. A later run read the value there. The store's paths are hidden from runs. Review 94: so are
    those of a database elsewhere (MLflow keeps its artifacts in `./mlruns` for every database store) and of a file
    store named by a bare folder name (`mlruns`), which review 92 took for a name like `databricks`."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store unless told
    from mcp_server.core import trackers
    ws = naming_workspace(fake_env, "seeker.py", SEEKER)
    monkeypatch.chdir(ws)  # where Claude Code starts the server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    lab = Lab(ws, unsandboxed=False, train_command=[str(fake_env / "venv" / "bin" / "python"), "seeker.py", str(ws)])
    tracker = trackers.tracker(ws, "mlflow")  # as the server with --track mlflow makes it
    try:
        crash = crash_naming_a_value(lab, ws, "tracked")
        assert crash["status"] == "crash" and "4321" * 2 in crash["tail"], crash
        answer(lab.call("discard"))
        assert tracker.sync() >= 2
        set_knobs(ws, VAL_BPB=0.99, EXPORT=1)
        later = answer(lab.call("run_experiment", description="reads the tracker's store", wait=True))
    finally:
        lab.loop.shutdown()
    stored = [p for p in [ws / "mlflow.db", *(ws / "mlruns").rglob("*")] if p.is_file() and b"4321" * 2 in p.read_bytes()]
    assert stored, "the tracker kept no reason: the play did not happen"
    log = (ws / later["log"]).read_text()
    assert later["status"] == "ok" and later["verified"], later
    assert "found the reason in" not in log, log


def test_links_one_and_two_levels_into_a_clients_folder_lead_to_hidden_folders(tmp_path, monkeypatch):
    """The folders links in the clients' folders lead to are hidden as the folders are (review 94), looked for two
    levels down (stop 56: a walk of every level cost 0.6 s a run on a home with 14,000 folders): Claude Code's
    `projects` kept on another disk (level 1), VS Code's `User/workspaceStorage`, where its chats are (level 2)."""
    home, disk = tmp_path / "home", tmp_path / "disk"
    for name in ("CLAUDE_CONFIG_DIR", "CODEX_HOME", "CLAUDE_CODE_TMPDIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
                 "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    for link, target in ((".claude/projects", "projects"), (".config/Code/User/workspaceStorage", "storage")):
        (home / link).parent.mkdir(parents=True)
        (disk / target).mkdir(parents=True)
        (home / link).symlink_to(disk / target)
    hidden = integrity.agent_records()
    assert str(disk / "projects") in hidden and str(disk / "storage") in hidden, hidden


def test_a_plugin_installed_in_the_agents_folder_is_shown_and_its_transcripts_hidden(bubblewrap, outside_tmp,
                                                                                         monkeypatch):
    """Review 92 hides the agents' session folders (~/.claude: Claude Code's transcripts hold the harness's reasons),
    where Claude Code also installs plugins, this one and its environment among them: what the spec shows inside the
    hidden folder (the plugin, read-only) is shown again, the rest of it is not."""
    monkeypatch.setenv("HOME", str(outside_tmp))
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)
    plugin, transcript = outside_tmp / ".claude" / "plugins" / "research-loop", outside_tmp / ".claude" / "projects"
    for folder in (plugin, transcript, outside_tmp / "ws"):
        folder.mkdir(parents=True)
    (plugin / "worker.py").write_text("the plugin\n")
    (transcript / "session.jsonl").write_text("an answer")
    (outside_tmp / "python").mkdir()  # review 94: the plugin's environment links to its interpreter's folder
    (outside_tmp / "python" / "lib.py").write_text("interpreter\n")
    (plugin / "base").symlink_to(outside_tmp / "python")
    spec = {"readonly": [str(plugin)], "writable": ["."], "hidden": integrity.agent_records()}
    argv, _ = sandbox.wrap(["sh", "-c", f"cat {plugin / 'worker.py'} {outside_tmp / 'python' / 'lib.py'}; "
                                        f"ls -A {outside_tmp / '.claude'}; cat {transcript / 'session.jsonl'}"],
                           spec, str(outside_tmp / "ws"))
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.stdout.split() == ["the", "plugin", "interpreter", "plugins"] and "No such file" in done.stderr, done


# the training command: names each file under the server's temporary folder that holds the reason while it is there
# (until the test makes the file named second), then trains
POLLER = """import os, runpy, sys, time
print("polling", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not os.path.exists(sys.argv[2]):
    for folder, _, files in os.walk(sys.argv[1]):
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    if b"4321" * 2 in f.read():
                        print("found the reason in", os.path.join(folder, name), flush=True)
                        deadline = 0
            except OSError:
                pass
sys.argv = ["fake_train.py"]
runpy.run_path("fake_train.py", run_name="__main__")
"""


def test_a_run_reads_no_reason_in_the_files_the_tracker_writes_for_mlflow(fake_env, bubblewrap, monkeypatch,
                                                                         outside_tmp):
    """Review 94: the MLflow tracker wrote each run's artifacts (its record and log, the harness's reason in both) to
    files of the server's temporary folder for MLflow to copy, `$TMPDIR` (a cluster's scratch, macOS's
    `/var/folders/...`), which runs read where it is not /tmp: a run living while the tracker wrote a crash's record
    read the value there. The tracker writes them in the workspace's hidden `.research-loop`."""
    pytest.importorskip("mlflow")
    import tempfile
    scratch = outside_tmp / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the server's process: tempfile read TMPDIR before
    from mcp_server.core import trackers
    ws = naming_workspace(fake_env, "poller.py", POLLER)
    done = outside_tmp / "done"  # seen by the run as it changes
    lab = Lab(ws, unsandboxed=False, train_command=[str(fake_env / "venv" / "bin" / "python"), "poller.py",
                                                    str(scratch), str(done)])
    tracker = trackers.tracker(ws, "mlflow")  # the workspace's own store, as the server with --track mlflow has it
    try:
        done.write_text("")
        crash = crash_naming_a_value(lab, ws, "scratch")
        assert crash["status"] == "crash" and "4321" * 2 in crash["tail"], crash
        answer(lab.call("discard"))
        done.unlink()
        set_knobs(ws, VAL_BPB=0.99, EXPORT=1)
        started = answer(lab.call("run_experiment", description="reads the tracker's files", wait=False))
        log = ws / started["log"]
        assert wait_until(lambda: log.is_file() and "polling" in log.read_text(), timeout=60), "the run never polled"
        assert tracker.sync() >= 2  # the crash's record among them, while the run lives
        done.write_text("")
        later = answer(lab.call("wait"))
    finally:
        lab.loop.shutdown()
    later = later.get("results", [later])[0] if isinstance(later, dict) else later
    text = log.read_text()
    assert later["status"] == "ok" and later["verified"], later
    assert "found the reason in" not in text, text
