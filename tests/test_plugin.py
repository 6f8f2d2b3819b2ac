"""The Claude Code plugin, checked with the pinned Claude Code CLI against a fresh clone of the
committed repository (so an uncommitted or ignored file cannot make it pass).

Everything here runs offline with no login: `claude plugin validate`, `claude mcp list`, and a
`claude -p` session whose stream-json `init` message lists the loaded skills, MCP servers and
tools, and whose hook events carry the SessionStart hook's output.
"""
import asyncio
import json
import re
import subprocess
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from plugin_support import (CLAUDE_CODE_VERSION, REPO, SERVER_NAME, TOOL_PREFIX, claude_env, git,
                            install_claude_cli, make_research_repo)

SKILL_ID = "research-loop:autoresearch"
CONTRACT_TOOLS = {"setup", "run_experiment", "read_metrics", "keep", "discard", "log_result", "status",
                  "plot_progress", "measure_noise"}
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
def env(tmp_path_factory) -> dict:
    return claude_env(tmp_path_factory.mktemp("claude-config"))


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


def session_messages(claude: str, plugin: Path, cwd: Path, env: dict) -> list[dict]:
    """A one-prompt print-mode session. With no credentials the model is never called, but the
    session starts for real: plugin loaded, MCP servers connected, SessionStart hooks run."""
    done = run_cli(claude, "--plugin-dir", str(plugin), "-p", "status", "--output-format", "stream-json",
                   "--verbose", "--include-hook-events", cwd=cwd, env=env)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_cli_is_the_pinned_version(claude, env, tmp_path):
    done = run_cli(claude, "--version", cwd=tmp_path, env=env)
    assert done.stdout.startswith(CLAUDE_CODE_VERSION), done.stdout + done.stderr


def test_plugin_validates_strict(claude, plugin_clone, env):
    done = run_cli(claude, "plugin", "validate", str(plugin_clone / ".claude-plugin" / "plugin.json"), "--strict",
                   cwd=plugin_clone, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skills: {SKILL_ID}" in done.stdout  # how the validator names the skill
    assert f"mcpServers: {SERVER_NAME} stdio uv" in done.stdout


def test_marketplace_validates_strict(claude, plugin_clone, env):
    done = run_cli(claude, "plugin", "validate", str(plugin_clone / ".claude-plugin" / "marketplace.json"),
                   "--strict", cwd=plugin_clone, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
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
    assert fields["argument-hint"] == "[run-tag]"
    assert "autoresearch" in fields["description"] and "train.py" in fields["description"]
    assert {"Read", "Edit(train.py)"} <= set(fields["allowed-tools"])
    body = (plugin_clone / "skills" / "autoresearch" / "SKILL.md").read_text()
    assert "$ARGUMENTS" in body

