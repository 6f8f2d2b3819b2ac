"""The unattended runner: headless Claude Code sessions, one after another, until the research
run is over.

    uv run research-loop overnight --tag nov26 --hours 8      (in the workspace)

Each session is `claude -p "/research-loop:autoresearch <tag> <limits>"` with the plugin and the
skill's allowed tools (no permission prompt, no --dangerously-skip-permissions). The Stop hook
keeps a session working; when one ends anyway (context exhausted, an API error, a crash, a stuck
agent) before a stop condition is met, the next one starts and resumes from the server's state.
Sessions that end quickly in a row back off, and after a few the runner gives up and says why.
With --max-cost it starts no session once the sessions' cost (each session's stream-json result)
reaches it; --notify pings a webhook when it gives up or stops for the cost (and the sessions'
servers ping theirs); --track mlflow|wandb has the sessions' servers track every run. It shows one live status line, keeps its own log in .research-loop/overnight/,
and at the end prints the ledger's summary, the GPU-hours and the sessions' tokens and cost, and the
path of progress.png. Ctrl-C stops the session in progress
(its server, and so its training, with it) and leaves the ledger intact: the same command resumes.
"""
import argparse
import copy
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

from git import GitCommandError

from mcp_server.core import budget_settings, cost, integrity, ledger, limits, logparse, notify, tracking
from mcp_server.scripts import sandbox
from mcp_server.core.models import Refusal, Row
from mcp_server.core.workspace import EDITABLE, HarnessGit, Workspace, prepared_info, time_budget, timeout_for, validate_tag

PLUGIN_ROOT = Path(__file__).resolve().parents[2]
SKILL = "/research-loop:autoresearch"
CLAUDE_CODE_PACKAGE = "@anthropic-ai/claude-code@2.1.332"
QUICK_SESSION_S = 60.0  # a session shorter than this that decided no run counts as a quick failure
MAX_QUICK_FAILURES = 5  # in a row, then the runner gives up
BACKOFF_S = (5, 15, 45, 120)  # before the 2nd, 3rd, ... restart after quick failures
RUN_GRACE_S = 60.0  # past the deadline, on top of the longest run's timeout, before the session is stopped
TERMINATE_GRACE_S = 10
STATUS_EVERY_S = 2.0  # redraw of the status line on a terminal
STATUS_LINE_EVERY_S = 60.0  # one status line a minute into a log or a pipe
LOG_DIR = ".research-loop/overnight"


class RunnerError(RuntimeError):
    """Something the user must fix before the runner can start; the message says what."""


def skill_allowed_tools() -> list[str]:
    """The skill's allowed-tools: what a headless session may use without a prompt."""
    text = (PLUGIN_ROOT / "skills" / "autoresearch" / "SKILL.md").read_text()
    front = text.split("---", 2)[1]
    tools, inside = [], False
    for line in front.splitlines():
        if line.startswith("allowed-tools:"):
            inside = True
        elif inside and line.startswith("  - "):
            tools.append(line[4:].strip())
        elif inside:
            break
    return tools


def appended(path: Path):
    """path opened to append bytes to, made anew where something else than a plain file lies there: the runner's
    folder is the agent's to write, and a FIFO put at a name the runner appends to blocked it for good (a folder
    there, which unlink cannot remove, raised out of the runner; so did a file put in place of the folder itself)."""
    made_folder(path.parent)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
        except OSError:  # ENXIO: a FIFO nobody reads; ELOOP: a symbolic link; EISDIR: a folder
            _remove(path)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)
            return open(fd, "ab")
        os.close(fd)
        _remove(path)
    raise OSError(f"{path} is not a plain file the runner can append to")


