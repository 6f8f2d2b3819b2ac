"""Review 66: the data orders every confirmation is held to, and the pairs it must not forget, attacked by an agent
that wants a lucky idea kept as confirmed. The fake's ORDER_LUCK is the luck of one code on one data order, which a
rerun repeats on the flops clock."""
import os
from pathlib import Path

from server_support import Lab, answer, git, make_workspace, text

BEST = "VAL_BPB = 1.0\nORDER_EFFECT = 0.0001\nORDER_LUCK = 0.002\n"  # 0.998 on the usual order
IDEA = "VAL_BPB = 0.999\nORDER_EFFECT = 0.0001\nORDER_LUCK = 0.002\n"  # 0.997: wins on data orders 1 and 2, loses on 3


def flops_lab(fake_env, monkeypatch) -> Lab:
    monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "flops")
    monkeypatch.setenv("FAKE_FLOPS_CLOCK", "1")
    return Lab(make_workspace(fake_env, BEST))


def lose_on_order_3(lab):
    """The baseline (run 1), then the idea (run 2), confirmed on data orders 1 to 3: it loses order 3; discarded."""
    lab.baseline()
    (lab.ws / "train.py").write_text(IDEA)
    answer(lab.call("run_experiment", description="an idea"))
    lost = answer(lab.call("confirm", pairs=3))
    assert [d > 0 for d in lost["paired_deltas"]] == [False, False, True], lost
    answer(lab.call("discard"))


def the_same_idea_is_not_confirmed_again(lab):
    """In a new research run: its baseline kept, the idea that lost order 3 run again and confirmed with pairs=1
    (data order 1 alone without the carried measurements, where it wins) is refused as having lost before."""
    answer(lab.call("run_experiment", description="baseline"))
    answer(lab.call("keep"))
    (lab.ws / "train.py").write_text(IDEA)
    answer(lab.call("run_experiment", description="the same idea", rerun=True))
    again = answer(lab.call("confirm", pairs=1))
    assert not again["confirmed"], again
    assert "did not hold in an earlier confirmation (it lost by +0.001000)" in again["next"], again


