"""Review 66: the data orders every confirmation is held to, and the pairs it must not forget, attacked by an agent
that wants a lucky idea kept as confirmed. The fake's ORDER_LUCK is the luck of one code on one data order, which a
rerun repeats on the flops clock."""
from server_support import Lab, answer, make_workspace

BEST = "VAL_BPB = 1.0\nORDER_EFFECT = 0.0001\nORDER_LUCK = 0.002\n"  # 0.998 on the usual order
IDEA = "VAL_BPB = 0.999\nORDER_EFFECT = 0.0001\nORDER_LUCK = 0.002\n"  # 0.997: wins on data orders 1 and 2, loses on 3


def flops_lab(fake_env, monkeypatch) -> Lab:
    monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "flops")
    monkeypatch.setenv("FAKE_FLOPS_CLOCK", "1")
    return Lab(make_workspace(fake_env, BEST))


def test_a_new_setup_on_the_same_harness_forgets_no_lost_pair_and_no_held_order(fake_env, monkeypatch):
    """The idea lost its pair on data order 3; the agent discarded it, set up a new tag from the best (allowed at any
    time on the same harness) and ran the same train.py again: the state began afresh, lost pairs, held orders and
    the data order counter with it, so confirm(pairs=1) drew order 1, where the idea wins, and it was kept as
    confirmed. A setup on the same harness now carries the measurements, the held orders and the counter."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        lab.baseline()  # run 1
        (lab.ws / "train.py").write_text(IDEA)
        answer(lab.call("run_experiment", description="an idea"))  # run 2
        lost = answer(lab.call("confirm", pairs=3))  # orders 1, 2, 3
        assert [d > 0 for d in lost["paired_deltas"]] == [False, False, True], lost
        answer(lab.call("discard"))

        answer(lab.call("setup", tag="again"))  # from the best: the branch's tip
        answer(lab.call("run_experiment", description="baseline"))
        answer(lab.call("keep"))
        (lab.ws / "train.py").write_text(IDEA)
        answer(lab.call("run_experiment", description="the same idea", rerun=True))
        again = answer(lab.call("confirm", pairs=1))
        assert not again["confirmed"], again  # confirmed on data order 1 alone without the fix
        assert "did not hold in an earlier confirmation (it lost by +0.001000)" in again["next"], again
        (lab.ws / "train.py").write_text(IDEA + "# the same idea, reworded\n")  # new code: the held orders meet it
        answer(lab.call("discard"))
        answer(lab.call("run_experiment", description="the same idea, reworded"))
        reworded = answer(lab.call("confirm", pairs=1))
        assert not reworded["confirmed"] and reworded["paired_deltas"][2] > 0, reworded
        assert reworded["held_to"].startswith("data order(s) 1, 2, 3, 4: every data order a confirmation of this")
    finally:
        lab.loop.shutdown()
