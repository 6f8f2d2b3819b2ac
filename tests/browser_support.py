"""A real headless Chromium for the dashboard tests, driven over the DevTools protocol through a
pipe (--remote-debugging-pipe): no websocket library, no debugging port, no browser download
(Debian's `chromium` package, installed here when missing and allowed).

    uv run python tests/browser_support.py URL OUT.png [WIDTH HEIGHT]   # a screenshot of a page
"""
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe")
COMMAND_TIMEOUT_S = 30
INSTALL_HINT = ("the dashboard tests need Chromium: `apt-get install -y chromium` (Debian/Ubuntu; .ci/run does it), "
                "or set RESEARCH_LOOP_CHROMIUM to a Chromium or Chrome binary")


def find_chromium() -> str | None:
    return os.environ.get("RESEARCH_LOOP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def ensure_chromium() -> str:
    """The browser, installed from Debian's archive first if missing and this user may."""
    found = find_chromium()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
        found = find_chromium()
    if found is None:
        raise RuntimeError(INSTALL_HINT)
    return found


class DevToolsError(RuntimeError):
    pass


class Browser:
    """One Chromium process; pages in contexts of their own (no shared cookies)."""

    def __init__(self, executable: str):
        self.profile = Path(tempfile.mkdtemp(prefix="research-loop-chromium-"))
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def on_fds_3_and_4():  # the protocol's pipe: the browser reads fd 3 and writes fd 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)
        self.process = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        preexec_fn=on_fds_3_and_4, pass_fds=(3, 4),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._last_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while True:
            answer = self._next_message(deadline)
            if answer.get("id") == self._last_id:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _next_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise DevToolsError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise DevToolsError("Chromium exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def new_page(self, width: int = 1280, height: int = 900) -> "Page":
        context = self.send("Target.createBrowserContext")["browserContextId"]
        target = self.send("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, context)
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (DevToolsError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._in)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, session: str, context: str):
        self.browser, self.session, self.context = browser, session, context

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def evaluate(self, expression: str):
        """The expression's value (JSON-able); a promise is awaited; a thrown error is raised."""
        done = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in done:
            raise DevToolsError(f"{expression}: {done['exceptionDetails'].get('exception', {}).get('description')}")
        return done["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1):
        """Polls the expression until it is truthy; its value, or an error saying what never came."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except DevToolsError:
                value = None  # the page is between two documents
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true after {timeout}s in the browser: {expression}")
            time.sleep(interval)

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"])
        Path(path).write_bytes(data)
        return data

    def close(self) -> None:
        self.browser.send("Target.disposeBrowserContext", {"browserContextId": self.context})


def screenshot(url: str, out: Path, width: int = 1280, height: int = 900, settle_s: float = 3.0) -> None:
    browser = Browser(ensure_chromium())
    try:
        page = browser.new_page(width, height)
        page.goto(url)
        time.sleep(settle_s)  # the event stream's first views
        full = page.evaluate("document.documentElement.scrollHeight")
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": max(height, full), "deviceScaleFactor": 1, "mobile": False})
        page.screenshot(out)
    finally:
        browser.close()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5):
        sys.exit(__doc__)
    screenshot(sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:]))
