"""No repeated runs: train.py already tried on the same best is answered from that run (no
training, no row, no run number), refused while that run is in flight or when it is the best
itself, and trained again on request or when the earlier run said nothing about the code."""
import json

from server_support import Lab, git, ledger_lines, make_workspace, set_knobs


def run_refs(lab) -> list[str]:
    return git(lab.ws, "for-each-ref", "--format=%(refname)", "refs/research-loop/runs/").split()


def state(lab) -> dict:
    return json.loads((lab.ws / ".research-loop" / "state.json").read_text())


def test_identical_train_py_is_answered_from_the_decided_run_without_training(lab):
    lab.ok("setup", tag="t", max_experiments=3)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    set_knobs(lab.ws, val_bpb=1.02)
    first = lab.ok("run_experiment", description="worse idea")
    lab.ok("discard", reason="worse")
    before = (ledger_lines(lab.ws), run_refs(lab), sorted(p.name for p in (lab.ws / "runs").iterdir()),
              state(lab)["seq"], lab.ok("status")["limits"])
    set_knobs(lab.ws, val_bpb=1.02)  # the same bytes again, as after a compaction
    again = lab.ok("run_experiment", description="worse idea, forgotten")
    assert again["run"] == first["run"] and again["commit"] == first["commit"] and again["val_bpb"] == 1.02
    assert "decided discard" in again["repeat_of"] and "rerun=true" in again["next"]
    assert lab.ok("run_experiment", description="queued, forgotten", wait=False)["repeat_of"] == again["repeat_of"]
    # nothing ran, nothing was logged, no run number was taken, the limits did not move
    after = (ledger_lines(lab.ws), run_refs(lab), sorted(p.name for p in (lab.ws / "runs").iterdir()),
             state(lab)["seq"], lab.ok("status")["limits"])
    assert after == before and "2 of 3 experiments left" in after[4]
    assert "Nothing to keep" in lab.refused("keep")  # an answer from the past is never a result to keep
    assert "Nothing to discard" in lab.refused("discard")
    # rerun=true trains it: a new run, a new row, counted
    rerun = lab.ok("run_experiment", description="worse idea, measured again", rerun=True)
    assert rerun["run"] == first["run"] + 1 and rerun.get("repeat_of") is None and rerun["val_bpb"] == 1.02
    lab.ok("discard")
    assert len(ledger_lines(lab.ws)) == len(before[0]) + 1
    assert "1 of 3 experiments left" in lab.ok("status")["limits"]


def test_rerun_still_goes_through_every_rule(lab):
    lab.ok("setup", tag="t", max_experiments=1)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    set_knobs(lab.ws, val_bpb=1.02)
    lab.ok("run_experiment", description="idea")
    assert "keep() or discard() first" in lab.refused("run_experiment", description="idea", rerun=True)
    lab.ok("discard")
    assert "has ended" in lab.refused("run_experiment", description="idea again", rerun=True)
    assert "rerun must be true or false" in str(_raises(lambda: lab.loop.submit("idea", rerun="yes")))


