"""The dashboard's web server: one page with its script and style, JSON views of the workspace, and
a stream of server-sent events, on 127.0.0.1 only, from the standard library's HTTP server.

Served by the MCP server (`--dashboard PORT`, or RESEARCH_LOOP_DASHBOARD=PORT) on a port of its
own, in stdio and HTTP mode alike, or with no MCP server at all by `research-loop dashboard`.
GET only, and every view is a read (mcp_server.dashboard.dashboard), so the page never changes the
workspace. With a token (RESEARCH_LOOP_TOKEN or --token-file, as for the HTTP transport) every
request must carry it: `Authorization: Bearer <token>`, or the cookie set when the page is opened
once as /?token=<token> (the address then drops the token, so it stays out of the address bar).
The cookie is an expiry signed (HMAC) with a secret made at each start of the server: it never
holds the token, lasts COOKIE_LIFETIME_S, and no server started later accepts it.

The stream: each page holds one connection; the server looks at the files once a second and sends
a view only when it changed, so a page costs a few stat calls a second, and a night of pages no
polling storm.
"""
import hashlib
import hmac
import json
import os
import secrets
import sys
import threading
import time
import urllib.parse
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mcp_server.core import ledger
from mcp_server.dashboard import dashboard
from mcp_server.dashboard.auth import http_token, port_number
from mcp_server.core.state import STATE_DIR, STATE_FILE, process_alive

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8766
POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 15.0  # a comment line on a quiet stream, so a closed page is noticed
RETRY_MS = 3000  # how long a page waits before it reconnects a broken stream
EXPIRY_DIGITS = 20  # of a cookie's expiry: seconds since 1970 take 10 for centuries to come
COOKIE_LIFETIME_S = 24 * 3600  # a night and the morning after; then the page is opened with the token again
STATIC = Path(__file__).resolve().parent / "dashboard_static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
         "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
