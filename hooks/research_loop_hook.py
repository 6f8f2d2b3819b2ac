"""Claude Code hooks of the research-loop plugin. Standard library only, so it runs before
(and without) the project's environment, and fast: a few file reads and one or two git calls.

  pre-edit       PreToolUse on Edit|Write|MultiEdit|NotebookEdit: on an autoresearch/* branch,
                 refuse an edit to any harness file (exit 2, the reason on stderr for Claude).
  session-start  SessionStart: the loop's state as context, plus a visible warning when the
                 workspace cannot run (no uv, no prepared data).
  pre-compact    PreCompact: the same state, which Claude Code adds to the compaction
                 instructions so the summary carries it.
  stop           Stop: while a research run is active and no stop condition is met, send Claude
                 back to work with the next step; let it stop once a condition is met, the run was
                 stopped on purpose, or it is stuck (repeated stops with no tool call between, or,
                 without a readable transcript, no change to the server's records between).

Each reads the hook's JSON from stdin (Claude Code's protocol) and always answers cleanly. The
edit guard fails closed: an event it cannot read, or a failure of its own, refuses the edit with
the reason. Any other hook's failure lets the action through (a stop included, so a broken hook
never keeps an agent spinning): the MCP server enforces the rules again on every run.
"""
from __future__ import annotations  # the system python3 may be older than 3.10

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mcp_server.core import limits  # noqa: E402  (standard library only, shared with the server)

EDITABLE = "train.py"
HARNESS_MARKERS = ("train.py", "prepare.py")  # both at the repo root: an autoresearch layout
RESEARCH_BRANCH_PREFIX = "autoresearch/"
LEDGER = "results.tsv"
RUN_LOG = "run.log"
FREE_FILES = (LEDGER, RUN_LOG)  # experiment records, not harness (ignored by git)
SERVER_RECORDS = (".research-loop/", "runs/")  # written by the MCP server only
STATE_FILE = ".research-loop/state.json"
DASHBOARD_FILE = ".research-loop/dashboard.json"  # the address the MCP server serves the dashboard on
DASHBOARD_URL = re.compile(r"http://127\.0\.0\.1:[0-9]{1,5}/")  # what the server writes there (dashboard_http.url)
RECENT_ROWS = 5
LOG_TAIL_BYTES = 4096
GIT_TIMEOUT_S = 5
# hooks.json gives each hook 10 s, and Claude Code lets the action through when a hook runs past it: the
# edit guard makes up to three git calls, so their waits share this (Python's start and the answer take the rest)
HOOK_BUDGET_S = 8.0
STARTED = time.monotonic()
SKILL = "/research-loop:autoresearch"
STOP_HOOK_STATE = ".research-loop/stop-hook.json"
# Stops in a row with no tool call between that the hook still sends back: after these the agent
# is stuck, not working, and is let go (Claude Code's own cap, 8 in 2.1.332, comes later).
MAX_IDLE_BLOCKS = 3
TOOL_USE_MARK = b'"type":"tool_use"'  # one per tool call in Claude Code's JSONL transcript
# Only the transcript's end is read: a night's transcript grows to gigabytes, the hook has 10 s.
TRANSCRIPT_TAIL_BYTES = 4 << 20


class Unreadable(ValueError):
    """An event field the hook cannot use (wrong type, NUL bytes); the message names it."""


def text_field(mapping: dict, key: str) -> str | None:
    value = mapping.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\0" in value:
        raise Unreadable(f"{key} is {type(value).__name__} {json.dumps(value)[:80]}, not a path")
    return value


def event_folder(event: dict) -> Path:
    """The session's folder; Claude Code runs hooks there, so a cwd of the wrong type falls back to it."""
    try:
        return Path(text_field(event, "cwd") or os.getcwd())
    except Unreadable:
        return Path(os.getcwd())


# --- workspace facts ---------------------------------------------------------------------

class GitStuck(RuntimeError):
    """git did not answer within GIT_TIMEOUT_S: the hook cannot tell what the repository holds."""