def made_folder(folder: Path) -> Path:
    """The folder, made anew where something else lies at its name (a file a session put in place of the runner's)."""
    if not folder.is_dir():
        _remove(folder)
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remove(path: Path) -> None:
    """Whatever lies at path, a folder (never a link's target) included; what cannot be removed is left."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass


def prompt_for(tag: str, args) -> str:
    parts = [SKILL, tag]
    for flag, value in (("--hours", args.hours), ("--max-experiments", args.max_experiments),
                        ("--target", args.target), ("--max-failures", args.max_failures),
                        ("--max-gpu-hours", args.max_gpu_hours)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


def preflight(workspace: Path, claude: str | None, unsandboxed: bool = False, track: str | None = None) -> str:
    """The claude executable; raises RunnerError naming what to install or run first."""
    if not (workspace / ".git").exists() or not (workspace / "train.py").is_file() \
            or not (workspace / "prepare.py").is_file():
        raise RunnerError(f"{workspace} is not an autoresearch workspace (a git repository with prepare.py and "
                          "train.py): run the runner in one, or pass --workspace.")
    if prepared_info() is None:
        raise RunnerError("No prepared data or tokenizer: run `uv run prepare.py` in the workspace first.")
    if not shutil.which("uv"):
        raise RunnerError("uv is not on PATH, and the plugin's server starts with it: `pip install uv`.")
    found = claude or os.environ.get("RESEARCH_LOOP_CLAUDE") or shutil.which("claude")
    if not found or not Path(found).exists() and not shutil.which(found):
        raise RunnerError(f"Claude Code is not installed: `npm install -g {CLAUDE_CODE_PACKAGE}` (or pass --claude).")
    local = (os.environ.get("RESEARCH_LOOP_EXECUTOR") or "local") == "local"  # a cluster's nodes check their own
    if local and not unsandboxed and sandbox.usable()[0] is None:  # every session's runs would be refused
        raise RunnerError(sandbox.missing())
    # the plugin's server runs in this project's environment (or a copy synced with the same extra)
    if track and tracking.missing_extra(track):
        raise RunnerError(tracking.missing_extra(track))
    return found


def plugin_dir(workspace: Path, track: str | None = None, commit: str = "HEAD") -> Path:
    """Where the session loads the plugin from. Claude Code treats a --plugin-dir folder's files as
    sensitive (each edit would need approval), so a workspace that is this checkout itself gets a
    copy of the plugin (plugin_copy) of `commit`, made afresh for each session."""
    if workspace.resolve() != PLUGIN_ROOT:
        return PLUGIN_ROOT
    return plugin_copy(workspace, track, commit)


def plugin_copy(workspace: Path, track: str | None = None, commit: str = "HEAD") -> Path:
    """A worktree of `commit` inside .git with its environment synced, rebuilt from nothing: whatever was
    planted in the last one (a changed or symlinked file, a .pth or sitecustomize in its .venv, its
    .git file pointed at another repository) is gone before the session's server loads it."""
    repo = HarnessGit(str(workspace))  # no hook, filter or other program of the agent's runs here
    # the workspace's own git directory: a linked worktree's .git is a file naming it
    copy = Path(repo.rev_parse("--absolute-git-dir")) / "research-loop" / "plugin"
    head = repo.rev_parse("--verify", f"{commit}^{{commit}}")
    if copy.is_symlink() or copy.is_file():
        copy.unlink()
    elif copy.exists():
        shutil.rmtree(copy)
    repo.worktree("prune")
    repo.worktree("add", "-q", "--detach", "--force", str(copy), head)
    extra = ["--extra", track] if track else []  # the tracker the session's server is told to use
    subprocess.run(["uv", "sync", "--quiet", "--project", str(copy), *extra], check=True)
    return copy


