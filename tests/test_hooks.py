"""The plugin's hooks, run as Claude Code runs them: the command from hooks/hooks.json with
${CLAUDE_PLUGIN_ROOT} expanded, the event's JSON on stdin, in a real git repository."""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plugin_support import LEDGER_HEADER, REPO, git, make_research_repo

ROWS = ["abc1234\t1.010000\t2.0\tkeep\tbaseline",
        "bcd2345\t0.000000\t0.0\tcrash\tdepth 16 OOM",
        "cde3456\t0.990000\t2.1\tkeep\tmatrix lr x2",
        "def4567\t0.995000\t2.1\tdiscard\twarmdown 0.3"]


def hook_command(event: str, matcher: str | None = None) -> str:
    config = json.loads((REPO / "hooks" / "hooks.json").read_text())["hooks"][event]
    group = next(g for g in config if g.get("matcher") == matcher)
    return group["hooks"][0]["command"].replace("${CLAUDE_PLUGIN_ROOT}", str(REPO))


def run_hook(event: str, payload: dict, cwd: Path, matcher: str | None = None, **env) -> subprocess.CompletedProcess:
    payload = {"session_id": "test", "transcript_path": "/dev/null", "cwd": str(cwd),
               "hook_event_name": event, **payload}
    return run_raw(event, json.dumps(payload), cwd, matcher, **env)


def run_raw(event: str, stdin: str | bytes, cwd: Path, matcher: str | None = None, preexec_fn=None,
            **env) -> subprocess.CompletedProcess:
    """The hook with exactly these bytes on stdin (a str is sent as UTF-8)."""
    full_env = dict(os.environ, CLAUDE_PLUGIN_ROOT=str(REPO), CLAUDE_PROJECT_DIR=str(cwd), **env)
    done = subprocess.run(["sh", "-c", hook_command(event, matcher)], input=stdin if isinstance(stdin, bytes) else
                          stdin.encode(), cwd=cwd, env=full_env, capture_output=True, timeout=30, preexec_fn=preexec_fn)
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode(errors="replace")
    return done


def edit(repo: Path, tool: str, path: str) -> subprocess.CompletedProcess:
    key = "notebook_path" if tool == "NotebookEdit" else "file_path"
    return run_hook("PreToolUse", {"tool_name": tool, "tool_input": {key: path}}, repo,
                    matcher="Edit|Write|MultiEdit|NotebookEdit")


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_research_repo(tmp_path / "ws", rows=ROWS)


@pytest.fixture
def prepared_cache(tmp_path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "prepared.json").write_text('{"profile": "cpu"}')
    return cache


