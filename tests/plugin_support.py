"""Helpers for the plugin tests: the pinned Claude Code CLI, an isolated environment to run it
in, and a throwaway autoresearch-layout git repository."""
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLAUDE_CODE_VERSION = "2.1.332"  # pinned: `claude plugin validate` rules change between releases
CLAUDE_PREFIX = REPO / ".tools" / "claude-code"
CLAUDE_BIN = CLAUDE_PREFIX / "node_modules" / ".bin" / "claude"
SERVER_NAME = "autoresearch"
TOOL_PREFIX = f"mcp__plugin_research-loop_{SERVER_NAME}__"
# Credentials never reach the CLI in tests: no run may call the real API.
SECRET_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL")
LEDGER_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"


def install_claude_cli() -> Path:
    """The pinned CLI under .tools/ (ignored by git), installed with npm when missing."""
    if not CLAUDE_BIN.exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install the Claude Code CLI for these tests: install Node.js 18+ and npm"
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(CLAUDE_PREFIX),
                        f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"], check=True)
    return CLAUDE_BIN


def claude_env(config_dir: Path) -> dict:
    """Environment for the CLI: its own config folder (no user plugins or settings), no secrets,
    and not the test runner's virtual environment (the plugin's server must find its own)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and k != "VIRTUAL_ENV"}
    env.update(CLAUDE_CONFIG_DIR=str(config_dir), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               DISABLE_AUTOUPDATER="1", MCP_TIMEOUT="120000")  # first start may sync the plugin's venv
    return env


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_research_repo(path: Path, branch: str | None = "autoresearch/t1", rows: list[str] = ()) -> Path:
    """A git repo in the autoresearch layout (stand-in files), optionally on a research branch
    with a ledger of the given rows."""
    (path / "nanochat").mkdir(parents=True)
    (path / "prepare.py").write_text("# harness stand-in\n")
    (path / "train.py").write_text("DEPTH = 4\n")
    (path / "nanochat" / "common.py").write_text("# harness stand-in\n")
    (path / ".gitignore").write_text("results.tsv\nrun.log\nruns/\n.research-loop/\n")
    git(path, "init", "-q", "-b", "main")
    git(path, "add", ".")
    git(path, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "initial")
    if branch:
        git(path, "switch", "-q", "-c", branch)
    if rows:
        (path / "results.tsv").write_text(LEDGER_HEADER + "".join(row + "\n" for row in rows))
    return path