ADDRESS_FILE = "dashboard.json"  # in .research-loop/: where the session-start hook finds the address
SECURITY_HEADERS = (("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
                    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                    ("Cache-Control", "no-store"))


def stamp(paths) -> tuple:
    """What changes when a file is rewritten, appended to, or a folder gains a file."""
    found = []
    for path in paths:
        try:
            st = path.stat()
            found.append((st.st_mtime_ns, st.st_size))
        except OSError:
            found.append(None)
    return tuple(found)


class Watch:
    """The views of one workspace, shared by every page; the ledger view is rebuilt only when one
    of its files changed (the live one is cheap, and changes with every step anyway)."""

    def __init__(self, root: Path):
        self.root = root
        self.files = (root / ledger.LEDGER_NAME, root / STATE_DIR / STATE_FILE, root / dashboard.RUNS_DIR,
                      root / ".git" / "HEAD")
        self.lock = threading.Lock()
        self.cached: tuple[tuple, dict] | None = None

    def ledger(self) -> dict:
        key = stamp(self.files)
        with self.lock:
            if self.cached is None or self.cached[0] != key:
                self.cached = (key, dashboard.ledger_view(self.root))
            return self.cached[1]

    def live(self) -> dict:
        return dashboard.live_view(self.root)


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # a page left open never keeps the process alive

    def __init__(self, root: Path, port: int, token: str | None):
        self.root, self.token = Path(root).resolve(), token
        self.secret = secrets.token_bytes(32)  # signs this server's cookies, and only this server's
        self.cookie_lifetime = COOKIE_LIFETIME_S
        self.watch = Watch(self.root)
        self.closing = threading.Event()
        super().__init__((LOOPBACK, port), Handler)
        self.cookie = f"research_loop_dashboard_{self.port}"  # cookies ignore the port: one per server

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    def start(self) -> "DashboardServer":
        threading.Thread(target=self.serve_forever, name="dashboard", daemon=True).start()
        return self

    def close(self) -> None:
        self.closing.set()  # ends the event streams
        self.shutdown()
        self.server_close()


def encoded(view: dict) -> bytes:
    return json.dumps(dashboard.plain(view), separators=(",", ":")).encode()


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "research-loop-dashboard"

    def log_message(self, format, *args):
        pass  # in stdio mode stderr is the MCP client's log: no line per request

    def do_GET(self):
        if not self.from_loopback_name():
            return self.reply(403, b"the dashboard answers only to 127.0.0.1 and localhost\n")
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if self.server.token and not self.authorized(query.get("token", [""])[0]):
            return self.reply(401, (f"This dashboard needs the server's token: open {self.server.url}?token=<token> "
                                    "once (RESEARCH_LOOP_TOKEN, or the --token-file the server was started with); "
                                    "a cookie keeps the page signed in.\n").encode(),
                              extra=[("WWW-Authenticate", "Bearer")])
        if self.server.token and "token" in query and url.path == "/":
            lifetime = self.server.cookie_lifetime
            cookie = (f"{self.server.cookie}={self.cookie_value(int(time.time() + lifetime))}; Max-Age={lifetime}; "
                      "Path=/; HttpOnly; SameSite=Strict")
            return self.reply(303, b"", extra=[("Location", "/"), ("Set-Cookie", cookie)])
        if url.path in PAGES:
            name, kind = PAGES[url.path]
            return self.reply(200, (STATIC / name).read_bytes(), kind)
        if url.path == "/api/events":
            return self.stream()
        views = {"/api/snapshot": lambda: {"ledger": self.server.watch.ledger(), "live": self.server.watch.live()},
                 "/api/diff": lambda: dashboard.kept_change(self.server.root, query.get("commit", [""])[0]),
                 "/api/tail": lambda: dashboard.run_tail(self.server.root, query.get("commit", [""])[0])}
        if url.path not in views:
            return self.reply(404, b"not found\n")
        try:
            return self.reply(200, encoded(views[url.path]()), "application/json")
        except LookupError as exc:
            return self.reply(404, encoded({"error": str(exc).strip("'\"")}), "application/json")

    def refuse_write(self):
        self.reply(405, b"the dashboard is read-only\n", extra=[("Allow", "GET")])

    do_POST = do_PUT = do_PATCH = do_DELETE = refuse_write

    def from_loopback_name(self) -> bool:
        """The Host a browser sent: another name resolving to 127.0.0.1 (DNS rebinding) is refused."""
        return self.headers.get("Host", "") in (f"{LOOPBACK}:{self.server.port}", f"localhost:{self.server.port}")

    def cookie_value(self, expires: int) -> str:
        """`<expiry>.<its HMAC under this server's secret>`: the cookie never holds the token."""
        mac = hmac.new(self.server.secret, str(expires).encode(), hashlib.sha256).hexdigest()
        return f"{expires}.{mac}"

    def valid_cookie(self, value: str) -> bool:
        expires, _, _ = value.partition(".")
        # an expiry is a time in seconds: thousands of digits would raise out of int() (Python's limit), unanswered
        return (expires.isascii() and expires.isdigit() and len(expires) <= EXPIRY_DIGITS and int(expires) > time.time()
                and hmac.compare_digest(value.encode(), self.cookie_value(int(expires)).encode()))

    def authorized(self, query_token: str) -> bool:
        scheme, _, bearer = (self.headers.get("Authorization") or "").partition(" ")
        cookies = SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie") or "")
        except CookieError:
            pass
        cookie = cookies[self.server.cookie].value if self.server.cookie in cookies else ""
        token = self.server.token.encode()
        return (hmac.compare_digest(query_token.encode(), token)
                or (scheme.lower() == "bearer" and hmac.compare_digest(bearer.strip().encode(), token))
                or self.valid_cookie(cookie))

    def reply(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8", extra=()):
        self.send_response(status)
        for name, value in (("Content-Type", kind), ("Content-Length", str(len(body))), *SECURITY_HEADERS, *extra):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def stream(self):
        """Server-sent events: `ledger` and `live`, each sent when it differs from what this page has."""
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream"), *SECURITY_HEADERS):
            self.send_header(name, value)
        self.end_headers()
        sent: dict[str, bytes] = {}
        quiet = 0.0
        try:
            self.wfile.write(f"retry: {RETRY_MS}\n\n".encode())
            while not self.server.closing.is_set():
                for name, view in (("ledger", self.server.watch.ledger), ("live", self.server.watch.live)):
                    data = encoded(view())
                    if data != sent.get(name):
                        self.wfile.write(b"event: " + name.encode() + b"\ndata: " + data + b"\n\n")
                        sent[name], quiet = data, 0.0
                if quiet >= HEARTBEAT_SECONDS:
                    self.wfile.write(b": still here\n\n")
                    quiet = 0.0
                self.wfile.flush()
                self.server.closing.wait(POLL_SECONDS)
                quiet += POLL_SECONDS
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page was closed


# --- the address, for the session-start hook ---------------------------------------------------

def address_path(root: Path) -> Path:
    return root / STATE_DIR / ADDRESS_FILE


def publish(root: Path, url: str, token: bool) -> None:
    """Writes where this process serves the dashboard, if the server's folder exists (never creates it)."""
    path = address_path(root)
    if not path.parent.is_dir():
        return
    tmp = path.with_name(f".{ADDRESS_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "token": token}))
        os.replace(tmp, path)
    except OSError:
        pass  # the address is in status() too


def withdraw(root: Path) -> None:
    """Removes the address file if this process wrote it (another server may have since)."""
    path = address_path(root)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def published(root: Path) -> dict | None:
    """The address a live server wrote, or None."""
    try:
        data = json.loads(address_path(root).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) and process_alive(data["pid"]) else None


# --- `research-loop dashboard`: the morning after, no MCP server needed -------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--workspace", type=Path,
                        default=os.environ.get("RESEARCH_LOOP_WORKSPACE") or os.getcwd(),
                        help="the research workspace (default: env RESEARCH_LOOP_WORKSPACE, else the current directory)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the token the page must be opened with (default: env RESEARCH_LOOP_TOKEN; "
                             "none: any local user can read the page)")


def main(args) -> int:
    root = Path(args.workspace).resolve()
    if not root.is_dir():
        print(f"research-loop dashboard: {root} is not a folder: pass the workspace with --workspace", file=sys.stderr)
        return 1
    token = http_token(args, "research-loop dashboard")
    try:
        server = DashboardServer(root, args.port, token)
    except OSError as exc:
        print(f"research-loop dashboard: cannot listen on {LOOPBACK}:{args.port} ({exc.strerror}): pick another "
              "--port (0 picks a free one)", file=sys.stderr)
        return 1
    print(f"research-loop dashboard of {root} (read-only): {server.url}"
          + (" (open it once with ?token=<token>)" if token else "") + "; Ctrl-C stops it", flush=True)
    if not token:
        print("research-loop dashboard: no token set (RESEARCH_LOOP_TOKEN or --token-file): every local user and "
              "process can read this page", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