def git(root: Path, *args: str) -> str | None:
    """git's output, or None where it fails (or is not installed); GitStuck where it does not answer within
    GIT_TIMEOUT_S or what is left of the hook's HOOK_BUDGET_S."""
    timeout = min(GIT_TIMEOUT_S, HOOK_BUDGET_S - (time.monotonic() - STARTED))
    within = f"{GIT_TIMEOUT_S}s" if timeout == GIT_TIMEOUT_S else f"the {HOOK_BUDGET_S:g}s the hook gives git in all"
    try:
        if timeout <= 0:
            raise subprocess.TimeoutExpired("git", 0)
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=timeout)
    except OSError:
        return None
    except subprocess.TimeoutExpired:
        raise GitStuck(f"`git {' '.join(args)}` did not answer within {within} in {root}") from None
    return done.stdout.strip() if done.returncode == 0 else None


def repo_root(start: Path) -> Path | None:
    top = git(start, "rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else None


def is_autoresearch_layout(root: Path) -> bool:
    return all((root / name).is_file() for name in HARNESS_MARKERS)


def current_branch(root: Path) -> str | None:
    return git(root, "symbolic-ref", "--short", "-q", "HEAD")


def cache_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


def data_prepared() -> bool:
    """prepare.py records prepared.json; an upstream cache has only the tokenizer folder."""
    cache = cache_dir()
    tokenizer = cache / "tokenizer"
    return (cache / "prepared.json").is_file() or (tokenizer.is_dir() and any(tokenizer.iterdir()))


# --- pre-edit ------------------------------------------------------------------------------

def edited_path(event: dict) -> Path:
    """The file the tool call edits; raises Unreadable when the event does not say which."""
    tool_input = event.get("tool_input")
    if not isinstance(tool_input, dict):
        raise Unreadable(f"tool_input is {type(tool_input).__name__}, not an object")
    named = {text_field(tool_input, key) for key in ("file_path", "notebook_path")} - {None}
    if len(named) > 1:  # which one the tool would edit is the tool's choice: judge neither
        raise Unreadable("tool_input names two different files (file_path and notebook_path)")
    if not named:
        raise Unreadable("tool_input names no file_path")
    raw = named.pop()
    path = Path(raw)
    if not path.is_absolute():
        path = Path(text_field(event, "cwd") or os.getcwd()) / path
    return Path(os.path.realpath(path))  # a symlink to prepare.py is prepare.py


def nearest_existing_dir(path: Path) -> Path:
    """The file's folder, or its closest existing ancestor when Write creates new folders."""
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def harness_refusal(root: Path, branch: str, rel: str) -> str | None:
    """Why this repo-relative path may not be edited on a research branch, or None."""
    if rel == EDITABLE or rel in FREE_FILES:
        return None
    if rel.startswith(SERVER_RECORDS):
        return (f"research-loop: {rel} is a record kept by the autoresearch MCP server; editing it by hand "
                "would falsify the run history. Use the tools (status, read_metrics, keep, discard, log_result).")
    if not rel.startswith(".git/") and git(root, "check-ignore", "-q", "--", rel) is not None:
        return None  # ignored by git: caches, environments, notes that no run depends on
    return (f"research-loop: {rel} is part of the evaluation harness, and {branch} is a research branch, so it "
            f"stays fixed: every val_bpb on this branch must be measured by the same code. Only {EDITABLE} may "
            f"change. Put the idea into {EDITABLE} instead. To change the harness on purpose, leave the research "
            "branch first (e.g. `git switch main`), edit and commit there, then start a new run tag.")


def refuse_unread_edit(problem: str) -> int:
    print(f"research-loop: this edit is refused because the hook could not read the tool call ({problem}), so it "
          "cannot tell whether the file belongs to the evaluation harness. Retry the edit with a plain file path; "
          "if this repeats, Claude Code sent a malformed PreToolUse event: update Claude Code.", file=sys.stderr)
    return 2


def pre_edit(event: dict) -> int:
    try:
        path = edited_path(event)
    except Unreadable as exc:
        return refuse_unread_edit(str(exc))
    try:
        return guard(path)
    except GitStuck as exc:  # whether this file is harness is unknown: the edit waits
        print(f"research-loop: this edit is refused because {exc}, so the hook cannot tell whether {path} is part "
              "of a research branch's evaluation harness. Retry the edit in a moment; if it repeats, look for a "
              "stuck git process or a leftover .lock file in that repository's .git.", file=sys.stderr)
        return 2


def guard(path: Path) -> int:
    """0 where the file may be edited, else 2 with the reason on stderr."""
    workspace = repo_root(nearest_existing_dir(path))
    if workspace is None or not is_autoresearch_layout(workspace):
        return 0  # not inside an autoresearch repository: nothing of ours to protect
    branch = current_branch(workspace) or ""
    if not branch.startswith(RESEARCH_BRANCH_PREFIX):
        return 0
    try:
        rel = path.relative_to(workspace).as_posix()
    except ValueError:
        return 0  # outside the repository: not harness
    reason = harness_refusal(workspace, branch, rel)
    if reason is None:
        return 0
    print(reason, file=sys.stderr)
    return 2  # Claude Code blocks the tool call and shows stderr to Claude


# --- state report ----------------------------------------------------------------------------

def ledger_rows(root: Path) -> list[list[str]]:
    """The server's rows (a hand edit of results.tsv steers nothing here either), as the ledger's text."""
    recorded = limits.recorded_rows(server_state(root))
    if recorded is not None:
        return [[str(c), f"{v:.6f}", f"{m:.1f}", str(s), str(d)] for c, v, m, s, d in recorded]
    try:
        lines = limits.read_record(root / LEDGER).decode(errors="replace").splitlines()
    except (OSError, ValueError):
        return []
    return [line.split("\t") for line in lines[1:] if line.count("\t") == 4]


def best_kept(rows: list[list[str]]) -> list[str] | None:
    """The last kept row: what the research branch holds (a worse keep moves it too), as status() says."""
    for row in reversed(rows):
        try:
            value = float(row[1])
        except ValueError:
            continue
        if row[3] == "keep" and value > 0:
            return row
    return None


def server_state(root: Path) -> dict:
    return limits.recorded_state(root)


def last_progress_line(log: Path) -> str | None:
    """The newest 'step ...' line of a run's log (progress lines are separated by carriage returns). Opened
    without blocking, a plain file only: a FIFO the agent put at the log's name hung the hook."""
    try:
        with open(os.open(log, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    steps = [part.strip() for part in tail.replace("\n", "\r").split("\r") if part.strip().startswith("step ")]
    return steps[-1] if steps else None


def process_alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # unknown: trust the record
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def dashboard_address(root: Path) -> str | None:
    """The dashboard's address: the one a live server wrote, else the one RESEARCH_LOOP_DASHBOARD asks
    the MCP server that starts with this session to serve."""
    try:
        served = json.loads(limits.read_record(root / DASHBOARD_FILE))
    except (OSError, ValueError, RecursionError):
        served = None
    # the agent can write the file: only an address a server writes is shown, never its text as research-loop's
    if isinstance(served, dict) and isinstance(served.get("pid"), int) and process_alive(served["pid"]) \
            and isinstance(served.get("url"), str) and DASHBOARD_URL.fullmatch(served["url"]):
        url, token = served["url"], served.get("token") is True
    else:
        port = os.environ.get("RESEARCH_LOOP_DASHBOARD", "")
        url = f"http://127.0.0.1:{port}/" if port.isdigit() and int(port) > 0 else None
        token = bool(os.environ.get("RESEARCH_LOOP_TOKEN"))
    if not isinstance(url, str):
        return None
    return url + (" (open it once as ?token=<RESEARCH_LOOP_TOKEN>)" if token else "")


def run_lines(root: Path, state: dict) -> list[str]:
    """One line per run nobody has decided yet, saying what to do about it."""
    lines = []
    runs = state.get("runs") if isinstance(state.get("runs"), dict) else {}
    for entry in sorted((e for e in runs.values() if isinstance(e, dict)), key=lambda e: e.get("run", 0)):
        name = f"run {entry.get('run')} ({str(entry.get('commit', ''))[:7]}) \"{entry.get('description', '')}\""
        status = entry.get("status")
        if status == "queued":
            lines.append(f"{name} is queued: it starts when a slot is free; wait() returns its result.")
        elif status == "running" and process_alive(entry.get("server_pid")):
            progress = last_progress_line(root / str(entry.get("log", ""))) or "no progress line yet"
            lines.append(f"{name} is running: {progress}. wait() or read_metrics() follows it.")
        elif status == "running":
            lines.append(f"{name} was running when its server stopped: status() settles it (its result, or "
                         "interrupted: discard() logs it as a crash).")
        elif status == "pending":
            result = entry.get("result") if isinstance(entry.get("result"), dict) else {}
            value = result.get("val_bpb")
            shown = f" val_bpb {value:.6f}" if isinstance(value, (int, float)) else ""
            lines.append(f"pending result: {name} {result.get('status')}{shown}: decide it with keep() or "
                         "discard() before anything else.")
        elif status == "interrupted":
            lines.append(f"{name} was interrupted (its server stopped mid-run): discard() logs it as a crash.")
    return lines


def ledger_lines(rows: list[list[str]]) -> list[str]:
    if not rows:
        return [f"{LEDGER}: no runs logged yet; the first run is the unchanged baseline."]
    counts = {s: sum(r[3] == s for r in rows) for s in ("keep", "discard", "crash")}
    lines = [f"{LEDGER}: {len(rows)} runs (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"]
    best = best_kept(rows)
    if best:
        lines.append(f"best val_bpb: {best[1]} at commit {best[0]} \"{best[4]}\"")
    lines.append("last rows (commit, val_bpb, memory_gb, status, description):")
    lines += ["  " + "  ".join(row) for row in rows[-RECENT_ROWS:]]
    return lines


def noise_lines(noise) -> list[str]:
    if not isinstance(noise, dict):
        return ["noise: not measured yet (measure_noise() after the baseline)."]
    try:
        return [f"noise: std {noise['std']:.6f} over {len(noise['values'])} runs of the same code; "
                f"a gain under {noise['threshold']:.6f} is within the noise."]
    except (KeyError, TypeError, ValueError):
        return [f"noise: {json.dumps(noise, sort_keys=True)}"]


def state_report(root: Path) -> str:
    branch = current_branch(root) or "(detached HEAD)"
    lines = [f"research-loop state of {root}:"]
    address = dashboard_address(root)
    if address:
        lines.append(f"dashboard (a live web page of the research run, for the user): {address}")
    if not branch.startswith(RESEARCH_BRANCH_PREFIX):
        lines.append(f"branch: {branch}, not a research branch. Start one with {SKILL} <tag> "
                     "(the setup tool creates autoresearch/<tag>).")
        return "\n".join(lines)
    lines.append(f"branch: {branch} (research branch: only {EDITABLE} may change)")
    lines += ledger_lines(ledger_rows(root))
    state = server_state(root)
    lines += run_lines(root, state)
    rows = rows_for_limits(root)
    over, left = limits.ended(state, rows), limits.left(state, rows)
    if over:
        lines.append(f"the research run has ended ({over}): decide what is pending, then stop.")
    elif left:
        lines.append(f"limits: {left}")
    lines += noise_lines(state.get("noise"))
    lines.append(f"Carry on with the loop ({SKILL} holds the protocol); never stop to ask.")
    return "\n".join(lines)


def uv_problem() -> str | None:
    if shutil.which("uv"):
        return None
    return ("`uv` is not on PATH, so the autoresearch MCP server and training cannot start. "
            "Install it (curl -LsSf https://astral.sh/uv/install.sh | sh), then restart Claude Code.")


def data_problem(root: Path) -> str | None:
    if data_prepared():
        return None
    return (f"no prepared data in {cache_dir()}: run `uv run prepare.py` in {root} once "
            "(add `--dataset offline` on a machine without network).")


def not_a_workspace_note(folder: Path) -> str:
    return (f"research-loop: {folder} is not an autoresearch workspace (a git repository with prepare.py and "
            "train.py at its root), so the autoresearch tools will refuse to run here. To run the research loop, "
            "start Claude Code in a clone of research-loop or of autoresearch, after `uv sync` and "
            "`uv run prepare.py` there.")


def session_start(event: dict) -> int:
    folder = event_folder(event)
    root = repo_root(folder)
    in_workspace = root is not None and is_autoresearch_layout(root)
    # Elsewhere Claude gets one line (no warning: the plugin may be enabled everywhere), unless uv is missing.
    problems = [p for p in (uv_problem(), data_problem(root) if in_workspace else None) if p]
    context = state_report(root) if in_workspace else not_a_workspace_note(folder)
    if problems:
        context += "\nsetup problems:\n" + "\n".join(f"- {p}" for p in problems)
    output = {"hookSpecificOutput": {"hookEventName": "SessionStart", "additionalContext": context}}
    address = dashboard_address(root) if in_workspace else None
    if problems or address:  # shown to the user
        output["systemMessage"] = "research-loop: " + " ".join(problems + ([f"dashboard: {address}"] if address else []))
    print(json.dumps(output))
    return 0


def pre_compact(event: dict) -> int:
    root = repo_root(event_folder(event))
    if root is None or not is_autoresearch_layout(root):
        return 0
    # Plain stdout of a PreCompact hook joins the compaction instructions.
    print("Keep this research-loop state in the summary, verbatim where possible:\n" + state_report(root))
    return 0


# --- stop ------------------------------------------------------------------------------------

def last_tool_call(transcript) -> str | None:
    """Where the transcript's newest tool call starts (a new call moves it), from its last
    TRANSCRIPT_TAIL_BYTES only; None when there is no readable transcript."""
    if not isinstance(transcript, str) or "\0" in transcript or not os.path.isfile(transcript):
        return None  # a FIFO or a device would block or never end
    try:
        with open(transcript, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - TRANSCRIPT_TAIL_BYTES)
            f.seek(start)
            found = f.read(TRANSCRIPT_TAIL_BYTES).rfind(TOOL_USE_MARK)
    except OSError:
        return None
    return f"tool call at byte {start + found}" if found >= 0 else "no tool call in the transcript's tail"


def records_mark(root: Path) -> str:
    """A digest of the server's records: without a transcript, the only sign of work between stops."""
    digest = hashlib.sha256()
    for name in (STATE_FILE, LEDGER):
        try:
            digest.update(limits.read_record(root / name))
        except (OSError, ValueError):
            pass
        digest.update(b"\0")
    return "records " + digest.hexdigest()[:16]


def rows_for_limits(root: Path) -> list[tuple[str, float, str]]:
    rows = []
    for row in ledger_rows(root):
        try:
            rows.append((row[3], float(row[1]), row[4] if len(row) > 4 else ""))
        except ValueError:
            continue
    return rows


def write_record(path: Path, text: str) -> None:
    """The hook's record, written to a new file renamed over whatever lies at its name: the agent can write the
    folder, and a FIFO put there blocked the hook's plain write until Claude Code killed it (a link was followed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise


def allow(message: str | None = None) -> int:
    if message:
        print(json.dumps({"systemMessage": message}))
    return 0


def stop(event: dict) -> int:
    """Blocks Claude's end of turn while the research run is active; exit 0 without output lets it stop."""
    root = repo_root(event_folder(event))
    if root is None or not is_autoresearch_layout(root):
        return allow()
    state = server_state(root)
    branch = current_branch(root)
    if not state.get("branch") or branch != state["branch"]:
        return allow()  # no research run here, or not on its branch: not ours to keep going
    rows = rows_for_limits(root)
    over = limits.ended(state, rows)
    if over:
        return allow(f"research-loop: the research run {branch} has ended ({over}).")
    record_path = root / STOP_HOOK_STATE
    record, malformed = stop_record(record_path)
    session = event.get("session_id") if isinstance(event.get("session_id"), str) else None
    # Progress between stops: a new tool call, or without a readable transcript, a change to the server's records
    mark = last_tool_call(event.get("transcript_path")) or records_mark(root)
    idle = record.get("session") == session and record.get("mark") == mark
    blocks = record.get("blocks", 0) + 1 if idle else 1
    if blocks > MAX_IDLE_BLOCKS:
        record_path.unlink(missing_ok=True)
        return allow(f"research-loop: Claude tried to stop {MAX_IDLE_BLOCKS + 1} times with no progress in between "
                     f"(no tool call, or no change to the server's records where the transcript could not be read), "
                     f"so it is let go, though the research run {branch} is still active. Continue it with "
                     f"{SKILL}, or end it with /research-loop:stop.")
    try:
        write_record(record_path, json.dumps({"session": session, "mark": mark, "blocks": blocks}))
    except OSError:
        return allow(f"research-loop: the research run {branch} is still active, but the Stop hook cannot record "
                     f"its count of stops in {STOP_HOOK_STATE}, so it lets Claude stop rather than risk sending it "
                     f"back forever. Continue with {SKILL}.")
    steps = run_lines(root, state) or ["edit train.py with the next idea, then run_experiment(description)."]
    left = limits.left(state, rows)
    reason = (f"research-loop: the research run {branch} is still active"
              + (f" ({left})" if left else " and has no limit: it runs until stopped")
              + ". Do not stop and do not ask: carry on with the loop. Next: " + " ".join(steps)
              + " To end the run on purpose, call the stop tool (/research-loop:stop).")
    answer = {"decision": "block", "reason": reason}
    if malformed:  # Claude and the user both hear of it
        answer.update(reason=f"{reason} {malformed}", systemMessage=f"research-loop: {malformed}")
    print(json.dumps(answer))
    return 0


def stop_record(path: Path) -> tuple[dict, str | None]:
    """The Stop hook's record of idle stops, and what to say of one that is there but is none the hook writes (its
    count no whole number from 0 to MAX_IDLE_BLOCKS): it is set aside, and the count starts again. Review 93: a
    count of -1000000 written there (the agent can write the folder) was counted up from, so the hook never let a
    stuck agent go."""
    try:
        record = json.loads(limits.read_record(path))
    except OSError:
        return {}, None  # none yet (or no plain file, which the hook's write replaces)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        found = "no JSON object the hook can read"
    elif type(record.get("blocks", 0)) is int and 0 <= record.get("blocks", 0) <= MAX_IDLE_BLOCKS:
        return record, None
    else:
        found = f"its count of stops is {json.dumps(record['blocks'])[:40]}, not a whole number from 0 to {MAX_IDLE_BLOCKS}"
    return {}, (f"The Stop hook's record {STOP_HOOK_STATE} is not one it writes ({found}): its count starts again from "
                "this stop. Leave that file to the hook.")


HANDLERS = {"pre-edit": pre_edit, "session-start": session_start, "pre-compact": pre_compact, "stop": stop}


def read_event() -> dict | None:
    """The event on stdin, or None when it is not a JSON object (empty, cut short, not UTF-8, nested deeper than
    Python's parser goes)."""
    try:
        event = json.loads(sys.stdin.buffer.read())
    except (ValueError, RecursionError):  # UnicodeDecodeError included; RecursionError is no ValueError
        return None
    return event if isinstance(event, dict) else None


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in HANDLERS:
        print(f"usage: research_loop_hook.py {{{'|'.join(HANDLERS)}}} < hook-event.json", file=sys.stderr)
        return 1
    name, event = sys.argv[1], read_event()
    if event is None and name == "pre-edit":
        return refuse_unread_edit("the event on stdin is not a JSON object")
    try:
        return HANDLERS[name](event or {})
    except Exception as exc:  # noqa: BLE001  (a traceback would exit 1: Claude Code lets the action through)
        if name == "pre-edit":
            return refuse_unread_edit(f"{type(exc).__name__}: {exc}")
        print(f"research-loop: the {name} hook failed ({type(exc).__name__}: {exc}); the action goes ahead.",
              file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