def session_start(repo: Path, cache: Path, **env) -> dict:
    done = run_hook("SessionStart", {"source": "startup"}, repo, AUTORESEARCH_CACHE=str(cache), **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("tool,path", [("Edit", "prepare.py"), ("Write", "nanochat/common.py"),
                                       ("MultiEdit", "nanochat/new_module.py"), ("NotebookEdit", "analysis.ipynb"),
                                       ("Write", "pyproject.toml")])
def test_harness_edit_is_blocked_on_a_research_branch(repo, tool, path):
    done = edit(repo, tool, str(repo / path))
    assert done.returncode == 2, done.stderr  # exit 2: Claude Code refuses the call, stderr goes to Claude
    assert path in done.stderr and "autoresearch/t1" in done.stderr and "Only train.py may change" in done.stderr

def test_an_edit_naming_two_files_is_refused(repo):
    """Only one of file_path and notebook_path was checked: train.py in one and prepare.py in the
    other passed, whichever the tool then edits."""
    done = run_hook("PreToolUse", {"tool_name": "NotebookEdit", "tool_input": {
        "file_path": str(repo / "train.py"), "notebook_path": str(repo / "prepare.py")}}, repo,
        matcher="Edit|Write|MultiEdit|NotebookEdit")
    assert done.returncode == 2 and "names two different files" in done.stderr, done.stderr


@pytest.mark.parametrize("path", ["train.py", "results.tsv", "run.log"])
def test_train_py_and_records_are_editable(repo, path):
    done = edit(repo, "Edit", str(repo / path))
    assert (done.returncode, done.stderr) == (0, "")


def test_relative_path_is_resolved_against_the_session_folder(repo):
    assert edit(repo, "Edit", "prepare.py").returncode == 2
    assert edit(repo, "Edit", "train.py").returncode == 0


def test_symlink_to_harness_is_blocked(repo):
    (repo / "alias.py").symlink_to(repo / "prepare.py")
    done = edit(repo, "Edit", str(repo / "alias.py"))
    assert done.returncode == 2 and "prepare.py" in done.stderr


def test_server_records_are_refused(repo):
    done = edit(repo, "Write", str(repo / ".research-loop" / "state.json"))
    assert done.returncode == 2 and "falsify" in done.stderr


def test_files_outside_the_repository_are_not_harness(repo, tmp_path):
    assert edit(repo, "Write", str(tmp_path / "notes" / "ideas.md")).returncode == 0


def test_git_ignored_files_are_not_harness(repo):
    (repo / ".gitignore").write_text((repo / ".gitignore").read_text() + "scratch/\n")
    assert edit(repo, "Write", str(repo / "scratch" / "plot.py")).returncode == 0


def test_harness_is_editable_off_the_research_branch(repo):
    git(repo, "switch", "-q", "main")
    assert edit(repo, "Edit", str(repo / "prepare.py")).returncode == 0


def test_other_repositories_are_left_alone(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    git(plain, "init", "-q", "-b", "autoresearch/x")
    (plain / "prepare.py").write_text("")  # no train.py: not an autoresearch layout
    assert edit(plain, "Edit", str(plain / "prepare.py")).returncode == 0


def test_session_start_reports_branch_best_and_last_rows(repo, prepared_cache):
    output = session_start(repo, prepared_cache)
    context = output["hookSpecificOutput"]["additionalContext"]
    assert output["hookSpecificOutput"]["hookEventName"] == "SessionStart"
    assert "branch: autoresearch/t1" in context
    assert "4 runs (2 keep, 1 discard, 1 crash)" in context
    assert 'best val_bpb: 0.990000 at commit cde3456 "matrix lr x2"' in context
    assert context.index("bcd2345") < context.index("def4567")  # newest last
    assert "systemMessage" not in output  # nothing for the user to fix


def test_session_start_reports_runs_in_flight_and_pending_results(repo, prepared_cache):
    (repo / ".research-loop").mkdir()
    (repo / "runs").mkdir()
    (repo / ".research-loop" / "state.json").write_text(json.dumps({"runs": {
        "6": {"run": 6, "commit": "f00dfeed123", "description": "window L", "status": "running",
              "server_pid": os.getpid(), "log": "runs/0006-f00dfee.log"},
        "5": {"run": 5, "commit": "e0e0e0e", "description": "depth 6", "status": "pending",
              "result": {"status": "ok", "val_bpb": 0.98}},
        "7": {"run": 7, "commit": "abcabca", "description": "lr x2", "status": "queued"}}}))
    (repo / "runs" / "0006-f00dfee.log").write_text(
        "step 00001 (1.0%) | loss: 9.0\rstep 00002 (2.0%) | loss: 8.5 | remaining: 57s\r")
    context = session_start(repo, prepared_cache)["hookSpecificOutput"]["additionalContext"]
    assert 'run 6 (f00dfee) "window L" is running: step 00002 (2.0%)' in context
    assert 'pending result: run 5 (e0e0e0e) "depth 6" ok val_bpb 0.980000' in context
    assert "keep() or discard()" in context
    assert 'run 7 (abcabca) "lr x2" is queued' in context
    assert context.index("run 5") < context.index("run 6") < context.index("run 7")


def test_a_fifo_at_a_running_runs_log_hangs_no_hook(repo, prepared_cache):
    """Review 46: the hooks read a running run's progress line from its log (runs/<n>-<commit>.log, a name
    the agent knows) with a plain open: a FIFO put there blocked it, and Claude Code killed the hook at its
    10 s timeout, so a new or compacted session got no state, and the Stop hook let Claude stop unseen."""
    (repo / ".research-loop").mkdir()
    (repo / "runs").mkdir()
    (repo / ".research-loop" / "state.json").write_text(json.dumps({"runs": {
        "6": {"run": 6, "commit": "f00dfeed123", "description": "window L", "status": "running",
              "server_pid": os.getpid(), "log": "runs/0006-f00dfee.log"}}}))
    fifo = repo / "runs" / "0006-f00dfee.log"
    os.mkfifo(fifo)
    try:
        context = session_start(repo, prepared_cache)["hookSpecificOutput"]["additionalContext"]
        assert 'run 6 (f00dfee) "window L" is running: no progress line yet' in context
    finally:
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # a hung hook's open ends


def test_session_start_tells_a_run_whose_server_died_from_a_live_one(repo, prepared_cache):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (repo / ".research-loop").mkdir()
    (repo / ".research-loop" / "state.json").write_text(json.dumps({"runs": {
        "6": {"run": 6, "commit": "f00dfee", "description": "window L", "status": "running",
              "server_pid": dead.pid, "log": "runs/0006-f00dfee.log"}}}))
    context = session_start(repo, prepared_cache)["hookSpecificOutput"]["additionalContext"]
    assert "is running" not in context
    assert 'run 6 (f00dfee) "window L" was running when its server stopped' in context


def test_session_start_reports_the_measured_noise(repo, prepared_cache):
    (repo / ".research-loop").mkdir()
    (repo / ".research-loop" / "state.json").write_text(json.dumps({
        "noise": {"values": [1.0, 1.002], "std": 0.0014, "spread": 0.002, "threshold": 0.0028}}))
    context = session_start(repo, prepared_cache)["hookSpecificOutput"]["additionalContext"]
    assert "noise: std 0.001400 over 2 runs of the same code; a gain under 0.002800 is within the noise" in context


def test_session_start_on_main_says_how_to_begin(repo, prepared_cache):
    git(repo, "switch", "-q", "main")
    context = session_start(repo, prepared_cache)["hookSpecificOutput"]["additionalContext"]
    assert "not a research branch" in context and "/research-loop:autoresearch <tag>" in context


def test_session_start_shows_the_user_what_to_run(repo, tmp_path):
    output = session_start(repo, tmp_path / "empty-cache")
    assert "uv run prepare.py" in output["systemMessage"]
    assert "uv run prepare.py" in output["hookSpecificOutput"]["additionalContext"]


def test_session_start_shows_the_user_the_dashboard_address(repo, prepared_cache):
    (repo / ".research-loop").mkdir()
    address = repo / ".research-loop" / "dashboard.json"
    address.write_text(json.dumps({"url": "http://127.0.0.1:8123/", "pid": os.getpid(), "token": True}))
    output = session_start(repo, prepared_cache)
    assert "dashboard: http://127.0.0.1:8123/ (open it once as ?token=" in output["systemMessage"]
    assert "http://127.0.0.1:8123/" in output["hookSpecificOutput"]["additionalContext"]
    gone = subprocess.Popen(["true"])
    gone.wait()
    address.write_text(json.dumps({"url": "http://127.0.0.1:8123/", "pid": gone.pid, "token": False}))
    assert "systemMessage" not in session_start(repo, prepared_cache)  # its server has ended
    # the MCP server that starts with this session will serve it there
    output = session_start(repo, prepared_cache, RESEARCH_LOOP_DASHBOARD="8200")
    assert "dashboard: http://127.0.0.1:8200/" in output["systemMessage"]


def bare_path(tmp_path: Path) -> Path:
    """A PATH folder with git, sh and python3 but no uv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("git", shutil.which("git")), ("sh", shutil.which("sh")), ("python3", sys.executable)):
        (bin_dir / name).symlink_to(os.path.realpath(target))
    return bin_dir


def test_session_start_without_uv_says_how_to_install_it(repo, prepared_cache, tmp_path):
    output = session_start(repo, prepared_cache, PATH=str(bare_path(tmp_path)))
    assert "`uv` is not on PATH" in output["systemMessage"] and "astral.sh/uv" in output["systemMessage"]


def test_session_start_outside_autoresearch_is_one_line_for_claude(tmp_path, prepared_cache):
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    output = session_start(other, prepared_cache)
    assert "is not an autoresearch workspace" in output["hookSpecificOutput"]["additionalContext"]
    assert "systemMessage" not in output


def test_session_start_outside_autoresearch_still_warns_about_uv(tmp_path, prepared_cache):
    output = session_start(tmp_path, prepared_cache, PATH=str(bare_path(tmp_path)))
    assert "`uv` is not on PATH" in output["systemMessage"]


def test_pre_compact_hands_the_state_to_the_summary(repo, prepared_cache):
    done = run_hook("PreCompact", {"trigger": "auto", "custom_instructions": ""}, repo,
                    AUTORESEARCH_CACHE=str(prepared_cache))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Keep this research-loop state in the summary")
    assert "best val_bpb: 0.990000 at commit cde3456" in done.stdout


# --- events the hooks cannot read: a clean answer each time, and the edit guard fails closed ----------
EDIT_MATCHER = "Edit|Write|MultiEdit|NotebookEdit"
UNREADABLE_EDITS = {
    "empty stdin": "",
    "not JSON": "Edit prepare.py please",
    "a JSON list": '["Edit", "prepare.py"]',
    "cwd a number, path relative": json.dumps({"cwd": 5, "tool_name": "Edit", "tool_input": {"file_path": "prepare.py"}}),
    "tool_input a string": json.dumps({"tool_name": "Edit", "tool_input": "prepare.py"}),
    "file_path a number": json.dumps({"tool_name": "Edit", "tool_input": {"file_path": 5}}),
    "file_path a list": json.dumps({"tool_name": "Write", "tool_input": {"file_path": ["prepare.py"]}}),
    "no file_path": json.dumps({"tool_name": "Edit", "tool_input": {"old_string": "a", "new_string": "b"}}),
    "a NUL in file_path": json.dumps({"tool_name": "Edit", "tool_input": {"file_path": "prepare.py\u0000.txt"}}),
    "a lone surrogate in file_path": '{"tool_name": "Edit", "tool_input": {"file_path": "prepare\\ud800.py"}}',
    # valid JSON that Python's parser gives up on (RecursionError, no ValueError): a traceback, exit 1 (review 93)
    "nested too deep to parse": '{"tool_name": "Edit", "tool_input": {"file_path": "prepare.py", "x": '
                                + "[" * 100_000 + "]" * 100_000 + "}}",
}


@pytest.mark.parametrize("stdin", UNREADABLE_EDITS.values(), ids=UNREADABLE_EDITS.keys())
def test_an_edit_event_the_guard_cannot_read_is_refused_with_the_reason(repo, stdin):
    done = run_raw("PreToolUse", stdin, repo, matcher=EDIT_MATCHER)
    assert done.returncode == 2, done.stderr  # exit 1 (a traceback) would let the edit go ahead
    assert "Traceback" not in done.stderr
    assert "this edit is refused because the hook could not read the tool call" in done.stderr
    assert "Retry the edit" in done.stderr


MALFORMED_EVENTS = {
    "empty stdin": "",
    "not JSON": "{not json",
    "not UTF-8": b'{"cwd": "\xff"}',
    "a JSON number": "5",
    "cwd a number": json.dumps({"cwd": 5}),
    "everything of the wrong type": json.dumps({"cwd": ["/"], "session_id": {}, "transcript_path": 7,
                                                "stop_hook_active": "yes"}),
    "nested too deep to parse": '{"cwd": ' + "[" * 100_000 + "]" * 100_000 + "}",  # review 93
}


@pytest.mark.parametrize("event", ["SessionStart", "PreCompact", "Stop"])
@pytest.mark.parametrize("stdin", MALFORMED_EVENTS.values(), ids=MALFORMED_EVENTS.keys())
def test_every_other_hook_answers_a_malformed_event_cleanly(repo, prepared_cache, event, stdin):
    active_run(repo)
    done = run_raw(event, stdin, repo, AUTORESEARCH_CACHE=str(prepared_cache))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    if event == "SessionStart":  # the session folder stands in for the unusable cwd
        assert "branch: autoresearch/t1" in json.loads(done.stdout)["hookSpecificOutput"]["additionalContext"]
    elif event == "Stop":
        assert json.loads(done.stdout)["decision"] == "block"
    else:
        assert "best val_bpb: 0.990000" in done.stdout


# --- the Stop hook without a transcript, and with a huge one -------------------------------------------
def active_run(repo: Path) -> None:
    """A research run as the server records it at setup (no limits: it runs until stopped)."""
    (repo / ".research-loop").mkdir(exist_ok=True)
    (repo / ".research-loop" / "state.json").write_text(json.dumps({"branch": "autoresearch/t1", "tag": "t1"}))


def stop(repo: Path, transcript, preexec_fn=None) -> dict | None:
    done = run_raw("Stop", json.dumps({"session_id": "s1", "cwd": str(repo), "hook_event_name": "Stop",
                                       "stop_hook_active": True, "transcript_path": transcript}), repo,
                   preexec_fn=preexec_fn)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def decisions(repo: Path, transcript, times: int, **kwargs) -> list:
    return [(stop(repo, transcript, **kwargs) or {}).get("decision") for _ in range(times)]


@pytest.mark.parametrize("transcript", ["missing.jsonl", "a folder", 7, None])
def test_without_a_readable_transcript_a_stuck_agent_is_let_go(repo, tmp_path, transcript):
    """No transcript to count tool calls in: the server's records are the sign of progress, and three
    stops in a row that changed nothing are the most it is sent back."""
    active_run(repo)
    transcript = {"missing.jsonl": str(tmp_path / "missing.jsonl"), "a folder": str(tmp_path)}.get(transcript,
                                                                                                  transcript)
    assert decisions(repo, transcript, 4) == ["block", "block", "block", None]
    answer = stop(repo, transcript)
    assert answer["decision"] == "block"  # a new round after it was let go
    assert decisions(repo, transcript, 2) == ["block", "block"]
    with open(repo / "results.tsv", "a") as ledger:  # the server decided a run: progress
        ledger.write("eee1111\t0.980000\t2.1\tkeep\tnew idea\n")
    assert decisions(repo, transcript, 4) == ["block", "block", "block", None]


def test_a_planted_row_in_results_tsv_does_not_end_the_research_run(repo, tmp_path):
    """The target is met only by the server's rows (its copy in the git directory, where the edit hook
    and a run cannot write): a keep row below the target appended to results.tsv by hand lets no agent
    stop early, and neither the overnight runner end its night."""
    from mcp_server.overnight.overnight import Runner
    from mcp_server.overnight.overnight import add_arguments as overnight_arguments
    state = {"branch": "autoresearch/t1", "tag": "t1", "limits": {"target_val_bpb": 0.9},
             "rows": [["abc1234", 1.0, 2.0, "keep", "baseline"]]}
    copy = repo / ".git" / "research-loop" / "records" / "state.json"
    copy.parent.mkdir(parents=True)
    copy.write_text(json.dumps(state))
    (repo / ".research-loop").mkdir(exist_ok=True)
    (repo / ".research-loop" / "state.json").write_text(json.dumps(state))
    transcript = tmp_path / "t.jsonl"
    transcript.write_text(TOOL_CALL)
    assert stop(repo, str(transcript))["decision"] == "block"
    (repo / "results.tsv").write_text(LEDGER_HEADER + "abc1234\t1.000000\t2.0\tkeep\tbaseline\n"
                                      "fff0000\t0.500000\t2.0\tkeep\tplanted\n")
    with open(transcript, "a") as f:
        f.write(TOOL_CALL)
    answer = stop(repo, str(transcript))
    assert answer["decision"] == "block" and "0.5" not in answer["reason"], answer
    parser = argparse.ArgumentParser()
    overnight_arguments(parser)
    runner = Runner(parser.parse_args(["--tag", "t1", "--workspace", str(repo)]), "claude")
    assert runner.over() is None
    state["rows"].append(["abc5678", 0.85, 2.0, "keep", "real"])  # the server's own row: the target is met
    copy.write_text(json.dumps(state))
    assert "target" in runner.over()


def test_the_stop_hook_lets_go_when_it_cannot_count_the_stops(repo):
    active_run(repo)
    (repo / ".research-loop" / "stop-hook.json").mkdir()  # its record cannot be written
    answer = stop(repo, None)
    assert "decision" not in answer and "cannot record its count of stops" in answer["systemMessage"]


@pytest.mark.parametrize("count", [-1000000, True, 2.5, "1", 10 ** 6])
def test_a_count_of_stops_the_hook_never_wrote_is_set_aside_and_the_agent_still_let_go(repo, count):
    """Found by review 93: the agent can write .research-loop/stop-hook.json, and a count of -1000000 there (its
    session and mark kept) was counted up from, so a stuck agent was sent back a million times. A count that is no
    whole number from 0 to 3 starts again, saying so, and the fourth idle stop lets the agent go."""
    active_run(repo)
    assert decisions(repo, None, 1) == ["block"]
    record = repo / ".research-loop" / "stop-hook.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"blocks": count}))
    answers = [stop(repo, None) or {} for _ in range(4)]
    assert [a.get("decision") for a in answers] == ["block", "block", "block", None], answers
    said = "The Stop hook's record .research-loop/stop-hook.json is not one it writes"
    assert said in answers[0]["reason"] and said in answers[0]["systemMessage"], answers[0]
    assert f"its count of stops is {json.dumps(count)}" in answers[0]["reason"], answers[0]
    assert said not in answers[1]["reason"]


TOOL_CALL = '{"type":"assistant","message":{"content":[{"type":"tool_use","name":"x"}]}}\n'


def test_a_huge_transcript_is_read_from_its_end_only(repo, tmp_path):
    """A night's transcript of 3 GiB (sparse: NUL bytes, not JSON, up to its last lines), read by a hook
    whose address space is capped at 1 GiB: reading it whole would fail; the tail answers, and still
    tells a tool call from none."""
    active_run(repo)
    transcript = tmp_path / "transcript.jsonl"
    with open(transcript, "wb") as f:
        f.truncate(3 << 30)
        f.seek(0, os.SEEK_END)
        f.write(TOOL_CALL.encode())
    capped = lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # noqa: E731
    assert decisions(repo, str(transcript), 4, preexec_fn=capped) == ["block", "block", "block", None]
    for _ in range(3):  # working: a tool call between stops
        with open(transcript, "a") as f:
            f.write('{"type":"user","message":"tool result"}\n' + TOOL_CALL)
        assert decisions(repo, str(transcript), 1, preexec_fn=capped) == ["block"]
    assert os.stat(transcript).st_blocks * 512 < 1 << 20  # still sparse: the test used no disk


# --- what the agent can plant for the hooks ---------------------------------------------------------
def test_an_edit_is_refused_when_git_does_not_answer(repo, tmp_path):
    """The guard asks git whether the file is in a research branch's harness: a git that hangs (a
    lock, a loaded disk) must not let the edit through unchecked."""
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    (slow / "git").write_text(f"#!/bin/sh\nsleep 8\nexec {shutil.which('git')} \"$@\"\n")
    (slow / "git").chmod(0o755)
    done = run_hook("PreToolUse", {"tool_name": "Edit", "tool_input": {"file_path": "prepare.py"}}, repo,
                    matcher=EDIT_MATCHER, PATH=f"{slow}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "did not answer within 5s" in done.stderr and "Retry the edit" in done.stderr, done.stderr


@pytest.mark.parametrize("planted", ["2 GiB", "nested too deep"])
def test_a_planted_state_file_neither_exhausts_the_hooks_nor_stands(repo, prepared_cache, planted):
    """A state.json the agent planted where the hooks read the server's records first: 2 GiB (sparse,
    for a hook capped at 1 GiB of address space) or 200,000 nested lists. The hooks read a bounded
    amount, skip it, and answer from the server's other copy."""
    active_run(repo)
    copy = repo / ".git" / "research-loop" / "records" / "state.json"
    copy.parent.mkdir(parents=True)
    with open(copy, "wb") as f:
        if planted == "2 GiB":
            f.write(b'{"branch": "autoresearch/t1", "rows": [], "pad": "')
            f.truncate(2 << 30)
        else:
            f.write(b"[" * 200_000)
    capped = lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # noqa: E731
    done = run_raw("SessionStart", json.dumps({"cwd": str(repo), "hook_event_name": "SessionStart"}), repo,
                   preexec_fn=capped, AUTORESEARCH_CACHE=str(prepared_cache))
    assert done.returncode == 0 and "failed" not in done.stderr, done.stderr
    context = json.loads(done.stdout)["hookSpecificOutput"]["additionalContext"]
    assert "branch: autoresearch/t1" in context and "best val_bpb: 0.990000" in context, context
    assert stop(repo, None, preexec_fn=capped)["decision"] == "block"


