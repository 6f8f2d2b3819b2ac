"""The dashboard without a browser: its views of real workspaces (fake trainer, real git), its
HTTP server (token, loopback, read-only), the MCP server serving it, and `research-loop dashboard`.
The page itself, in a real Chromium, is tests/test_dashboard_browser.py."""
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from mcp_server.dashboard import dashboard
from mcp_server.__main__ import start_dashboard
from mcp_server.dashboard.dashboard_http import DashboardServer
from server_support import (
    REPO, Lab, answer, git, make_cache, make_workspace, set_knobs, stdio_client_for, wait_until,
)

TOKEN = "dashboard-test-token"
MALFORMED = "not a ledger row"


class Night:
    """A small night, made once for the tests that only read it: baseline, a kept gain, a discard, a
    crash, and a hand-mangled ledger line; its server has gone."""

    def __init__(self, folder: Path):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AUTORESEARCH_CACHE", str(make_cache(folder)))
            lab = Lab(make_workspace(folder))
            lab.ok("setup", tag="t", max_experiments=5)
            self.runs = {"baseline": lab.ok("run_experiment", description="baseline")}
            lab.ok("keep")
            for name, knobs, decision in (("better", {"val_bpb": 0.9}, "keep"),
                                          ("worse", {"val_bpb": 0.95}, "discard"), ("crashy", {"crash": 1}, "discard")):
                set_knobs(lab.ws, **knobs)
                self.runs[name] = lab.ok("run_experiment", description=name)
                lab.ok(decision, **({"unconfirmed": True} if decision == "keep" else {}))  # no noise measured
            lab.loop.shutdown()
        with open(lab.ws / "results.tsv", "a") as ledger:
            ledger.write(MALFORMED + "\n")
        self.ws = lab.ws


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Night:
    return Night(tmp_path_factory.mktemp("night"))


