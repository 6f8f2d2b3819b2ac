"""Helpers for the plugin tests: the pinned Claude Code CLI, an isolated environment to run it
in, a scripted stand-in for the model, and a throwaway autoresearch-layout git repository."""
import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from filelock import FileLock

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
    """The pinned CLI under .tools/ (ignored by git), installed with npm when missing (by one of
    xdist's workers: the other waits on the lock)."""
    CLAUDE_PREFIX.mkdir(parents=True, exist_ok=True)
    with FileLock(CLAUDE_PREFIX.parent / "claude-code.lock"):
        if CLAUDE_BIN.exists():
            return CLAUDE_BIN
        npm = shutil.which("npm")
        assert npm, "npm is needed to install the Claude Code CLI for these tests: install Node.js 18+ and npm"
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(CLAUDE_PREFIX),
                        f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"], check=True)
    return CLAUDE_BIN


def claude_env(home: Path) -> dict:
    """Environment for the CLI: its own config and temp folders under `home` (no user plugins or
    settings, nothing left behind), no secrets, and not the test runner's virtual environment
    (the plugin's server must find its own)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and k != "VIRTUAL_ENV"}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(CLAUDE_CONFIG_DIR=str(home / "config"), CLAUDE_CODE_TMPDIR=str(home / "tmp"),
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               DISABLE_AUTOUPDATER="1",
               # the first start may sync the plugin's venv; -p waits (blocking) for servers to connect
               MCP_TIMEOUT="120000", MCP_CONNECT_TIMEOUT_MS="120000", MCP_CONNECTION_NONBLOCKING="false")
    return env


def uv_link_mode(target: Path) -> dict:
    """uv hard-links packages from its cache; across file systems (a tmpfs /tmp) it would copy
    the whole environment, torch included, so link there with symlinks instead."""
    cache = Path(subprocess.run(["uv", "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip())
    cache.mkdir(parents=True, exist_ok=True)
    return {} if os.stat(cache).st_dev == os.stat(target).st_dev else {"UV_LINK_MODE": "symlink"}


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


class ScriptedModel:
    """A local stand-in for the Anthropic Messages API, so a real Claude Code session can run
    offline: each turn answers with the next scripted tool call (by how many tool results the
    conversation holds), then with plain text. Every request body is kept for inspection."""

    def __init__(self, tool_calls: list[tuple[str, dict]] = ()):
        self.tool_calls = list(tool_calls)
        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    def __enter__(self) -> "ScriptedModel":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, base: dict) -> dict:
        return dict(base, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{self.server.server_port}",
                    ANTHROPIC_API_KEY="sk-test-not-a-key")

    def reply_blocks(self, body: dict) -> tuple[dict, str, dict]:
        turn = sum(part.get("type") == "tool_result" for m in body.get("messages", []) if m["role"] == "user"
                   and isinstance(m["content"], list) for part in m["content"])
        if turn < len(self.tool_calls) and body.get("tools"):
            name, tool_input = self.tool_calls[turn]
            return ({"type": "tool_use", "id": f"toolu_{turn:04d}", "name": name, "input": {}}, "tool_use",
                    {"type": "input_json_delta", "partial_json": json.dumps(tool_input)})
        return {"type": "text", "text": ""}, "end_turn", {"type": "text_delta", "text": "Done."}

    def stream(self, body: dict) -> bytes:
        block, stop_reason, delta = self.reply_blocks(body)
        # a fresh id per reply: Claude Code merges streamed assistant messages that share one
        message = {"id": f"msg_{len(self.requests):05d}", "type": "message", "role": "assistant", "model": body.get("model"),
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 1, "output_tokens": 1}}
        events = [("message_start", {"message": message}),
                  ("content_block_start", {"index": 0, "content_block": block}),
                  ("content_block_delta", {"index": 0, "delta": delta}),
                  ("content_block_stop", {"index": 0}),
                  ("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                     "usage": {"output_tokens": 1}}),
                  ("message_stop", {})]
        return "".join(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
                       for name, data in events).encode()

    def _handler(self):
        model = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if not self.path.startswith("/v1/messages?") and self.path != "/v1/messages":
                    self.send_error(404)  # token counting and the like: the CLI copes without them
                    return
                model.requests.append(body)
                payload = model.stream(body)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
        return Handler


class ScriptedAgent(ScriptedModel):
    """A scripted model that plays a whole turn, Stop-hook feedback included: its n-th reply is
    step n of the script (counting the replies already in the conversation), a tool call, or None
    to end the turn. Past the end of the script it always ends the turn. Each session starts the
    script over."""

    def __init__(self, steps: list):
        super().__init__()
        self.steps = list(steps)

    def reply_blocks(self, body: dict) -> tuple[dict, str, dict]:
        turn = sum(m["role"] == "assistant" for m in body.get("messages", []))
        step = self.steps[turn] if turn < len(self.steps) else None
        if step is not None and body.get("tools"):
            name, tool_input = step
            return ({"type": "tool_use", "id": f"toolu_{turn:04d}", "name": name, "input": {}}, "tool_use",
                    {"type": "input_json_delta", "partial_json": json.dumps(tool_input)})
        return {"type": "text", "text": ""}, "end_turn", {"type": "text_delta", "text": f"Stopping (turn {turn})."}

    def stop_feedback(self) -> list[str]:
        """The Stop hook reasons Claude Code sent back to the model, in order (read from the last
        request of the conversation, which carries all of them)."""
        conversation = [r for r in self.requests if r.get("tools")]
        seen = []
        for message in conversation[-1].get("messages", []) if conversation else []:
            content = message["content"] if isinstance(message["content"], list) else \
                [{"type": "text", "text": message["content"]}]
            for part in content:
                text = part.get("text", "") if part.get("type") == "text" else ""
                if message["role"] == "user" and "research-loop: the research run" in text:
                    seen.append(text)
        return seen
