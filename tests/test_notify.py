"""--notify: pings to a real webhook on 127.0.0.1 from the real MCP server (in process and over
stdio) on a keep, failures in a row and the end of the research run; and a webhook that fails,
hangs or refuses connections, which must cost the loop nothing."""
import json
import socket
import subprocess
import sys

import anyio
import pytest

from mcp_server.core import notify
from server_support import (REPO, Webhook, answer, git, ledger_lines, make_workspace, set_knobs, stdio_client_for,
                            wait_until)

FAST_RETRIES = (0.1, 0.2)  # two retries, soon: the tests wait for them


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def a_night_with_failures(lab) -> None:
    """A baseline kept, three crashes in a row, then a better run kept, which is the 4th and last experiment."""
    lab.ok("setup", tag="t", max_experiments=4)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    for k in range(3):
        set_knobs(lab.ws, crash=1)
        lab.ok("run_experiment", description=f"broken {k}", rerun=True)  # the same broken code again
        lab.ok("discard")
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description="better")
    lab.ok("keep", unconfirmed=True)


def test_a_keep_failures_in_a_row_and_the_end_are_pinged_once_each(lab, webhook):
    lab.loop.notifier = notify.Notifier(webhook.url)
    a_night_with_failures(lab)
    assert wait_until(lambda: len(webhook.posts) >= 4, 15), webhook.messages()
    lab.ok("status")  # asking again announces nothing new
    lab.loop.notifier.close()
    kept, failed, better, ended = webhook.messages()
    assert kept.startswith("kept ") and "val_bpb 1.000000" in kept and "baseline" in kept
    assert failed.startswith("3 runs in a row failed") and "broken 2" in failed and "crash" in failed
    assert "val_bpb 0.900000" in better and "better" in better
    assert ended == "the research run autoresearch/t has ended: 4 experiments done; best val_bpb 0.900000 [ws]"
    assert all(post["type"] == "application/json" for post in webhook.posts)


def test_the_stop_tool_is_pinged_in_plain_text_for_ntfy(lab, webhook):
    lab.loop.notifier = notify.Notifier(webhook.url, "text")
    lab.baseline()
    lab.ok("stop", reason="enough for tonight")
    assert wait_until(lambda: len(webhook.posts) == 2, 15)
    lab.loop.notifier.close()
    assert [p["type"] for p in webhook.posts] == ["text/plain; charset=utf-8"] * 2
    assert webhook.posts[1]["body"].decode() == ("the research run autoresearch/t has ended: stopped: enough for "
                                                 "tonight; best val_bpb 1.000000 [ws]")
    # auto: plain text for ntfy's hosts, JSON for the rest
    assert notify.request_for("https://ntfy.sh/night", "auto", "x").data == b"x"
    assert json.loads(notify.request_for("https://hooks.slack.com/services/x", "auto", "x").data) == \
        {"text": "x", "content": "x", "allowed_mentions": {"parse": []}}


def refused_url() -> str:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


@pytest.mark.parametrize("mode", ["500", "hang", "refused"])
def test_a_failing_webhook_costs_the_loop_nothing(lab, mode, capfd):
    """The same night as above with a webhook that answers 500, never answers, or is not there: every
    tool call answers as usual (while the hanging one still holds the first ping), the ledger is
    whole, and the failure is logged; a webhook that comes back gets every ping."""
    hook = Webhook("hang" if mode == "hang" else "500")
    url = refused_url() if mode == "refused" else hook.url
    lab.loop.notifier = notify.Notifier(url, retry_delays_s=FAST_RETRIES, timeout_s=60)
    try:
        a_night_with_failures(lab)
        assert [line.split("\t")[3] for line in ledger_lines(lab.ws)[1:]] == ["keep"] + ["crash"] * 3 + ["keep"]
        assert lab.ok("status")["ended"] == "4 experiments done"
        if mode == "hang":
            assert len(hook.posts) == 1  # the loop went on while the first ping is still held
            hook.release()
            assert wait_until(lambda: len(hook.posts) == 4, 15)  # nothing lost
            assert "has ended: 4 experiments done" in hook.messages()[-1]
        else:
            seen = []

            def all_given_up():
                seen.append(capfd.readouterr().err)
                return "".join(seen).count("failed 3 times") >= 4
            assert wait_until(all_given_up, 30), "".join(seen)
            log = "".join(seen)
            assert log.count("failed 3 times") == 4 and "retrying in 0.1 s" in log, log
            assert ("HTTP 500" if mode == "500" else "Connection refused") in log
            if mode == "500":
                assert len(hook.posts) == 3 * 4  # each ping tried three times
    finally:
        hook.close()