def test_the_ledger_view_has_every_row_its_delta_run_and_change_and_says_the_hand_edit(night):
    runs = night.runs
    view = dashboard.ledger_view(night.ws)
    rows = view["rows"]
    assert [r["status"] for r in rows] == ["keep", "keep", "discard", "crash"]  # the server's rows only
    assert [r.get("commit") for r in rows] == [runs[n]["commit"] for n in ("baseline", "better", "worse", "crashy")]
    assert [r.get("delta") for r in rows] == [None, -0.1, 0.05, None]  # against the best kept before it
    assert [r["run"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["changes"] == "VAL_BPB 1.0->0.9"
    assert "results.tsv is not what the server wrote" in view["problem"]  # the appended line
    assert view["branch"] == "autoresearch/t" and view["set_up"] and view["first_step"] is None


def test_a_copy_of_the_state_with_wrong_types_fails_no_page(lab):
    """While the owner runs, the agent writes the server's copy of the state with a row's description a number: the
    owner's status is right (it believes what it wrote), but the page read the copy and failed (AttributeError in the
    ledger view), for as long as state.json was not changed. The page reads state.json instead, as the server's
    readers do, and where neither is of the server's shape it shows results.tsv's rows and says why."""
    from mcp_server.core.limits import records_dir
    lab.baseline()
    copy, path = records_dir(lab.ws) / "state.json", lab.ws / ".research-loop" / "state.json"
    forged = json.loads(copy.read_text())
    forged["rows"][0][4] = 5
    copy.write_text(json.dumps(forged))
    assert lab.ok("status")["best_val_bpb"] == 1.0
    assert [row["description"] for row in dashboard.ledger_view(lab.ws)["rows"]] == ["baseline"]
    path.write_text(json.dumps(forged))
    view = dashboard.ledger_view(lab.ws)  # results.tsv's rows, as for a state from before the server kept them
    assert [row["description"] for row in view["rows"]] == ["baseline"], view
    assert "nor the server's copy of it is a state the server writes" in view["problem"], view


def test_a_discard_row_logged_by_hand_shows_no_gain(lab):
    """Review 72: log_result marked only keep rows as the agent's number: a discard row logged by hand at 0.3 beside a
    measured best of 1.0 read on the dashboard as an idea 0.7 better than the best, which nothing measured."""
    lab.baseline()
    outside = git(lab.ws, "commit-tree", "HEAD^{tree}", "-m", "trained elsewhere").strip()
    row = lab.ok("log_result", commit=outside, val_bpb=0.3, memory_gb=1.0, status="discard", description="elsewhere")
    assert row["row"]["description"] == "elsewhere (logged by hand)"
    shown = dashboard.ledger_view(lab.ws)["rows"][-1]
    assert shown["val_bpb"] == 0.3 and shown["delta"] is None, shown


def test_the_tail_of_a_run_whose_record_was_replaced_says_so_not_that_it_was_logged_by_hand(lab):
    """Review 78: with the run records' folder replaced (or a record edited), the tail of a run the server ran said
    "no log was kept for this run (logged with log_result?)", which is what a row logged by hand has. It now says the
    server's record is missing or not what it wrote, and a row logged by hand still says it was logged by hand."""
    run = lab.baseline()["row"]["commit"]
    outside = git(lab.ws, "commit-tree", "HEAD^{tree}", "-m", "trained elsewhere").strip()
    lab.ok("log_result", commit=outside, val_bpb=0.9, memory_gb=1.0, status="discard", description="elsewhere")
    runs = lab.ws / "runs"
    runs.rename(lab.ws / "runs.old")
    runs.mkdir()
    tail = dashboard.run_tail(lab.ws, run)["tail"]
    assert "logged with log_result" not in tail, tail
    assert f"runs/0001-{run}.json" in tail and "missing or not what the server wrote" in tail, tail
    assert "logged with log_result" in dashboard.run_tail(lab.ws, outside[:7])["tail"]
    runs.rmdir()
    (lab.ws / "runs.old").rename(runs)
    assert "val_bpb:" in dashboard.run_tail(lab.ws, run)["tail"]  # the folder put back: the log is shown again


def test_a_discarded_result_that_is_train_pys_own_number_is_marked(fake_env):
    """Review 72: a result the harness could not verify (no export: train.py's own number) was marked in its row only
    when kept: discarded, train.py's 0.3 was a plain row of the ledger, a measured number wherever rows are shown."""
    from server_support import exporting_workspace
    lab = Lab(exporting_workspace(fake_env))
    try:
        lab.ok("setup", tag="t")
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep", unverified=True)
        set_knobs(lab.ws, val_bpb=0.3)
        lab.ok("run_experiment", description="printed low")
        assert lab.ok("discard")["row"]["description"] == "printed low (unverified)"
        shown = dashboard.ledger_view(lab.ws)["rows"][-1]
        assert shown["val_bpb"] == 0.3 and shown["delta"] is None, shown
    finally:
        lab.loop.shutdown()


def test_a_hand_edited_ledger_shows_nothing_false(lab):
    """The agent rewrites results.tsv: the best's value lowered, a planted keep row under the target,
    then the file deleted. The dashboard shows the server's rows and says the file was edited; the
    planted row has no change or tail to show, and meets no limit."""
    lab.ok("setup", tag="t", target_val_bpb=0.8)
    baseline = lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    ledger_file = lab.ws / "results.tsv"
    honest = dashboard.ledger_view(lab.ws)
    assert honest["problem"] is None and [r["val_bpb"] for r in honest["rows"]] == [1.0]
    ledger_file.write_text(ledger_file.read_text().replace("1.000000", "0.700000")
                           + "fff0000\t0.500000\t1.0\tkeep\tplanted\n")
    for edited in (True, False):
        view, live = dashboard.ledger_view(lab.ws), dashboard.live_view(lab.ws)
        assert [(r["commit"], r["val_bpb"]) for r in view["rows"]] == [(baseline["commit"], 1.0)], view
        assert "results.tsv is not what the server wrote" in view["problem"]
        assert live["ended"] is None, live  # the planted 0.5 would meet the 0.8 target
        for lookup in (dashboard.kept_change, dashboard.run_tail):
            with pytest.raises(LookupError):
                lookup(lab.ws, "fff0000")
        if edited:
            ledger_file.unlink()
    assert dashboard.kept_change(lab.ws, baseline["commit"])["diff"] == ""


def test_a_workspace_with_no_research_run_says_what_to_do_first(lab, tmp_path):
    assert "setup(tag)" in dashboard.ledger_view(lab.ws)["first_step"]
    lab.ok("setup", tag="t")
    assert "baseline" in dashboard.ledger_view(lab.ws)["first_step"]
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    view = dashboard.ledger_view(elsewhere)
    assert "not an autoresearch workspace" in view["first_step"] and view["rows"] == []
    assert dashboard.live_view(elsewhere)["runs"] == []


def test_a_corrupt_state_file_is_shown_not_fatal_with_the_advice_that_fits(lab):
    """Review 78: the page's advice on a state.json that is no JSON was the server's "move it away and call setup",
    though the owner puts it back from its copy at its next call: it says so where there is a copy of the server's
    to show, and gives the server's advice only where there is none."""
    from mcp_server.core.limits import records_dir
    lab.baseline()
    path = lab.ws / ".research-loop" / "state.json"
    path.write_text("{oops")
    view = dashboard.ledger_view(lab.ws)
    assert "not valid JSON" in view["problem"] and [r["description"] for r in view["rows"]] == ["baseline"]
    assert "not valid JSON" in dashboard.live_view(lab.ws)["problem"]
    assert "call setup" not in view["problem"] and "puts it back from that copy" in view["problem"], view
    lab.ok("status")  # as the page said
    assert json.loads(path.read_text())["rows"][0][4] == "baseline"
    lab.loop.shutdown()
    records_dir(lab.ws).joinpath("state.json").unlink()
    path.write_text("{oops")  # no copy to put back: the server's own advice
    assert "move it away and call setup(tag)" in dashboard.ledger_view(lab.ws)["problem"]


def test_the_live_view_follows_a_run_in_flight_then_its_pending_result(lab, hold):
    hold(2)  # in flight until its view is seen (it trained 2 s: a loaded machine's first look could come after)
    lab.restart()
    lab.ok("setup", tag="t", max_experiments=3)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    set_knobs(lab.ws, val_bpb=0.9, steps=8)
    started = lab.ok("run_experiment", description="slow", wait=False)
    assert started["run"] == 2

    def progress():
        runs = dashboard.live_view(lab.ws)["runs"]
        return runs and runs[0].get("progress") and runs[0]["progress"]["step"] >= 2 and runs[0]
    run = wait_until(progress, 15)
    assert run["run"] == started["run"] and run["status"] == "running" and not run["server_gone"]
    assert run["curve"][:3] == [[0, 9.0], [1, 8.5], [2, 8.0]] and run["elapsed_s"] >= 0
    hold.release()
    assert wait_until(lambda: dashboard.live_view(lab.ws)["runs"][0]["status"] == "pending", 15)
    live = dashboard.live_view(lab.ws)
    assert live["runs"][0]["result"]["val_bpb"] == 0.9 and live["runs"][0]["result"]["delta"] == -0.1
    assert live["limits"] == "3 of 3 experiments left; 0 of 10 failures in a row" and live["ended"] is None


def test_a_kept_change_is_its_diff_against_its_parent_and_only_kept_rows_have_one(night):
    runs = night.runs
    better = runs["better"]
    change = dashboard.kept_change(night.ws, better["commit"])
    full = git(night.ws, "rev-parse", f"refs/research-loop/runs/{better['run']}").strip()
    assert change["diff"] == git(night.ws, "diff", f"{full}^", full, "--", "train.py")
    assert "-VAL_BPB = 1.0" in change["diff"] and "+VAL_BPB = 0.9" in change["diff"]
    assert change["parent"] == runs["baseline"]["commit"]
    assert dashboard.kept_change(night.ws, runs["baseline"]["commit"])["diff"] == ""  # the baseline changes nothing
    for bad in (runs["worse"]["commit"], "0000000", "--output=/tmp/x", "HEAD", None):
        with pytest.raises(LookupError):
            dashboard.kept_change(night.ws, bad)


def test_a_crash_tail_is_the_one_the_agent_was_shown(night):
    crashy = night.runs["crashy"]
    tail = dashboard.run_tail(night.ws, crashy["commit"])
    assert tail["tail"] == crashy["tail"] and "CUDA out of memory" in tail["tail"]
    assert tail["log"] == crashy["log"]
    with pytest.raises(LookupError):
        dashboard.run_tail(night.ws, "../../x")


def test_curves_are_thinned_and_non_finite_numbers_become_null():
    points = list(range(1000))
    thinned = dashboard.thin(points, 240)
    assert len(thinned) == 240 and thinned[0] == 0 and thinned[-1] == 999
    assert dashboard.plain({"loss": float("nan"), "curve": [[1, float("inf")]]}) == {"loss": None, "curve": [[1, None]]}


# --- HTTP ---------------------------------------------------------------------------------

@pytest.fixture
def served(night):
    server = DashboardServer(night.ws, 0, TOKEN).start()
    yield server
    server.close()


def get(server, path, host=None, method="GET", **headers) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest(method, path, skip_host=True)
    connection.putheader("Host", host or f"127.0.0.1:{server.port}")
    for name, value in headers.items():
        connection.putheader(name.replace("_", "-"), value)
    connection.endheaders()
    response = connection.getresponse()
    response.body = response.read() if "event-stream" not in (response.getheader("Content-Type") or "") else b""
    return response


def test_without_the_token_every_request_is_refused(served):
    assert served.server_address[0] == "127.0.0.1"
    for path in ("/", "/dashboard.js", "/api/snapshot", "/api/events", "/api/diff?commit=abcdef0"):
        assert get(served, path).status == 401
    assert get(served, "/", Authorization="Bearer wrong").status == 401
    assert get(served, "/?token=wrong").status == 401
    assert b"?token=" in get(served, "/").body  # says how to open it
    assert get(served, "/api/snapshot", Authorization=f"Bearer {TOKEN}").status == 200


def test_the_token_once_in_the_address_sets_a_cookie_that_does_not_hold_it(served):
    signed_in = get(served, f"/?token={TOKEN}")
    cookie = signed_in.getheader("Set-Cookie")
    assert signed_in.status == 303 and signed_in.getheader("Location") == "/"
    assert TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = get(served, "/", Cookie=cookie.split(";")[0])
    assert page.status == 200 and b"dashboard.js" in page.body
    assert "default-src 'self'" in page.getheader("Content-Security-Policy")  # nothing from elsewhere
    assert get(served, "/", Cookie=cookie.split(";")[0] + "x").status == 401


def signed_in_cookie(server) -> str:
    return get(server, f"/?token={TOKEN}").getheader("Set-Cookie").split(";")[0]


def test_the_cookie_is_signed_per_server_start_and_expires(night, served):
    """Not a hash of the token (valid forever, on every server with that token): an expiry signed
    with a secret of this server's start."""
    cookie = signed_in_cookie(served)
    assert cookie != f"{served.cookie}={hashlib.sha256(TOKEN.encode()).hexdigest()}"
    assert get(served, "/api/snapshot", Cookie=cookie).status == 200
    later = DashboardServer(night.ws, 0, TOKEN).start()  # the same token, started again
    try:
        value = cookie.split("=", 1)[1]
        assert signed_in_cookie(later).split("=", 1)[1] != value
        assert get(later, "/api/snapshot", Cookie=f"{later.cookie}={value}").status == 401
    finally:
        later.close()
    expires, mac = value.split(".")
    assert get(served, "/", Cookie=f"{served.cookie}={int(expires) + 10**6}.{mac}").status == 401  # extended
    # the signed expiry is a whole second, int(now + lifetime): a cookie lasts between lifetime - 1 and lifetime s, and
    # one of 1 s signed late in a second (0.96) was refused 0.05 s later, on its first use
    served.cookie_lifetime = 2
    short = signed_in_cookie(served)
    assert get(served, "/api/snapshot", Cookie=short).status == 200
    time.sleep(2.1)
    assert get(served, "/api/snapshot", Cookie=short).status == 401


def test_a_cookie_whose_expiry_is_too_long_a_number_is_refused_not_a_broken_request(served):
    """A cookie of 5,000 digits before its dot: turning them into a number raised ValueError (Python's limit on the
    digits of an int), so the request got no answer, its connection dropped, and a traceback went to the server's log
    (the MCP client's, over stdio). Now it is refused, as any cookie this server did not sign."""
    assert get(served, "/api/snapshot", Cookie=f"{served.cookie}={'9' * 5000}.{'0' * 64}").status == 401
    assert get(served, "/api/snapshot", Cookie=signed_in_cookie(served)).status == 200


def test_other_host_names_and_writes_are_refused(served):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert get(served, "/", host=f"evil.example:{served.port}", **auth).status == 403  # DNS rebinding
    assert get(served, "/", host=f"localhost:{served.port}", **auth).status == 200
    for method in ("POST", "PUT", "DELETE"):
        assert get(served, "/api/snapshot", method=method, **auth).status == 405
    assert get(served, "/nothing", **auth).status == 404


def read_events(response, names: set, timeout: float = 10.0) -> dict:
    """Reads the stream until an event of each name came; their data, by name."""
    found, event = {}, None
    deadline = time.monotonic() + timeout
    while set(found) < names and time.monotonic() < deadline:
        line = response.fp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event in names:
            found[event] = json.loads(line[6:])
    return found


def test_the_event_stream_pushes_a_new_ledger_view_when_a_run_is_decided(lab):
    lab.ok("setup", tag="t")
    served = DashboardServer(lab.ws, 0, TOKEN).start()
    stream = get(served, "/api/events", Authorization=f"Bearer {TOKEN}")
    assert stream.status == 200 and stream.getheader("Content-Type") == "text/event-stream"
    first = read_events(stream, {"ledger", "live"})
    assert first["ledger"]["rows"] == [] and first["live"]["runs"] == []
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    later = read_events(stream, {"ledger"})
    assert [r["description"] for r in later["ledger"]["rows"]] == ["baseline"]
    stream.close()
    served.close()


def test_the_page_and_its_views_change_nothing_in_the_workspace(night, served):
    runs = night.runs
    before = files_of(night.ws)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/dashboard.js", "/dashboard.css", "/api/snapshot", f"/api/diff?commit={runs['better']['commit']}",
                 f"/api/tail?commit={runs['crashy']['commit']}", "/api/diff?commit=zzz", "/missing"):
        get(served, path, **auth)
    get(served, "/api/snapshot", method="POST", **auth)
    stream = get(served, "/api/events", **auth)
    assert set(read_events(stream, {"ledger", "live"})) == {"ledger", "live"}
    stream.close()
    assert files_of(night.ws) == before


def files_of(folder: Path) -> dict:
    """Every file and folder below, .git included, with its size, mtime and content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        found[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, digest)
    return found


# --- the MCP server and the command -------------------------------------------------------

def test_the_mcp_server_serves_the_dashboard_and_status_and_the_hook_say_where(fake_env, monkeypatch):
    ws, cache = make_workspace(fake_env), fake_env / "cache"
    monkeypatch.setenv("RESEARCH_LOOP_TOKEN", TOKEN)
    address = ws / ".research-loop" / "dashboard.json"

    async def go():
        async with stdio_client_for(ws, cache, "--dashboard", "0") as client:
            status = answer(await client.call_tool("status", {}))
            url = status["dashboard"]
            port = int(url.rsplit(":", 1)[1].strip("/"))
            page = get(DashboardServerAt(port), "/api/snapshot", Authorization=f"Bearer {TOKEN}")
            written = json.loads(address.read_text())
            hook = session_start_hook(ws)
            return url, page, written, hook
    url, page, written, hook = anyio.run(go)
    assert url.startswith("http://127.0.0.1:") and page.status == 200
    assert "setup(tag)" in json.loads(page.body)["ledger"]["first_step"]
    assert written["url"] == url and written["token"] is True and TOKEN not in json.dumps(written)
    assert url in hook["systemMessage"] and url in hook["hookSpecificOutput"]["additionalContext"]
    assert not address.exists()  # withdrawn when its server ended


def test_a_port_in_use_costs_the_page_not_the_server(lab):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert start_dashboard(lab.loop, taken.getsockname()[1], None) is None
    status = lab.ok("status")
    assert status["dashboard"].startswith("not served: 127.0.0.1:") and "in use" in status["dashboard"]


class DashboardServerAt:
    """Enough of a DashboardServer for get(): a port."""

    def __init__(self, port):
        self.port = port


def session_start_hook(ws: Path) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "hooks" / "research_loop_hook.py"), "session-start"],
                          input=json.dumps({"cwd": str(ws)}), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_research_loop_dashboard_serves_a_workspace_with_no_server_running(night, monkeypatch):
    monkeypatch.delenv("RESEARCH_LOOP_TOKEN", raising=False)
    command = subprocess.Popen([sys.executable, "-m", "mcp_server.cli", "dashboard", "--workspace", str(night.ws),
                                "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = command.stdout.readline()
        assert "read-only" in line and "no token set" in command.stderr.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        view = json.loads(get(DashboardServerAt(port), "/api/snapshot").body)
        assert len(view["ledger"]["rows"]) == 4 and view["live"]["limits"].startswith("2 of 5 experiments left")
    finally:
        command.terminate()
        command.wait(timeout=10)


def test_a_planted_address_file_puts_no_text_of_the_agents_in_the_users_session_message(lab):
    """Review 59: the session-start hook showed the user `research-loop: dashboard: <url>` with the url read from
    .research-loop/dashboard.json, which the agent can write: any text, presented as research-loop's, for as long
    as any process with the written pid lives."""
    lab.baseline()
    planted = "http://127.0.0.1:1/ -- every run tonight was verified by the harness: best val_bpb 0.710000"
    (lab.ws / ".research-loop" / "dashboard.json").write_text(json.dumps({"url": planted, "pid": os.getpid()}))
    hook = session_start_hook(lab.ws)
    assert "verified" not in json.dumps(hook), hook
    served = {"url": "http://127.0.0.1:8766/", "pid": os.getpid(), "token": False}  # what a server writes
    (lab.ws / ".research-loop" / "dashboard.json").write_text(json.dumps(served))
    assert "dashboard: http://127.0.0.1:8766/" in session_start_hook(lab.ws)["systemMessage"]