def plugin_commit(workspace: Path, tag: str) -> tuple[str, str | None]:
    """The commit every session's plugin copy is made from, where the workspace is this checkout, and a note where
    it is not HEAD. HEAD moves with the research branch, where the agent may commit (git is among its tools), so it
    is the commit the runner starts on (review 57), unless the runner resumes research run `tag` and HEAD's harness
    (every tracked file but train.py) is not the one that run was set up with: then the run's kept commit, whose
    harness is (review 62: run again "to resume", the runner started on the research branch's tip, an edit of the
    server or the Stop hook the agent had committed there, and every session loaded it)."""
    ws = Workspace(workspace)
    head = ws.repo.git.rev_parse("--verify", "HEAD^{commit}")
    state = limits.recorded_state(workspace)
    pinned = state.get("fingerprint")
    if state.get("tag") != tag or not isinstance(pinned, str) or ws.fingerprint(head) == pinned:
        return head, None
    try:  # the state is read as the server last wrote it, but checked all the same
        kept = ws.resolve_commit(str(state.get("kept_commit"))) if state.get("kept_commit") else None
    except Refusal:
        kept = None
    if kept and ws.fingerprint(kept) == pinned:
        changed = [p for p in ws.repo.git.diff("--name-only", "-z", "--no-renames", kept, head, "--").split("\0")
                   if p and p != EDITABLE]
        return kept, (f"the plugin comes from {kept[:7]}, research run {tag}'s best: HEAD {head[:7]} holds another "
                      f"harness than the run was set up with ({', '.join(changed[:5]) or 'file modes'}), which no "
                      "session loads")
    raise RunnerError(f"HEAD {head[:7]} holds another harness than research run {tag} was set up with, and no "
                      "commit of that harness is known: check out the plugin commit you mean the sessions to load "
                      "(git log shows who changed what), then run the same command")


