"""A train.py that does not train on the data order the harness gives it (one that drops
AUTORESEARCH_DATA_ORDER before nanochat/dataloader.py reads it, found by review 49): on the flops
clock its reruns repeat one number, so measure_noise would store a threshold of 0 and a confirmation
would pass on one lucky number. The fake trainer with ORDER_EFFECT 0 plays it (its value ignores
the order); with an ORDER_EFFECT it trains on the order, as the harness's dataloader does. Each test
drives the server through a real MCP client over stdio."""
import anyio
import pytest

from server_support import answer, error, ledger_lines, make_cache, make_workspace, set_knobs, stdio_client_for


@pytest.fixture
def flops(fake_env, monkeypatch):
    """A workspace on the CPU profile's flops clock (local slots: reruns get their data orders)."""
    monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "flops")
    monkeypatch.setenv("FAKE_FLOPS_CLOCK", "1")

    def workspace(order_effect: float):
        """The baseline's train.py: VAL_BPB 1.0, moved by order_effect per data order (0: ignores it)."""
        return make_workspace(fake_env, f"VAL_BPB = 1.0\nORDER_EFFECT = {order_effect}\n"), make_cache(fake_env)
    return workspace


def play(ws, cache, steps):
    """Calls each (tool, args, knobs) in turn on one stdio server, the knobs written to train.py
    first (None: train.py as it is); returns the raw results."""
    async def go():
        results = []
        async with stdio_client_for(ws, cache) as client:
            for name, args, knobs in steps:
                if knobs is not None:
                    set_knobs(ws, **knobs)
                results.append(await client.call_tool(name, args))
        return results
    return anyio.run(go)


BASELINE = [("setup", {"tag": "order"}, None), ("run_experiment", {"description": "baseline"}, None),
            ("keep", {}, None)]


def test_noise_repeats_that_ignore_their_data_order_store_no_noise(flops):
    ws, cache = flops(0)  # trains on the usual data whatever order it is given
    *_, refused, status = play(ws, cache, BASELINE + [("measure_noise", {"repeats": 2}, None), ("status", {}, None)])
    message = error(refused)
    assert "does not train on the data order" in message and "AUTORESEARCH_DATA_ORDER" in message
    assert "nanochat/dataloader" in message and "restore train.py's data loading" in message
    assert "1.000000 on order 0, 1.000000 on order 1, 1.000000 on order 2" in message
    assert "No noise estimate was stored" in message
    status = answer(status)
    assert status.get("noise") is None and status["extra_runs"] == 2  # the repeats are counted...
    rows = ledger_lines(ws)  # ...and recorded
    assert [r.split("\t")[3] for r in rows[1:]] == ["keep", "discard", "discard"]
    assert "noise repeat 2/2" in rows[3] and "data order 2" in rows[3]


def test_noise_repeats_on_their_data_orders_give_a_threshold(flops):
    ws, cache = flops(0.003)  # another stretch of data, another number
    noise = answer(play(ws, cache, BASELINE + [("measure_noise", {"repeats": 2}, None)])[-1])["noise"]
    assert noise["values"] == [1.0, 1.003, 1.006] and noise["threshold"] == 0.006


def test_a_candidate_that_ignores_its_data_order_is_not_confirmed_by_its_one_lucky_number(flops):
    """The best trains on its orders (noise measured); the candidate's 0.99 was luck it repeats on
    every order: beside the best's rerun on order 1 (1.003) it would win every pair."""
    ws, cache = flops(0.003)
    *_, confirmation, keep, forced = play(ws, cache, BASELINE + [
        ("measure_noise", {"repeats": 2}, None),  # threshold 0.006: a gain of 0.01 needs confirming
        ("run_experiment", {"description": "lucky once"}, {"VAL_BPB": 0.99, "ORDER_EFFECT": 0}),
        ("confirm", {}, None), ("keep", {}, None), ("keep", {"unconfirmed": True}, None)])
    confirmation = answer(confirmation)
    assert not confirmation["confirmed"] and confirmation["paired_deltas"] == [-0.013]
    assert confirmation["next"].startswith("Run 4's train.py does not train on the data order")
    assert "0.990000 on order 0, 0.990000 on order 1" in confirmation["next"]
    assert confirmation["next"].endswith("The gain is not confirmed: discard(run=4)")
    assert "AUTORESEARCH_DATA_ORDER" in error(keep) and "discard(run=4)" in error(keep)
    # kept against that evidence, the record (and the morning report, which prints it) says why
    assert answer(forced)["evidence"] == ("kept unconfirmed on request, though its confirmation failed (-0.013000; "
                                          "Run 4's train.py does not train on the data order the harness gives it)")


