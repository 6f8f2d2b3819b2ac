"""Early stop, opt-in at setup: a run whose training loss lags the best's run at the same share of
the budget by more than the noise-calibrated margin is stopped through the cancel path and logged;
never without a noise estimate, never before MIN_PROGRESS, never when not asked for."""
import json
import re

import pytest

from mcp_server.core import limits
from mcp_server.phases import early_stop
from server_support import Lab, ledger_lines, make_workspace, set_knobs

BASE = "VAL_BPB = 1.0\nSTEPS = 10\n"


@pytest.fixture
def es_lab(fake_env, monkeypatch):
    monkeypatch.setenv("FAKE_NOISE", "0.005")  # repeats of one code differ: measure_noise has a spread
    # the watcher looks every 0.5 s, not 2 s: a lagging run is stopped sooner, and a run that must not be stopped is
    # looked at more often past MIN_PROGRESS in its 3 s than in the 4 s it trained at the default
    monkeypatch.setattr(early_stop, "POLL_SECONDS", 0.5)
    lab = Lab(make_workspace(fake_env, BASE))
    yield lab
    lab.loop.shutdown()


def start(lab, early: bool, noise: bool) -> dict:
    answer = lab.ok("setup", tag="es", early_stop=early)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    if noise:
        lab.ok("measure_noise", repeats=1)
    return answer


def lagging(lab, lag: float, sleep: float = 10.0) -> dict:
    set_knobs(lab.ws, val_bpb=0.9, steps=10, sleep=sleep, lag=lag)
    return lab.ok("run_experiment", description=f"lags by {lag}")


def stopped_before_its_end(lab, result) -> bool:
    """Whether the run never printed its last step (of 10, a second each): stopped before its budget was spent. (The
    call's own time, under 10 s, was ~5 s alone, with the server's work before and after the run: a loaded machine's
    could double it.)"""
    from mcp_server.core.logparse import last_progress
    return last_progress((lab.ws / result["log"]).read_text()).step < 9


def test_a_lagging_run_is_stopped_early_and_logged(es_lab):
    setup = start(es_lab, early=True, noise=False)
    assert "no noise estimate yet" in setup["early_stop"]
    es_lab.ok("measure_noise", repeats=1)
    rows = len(ledger_lines(es_lab.ws))
    result = lagging(es_lab, lag=1.0)
    assert result["status"] == "crash" and result["tail"].startswith("[stopped early: training loss")
    assert stopped_before_its_end(es_lab, result)
    row = ledger_lines(es_lab.ws)[-1].split("\t")
    assert len(ledger_lines(es_lab.ws)) == rows + 1 and row[3] == "crash" and "(stopped early: training loss" in row[4]
    assert "behind by more than the margin" in row[4]
    record = json.loads(next((es_lab.ws / "runs").glob(f"{result['run']:04d}-*[0-9a-f].json")).read_text())
    assert "stopped_early" in record["decision"]
    assert 0 < record["run"]["wall_seconds"] < 10.0  # the slot time it spent counts (GPU-hours, their limit)
    status = es_lab.ok("status")
    assert status["undecided"] is None and status["running"] is None  # nothing left to decide
    # the same code again is answered from the stopped run: no second try of a hopeless idea
    set_knobs(es_lab.ws, val_bpb=0.9, steps=10, sleep=10.0, lag=1.0)
    again = es_lab.ok("run_experiment", description="lags again")
    assert again["run"] == result["run"] and "stopped early" in again["repeat_of"]


@pytest.mark.parametrize("early, noise, lag", [(True, False, 1.0), (False, True, 1.0), (True, True, 0.0)],
                         ids=["no noise estimate", "not asked for", "not lagging"])
def test_runs_are_not_stopped(es_lab, early, noise, lag):
    start(es_lab, early=early, noise=noise)
    result = lagging(es_lab, lag=lag, sleep=3.0)
    assert result["status"] == "ok" and result["val_bpb"] == pytest.approx(0.9, abs=0.01)
    assert not stopped_before_its_end(es_lab, result)


def test_the_rule_never_stops_during_warm_up_and_scales_with_the_noise():
    best = [(p, 9.0 - p / 20) for p in range(5, 101, 5)]
    behind = [(p, loss + 1.0) for p, loss in best]
    early = [point for point in behind if point[0] < early_stop.MIN_PROGRESS]
    assert early_stop.verdict(early, best, 1.0, 0.01) is None  # far behind, but in warm-up
    assert early_stop.verdict(behind[:12], best, 1.0, None) is None  # no noise estimate: never
    stop = early_stop.verdict(behind[:12], best, 1.0, 0.01)
    assert stop["progress"] == 60 and stop["loss"] - stop["best_loss"] == pytest.approx(1.0)
    # the margin: MARGIN_WIDTHS noise thresholds in loss units (the best's final loss per val_bpb)
    scale = early_stop.loss_per_bpb(best, 1.0)
    assert stop["margin"] == pytest.approx(early_stop.MARGIN_WIDTHS * 0.01 * scale, abs=1e-4)
    wide = 1.01 / (early_stop.MARGIN_WIDTHS * scale)  # a noise this large covers a lag of 1.0
    assert early_stop.verdict(behind[:12], best, 1.0, wide) is None
    slight = [(p, loss + early_stop.MIN_MARGIN / 2) for p, loss in best]
    assert early_stop.verdict(slight, best, 1.0, 0.0) is None  # a zero noise still leaves the floor


