"""The Claude Code plugin, checked with the pinned Claude Code CLI against a fresh clone of the
committed repository (so an uncommitted or ignored file cannot make it pass).

Everything runs offline with no login: `claude plugin validate`, `claude mcp list`, and real
`claude -p` sessions. Without credentials a session still starts for real (plugin loaded, MCP
servers connected, SessionStart hooks run) and its stream-json `init` message lists the skills,
servers and tools. Where a test needs the model to act, a local scripted stand-in for the
Messages API (ScriptedModel) issues the tool calls, and Claude Code does everything else.
"""
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from server_support import TOOL_NAMES, free_port
from plugin_support import (CLAUDE_CODE_VERSION, REPO, SERVER_NAME, TOOL_PREFIX, ScriptedModel, claude_env,
                            git, install_claude_cli, make_research_repo, uv_link_mode)

SKILL_ID = "research-loop:autoresearch"
CONTRACT_TOOLS = TOOL_NAMES
CLI_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def claude():
    return str(install_claude_cli())


@pytest.fixture(scope="session")
def plugin_clone(tmp_path_factory) -> Path:
    """The committed HEAD of this repository, cloned like a user would get it."""
    clone = tmp_path_factory.mktemp("plugin") / "research-loop"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    return clone


@pytest.fixture(scope="session")
def env(tmp_path_factory, plugin_clone) -> dict:
    return claude_env(tmp_path_factory.mktemp("claude-home")) | uv_link_mode(plugin_clone)


@pytest.fixture
def workspace(tmp_path) -> Path:
    return make_research_repo(tmp_path / "ws", rows=["abc1234\t1.010000\t2.0\tkeep\tbaseline",
                                                     "def5678\t1.020000\t2.0\tdiscard\tdepth 6"])