def test_a_control_that_ignores_its_data_order_fails_the_confirmation(flops):
    """No noise measured; a gain at another speed needs confirming, and the best's reruns repeat its number."""
    ws, cache = flops(0)
    *_, confirmation = play(ws, cache, BASELINE + [
        ("run_experiment", {"description": "half the speed"}, {"VAL_BPB": 0.9, "MFU": 20.0, "ORDER_EFFECT": 0.003}),
        ("confirm", {}, None)])
    confirmation = answer(confirmation)
    assert not confirmation["confirmed"] and confirmation["paired_deltas"] == [-0.097]
    assert confirmation["next"].startswith("The best's train.py does not train on the data order")


def test_an_honest_candidate_is_confirmed_on_its_data_orders(flops):
    ws, cache = flops(0.003)
    *_, confirmation = play(ws, cache, BASELINE + [
        ("measure_noise", {"repeats": 2}, None),
        ("run_experiment", {"description": "a real gain"}, {"VAL_BPB": 0.99, "ORDER_EFFECT": 0.003}),
        ("confirm", {}, None)])
    confirmation = answer(confirmation)
    assert confirmation["confirmed"] and confirmation["paired_deltas"] == [-0.01]



def test_a_train_py_that_names_no_flops_clock_is_still_checked_on_the_harnesss(flops, monkeypatch):
    """Review 52: a run was judged by the clock its summary named, so a train.py on the flops clock that
    printed no `budget_clock: flops` (or `wall`) had its reruns filed where the data-order check never
    looked: measure_noise stored a threshold of 0 from three equal values."""
    monkeypatch.delenv("FAKE_FLOPS_CLOCK")  # the fake then names no clock
    ws, cache = flops(0)
    *_, refused = play(ws, cache, BASELINE + [("measure_noise", {"repeats": 2}, None)])
    assert "does not train on the data order" in error(refused)


def test_on_the_wall_clock_a_train_py_that_repeats_its_number_stores_no_noise_either(fake_env):
    """Stop 48: the check above looked at the flops clock's values only, and on the wall clock a train.py that trains a
    fixed number of steps and ignores its data order repeats its number as well (the fake plays it): measure_noise
    stored a threshold of 0, and every later gain, however small (an edit's fresh luck), was "beyond noise", kept
    unconfirmed. Its values on other data orders are checked there too."""
    ws, cache = make_workspace(fake_env, "VAL_BPB = 1.0\n"), make_cache(fake_env)
    *_, refused, gain = play(ws, cache, BASELINE + [("measure_noise", {"repeats": 2}, None),
                                                    ("run_experiment", {"description": "a sliver"}, {"VAL_BPB": 0.99999})])
    message = error(refused)
    assert "does not train on the data order" in message and "No noise estimate was stored" in message, message
    assert "1.000000 on order 0, 1.000000 on order 1, 1.000000 on order 2" in message
    assert "beyond noise" not in answer(gain)["noise"], answer(gain)


def test_a_data_order_in_the_servers_environment_reaches_no_run(fake_env, monkeypatch):
    """Review 80: the worker set AUTORESEARCH_DATA_ORDER for a rerun on another order, and left it as the server's
    environment had it for every other run. A server started with AUTORESEARCH_DATA_ORDER=1 (a later session's server,
    whose environment the agent's project settings can give) trained the baseline on order 1, recorded as the usual
    order, so the noise repeat on order 1 counted that one stretch of data twice: a smaller noise estimate, and with
    one repeat "does not train on the data order" of a train.py that does. Every run but a rerun is on the usual order."""
    from server_support import Lab
    monkeypatch.setenv("AUTORESEARCH_DATA_ORDER", "1")
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nORDER_EFFECT = 0.01\n"))
    try:
        lab.ok("setup", tag="t")
        baseline = lab.ok("run_experiment", description="baseline")
        assert baseline["val_bpb"] == 1.0, baseline  # the usual order's, 1.01 on order 1
        lab.ok("keep")
        assert lab.ok("measure_noise", repeats=2)["noise"]["values"] == [1.0, 1.01, 1.02]
    finally:
        lab.loop.shutdown()