def test_a_full_queue_drops_the_oldest_and_never_blocks(webhook, capfd):
    """A webhook down all night: sending never waits, the queue stays bounded, the newest pings survive."""
    webhook.mode = "hang"
    notifier = notify.Notifier(webhook.url, timeout_s=60)
    notifier.send("first")
    assert wait_until(lambda: len(webhook.posts) == 1)  # held by the webhook
    for k in range(notify.QUEUE_SIZE + 5):
        notifier.send(f"message {k}")
    assert len(webhook.posts) == 1 and notifier.queue.qsize() == notify.QUEUE_SIZE
    assert capfd.readouterr().err.count("queue full, dropped") == 5
    webhook.release()
    assert wait_until(lambda: len(webhook.posts) == 1 + notify.QUEUE_SIZE, 30)
    assert webhook.messages()[1] == "message 5" and webhook.messages()[-1] == f"message {notify.QUEUE_SIZE + 4}"


def test_the_servers_notify_option_pings_over_stdio(fake_env, webhook):
    ws = make_workspace(fake_env)

    async def night():
        async with stdio_client_for(ws, fake_env / "cache", "--notify", webhook.url) as client:
            answer(await client.call_tool("setup", {"tag": "stdio"}))
            answer(await client.call_tool("run_experiment", {"description": "baseline"}))
            answer(await client.call_tool("keep", {}))
            return answer(await client.call_tool("stop", {"reason": "done"}))
    anyio.run(night)
    assert wait_until(lambda: len(webhook.posts) == 2, 15)
    kept, ended = webhook.messages()
    assert "baseline" in kept and ended.startswith("the research run autoresearch/stdio has ended: stopped: done")


@pytest.mark.parametrize("flags, said", [
    (["--notify", "ftp://example.org/x"], "--notify needs an http:// or https:// webhook URL"),
    (["--notify", "hooks.slack.com/x"], "--notify needs an http:// or https:// webhook URL"),
    (["--notify", "http://127.0.0.1:9/x", "--notify-format", "xml"], "invalid choice: 'xml'"),
])
def test_a_bad_notify_option_is_refused_before_the_server_starts(flags, said):
    done = subprocess.run([sys.executable, "-m", "mcp_server", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and said in done.stderr, done.stderr


def test_the_end_ping_names_the_best_the_branch_holds_and_whose_number_it_is(lab, webhook):
    """Review 59: review 53 mended the report, hook and dashboard, not the end's ping, which took the lowest
    keep row ever: 0.9 after a worse result was kept (the branch holds 0.95), then the agent's own 0.05 logged
    by hand with log_result, unmarked, as the night's best on the researcher's phone."""
    lab.loop.notifier = notify.Notifier(webhook.url)
    lab.ok("setup", tag="t")
    for val in (1.0, 0.9, 0.95):  # baseline, a gain, a worse one kept on request
        set_knobs(lab.ws, val_bpb=val)
        lab.ok("run_experiment", description=f"at {val}")
        lab.ok("keep", unconfirmed=True)
    lab.ok("stop", reason="done")
    assert wait_until(lambda: len(webhook.posts) == 4, 15), webhook.messages()
    assert webhook.messages()[-1] == "the research run autoresearch/t has ended: stopped: done; best val_bpb 0.950000 [ws]"

    set_knobs(lab.ws, val_bpb=0.97)
    git(lab.ws, "commit", "-qam", "tuned by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=0.05, memory_gb=1.0, status="keep", description="by hand")
    restarted = notify.Notifier(webhook.url)  # a new server pings the end once more
    restarted.check(lab.loop)
    assert wait_until(lambda: len(webhook.posts) == 5, 15), webhook.messages()
    restarted.close()
    lab.loop.notifier.close()
    assert webhook.messages()[-1] == ("the research run autoresearch/t has ended: stopped: done; best val_bpb 0.050000 "
                                      "(the agent's, logged by hand, not measured by the harness) [ws]")


def test_a_description_with_each_services_markup_pings_as_written_text(lab, webhook):
    """Review 59: a description went into the ping as it was, where Slack reads `<!channel>` and `<url|text>`
    and Discord `@everyone` and `[text](url)`: the agent's mention and a link text of its choosing, in a message
    from research-loop."""
    lab.loop.notifier = notify.Notifier(webhook.url)
    lab.ok("setup", tag="t")
    described = "baseline <!channel> <https://evil.example|the harness verified this> [logs](https://evil.example) @everyone"
    lab.ok("run_experiment", description=described)
    lab.ok("keep")
    assert wait_until(lambda: len(webhook.posts) >= 1, 15)
    lab.loop.notifier.close()
    body = json.loads(webhook.posts[0]["body"])
    assert "<" not in body["text"] and "&lt;!channel&gt; &lt;https://evil.example|the harness" in body["text"]
    assert "\\[logs\\]\\(https://evil.example\\)" in body["content"] and "\\<!channel\\>" in body["content"]
    assert body["allowed_mentions"] == {"parse": []}  # Discord: @everyone is text, not a ping
    assert described in webhook.messages()[0]  # what each service shows is the description as written