class Runner:
    def __init__(self, args, claude: str, backoff_s: tuple = BACKOFF_S, grace_s: float = RUN_GRACE_S,
                 poll_s: float = STATUS_EVERY_S):
        """backoff_s, grace_s and poll_s: the timing, in seconds (tests shorten it)."""
        self.args, self.claude = args, claude
        self.backoff_s, self.grace_s, self.poll_s = backoff_s, grace_s, poll_s
        self.workspace = Path(args.workspace).resolve()
        self.logs = made_folder(self.workspace / LOG_DIR)
        self.plugin_commit = "HEAD"  # where the workspace is this checkout: run() takes the commit (plugin_commit)
        self.started = time.time()
        self.deadline = self.started + args.hours * 3600 if args.hours else None
        # the server's own timeout for a run of the research run's budget, taken before any session: the runs' own
        # timeouts in the state, which the agent can write, are believed only below it (a planted run with an infinite
        # or NaN timeout kept its session past --hours for good)
        self.most_seconds = timeout_for(self.research_budget())
        self.session: subprocess.Popen | None = None
        self.output: cost.SessionOutput | None = None  # the session's output, read from the runner's own pipe
        # what the sessions cost: sessions.jsonl as earlier runs of the command left it, then this runner's own
        # records, kept here: the file is the agent's to write during a session (a line deleted, or one of a
        # huge or negative cost, moved --max-cost either way)
        self.spent_before = cost.sessions_spent(self.workspace, args.tag)
        self.recorded: list[dict] = []
        self.sessions = 0
        self.set_up: tuple | None = None  # the runner's research run as first seen set up: (its start,) (see over)
        self.tty = sys.stdout.isatty()
        self.last_line = 0.0
        self.notifier = notify.Notifier(args.notify, args.notify_format)

    # --- the workspace, read like the hooks read it ---------------------------------------
    def state(self) -> dict:
        return limits.recorded_state(self.workspace)

    def research_budget(self) -> float:
        """The time budget the sessions' runs train at: the one research run `tag` recorded at its setup where the
        runner resumes it (its servers keep it whatever this environment says), else the environment's."""
        state = self.state()
        pinned = budget_settings.recorded(state) if state.get("tag") == self.args.tag else None
        return pinned["time_budget"] if pinned else time_budget(self.workspace)

    def settings_note(self) -> str | None:
        """Where this environment's budget settings differ from those research run `tag` recorded: the night goes
        on at the research run's (core/budget_settings.py), which is said."""
        state = self.state()
        if state.get("tag") != self.args.tag:
            return None
        differ = budget_settings.differences(state, self.workspace, prepared_info() or {})
        return differ and f"{differ}: the night goes on at research run {self.args.tag}'s settings"

    def rows(self) -> list:
        """The server's rows: a results.tsv edited by hand ends no night."""
        state = self.state()
        recorded = limits.recorded_rows(state)
        if recorded is None:
            return ledger.read_rows(self.workspace / ledger.LEDGER_NAME)[0]
        return [row for row in map(_row, recorded) if row is not None]

    def runs(self) -> list[dict]:
        """The state's runs, each a dict (the rest is no server's)."""
        runs = self.state().get("runs")
        return [e for e in runs.values() if isinstance(e, dict)] if isinstance(runs, dict) else []

    def over(self) -> str | None:
        state = self.state()
        tag = state.get("tag")
        if tag == self.args.tag:
            began = (state.get("started_at"),)
            if self.set_up is None and not self.branch_exists(state.get("branch")):
                return None  # a research run whose branch is gone (the user's, to begin the tag anew): not the night's
            self.set_up = self.set_up or began
            if began != self.set_up:  # review 80: its branch renamed away, the same tag set up anew, fresh limits
                return (f"a session set up research run {tag} again (a new branch of that name, fresh limits) after the "
                        "one the runner saw; the runner ends with the research run it began with.")
            return limits.ended(state, [(r.status, r.val_bpb, r.description) for r in self.rows()])
        if self.set_up and isinstance(tag, str):  # a setup of another tag begins fresh limits: the user's night was the runner's research run
            return (f"a session set up another research run ({tag}) after {self.args.tag}; the runner ends with its "
                    f"own research run. To go on with {tag}, run the runner with --tag {tag}.")
        return None  # not set up yet: the session sets it up

    def branch_exists(self, branch) -> bool:
        try:
            HarnessGit(str(self.workspace)).rev_parse("--verify", "--quiet", f"refs/heads/{branch}")
        except GitCommandError:
            return False
        return True

    def status_line(self) -> str:
        rows = self.rows()
        best = ledger.best_kept(rows)
        parts = [f"session {self.sessions}", f"{limits.experiments_done([r.status for r in rows])} experiments",
                 f"{sum(r.status == 'keep' for r in rows)} kept"]
        if best:
            parts.append(f"best {best.val_bpb:.6f}" + ("" if limits.measured(best.description) else " (not the harness's)"))
        spent = self.spent()
        if spent["sessions"]:
            parts.append(f"${spent['cost_usd']:.2f}")
        state = self.state()
        left = limits.left(state, [(r.status, r.val_bpb, r.description) for r in rows])
        if left:
            parts.append(left.split("; ")[0])
        for entry in self.runs():
            if entry.get("status") == "running":
                log = self.workspace / str(entry.get("log"))
                progress = logparse.last_progress(logparse.read_tail_bytes(log)) if log.exists() else None
                step = f"step {progress.step} ({progress.percent:.0f}%)" if progress else "starting"
                parts.append(f"run {entry.get('run')}: {step}")
        return " | ".join(parts)

    def show(self, force: bool = False) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S")
        if self.tty:
            print(f"\r[{stamp}] {self.status_line()[:150]:<150}", end="", flush=True)
        elif force or now - self.last_line >= STATUS_LINE_EVERY_S:
            print(f"[{stamp}] {self.status_line()}", flush=True)
            self.last_line = now

    def spent(self) -> dict:
        total = copy.deepcopy(self.spent_before)
        for record in self.recorded:
            cost.add_session(total, record)
        return total

    def out_of_money(self) -> str | None:
        # any process of the session can kill it before its result, or write a result line of no cost into its pipe
        unknown = [r for r in self.recorded if r.get("cost_usd") is None or r["exit_code"] < 0]
        if self.args.max_cost is not None and unknown:
            return (f"session {unknown[0]['session']} ended without its result event or by a signal (exit code "
                    f"{unknown[0]['exit_code']}): what it cost is unknown, so --max-cost cannot be kept")
        spent = self.spent()["cost_usd"]
        if self.args.max_cost is not None and spent >= self.args.max_cost:
            return f"the sessions have cost ${spent:.2f} of --max-cost ${self.args.max_cost:g}"
        return None

    def say(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(("\r" + " " * 170 + "\r" if self.tty else "") + line, flush=True)
        try:
            with appended(self.logs / "runner.log") as log:
                log.write((line + "\n").encode())
        except OSError:
            pass  # printed above

    # --- sessions ---------------------------------------------------------------------------
    def start_session(self, plugin: Path) -> None:
        self.sessions += 1
        command = [self.claude, "-p", prompt_for(self.args.tag, self.args), "--output-format", "stream-json",
                   "--verbose", "--plugin-dir", str(plugin), "--allowedTools", *skill_allowed_tools()]
        if self.args.model:
            command += ["--model", self.args.model]
        env = dict(os.environ)
        if self.args.unsandboxed:  # the plugin's server reads the user's opt-in from its environment
            env[sandbox.UNSANDBOXED_ENV] = "1"
        if self.args.notify:  # so does its webhook
            env.update({notify.NOTIFY_ENV: self.args.notify, notify.FORMAT_ENV: self.args.notify_format})
        env.update(tracking.server_env(self.args))  # and its tracking
        env.setdefault("MCP_TIMEOUT", "120000")  # the first start of the server may sync its environment
        self.session = subprocess.Popen(command, cwd=self.workspace, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        log = appended(self.logs / f"session-{self.sessions:03d}.jsonl")
        self.output = cost.SessionOutput(self.session.stdout, log)
        self.say(f"session {self.sessions} started: {' '.join(command[:3])} ... (log {LOG_DIR}/session-"
                 f"{self.sessions:03d}.jsonl)")

    def stop_session(self) -> None:
        """The session's whole process group; its MCP server then stops its training runs."""
        if self.session is None or self.session.poll() is not None:
            return
        try:
            os.killpg(self.session.pid, signal.SIGTERM)
            self.session.wait(timeout=TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.session.pid, signal.SIGKILL)
            self.session.wait()
        except ProcessLookupError:
            pass

    def run(self) -> int:
        self.say(f"overnight run of {SKILL} {self.args.tag} in {self.workspace}"
                 + (f", for {self.args.hours} h" if self.args.hours else ""))
        if self.workspace == PLUGIN_ROOT:
            try:
                self.plugin_commit, note = plugin_commit(self.workspace, self.args.tag)
            except (RunnerError, GitCommandError) as exc:
                self.say(f"no session: {str(exc).strip()[:500]}")
                self.notifier.send(f"the overnight runner started no session: {str(exc).strip()[:300]} "
                                   f"[{self.workspace.name}]")
                return 1
            if note:
                self.say(note)
        settings = self.settings_note()
        if settings:
            self.say(settings)
        quick = 0
        while True:
            over = self.over()
            if over:
                self.say(f"the research run has ended: {over}")
                return 0
            if self.deadline and time.time() >= self.deadline:
                self.say("the runner's deadline has passed")
                return 0
            broke = self.out_of_money()
            if broke:
                self.say(f"no new session: {broke}")
                self.notifier.send(f"the overnight runner stopped starting sessions: {broke} [{self.workspace.name}]")
                return 0
            try:
                plugin = plugin_dir(self.workspace, self.args.track, self.plugin_commit)
            except (OSError, subprocess.CalledProcessError, GitCommandError) as exc:  # raised out of the runner
                problem = f"the plugin's copy for the next session could not be made ({str(exc).strip()[:300]})"
                self.say(f"no new session: {problem}. Fix that (uv's or git's error is above), then run the same "
                         "command to resume.")
                self.notifier.send(f"the overnight runner stopped starting sessions: {problem} [{self.workspace.name}]")
                return 1
            began, rows_before = time.time(), len(self.rows())
            self.start_session(plugin)
            while self.session.poll() is None:
                self.show()
                time.sleep(self.poll_s)
                if self.deadline and time.time() > self.deadline + self.grace():
                    self.say("the deadline passed long ago and the session is still going: stopping it")
                    self.stop_session()
            lasted = time.time() - began
            self.say(f"session {self.sessions} ended after {lasted:.0f} s (exit code {self.session.returncode})")
            self.recorded.append({"session": self.sessions, "tag": self.args.tag, "started_at": began,
                                  "ended_at": time.time(), "exit_code": self.session.returncode,
                                  "runs_decided": len(self.rows()) - rows_before} | self.output.settled())
            with appended(self.workspace / cost.SESSIONS_FILE) as record:
                record.write(json.dumps(self.recorded[-1]).encode() + b"\n")
            if self.over():
                continue
            # a short session that decided runs was working; one that decided nothing failed
            quick = quick + 1 if lasted < QUICK_SESSION_S and len(self.rows()) == rows_before else 0
            if quick >= MAX_QUICK_FAILURES:
                self.say(f"giving up: {quick} sessions in a row ended within {QUICK_SESSION_S:.0f} s. The last one "
                         f"said:\n{self.session_tail()}\nFix that, then run the same command to resume.")
                self.notifier.send(f"the overnight runner gave up: {quick} sessions in a row ended within "
                                   f"{QUICK_SESSION_S:.0f} s; the last said: {self.session_tail(1)} [{self.workspace.name}]")
                return 1
            if quick:
                pause = self.backoff_s[min(quick - 1, len(self.backoff_s) - 1)]
                if self.deadline:  # a back-off of up to two minutes outlasted --hours
                    pause = max(0.0, min(pause, self.deadline - time.time()))
                self.say(f"the session ended early: a new one in {pause:g} s")
                time.sleep(pause)

    def grace(self) -> float:
        """How long past the deadline a session may finish the run it has: one run's timeout, at most the
        server's own for its budget (a longer one is the agent's to ask, and such a run is no result), and the
        harness's evaluation after it where the run verifies."""
        return max(map(self.allowance, self.runs()), default=0) + self.grace_s

    def allowance(self, entry: dict) -> float:
        """Seconds one run may take, whatever the state says: its training, at most the server's timeout for
        the budget, then its evaluation's limit."""
        training = min(_seconds(entry.get("timeout", 0)), _seconds(entry.get("most_seconds")), self.most_seconds)
        return training + (integrity.evaluation_timeout(training) if entry.get("verifies") is True else 0.0)

    def session_tail(self, lines: int = 8) -> str:
        shown = []
        for line in list(self.output.last)[-lines:] if self.output else []:
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                event = None
            if isinstance(event, dict):  # a line of another shape is shown as it is (a list's .get raised)
                shown.append(str(event.get("result") or event.get("subtype") or event.get("type"))[:200])
            else:
                shown.append(line.rstrip("\n")[:200])
        return "\n".join(printable(line) for line in shown)

    def summary(self) -> None:
        rows = self.rows()
        counts = {s: sum(r.status == s for r in rows) for s in ledger.STATUSES}
        best = ledger.best_kept(rows)  # what the branch holds, as the report says: not the lowest keep row
        print()
        print(f"{len(rows)} runs in {ledger.LEDGER_NAME}: {counts['keep']} kept, {counts['discard']} discarded, "
              f"{counts['crash']} crashed; {self.sessions} session(s) in {(time.time() - self.started) / 3600:.2f} h")
        if best:
            whose = limits.not_measured(best.description)
            print(f"best val_bpb {best.val_bpb:.6f}" + (f" ({whose})" if whose else "")
                  + f" at {best.commit}: {best.description}")
            from mcp_server.core import history, plot
            from mcp_server.core.workspace import RUNS_DIR
            path = self.workspace / plot.PLOT_NAME
            plot.plot_rows(rows, path, set(history.rerun_commits(self.workspace / RUNS_DIR, self.state(), [r.commit for r in rows])))
            print(f"progress chart: {path}")
        for line in (cost.hours_text(cost.run_hours(self.state())),
                     cost.sessions_text(self.spent())):
            if line:
                print(f"spent: {line}")
        print(f"logs: {self.logs}")


def printable(text: str) -> str:
    """A session's words as the runner prints and pings them: control and format characters (terminal
    escapes, bidi overrides) written out, so the agent's output cannot move, erase or hide the runner's lines."""
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def _row(entry) -> Row | None:
    """A row of the state's, checked: the runner reads the state the agent can write while no transaction
    of the server's puts it back, and a row of another shape raised out of the runner."""
    try:
        return Row(**dict(zip(Row.model_fields, entry, strict=True)))
    except (TypeError, ValueError):
        return None


def _seconds(value) -> float:
    """A number of seconds from the state; anything else (text, NaN) is none: inf."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    return value if ok else float("inf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tag", required=True, help="research run tag: branch autoresearch/<tag> (resumed if it exists)")
    parser.add_argument("--hours", type=float, help="deadline: no run starts after this many hours")
    parser.add_argument("--max-experiments", type=int, help="stop after this many experiments")
    parser.add_argument("--target", type=float, help="stop once a kept val_bpb reaches this")
    parser.add_argument("--max-failures", type=int, help="stop after this many crashes in a row (default 10)")
    parser.add_argument("--max-gpu-hours", type=float, help="stop once the runs have used this many GPU-hours "
                                                            "(slot-hours on a CPU)")
    parser.add_argument("--max-cost", type=float, metavar="USD", help="start no new session once the sessions have "
                                                                      "cost this many dollars (as Claude Code reports)")
    parser.add_argument("--workspace", default=os.getcwd(), help="the workspace (default: the current folder)")
    parser.add_argument("--claude", help="the claude executable (default: env RESEARCH_LOOP_CLAUDE, else on PATH)")
    parser.add_argument("--model", help="the model for the sessions (default: Claude Code's)")
    parser.add_argument("--unsandboxed", action="store_true", default=sandbox.opted_in(),
                        help="let the sessions' server train without a sandbox where none can run here (every "
                             f"answer and ledger row says so; default: env {sandbox.UNSANDBOXED_ENV}=1)")
    notify.add_arguments(parser)
    tracking.add_arguments(parser)


def main(args) -> int:
    try:  # setup would refuse it in every session, and the runner would start one after another
        validate_tag(args.tag)
    except Refusal as exc:
        print(f"error: --tag: {exc}", file=sys.stderr)
        return 2
    # setup's own checks, before any session starts: nan, inf, 0 or less would set no limit at all
    for flag, name, value in (("--hours", "hours", args.hours), ("--max-experiments", "max_experiments",
                              args.max_experiments), ("--target", "target_val_bpb", args.target),
                              ("--max-failures", "max_failures_in_row", args.max_failures),
                              ("--max-gpu-hours", "max_gpu_hours", args.max_gpu_hours)):
        try:
            limits.make_limits(**{"max_failures_in_row": None, name: value})
        except ValueError as exc:
            print(f"error: {flag}: {exc}; fix it and rerun", file=sys.stderr)
            return 2
    problem = tracking.arguments_problem(args) or notify.arguments_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.max_cost is not None and not (0 < args.max_cost < float("inf")):
        print(f"error: --max-cost must be a number of dollars above 0, got {args.max_cost}; fix it and rerun",
              file=sys.stderr)
        return 2
    try:
        claude = preflight(Path(args.workspace).resolve(), args.claude, args.unsandboxed, args.track)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runner = Runner(args, claude)

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    # SIGINT too: started in the background by a script, the runner inherits it ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted)
    try:
        code = runner.run()
    except KeyboardInterrupt:
        code = 130
    finally:  # whatever ends the runner ends its session: none goes on unwatched, past every limit
        runner.stop_session()
    if code == 130:
        runner.say("interrupted: the session and its training were stopped; the ledger is intact. "
                   "Run the same command to resume.")
    runner.summary()
    runner.notifier.close()
    return code