def run_cli(claude: str, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([claude, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def skill_frontmatter(plugin: Path) -> dict:
    """The SKILL.md frontmatter (flat keys and '- item' lists: all this file uses)."""
    text = (plugin / "skills" / "autoresearch" / "SKILL.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "SKILL.md must start with a --- frontmatter block"
    fields, key = {}, None
    for line in match.group(1).splitlines():
        if line.startswith("  - ") and key:
            fields.setdefault(key, []).append(line[4:].strip())
        else:
            key, _, value = line.partition(":")
            if value.strip():
                fields[key] = value.strip().strip('"')
    return fields


def allowed_server_tools(plugin: Path) -> set[str]:
    return {t[len(TOOL_PREFIX):] for t in skill_frontmatter(plugin)["allowed-tools"] if t.startswith(TOOL_PREFIX)}


def plugin_server(plugin: Path, cwd: Path, env: dict) -> StdioServerParameters:
    """The server exactly as .mcp.json declares it, started the way Claude Code starts it:
    ${CLAUDE_PLUGIN_ROOT} expanded, in the session's folder."""
    declared = json.loads((plugin / ".mcp.json").read_text())["mcpServers"][SERVER_NAME]
    args = [arg.replace("${CLAUDE_PLUGIN_ROOT}", str(plugin)) for arg in declared["args"]]
    return StdioServerParameters(command=declared["command"], args=args, env=env, cwd=str(cwd))


def session_messages(claude: str, plugin: Path | None, cwd: Path, env: dict) -> list[dict]:
    """A one-prompt print-mode session (the plugin from a folder, or installed when None). With no
    credentials the model is never called, but the session starts for real: plugin loaded, MCP
    servers connected, SessionStart hooks run."""
    plugin_args = ("--plugin-dir", str(plugin)) if plugin else ()
    done = run_cli(claude, *plugin_args, "-p", "status", "--output-format", "stream-json",
                   "--verbose", "--include-hook-events", cwd=cwd, env=env)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_cli_is_the_pinned_version(claude, env, tmp_path):
    done = run_cli(claude, "--version", cwd=tmp_path, env=env)
    assert done.stdout.startswith(CLAUDE_CODE_VERSION), done.stdout + done.stderr


@pytest.mark.parametrize("target", [".", ".claude-plugin/plugin.json", ".claude-plugin/marketplace.json"])
def test_validates_strict(claude, plugin_clone, env, target):
    done = run_cli(claude, "plugin", "validate", target, "--strict", cwd=plugin_clone, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation passed" in done.stdout


def test_validator_sees_the_skill_server_hooks_and_stop_command(claude, plugin_clone, env):
    done = run_cli(claude, "plugin", "validate", ".claude-plugin/plugin.json", cwd=plugin_clone, env=env)
    assert f"skills: {SKILL_ID}" in done.stdout  # how Claude Code names the skill
    assert f"mcpServers: {SERVER_NAME} stdio uv" in done.stdout
    for event in ("PreToolUse Edit|Write|MultiEdit|NotebookEdit", "SessionStart", "PreCompact", "Stop"):
        assert f"hooks: {event} command" in done.stdout
    assert "commands: research-loop:stop" in done.stdout


def test_marketplace_lists_the_plugin_at_the_root(plugin_clone):
    listing = json.loads((plugin_clone / ".claude-plugin" / "marketplace.json").read_text())
    assert [(p["name"], p["source"]) for p in listing["plugins"]] == [("research-loop", "./")]


def test_manifest_and_marketplace_agree(plugin_clone):
    manifest = json.loads((plugin_clone / ".claude-plugin" / "plugin.json").read_text())
    listing = json.loads((plugin_clone / ".claude-plugin" / "marketplace.json").read_text())
    assert manifest["name"] == "research-loop" and manifest["license"] == "MIT"
    assert listing["plugins"][0]["version"] == manifest["version"]


def test_mcp_list_shows_the_server_connected_from_a_fresh_clone(claude, plugin_clone, env, workspace):
    done = run_cli(claude, "--plugin-dir", str(plugin_clone), "mcp", "list", cwd=workspace, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith(f"plugin:research-loop:{SERVER_NAME}:")), "")
    assert "Connected" in line, done.stdout + done.stderr
    assert str(plugin_clone) in line  # ${CLAUDE_PLUGIN_ROOT} expanded to where the plugin lives


def test_session_loads_skill_server_tools_and_session_start_state(claude, plugin_clone, env, workspace):
    messages = session_messages(claude, plugin_clone, workspace, env)
    init = next(m for m in messages if m.get("subtype") == "init")
    assert SKILL_ID in init["skills"]
    assert {"name": f"plugin:research-loop:{SERVER_NAME}", "status": "connected", "source": "plugin"} \
        in init["mcp_servers"]
    session_tools = {t[len(TOOL_PREFIX):] for t in init["tools"] if t.startswith(TOOL_PREFIX)}
    assert session_tools == allowed_server_tools(plugin_clone) == CONTRACT_TOOLS
    hook = next(m for m in messages if m.get("subtype") == "hook_response" and m["hook_event"] == "SessionStart")
    assert hook["exit_code"] == 0, hook
    context = json.loads(hook["stdout"])["hookSpecificOutput"]["additionalContext"]
    assert "branch: autoresearch/t1" in context
    assert "best val_bpb: 1.010000 at commit abc1234" in context


def test_server_workspace_is_the_session_folder(claude, plugin_clone, env, workspace):
    """Claude Code starts plugin servers in the project folder; status() must report it."""
    async def status():
        async with Client(plugin_server(plugin_clone, workspace, env), mode="legacy") as client:
            return await client.call_tool("status", {})
    result = asyncio.run(status())
    assert not result.is_error, result.content
    assert Path(result.structured_content["workspace"]) == workspace.resolve()
    assert result.structured_content["branch"] == "autoresearch/t1"


def test_allowed_tools_match_the_servers_tools_list(plugin_clone, env, workspace):
    """Every server tool the skill allows exists on the real server, and every server tool is allowed."""
    async def tool_names():
        async with Client(plugin_server(plugin_clone, workspace, env), mode="legacy") as client:
            return {tool.name for tool in (await client.list_tools()).tools}
    assert allowed_server_tools(plugin_clone) == asyncio.run(tool_names())


def test_skill_frontmatter(plugin_clone):
    fields = skill_frontmatter(plugin_clone)
    assert fields["name"] == "autoresearch"
    assert fields["argument-hint"].startswith("[run-tag]") and "--hours" in fields["argument-hint"]
    assert "autoresearch" in fields["description"] and "train.py" in fields["description"]
    assert {"Read", "Edit(train.py)"} <= set(fields["allowed-tools"])
    body = (plugin_clone / "skills" / "autoresearch" / "SKILL.md").read_text()
    assert "$ARGUMENTS" in body



def tool_results(request: dict) -> dict[str, str]:
    """tool_use_id -> the text Claude Code sent back to the model for that call."""
    results = {}
    for message in request["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part.get("type") == "tool_result":
                content = part["content"]
                results[part["tool_use_id"]] = content if isinstance(content, str) else json.dumps(content)
    return results


def test_claude_code_blocks_a_harness_edit_and_allows_train_py(claude, plugin_clone, env, workspace):
    """A real session (the model scripted): the PreToolUse hook stops the prepare.py edit and the
    refusal reaches the model; the train.py edit goes through."""
    calls = [("Read", {"file_path": str(workspace / "prepare.py")}),
             ("Edit", {"file_path": str(workspace / "prepare.py"), "old_string": "stand-in", "new_string": "HACK"}),
             ("Read", {"file_path": str(workspace / "train.py")}),
             ("Edit", {"file_path": str(workspace / "train.py"), "old_string": "DEPTH = 4", "new_string": "DEPTH = 6"})]
    with ScriptedModel(calls) as model:
        done = run_cli(claude, "--plugin-dir", str(plugin_clone), "-p", "try two edits", "--permission-mode",
                       "acceptEdits", cwd=workspace, env=model.env(env))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (workspace / "prepare.py").read_text() == "# harness stand-in\n"
    assert (workspace / "train.py").read_text() == "DEPTH = 6\n"
    answers = tool_results(model.requests[-1])
    assert "prepare.py is part of the evaluation harness" in answers["toolu_0001"]
    assert "updated successfully" in answers["toolu_0003"]


def test_an_edit_guard_that_cannot_run_blocks_the_edit(claude, plugin_clone, env, workspace, tmp_path):
    """Claude Code lets the action through when a hook fails (no Python, a crash, a timeout), unless
    hooks.json says onFailure block: a guard that cannot run must refuse the harness edit."""
    plugin = tmp_path / "plugin"
    shutil.copytree(plugin_clone, plugin, ignore=shutil.ignore_patterns(".venv"))
    (plugin / "hooks" / "research_loop_hook.py").write_text("raise SystemExit(1)  # a guard that fails\n")
    calls = [("Read", {"file_path": str(workspace / "prepare.py")}),
             ("Edit", {"file_path": str(workspace / "prepare.py"), "old_string": "stand-in", "new_string": "HACK"})]
    with ScriptedModel(calls) as model:
        done = run_cli(claude, "--plugin-dir", str(plugin), "-p", "try an edit", "--permission-mode",
                       "acceptEdits", cwd=workspace, env=model.env(env))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (workspace / "prepare.py").read_text() == "# harness stand-in\n"
    assert "updated successfully" not in tool_results(model.requests[-1])["toolu_0001"]


def test_compaction_keeps_the_loop_state(claude, plugin_clone, env, workspace):
    """/compact in a resumed session: the PreCompact hook's state joins the compaction request."""
    with ScriptedModel() as model:
        first = run_cli(claude, "--plugin-dir", str(plugin_clone), "-p", "hello", "--output-format", "json",
                        cwd=workspace, env=model.env(env))
        session = json.loads(first.stdout)["session_id"]
        model.requests.clear()
        done = run_cli(claude, "--plugin-dir", str(plugin_clone), "-p", "/compact", "--resume", session,
                       cwd=workspace, env=model.env(env))
    assert done.returncode == 0, done.stdout + done.stderr
    compaction = [json.dumps(r) for r in model.requests if "Keep this research-loop state" in json.dumps(r)]
    assert compaction, "no request to the model carried the PreCompact hook's state"
    assert "best val_bpb: 1.010000 at commit abc1234" in compaction[0]


def docs_blocks(language: str, doc: str = "docs/other-agents.md") -> list[str]:
    """The code blocks of a user's document: the README shows the stdio config, docs/other-agents.md
    all of them."""
    text = (REPO / doc).read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)



def wait_for_port(port: int, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert server.poll() is None, f"the HTTP server exited: {server.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"the HTTP server did not listen on port {port} within {timeout_s} s"
        time.sleep(0.2)


def connected_tools(claude: str, config: str, cwd: Path, env: dict) -> tuple[str, set[str]]:
    """Status of server `autoresearch` and its tools in a session given an --mcp-config."""
    path = cwd.parent / "mcp-config.json"
    path.write_text(config)
    done = run_cli(claude, "--mcp-config", str(path), "-p", "status", "--output-format", "stream-json", "--verbose",
                   cwd=cwd, env=env)
    init = next(json.loads(l) for l in done.stdout.splitlines() if '"subtype":"init"' in l)
    status = next(s["status"] for s in init["mcp_servers"] if s["name"] == SERVER_NAME)
    return status, {t.removeprefix(f"mcp__{SERVER_NAME}__") for t in init["tools"] if t.startswith("mcp__")}


def test_documented_stdio_config_connects(claude, plugin_clone, env, workspace):
    assert json.loads(docs_blocks("json", "README.md")[0]) == json.loads(docs_blocks("json")[0])
    stdio = docs_blocks("json")[0].replace("/path/to/research-loop", str(plugin_clone))
    status, tools = connected_tools(claude, stdio.replace("/path/to/workspace", str(workspace)), workspace, env)
    assert (status, tools) == ("connected", CONTRACT_TOOLS)


def test_documented_http_server_and_config_connect_only_with_the_token(claude, plugin_clone, env, workspace):
    port = str(free_port())
    start = next(line for block in docs_blocks("bash") for line in block.splitlines() if "--http" in line)
    command = shlex.split(start.replace("/path/to/research-loop", str(plugin_clone))
                          .replace("/path/to/workspace", str(workspace)).replace("8765", port))
    config = docs_blocks("json")[1].replace("8765", port)
    server_env = dict(env, RESEARCH_LOOP_TOKEN="s3cret")
    server = subprocess.Popen(command, env=server_env, cwd=workspace, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(int(port), server)
        assert connected_tools(claude, config, workspace, server_env) == ("connected", CONTRACT_TOOLS)
        wrong = dict(env, RESEARCH_LOOP_TOKEN="wrong")
        assert connected_tools(claude, config, workspace, wrong)[0] == "failed"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_documented_codex_configs_parse():
    stdio, http = (tomllib.loads(block)["mcp_servers"]["autoresearch"] for block in docs_blocks("toml"))
    assert stdio["command"] == "uv" and "research-loop-mcp" in stdio["args"]
    assert http["url"].startswith("http://127.0.0.1:") and http["bearer_token_env_var"] == "RESEARCH_LOOP_TOKEN"


def test_slash_command_runs_the_skill_with_its_tools(claude, plugin_clone, env, tmp_path):
    """`/research-loop:autoresearch t2` in a real session (model scripted): the skill's text arrives
    with the tag, and its allowed-tools let the MCP calls through unprompted; setup makes the branch."""
    repo = make_research_repo(tmp_path / "fresh", branch=None)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "prepared.json").write_text('{"profile": "cpu", "time_budget": 1}')
    calls = [(TOOL_PREFIX + "status", {}), (TOOL_PREFIX + "setup", {"tag": "t2"}),
             ("Read", {"file_path": str(repo / "train.py")}),
             ("Edit", {"file_path": str(repo / "train.py"), "old_string": "DEPTH = 4", "new_string": "DEPTH = 5"})]

    def session(prompt: str) -> tuple[ScriptedModel, subprocess.CompletedProcess]:
        with ScriptedModel(calls) as model:
            done = run_cli(claude, "--plugin-dir", str(plugin_clone), "-p", prompt, cwd=repo,
                           env=model.env(dict(env, AUTORESEARCH_CACHE=str(cache))))
        assert done.returncode == 0, done.stdout + done.stderr
        return model, done

    model, _ = session("please set up t2")  # no skill: these tools still need a person's approval
    answers = tool_results(model.requests[-1])
    assert "haven't granted it yet" in answers["toolu_0001"] and "haven't granted it yet" in answers["toolu_0003"]
    assert git(repo, "branch", "--list", "autoresearch/*") == ""
    assert (repo / "train.py").read_text() == "DEPTH = 4\n"

    model, _ = session(f"/{SKILL_ID} t2")
    assert "Arguments: `t2`" in json.dumps(model.requests[0])
    answers = tool_results(model.requests[-1])
    assert '"next":"setup(tag)"' in answers["toolu_0000"]
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "autoresearch/t2", answers["toolu_0001"]
    assert (repo / "train.py").read_text() == "DEPTH = 5\n", answers["toolu_0003"]


def test_installed_from_the_workspace_itself_the_loop_runs_unattended(claude, env, tmp_path):
    """The recommended route: in a clone, add it as a marketplace and install research-loop from
    it. A session without --plugin-dir then has the skill and the connected server, and under
    the skill (model scripted) setup runs and train.py is edited without anyone approving."""
    clone = tmp_path / "research-loop"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "prepared.json").write_text('{"profile": "cpu", "time_budget": 1}')
    own = dict(env, CLAUDE_CONFIG_DIR=str(tmp_path / "installed-config"), AUTORESEARCH_CACHE=str(cache))
    for args in (("plugin", "marketplace", "add", str(clone)), ("plugin", "install", "research-loop@research-loop")):
        done = run_cli(claude, *args, cwd=clone, env=own)
        assert done.returncode == 0, done.stdout + done.stderr
    done = run_cli(claude, "mcp", "list", cwd=clone, env=own)
    assert f"plugin:research-loop:{SERVER_NAME}:" in done.stdout and "Connected" in done.stdout, done.stdout
    init = next(m for m in session_messages(claude, None, clone, own) if m.get("subtype") == "init")
    assert SKILL_ID in init["skills"]
    assert {t[len(TOOL_PREFIX):] for t in init["tools"] if t.startswith(TOOL_PREFIX)} == CONTRACT_TOOLS

    source = (clone / "train.py").read_text()
    line = next(l for l in source.splitlines() if l.strip() and source.count(l) == 1)  # Edit needs a unique match
    calls = [(TOOL_PREFIX + "setup", {"tag": "t3"}), ("Read", {"file_path": str(clone / "train.py")}),
             ("Edit", {"file_path": str(clone / "train.py"), "old_string": line,
                       "new_string": line + "  # edited unattended"})]
    with ScriptedModel(calls) as model:
        done = run_cli(claude, "-p", f"/{SKILL_ID} t3", cwd=clone, env=model.env(own))
    answers = tool_results(model.requests[-1])
    assert git(clone, "symbolic-ref", "--short", "HEAD") == "autoresearch/t3", answers["toolu_0000"]
    assert (clone / "train.py").read_text() == source.replace(line, line + "  # edited unattended"), answers["toolu_0002"]