def test_an_edit_is_refused_within_the_hooks_timeout_when_each_git_call_is_slow(repo, tmp_path):
    """Review 57: a git that answers each call in 4.5 s, under the 5 s the guard gives one (a config or an
    exclude file made huge): three calls took 13.5 s, past the 10 s hooks.json gives the hook, and Claude
    Code lets a timed-out hook's edit through. The calls share one budget: refused in time."""
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    (slow / "git").write_text(f"#!/bin/sh\nsleep 4.5\nexec {shutil.which('git')} \"$@\"\n")
    (slow / "git").chmod(0o755)
    limit = json.loads((REPO / "hooks" / "hooks.json").read_text())["hooks"]["PreToolUse"][0]["hooks"][0]["timeout"]
    began = time.monotonic()
    done = run_hook("PreToolUse", {"tool_name": "Edit", "tool_input": {"file_path": "prepare.py"}}, repo,
                    matcher=EDIT_MATCHER, PATH=f"{slow}{os.pathsep}{os.environ['PATH']}")
    took = time.monotonic() - began
    assert took < limit, f"the hook answered after {took:.1f} s, past its {limit} s"
    assert done.returncode == 2 and "the 8s the hook gives git in all" in done.stderr, done.stderr


def test_in_a_linked_worktree_a_forged_state_file_ends_no_night(fake_env, tmp_path):
    """Review 72: a workspace that is a linked worktree (`git worktree add`) has a `.git` file, and the server keeps its
    copy of the state in that worktree's own git directory; the hooks, the overnight runner and the early stop read
    `.git/research-loop/records/` (no such folder there), so they fell back to state.json, which the agent can write
    while the server runs: a keep row below the target planted there let Claude stop, and the runner ended the night
    and named the planted best."""
    from mcp_server.overnight.overnight import Runner
    from mcp_server.overnight.overnight import add_arguments as overnight_arguments
    from server_support import Lab, make_workspace
    main = make_workspace(fake_env)
    linked = tmp_path / "linked"
    git(main, "worktree", "add", "-q", "-b", "work", str(linked))
    lab = Lab(linked)
    try:
        lab.ok("setup", tag="t1", target_val_bpb=0.5)
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep")
        state_path = linked / ".research-loop" / "state.json"
        state = json.loads(state_path.read_text())
        state["rows"].append(["fff0000", 0.4, 2.0, "keep", "planted"])
        state_path.write_text(json.dumps(state))
        transcript = tmp_path / "t.jsonl"
        transcript.write_text(TOOL_CALL)
        answer = stop(linked, str(transcript))
        assert answer and answer["decision"] == "block" and "0.4" not in answer["reason"], answer
        parser = argparse.ArgumentParser()
        overnight_arguments(parser)
        runner = Runner(parser.parse_args(["--tag", "t1", "--workspace", str(linked)]), "claude")
        assert runner.over() is None
        assert "0.400000" not in runner.status_line()
    finally:
        lab.loop.shutdown()


@pytest.mark.parametrize("planted", ["fifo", "link"])
def test_what_is_planted_at_the_stop_hooks_record_neither_hangs_it_nor_is_written_through(repo, tmp_path, planted):
    """The Stop hook wrote its count of stops with a plain open of .research-loop/stop-hook.json, which the agent can
    write: a FIFO there blocked the hook until Claude Code killed it at 10 s, and a killed Stop hook lets Claude stop;
    a symbolic link there had the hook's JSON written over the file it points to. Now the record is a new file renamed
    over what lies there: the hook answers at once and keeps counting, and the link's target is untouched."""
    active_run(repo)
    record = repo / ".research-loop" / "stop-hook.json"
    target = tmp_path / "the users file"
    target.write_text("the user's own text\n")
    os.mkfifo(record) if planted == "fifo" else record.symlink_to(target)
    started = time.monotonic()
    assert decisions(repo, None, 3) == ["block", "block", "block"]
    assert time.monotonic() - started < 10 and record.is_file() and not record.is_symlink()
    assert decisions(repo, None, 1) == [None]  # counted: a stuck agent is let go at the fourth stop
    assert target.read_text() == "the user's own text\n"
    assert [p.name for p in record.parent.iterdir() if p.name.endswith(".tmp")] == []
