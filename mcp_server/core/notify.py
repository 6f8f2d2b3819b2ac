"""Pings for a person away from the screen (--notify URL): a webhook on a keep, when the research run
ends (a limit met, or the stop tool), after a few failed runs in a row, and when the overnight
runner gives up or stops on its own.

The body is JSON carrying the message under both `text` (what Slack reads) and `content` (what
Discord reads), each with that service's markup escaped and Discord's mentions turned off, or the message as plain text for ntfy: chosen by the URL (a host that begins with
`ntfy`) unless --notify-format says json or text. Messages wait in a bounded queue for one
background thread that posts them, retrying a failure a few times with backoff; a webhook that
fails, hangs or refuses connections is logged on stderr and never slows a tool call. Standard
library only.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from mcp_server.core import limits  # standard library only too

FORMATS = ("auto", "json", "text")
NOTIFY_ENV = "RESEARCH_LOOP_NOTIFY"  # the URL, for servers started by Claude Code (the overnight runner sets it)
FORMAT_ENV = "RESEARCH_LOOP_NOTIFY_FORMAT"
# Three failed runs in a row is rarely bad luck (a broken edit, an environment gone wrong), and it
# comes well before max_failures_in_row (10 by default) ends the research run on its own.
FAILURES_TO_PING = 3
QUEUE_SIZE = 100  # messages waiting: a night's keeps fit; past it the oldest is dropped
TIMEOUT_S = 10.0  # per attempt
RETRY_DELAYS_S = (2.0, 8.0, 30.0)  # after the 1st, 2nd and 3rd failed attempt; then the message is given up
MAX_CHARS = 1900  # Discord refuses content over 2000 characters
CLOSE_WAIT_S = 5.0  # on exit, for the last messages (the stop, the runner's give-up) to go out
TITLE = "research-loop"
DISCORD_MARKUP = set("\\*_~`|<>[]()#")


def check_url(url: str) -> str:
    """The URL if it can be posted to; ValueError saying what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--notify needs an http:// or https:// webhook URL (Slack, Discord, ntfy...), got {url!r}")
    return url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--notify and --notify-format: the server's and the overnight runner's."""
    parser.add_argument("--notify", type=url_argument, metavar="URL", default=os.environ.get(NOTIFY_ENV) or None,
                        help="a webhook (Slack, Discord, ntfy, ...) pinged on a keep, when the research run ends, "
                             f"after {FAILURES_TO_PING} failed runs in a row, and when the overnight runner "
                             f"gives up (default: env {NOTIFY_ENV}, else none)")
    parser.add_argument("--notify-format", choices=FORMATS, default=os.environ.get(FORMAT_ENV) or "auto",
                        help="json: {\"text\", \"content\"} (Slack and Discord read one each); text: the message as "
                             "plain text (ntfy); auto (default): text for a host that begins with ntfy, else json")


def arguments_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --notify-format where the environment set it (argparse checks a flag's choices only)."""
    if args.notify_format not in FORMATS:
        return f"--notify-format (or env {FORMAT_ENV}) must be one of {', '.join(FORMATS)}, got {args.notify_format!r}"
    return None


def url_argument(text: str) -> str:
    try:
        return check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def plain_text(url: str, fmt: str) -> bool:
    if fmt == "auto":
        return (urlsplit(url).hostname or "").startswith("ntfy")
    return fmt == "text"


def request_for(url: str, fmt: str, message: str) -> urllib.request.Request:
    message = message if len(message) <= MAX_CHARS else message[:MAX_CHARS - 3] + "..."
    if plain_text(url, fmt):
        return urllib.request.Request(url, data=message.encode(), method="POST",
                                      headers={"Content-Type": "text/plain; charset=utf-8", "Title": TITLE})
    body = json.dumps({"text": slack_text(message), "content": discord_text(message),
                       "allowed_mentions": {"parse": []}}).encode()  # Discord: no @everyone, role or user pings
    return urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})


# A message carries the agent's words (descriptions, train.py's last log line): each service's markup in them
# is written out, so no mention, link or hidden text of the agent's reads as research-loop's (review 59).
def slack_text(message: str) -> str:
    """Slack's escaping: `<...>` is its markup for mentions (`<!channel>`) and links (`<url|text>`)."""
    return message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def discord_text(message: str) -> str:
    """Discord's markdown escaped with backslashes: masked links `[text](url)`, mentions `<@id>`, spoilers."""
    escaped = "".join("\\" + ch if ch in DISCORD_MARKUP else ch for ch in message)
    return escaped if len(escaped) <= MAX_CHARS else escaped[:MAX_CHARS - 3].rstrip("\\") + "..."