def test_the_noise_repeats_luck_widens_the_margin():
    """The same code on other data strays from the best's curve: a candidate must lag by more."""
    best = [(p, 9.0 - p / 20) for p in range(5, 101, 5)]
    repeat = [(p, loss + (0.5 if p <= 70 else -0.1)) for p, loss in best]
    behind = [(p, loss + 0.3) for p, loss in best]
    assert early_stop.verdict(behind[:12], best, 1.0, 0.001)["progress"] == 60  # judged on the val_bpb noise alone
    assert early_stop.verdict(behind[:12], best, 1.0, 0.001, [(repeat, best)]) is None  # the data's luck was 0.5
    stop = early_stop.verdict(behind[:16], best, 1.0, 0.001, [(repeat, best)])  # past it, the luck was 0.1
    assert stop["progress"] == 80 and stop["margin"] == pytest.approx(0.1)


def test_runs_the_early_stop_ended_are_no_failures_in_a_row():
    """Late in a night most ideas are behind the best: ten stopped in a row must not end the night
    as "10 failures in a row", while real crashes still do."""
    state = {"limits": {"max_failures_in_row": 2}}
    stopped = [("crash", 0.0, f"idea {k}{limits.STOPPED_EARLY}loss 5.0 behind 4.8 at 50%)") for k in range(5)]
    rows = [("keep", 1.0, "baseline")] + stopped
    assert limits.ended(state, rows) is None and "0 of 2 failures" in limits.left(state, rows)
    broken = rows + [("crash", 0.0, "broken"), ("crash", 0.0, "broken again")]
    assert "2 failures in a row" in limits.ended(state, broken)


def test_an_idea_named_noise_repeat_does_not_widen_the_margin():
    """The margin grows with the noise repeats' luck: an idea the agent names "noise repeat ..." is
    no repeat (the server marks its own with the data order it chose)."""
    best = {"result": {"commit": "b000000", "status": "ok"}, "run": {"parent": "a000000"}, "decision": {"status": "keep"}}
    named = {"result": {"commit": "c000000", "status": "ok", "description": "noise repeat 1/1 of b000000"},
             "run": {"parent": "b000000"}, "decision": {"status": "discard"}}
    real = {"result": {"commit": "d000000", "status": "ok", "description": "noise repeat 1/1 of b000000"},
            "run": {"parent": "b000000", "data_order": 1}, "decision": {"status": "discard"}}
    curves = {"b000000": [(50, 4.0)], "c000000": [(50, 9.0)], "d000000": [(50, 4.1)]}
    found = early_stop.repeats_of([best, named, real], lambda r: curves[r["result"]["commit"]])
    assert found == [([(50, 4.1)], [(50, 4.0)])]


def plant_reference(lab, scale: float) -> None:
    """The agent's reference curve: the best's log with every loss times `scale`, in a file of its
    own, and the best's record (runs/0001-*.json) pointed at it."""
    record = next((lab.ws / "runs").glob("0001-*[0-9a-f].json"))
    honest = (lab.ws / json.loads(record.read_text())["result"]["log"]).read_text()
    planted = lab.ws / "notes" / "best.log"
    planted.parent.mkdir(exist_ok=True)
    planted.write_text(re.sub(r"loss: ([0-9.]+)", lambda m: f"loss: {float(m.group(1)) * scale:.6f}", honest))
    assert len(early_stop.curve(planted.read_text())) == len(early_stop.curve(honest)) > 0
    forged = json.loads(record.read_text())
    forged["result"]["log"] = "notes/best.log"
    record.write_text(json.dumps(forged))


def test_a_reference_curve_the_agent_planted_lets_no_lagging_run_go_on(es_lab):
    """The best's curve is the log the server kept it from: the agent points the best's record at a
    log of its own with losses far above any run's, so that no idea ever looks behind (or, with the
    record unread, that there is no reference at all). A lagging run is still stopped early."""
    start(es_lab, early=True, noise=True)
    plant_reference(es_lab, 100.0)
    result = lagging(es_lab, lag=1.0)
    assert result["status"] == "crash" and result["tail"].startswith("[stopped early: training loss")
    assert stopped_before_its_end(es_lab, result)


def test_a_reference_curve_the_agent_planted_stops_no_good_run(es_lab):
    """The other way: a planted curve far below any run's, and the noise repeat's record made an
    idea's (so that its luck widens no margin), would stop every idea."""
    start(es_lab, early=True, noise=True)
    plant_reference(es_lab, 0.01)
    repeat = next((es_lab.ws / "runs").glob("0002-*[0-9a-f].json"))
    forged = json.loads(repeat.read_text())
    forged["run"]["data_order"] = None
    repeat.write_text(json.dumps(forged))
    result = lagging(es_lab, lag=0.0, sleep=3.0)
    assert result["status"] == "ok" and result["val_bpb"] == pytest.approx(0.9, abs=0.01)


def scale_log(path, scale: float) -> None:
    text = path.read_text()
    path.write_text(re.sub(r"loss: ([0-9.]+)", lambda m: f"loss: {float(m.group(1)) * scale:.6f}", text))
    assert early_stop.curve(path.read_text()) and early_stop.curve(path.read_text()) != early_stop.curve(text)


def test_an_edited_best_log_is_not_the_reference(es_lab):
    """The agent edits the logs themselves (the best's and its noise repeat's, so that the repeat's luck
    widens no margin), every loss times 0.01: every idea would look far behind and be stopped. The
    server digested each log when it recorded the run: an edited log is no reference, a good run goes
    on, and the change is told."""
    start(es_lab, early=True, noise=True)
    for number in (1, 2):
        record = json.loads(next((es_lab.ws / "runs").glob(f"000{number}-*[0-9a-f].json")).read_text())
        scale_log(es_lab.ws / record["result"]["log"], 0.01)
    result = lagging(es_lab, lag=0.0, sleep=3.0)
    assert result["status"] == "ok" and result["val_bpb"] == pytest.approx(0.9, abs=0.01), result
    assert any("early stop does not read it" in notice for notice in es_lab.ok("status")["records_changed"])