def test_a_new_setup_on_the_same_harness_forgets_no_lost_pair_and_no_held_order(fake_env, monkeypatch):
    """The idea lost its pair on data order 3; the agent discarded it, set up a new tag from the best (allowed at any
    time on the same harness) and ran the same train.py again: the state began afresh, lost pairs, held orders and
    the data order counter with it, so confirm(pairs=1) drew order 1, where the idea wins, and it was kept as
    confirmed. A setup on the same harness now carries the measurements, the held orders and the counter."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        lose_on_order_3(lab)

        answer(lab.call("setup", tag="again"))  # from the best: the branch's tip
        the_same_idea_is_not_confirmed_again(lab)
        (lab.ws / "train.py").write_text(IDEA + "# the same idea, reworded\n")  # new code: the held orders meet it
        answer(lab.call("discard"))
        answer(lab.call("run_experiment", description="the same idea, reworded"))
        reworded = answer(lab.call("confirm", pairs=1))
        assert not reworded["confirmed"] and reworded["paired_deltas"][2] > 0, reworded
        assert reworded["held_to"].startswith("data order(s) 1, 2, 3, 4: every data order a confirmation of this")
    finally:
        lab.loop.shutdown()


WALL_IDEA = "VAL_BPB = 0.9995\nNOISE = 0.001\n"


def lose_on_order_1_and_rerun_its_control_unluckily(lab, run):
    """Wall clock (every rerun its own luck; the fake's NOISE by run number): the idea (run 3) loses its pair on data
    order 1 (+0.0005: the best 1.0, run 4; the idea 1.0005, run 5), then another idea's confirmation reruns the best
    there unluckily (1.001, run 8). `run(source, description, **args)` runs a train.py."""
    lab.baseline()  # run 1: 1.0
    filler = "VAL_BPB = 1.1\nNOISE = 0.001\n"  # a run to discard: the agent times its runs by their numbers
    run(filler, "filler")  # run 2
    answer(lab.call("discard"))
    assert run(WALL_IDEA, "an idea")["delta"] == -0.0015  # run 3
    lost = answer(lab.call("confirm", pairs=1))  # order 1: the best 1.0 (run 4), the idea 1.0005 (run 5)
    assert lost["paired_deltas"] == [0.0005] and not lost["confirmed"], lost
    answer(lab.call("discard"))
    run(filler + "# again\n", "filler again")  # run 6
    answer(lab.call("discard"))
    run("VAL_BPB = 0.9\nNOISE = 0.001\n", "another idea")  # run 7
    assert answer(lab.call("confirm", pairs=1))["control_val_bpb"] == [1.001]  # order 1 held: run 8, 1.001
    answer(lab.call("discard"))


def runner(lab):
    def run(source, description, **args):
        (lab.ws / "train.py").write_text(source)
        return answer(lab.call("run_experiment", description=description, **args))
    return run


def test_on_the_wall_clock_a_lost_pair_is_not_rewritten_by_later_controls(fake_env):
    """Lost pairs were read from the values filed per code and order, and each later confirmation of another idea
    reran the best on that held order and filed its new value in place of the old: once a control came out unlucky
    (1.001), the idea's lost pair read as won, was skipped as judged, and the same train.py sent again was confirmed
    on one fresh order. Where reruns do not repeat, the pairs are those a confirmation measured side by side,
    recorded as judged."""
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nNOISE = 0.001\n"))  # run k: VAL_BPB + 0.001 (k % 3 - 1)
    try:
        lose_on_order_1_and_rerun_its_control_unluckily(lab, run := runner(lab))
        run(WALL_IDEA, "the idea again", rerun=True)  # run 10
        again = answer(lab.call("confirm", pairs=1))  # a fresh order 2: 1.001 (run 11) against 0.9985 (run 12)
        assert not again["confirmed"] and "did not hold in an earlier confirmation" in again["next"], again
    finally:
        lab.loop.shutdown()


def test_a_lost_pair_on_the_wall_clock_stays_lost_on_a_server_started_on_the_flops_clock(fake_env, monkeypatch):
    """Review 69: the same, then the agent started the server again on the flops clock (AUTORESEARCH_BUDGET_CLOCK):
    the queued and later runs trained on the flops clock, and pairs were read again from the values filed per code
    and order, the wall clock's among them and over the recorded ones, so the best's unlucky 1.001 made the lost pair
    won and the same train.py was confirmed on one fresh order. The research run stays on the wall clock it was set
    up on (core/budget_settings.py), its runs train there and are labelled so, and the answer says why; and a
    recorded pair stands over one rebuilt from filed values."""
    monkeypatch.delenv("AUTORESEARCH_BUDGET_CLOCK", raising=False)
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nNOISE = 0.001\n"))
    try:
        lose_on_order_1_and_rerun_its_control_unluckily(lab, run := runner(lab))
        monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "flops")
        monkeypatch.setenv("FAKE_FLOPS_CLOCK", "1")
        lab.restart()
        ran = run(WALL_IDEA, "the idea again", rerun=True)  # run 10
        assert ran["budget_clock"] == "wall" and "AUTORESEARCH_BUDGET_CLOCK gives flops, the research run recorded " \
            "wall" in " ".join(ran["records_changed"]), ran
        log = next((lab.ws / "runs").glob("0010-*.log")).read_text()
        assert "budget: BUDGET_CLOCK=- " in log  # trained on the prepared record's clock, wall: not told flops
        again = answer(lab.call("confirm", pairs=1))
        assert "did not hold in an earlier confirmation (it lost by +0.000500)" in again["next"], again
    finally:
        lab.loop.shutdown()


def test_a_harness_edit_set_up_and_undone_forgets_no_lost_pair(fake_env, monkeypatch):
    """Review 68: the idea lost its pair on data order 3; the agent stopped, committed a harness edit (a note), set up
    on it, stopped, took the note back out and set up again on the first harness. A setup carried the measurements of
    the research run before it only, which the edited harness's had none of: the lost pair, the held orders and the
    counter were gone, and the same train.py was confirmed on data order 1. They are shelved per harness now."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        lose_on_order_3(lab)
        for tag, change in (("noted", "add"), ("again", "rm")):
            answer(lab.call("stop", reason="a harness note"))
            if change == "add":
                (lab.ws / "NOTES.md").write_text("a note\n")
            git(lab.ws, change, "NOTES.md")
            git(lab.ws, "commit", "-q", "-m", f"{change} a note")
            answer(lab.call("setup", tag=tag))
        the_same_idea_is_not_confirmed_again(lab)
    finally:
        lab.loop.shutdown()


def test_a_prepared_record_edited_to_no_effect_forgets_no_lost_pair(fake_env, monkeypatch):
    """Review 71: the idea lost its pair on data order 3; the agent appended a newline to the cache's prepared.json
    (the same data and budget: no stop needed, the harness unchanged) and set up a new tag. Measurements were carried
    by harness and prepared data (review 68), the record's bytes in the data's fingerprint, so none were: the lost
    pair, the held orders and the counter were gone, and the same train.py was confirmed on data order 1. Only the
    values stay with their data; the pairs, the orders and the counter go with the harness."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        lose_on_order_3(lab)
        record = Path(os.environ["AUTORESEARCH_CACHE"]) / "prepared.json"
        record.write_text(record.read_text() + "\n")
        answer(lab.call("setup", tag="respaced"))
        the_same_idea_is_not_confirmed_again(lab)
    finally:
        lab.loop.shutdown()


def the_best_rerun_beside_a_discarded_idea(lab) -> None:
    """The baseline (run 1), an idea (run 2) confirmed on data order 1 beside the best's rerun (run 3), discarded:
    the best's value on order 1 is filed for a later confirmation to reuse."""
    lab.baseline()
    (lab.ws / "train.py").write_text(IDEA)
    answer(lab.call("run_experiment", description="an idea"))
    answer(lab.call("confirm", pairs=1))
    answer(lab.call("discard"))


def test_measurements_on_other_prepared_data_are_no_controls(fake_env, monkeypatch):
    """Review 68: a setup on the same harness carried the best's reruns, filed by harness and code alone, onto a cache
    prepared again with other data: the best's value on data order 1 from the old data stood as the control of the
    idea's rerun on the new, with no run of it. Measurements are carried by harness and prepared data."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        the_best_rerun_beside_a_discarded_idea(lab)
        cache = Path(os.environ["AUTORESEARCH_CACHE"])
        (cache / "data").mkdir()
        (cache / "data" / "shard_00000.parquet").write_bytes(b"other data")  # prepared again
        answer(lab.call("setup", tag="other-data"))
        answer(lab.call("run_experiment", description="baseline"))
        answer(lab.call("keep"))
        (lab.ws / "train.py").write_text(IDEA + "# reworded\n")  # a pair not judged yet: held to order 1
        answer(lab.call("run_experiment", description="the idea, reworded"))
        again = answer(lab.call("confirm", pairs=1))
        assert not again.get("reused") and again["extra_runs"] == 2, again  # the old control reused without the fix  # the old control reused without the fix
    finally:
        lab.loop.shutdown()


def test_a_started_pair_keeps_its_values_when_a_confirmation_beside_it_reruns_the_best_on_its_order(fake_env):
    """Review 69, by reading (to play through the tools: three slots, a timed interleaving and a SIGKILL; played here on
    the server's own records): on the wall clock a confirmation's control on held order 1 (run 101) is filed, then
    another confirmation beside it files its rerun of the best on the same order (run 201) in the same place, then the
    first pair's candidate (run 102). The started pair was judged from the filed values, found its control's gone and
    stayed unjudged until its call returned: a server killed before then left a lost pair to be measured again on new
    luck. A started pair keeps its own values as they are filed."""
    from mcp_server.core.models import RunResult
    from mcp_server.phases.measurements import PAIRS, _pair_key, file_measurement
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nNOISE = 0.001\n"))
    try:
        lab.baseline()
        (lab.ws / "train.py").write_text(WALL_IDEA)
        entry = lab.loop.entry(answer(lab.call("run_experiment", description="an idea"))["run"])
        lab.loop.note_pair(entry, 1, 101, 102)

        def filed(run: int, commit: str, value: float, order: int = 1):
            result = RunResult(run=run, commit=commit, description="a rerun", status="ok", val_bpb=value,
                               budget_clock="wall", log=f"runs/{run}.log", next="")
            with lab.loop.state.transaction() as state:
                file_measurement(lab.loop, state, {"run": run, "commit": commit, "data_order": order}, result)
        filed(101, entry["parent"], 1.0)
        filed(201, entry["parent"], 1.001)  # another confirmation's control, beside this one, on the same order
        filed(102, entry["commit"], 1.0005)
        assert lab.loop.state.load()[PAIRS][_pair_key(lab.loop, entry)] == {"1": [1.0, 1.0005]}  # lost, and judged

        # review 70: two confirmations of two candidates at once reusing one filed control (run 301) noted their pairs
        # under its run alone, so the second replaced the first's, which was then judged only when its call returned
        other = dict(entry, commit=entry["parent"], parent=entry["commit"])  # another pair of codes
        filed(301, entry["parent"], 1.0, order=2)
        lab.loop.note_pair(entry, 2, 301, 302)
        lab.loop.note_pair(other, 2, 301, 402)
        filed(302, entry["commit"], 1.0005, order=2)
        filed(402, other["commit"], 0.99, order=2)
        judged = lab.loop.state.load()[PAIRS]
        assert judged[_pair_key(lab.loop, entry)]["2"] == [1.0, 1.0005], judged
        assert judged[_pair_key(lab.loop, other)]["2"] == [1.0, 0.99], judged

        # review 75: a pair noted by stop 46's server (keyed by its control's run, five items), its sides filed after an
        # upgrade, was read in the new shape and recorded with one value, and every later confirm of the pair failed
        with lab.loop.state.transaction() as state:
            state["pairs_started"]["501"] = [_pair_key(lab.loop, entry), 3, 502, None, None]
        filed(501, entry["parent"], 1.0, order=3)
        filed(502, entry["commit"], 1.0005, order=3)
        assert lab.loop.state.load()[PAIRS][_pair_key(lab.loop, entry)]["3"] == [1.0, 1.0005]
    finally:
        lab.loop.shutdown()


def test_two_confirmations_of_one_run_at_once_measure_it_once(fake_env):
    """Review 71: one call at a time measures a pair, told by the reruns in flight; two confirm calls at once both
    planned before either had queued one, so both measured data order 1. The idea lost the one pair and won the other,
    the later pair recorded replaced the lost one, and the same train.py sent again was confirmed on a fresh order.
    The second call is refused from before its plan."""
    import anyio
    from mcp import Client
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nNOISE = 0.001\n"))
    try:
        lab.baseline()  # run 1
        run = runner(lab)
        run("VAL_BPB = 1.1\nNOISE = 0.001\n", "filler")  # run 2
        answer(lab.call("discard"))
        assert run(WALL_IDEA, "an idea")["delta"] == -0.0015  # run 3
        answers = []

        async def both():
            async def confirm():
                answers.append(await client.call_tool("confirm", {"run": 3}))
            async with Client(lab.server()) as client, anyio.create_task_group() as tasks:
                tasks.start_soon(confirm)
                tasks.start_soon(confirm)
        anyio.run(both)
        refused, lost = sorted(answers, key=lambda result: not result.is_error)
        assert "run 3's train.py against this best is being measured now" in text(refused), text(refused)
        assert answer(lost)["paired_deltas"] == [0.0005], answer(lost)  # order 1: runs 4 and 5, as one call alone
        answer(lab.call("discard"))
        run(WALL_IDEA, "the idea again", rerun=True)  # run 6
        again = answer(lab.call("confirm"))
        assert "did not hold in an earlier confirmation (it lost by +0.000500)" in again["next"], again
    finally:
        lab.loop.shutdown()


def test_measurements_on_a_shard_rewritten_at_its_size_are_no_controls(fake_env, monkeypatch):
    """Review 73: the values a setup carries went with the harness and the prepared data's fingerprint, which holds the
    shards' names and sizes only. The agent rewrote a train shard at its size (other text: every run's number moves),
    which stops every run until a setup, and set up a new tag: the best's value on data order 1 from the old text
    stood as the control of the idea's rerun on the new, with no run of it. Values go with the shards' content too;
    a shard written again with the same bytes (prepare run again) keeps them."""
    cache = Path(os.environ["AUTORESEARCH_CACHE"])
    (cache / "data").mkdir()
    shard = cache / "data" / "shard_00000.parquet"
    shard.write_bytes(b"first text")
    lab = flops_lab(fake_env, monkeypatch)
    try:
        the_best_rerun_beside_a_discarded_idea(lab)
        for tag, data in (("same-text", b"first text"), ("other-text", b"other text")):
            shard.write_bytes(data)  # the same size: the fingerprint as it was
            answer(lab.call("setup", tag=tag))
            answer(lab.call("run_experiment", description="baseline"))
            answer(lab.call("keep"))
            (lab.ws / "train.py").write_text(IDEA + f"# reworded for {tag}\n")  # a pair not judged yet: order 1
            answer(lab.call("run_experiment", description="the idea, reworded"))
            again = answer(lab.call("confirm", pairs=1))
            answer(lab.call("discard"))
            if tag == "same-text":
                assert again.get("reused") and again["extra_runs"] == 1, again  # the same text: the value stands
        assert not again.get("reused") and again["extra_runs"] == 2, again  # the old text's control without the fix
    finally:
        lab.loop.shutdown()


def test_a_shelf_filed_by_the_last_version_gives_back_its_pairs_orders_and_counter_not_its_values():
    """Review 75: stop 46's server shelved a research run under "<harness> <cache fingerprint>", both parts together;
    the new key never matched it, so a setup after an upgrade forgot its lost pair, held orders and counter."""
    from mcp_server.phases.measurements import carried
    before = {"judged_pairs": {"k": {"3": [1.0, 1.0005]}}, "held_orders": [1, 2, 3], "data_orders": 3,
              "measured": {"code": {"1": {"val_bpb": 1.0, "run": 2}}}}
    state = {"fingerprint": "B", "shelved_measurements": {"A cacheA": before}}
    back = carried(state, "A", {"cache_fingerprint": "cacheA"})
    assert (back["judged_pairs"], back["held_orders"], back["data_orders"]) == (before["judged_pairs"], [1, 2, 3], 3), back
    assert "measured" not in back and "A cacheA" not in back.get("shelved_measurements", {}), back

