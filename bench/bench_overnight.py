"""An unattended run, measured: the overnight runner with the pinned Claude Code CLI, a scripted
stand-in for the model and the fake trainer.

    uv run python bench/bench_overnight.py [--minutes 10] [--run-seconds 20]

The research run has a deadline of `minutes`. The scripted agent ends its first two sessions itself
(after three experiments it only tries to stop: the Stop hook sends it back three times, then lets
a stuck agent go), and works in the third until the deadline, when the server refuses new runs and
the hook lets it stop. Printed: experiments, sessions, the gap between a session's end and the next
session's first run, and where the last run ended against the deadline (target: within one run).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from plugin_support import TOOL_PREFIX, ScriptedAgent, claude_env, install_claude_cli, uv_link_mode  # noqa: E402
from server_support import make_cache, make_workspace  # noqa: E402

QUITTING_SESSIONS = 2  # sessions that end themselves early
EXPERIMENTS_BEFORE_QUITTING = 3


class NightAgent(ScriptedAgent):
    """Sessions 1 and 2: three experiments, then only tries to stop. Later sessions: experiments
    until the server says the research run has ended."""

    def __init__(self, hours: float):
        super().__init__([])
        self.hours, self.sessions = hours, 0

    def reply_blocks(self, body: dict):
        messages = body.get("messages", [])
        if body.get("tools") and not any(m["role"] == "assistant" for m in messages):
            self.sessions += 1  # a conversation's first request
        ended = "has ended" in json.dumps(messages[-1]) if messages else False
        pairs = EXPERIMENTS_BEFORE_QUITTING if self.sessions <= QUITTING_SESSIONS else 10_000
        self.steps = [(TOOL_PREFIX + "status", {}), (TOOL_PREFIX + "setup", {"tag": "night", "hours": self.hours})]
        self.steps += [(TOOL_PREFIX + "run_experiment", {"description": "same code"}), (TOOL_PREFIX + "discard", {})] \
            * pairs
        if ended:
            self.steps = []
        return super().reply_blocks(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--run-seconds", type=float, default=20.0)
    args = parser.parse_args()
    claude = str(install_claude_cli())
    tmp = Path(tempfile.mkdtemp(prefix="bench-overnight-"))
    ws, cache = make_workspace(tmp), make_cache(tmp)
    (ws / "train.py").write_text(f"VAL_BPB = 1.0\nSLEEP = {args.run_seconds}\nSTEPS = 10\n")
    subprocess.run(["git", "commit", "-q", "-am", "fixed-length runs"], cwd=ws, check=True)
    env = claude_env(tmp / "claude-home") | uv_link_mode(REPO) | {
        "AUTORESEARCH_CACHE": str(cache), "RESEARCH_LOOP_TRAIN_COMMAND": f"{sys.executable} fake_train.py",
        "PYTHONUNBUFFERED": "1"}
    hours = args.minutes / 60
    with NightAgent(hours) as agent:
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "mcp_server.cli", "overnight", "--workspace", str(ws),
                               "--claude", claude, "--tag", "night", "--hours", str(hours)],
                              cwd=REPO, env=agent.env(env), capture_output=True, text=True)
        finished = time.time()
    print(proc.stdout[-2500:])
    sessions = [json.loads(line) for line in (ws / ".research-loop" / "overnight" / "sessions.jsonl").read_text()
                .splitlines()]
    records = sorted((json.loads(p.read_text())["run"] for p in (ws / "runs").glob("*.json")
                      if not p.name.endswith(".report.json")), key=lambda r: r["run"])
    state = json.loads((ws / ".research-loop" / "state.json").read_text())
    deadline = state["limits"]["deadline"]
    ends = [session["ended_at"] for session in sessions]
    gaps = []
    for end in ends[:-1]:
        after = [r["started_at"] for r in records if r["started_at"] > end]
        if after:
            gaps.append(round(min(after) - end, 1))
    last_end = max(r["ended_at"] for r in records)
    print(f"\nexit code {proc.returncode}; wall {finished - started:.0f} s for a {args.minutes:.0f}-minute deadline")
    print(f"experiments: {len(records)} (each {args.run_seconds:.0f} s of training); sessions: {len(ends)}")
    print(f"gaps from a session's end to the next session's first run (s): {gaps}")
    late = last_end - deadline
    print(f"last run ended {late:+.1f} s from the deadline; the runner stopped {finished - deadline:+.1f} s from it "
          f"(target: within one run, {args.run_seconds:.0f} s plus start-up)")
    ok = proc.returncode == 0 and len(ends) >= QUITTING_SESSIONS + 1 and late <= args.run_seconds + 30
    print("targets: " + ("all met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
