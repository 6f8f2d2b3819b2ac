"""A second, independent client: the MCP Inspector CLI (npm), against `python -m mcp_server`.

Pinned to the last 0.x release: the 2.x line needs Node >= 22.19, and this project's
machines run Node 20. Installed once into the repo's ignored .tools/ (CI caches it).
"""
import json
import subprocess
import sys

from server_support import REPO, TOOL_NAMES, make_cache, make_workspace

INSPECTOR_VERSION = "0.22.0"
INSPECTOR_DIR = REPO / ".tools" / "inspector"
INSPECTOR = INSPECTOR_DIR / "node_modules" / ".bin" / "mcp-inspector"


def inspector() -> str:
    installed = INSPECTOR_DIR / "node_modules" / "@modelcontextprotocol" / "inspector" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != INSPECTOR_VERSION:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(INSPECTOR_DIR),
                        f"@modelcontextprotocol/inspector@{INSPECTOR_VERSION}"], check=True, timeout=300)
    return str(INSPECTOR)


def run_inspector(ws, cache, *method_args) -> dict:
    command = [inspector(), "--cli", "-e", f"AUTORESEARCH_CACHE={cache}", sys.executable, "-m", "mcp_server",
               "--workspace", str(ws), *method_args]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_inspector_lists_the_tools_and_calls_one(tmp_path):
    ws, cache = make_workspace(tmp_path), make_cache(tmp_path)
    listed = run_inspector(ws, cache, "--method", "tools/list")
    names = {tool["name"] for tool in listed["tools"]}
    assert names == TOOL_NAMES
    assert all(tool.get("annotations") and tool.get("outputSchema") for tool in listed["tools"])

    called = run_inspector(ws, cache, "--method", "tools/call", "--tool-name", "setup", "--tool-arg", "tag=insp")
    assert called["structuredContent"]["branch"] == "autoresearch/insp"
    status = run_inspector(ws, cache, "--method", "tools/call", "--tool-name", "status")
    assert status["structuredContent"]["set_up"] is True