def _raises(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no refusal")


def test_the_kept_code_unchanged_is_a_noise_repeat(lab):
    lab.baseline()
    refused = lab.refused("run_experiment", description="same code again")
    assert "kept code" in refused and "noise repeat" in refused and "measure_noise()" in refused
    assert "rerun=true" in refused and len(run_refs(lab)) == 1
    assert lab.ok("run_experiment", description="same code again", rerun=True)["val_bpb"] == 1.0


def test_identical_to_a_run_in_flight_or_pending_is_refused_with_its_number(fake_env, hold):
    hold(2)  # in flight until the call beside it is answered (it trained 2 s, which a loaded machine's call came after)
    lab = Lab(make_workspace(fake_env), slots=2)
    try:
        lab.baseline()
        set_knobs(lab.ws, val_bpb=0.97, steps=4)
        running = lab.ok("run_experiment", description="slow idea", wait=False)
        assert running["run"] == 2
        refused = lab.refused("run_experiment", description="slow idea again")
        assert f"identical to run {running['run']}" in refused and "wait()" in refused
        hold.release()
        lab.ok("wait")
        refused = lab.refused("run_experiment", description="slow idea again")
        assert f"keep(run={running['run']})" in refused and "pending" in refused
        assert len(run_refs(lab)) == 2
        # asked for, the same code runs beside the pending one (a second measurement)
        assert lab.ok("run_experiment", description="measured twice", rerun=True)["val_bpb"] == 0.97
    finally:
        lab.loop.shutdown()


def test_a_crash_of_the_code_is_answered_a_timeout_trains_again(lab):
    lab.baseline()
    set_knobs(lab.ws, crash=1, steps=4)
    crashed = lab.ok("run_experiment", description="broken")
    lab.ok("discard")
    rows = ledger_lines(lab.ws)
    set_knobs(lab.ws, crash=1, steps=4)  # discard restored the kept code: the broken bytes again
    again = lab.ok("run_experiment", description="broken, forgotten")
    assert again["run"] == crashed["run"] and again["status"] == "crash" and "decided crash" in again["repeat_of"]
    assert again.get("val_bpb") is None and ledger_lines(lab.ws) == rows  # no second crash row toward the failure limit
    set_knobs(lab.ws, sleep=60, steps=60)
    timed_out = lab.ok("run_experiment", description="too slow", timeout_seconds=1.5)
    assert timed_out["status"] == "timeout"
    lab.ok("discard")
    set_knobs(lab.ws, sleep=60, steps=60)
    retried = lab.ok("run_experiment", description="too slow, on a quieter machine", timeout_seconds=1.5)
    assert retried["run"] == timed_out["run"] + 1 and retried.get("repeat_of") is None
    assert f"run {timed_out['run']}" in retried["tried_before"] and "timeout" in retried["tried_before"]


def test_a_cancelled_run_trains_again(lab):
    lab.baseline()
    set_knobs(lab.ws, sleep=60, steps=60)
    started = lab.ok("run_experiment", description="slow", wait=False)
    lab.ok("cancel", run=started["run"])
    set_knobs(lab.ws, sleep=60, steps=60)  # cancel restored the kept code: the same bytes again
    again = lab.ok("run_experiment", description="slow again", wait=False)
    assert again["run"] == started["run"] + 1 and again.get("repeat_of") is None
    lab.ok("cancel", run=again["run"])


def test_the_same_constants_in_other_bytes_train_and_name_the_earlier_run(lab):
    lab.baseline()
    base = (lab.ws / "train.py").read_text()
    (lab.ws / "train.py").write_text(base + "MATRIX_LR = 0.08\n")
    first = lab.ok("run_experiment", description="higher lr")
    lab.ok("discard")
    (lab.ws / "train.py").write_text(base + "MATRIX_LR = 0.08  # once more\n")
    second = lab.ok("run_experiment", description="higher lr, commented")
    assert second["run"] == first["run"] + 1 and second.get("repeat_of") is None
    assert f"run {first['run']} ({first['commit']}) set the same (MATRIX_LR (new)->0.08) on this best: discard, " \
           "val_bpb 1.000000" in second["tried_before"]
    lab.ok("discard")
    (lab.ws / "train.py").write_text(base + "MATRIX_LR = 0.06\n")  # another value: nothing to point out
    assert lab.ok("run_experiment", description="lower lr").get("tried_before") is None


def test_a_record_the_ledger_does_not_back_answers_nothing(lab):
    """runs/ is the agent's to write: a record edited to a better number is not an answer."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.02)
    first = lab.ok("run_experiment", description="idea")
    lab.ok("discard")
    record = next((lab.ws / "runs").glob(f"{first['run']:04d}-*[0-9a-f].json"))
    forged = json.loads(record.read_text())
    forged["result"]["val_bpb"] = 0.5
    record.write_text(json.dumps(forged))
    set_knobs(lab.ws, val_bpb=1.02)
    again = lab.ok("run_experiment", description="idea again")
    assert again["run"] == first["run"] + 1 and again.get("repeat_of") is None and again["val_bpb"] == 1.02


def test_a_new_research_run_measures_again_what_an_earlier_one_tried(lab):
    """setup starts a new research run (its data, budget and ledger may differ): its baseline trains,
    though it is the earlier run's best unchanged, and so do ideas the earlier run tried."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.02)
    first = lab.ok("run_experiment", description="idea")
    lab.ok("discard")
    git(lab.ws, "checkout", "-q", "-b", "more")
    lab.ok("setup", tag="t2")
    assert lab.ok("run_experiment", description="baseline again")["val_bpb"] == 1.0
    lab.ok("keep")
    set_knobs(lab.ws, val_bpb=1.02)
    again = lab.ok("run_experiment", description="idea again")
    assert again["run"] > first["run"] and again.get("repeat_of") is None