def log(message: str) -> None:
    print(f"research-loop: notify: {message}", file=sys.stderr, flush=True)


class Notifier:
    """Sends messages to one webhook from its own thread. Without a URL every method does nothing,
    so the loop calls it the same way whether or not the user asked for pings."""

    def __init__(self, url: str | None = None, fmt: str = "auto", failures: int = FAILURES_TO_PING,
                 retry_delays_s: tuple = RETRY_DELAYS_S, timeout_s: float = TIMEOUT_S):
        self.url = check_url(url) if url else None
        if fmt not in FORMATS:
            raise ValueError(f"--notify-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fmt, self.failures_to_ping = fmt, failures
        self.retry_delays_s, self.timeout_s = retry_delays_s, timeout_s
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.lock = threading.Lock()  # the counters below: runs are recorded on the executor's threads
        self.thread: threading.Thread | None = None
        self.failures_in_row = 0
        self.ended_sent: set = set()  # research runs whose end was announced

    @classmethod
    def from_env(cls, env: dict) -> Notifier:
        return cls(env.get(NOTIFY_ENV) or None, env.get(FORMAT_ENV) or "auto")

    # --- sending ----------------------------------------------------------------------------
    def send(self, message: str) -> None:
        """Queues the message and returns at once."""
        if not self.url:
            return
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._deliver, name="notify", daemon=True)
                self.thread.start()
        while True:
            try:
                self.queue.put_nowait(message)
                return
            except queue.Full:  # the webhook has been down a long time: the newest news matters most
                try:
                    log(f"queue full, dropped: {self.queue.get_nowait()[:100]!r}")
                except queue.Empty:
                    pass

    def _deliver(self) -> None:
        while True:
            message = self.queue.get()
            if message is None:
                return
            self._post(message)

    def _post(self, message: str) -> bool:
        for attempt in range(len(self.retry_delays_s) + 1):
            try:
                with urllib.request.urlopen(request_for(self.url, self.fmt, message), timeout=self.timeout_s):
                    return True
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    log(f"{self.url} refused the message ({problem}); not retried: check the URL")
                    return False
            except (OSError, ValueError) as exc:  # refused, unreachable, timed out, a bad answer
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < len(self.retry_delays_s):
                log(f"{self.url} failed ({problem}); retrying in {self.retry_delays_s[attempt]:g} s")
                time.sleep(self.retry_delays_s[attempt])
        log(f"{self.url} failed {len(self.retry_delays_s) + 1} times ({problem}); message dropped: {message[:100]!r}")
        return False

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Lets the queued messages go out for up to wait_s, then leaves the rest (the thread is a daemon)."""
        if self.thread is None:
            return
        try:
            self.queue.put(None, timeout=wait_s)
        except queue.Full:
            return
        self.thread.join(wait_s)

    # --- the research loop's events (each called once the state's lock is released) -----------
    def kept(self, loop, row, evidence: str | None) -> None:
        if not self.url:
            return
        self.send(f"kept {row.commit}: val_bpb {row.val_bpb:.6f} — {row.description}"
                  + (f" ({evidence})" if evidence else "") + f" [{loop.root.name}]")
        self.check(loop)

    def recorded(self, loop, result) -> None:
        """A run's result: a failure extends the streak (pinged once, at FAILURES_TO_PING), ok ends it."""
        if not self.url:
            return
        with self.lock:
            self.failures_in_row = self.failures_in_row + 1 if result.status in ("crash", "timeout") else 0
            streak = self.failures_in_row
        if streak == self.failures_to_ping:
            why = (result.tail or "").strip().splitlines()[-1:] or [result.status]
            self.send(f"{streak} runs in a row failed; the last, run {result.run} ({result.description}): "
                      f"{result.status}: {why[0][:300]} [{loop.root.name}]")
        self.check(loop)

    def check(self, loop) -> None:
        """Pings once per research run when it has ended (a limit met, or stopped)."""
        if not self.url:
            return
        state = loop.state.load()
        reason = loop.ended(state)
        key = (state.get("branch"), state.get("started_at"))
        with self.lock:
            if not reason or key in self.ended_sent:
                return
            self.ended_sent.add(key)
        # the best is what the branch holds (the last keep, a worse one too), not the lowest keep row,
        # which may be the agent's own number: its marker is said, and a run without a sandbox (review 72)
        best = next((r for r in reversed(loop.rows()) if r.status == "keep"), None)
        whose = limits.caveat(best.description) if best else None
        self.send(f"the research run {state.get('branch')} has ended: {reason}"
                  + (f"; best val_bpb {best.val_bpb:.6f}" if best else "") + (f" ({whose})" if whose else "")
                  + f" [{loop.root.name}]")
