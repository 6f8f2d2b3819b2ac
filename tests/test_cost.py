"""What a research run spends: the runs' slot time (GPU-hours; slot-hours on a CPU) in status and the
dashboard, summed into the server's state as each run ends (runs/*.json, which a shell can edit or
delete, never move them), and the max_gpu_hours limit that ends the run."""
import argparse
import json
import os
import math

import pytest

from mcp_server.core import cost, limits
from mcp_server.dashboard import dashboard
from server_support import set_knobs

HOUR = 3600.0


def walls(ws) -> list[float]:
    """Each run's wall time as its worker measured it (the report beside its log)."""
    return [json.loads(path.read_text())["wall_seconds"] for path in sorted((ws / "runs").glob("*.report.json"))]


def test_status_and_the_dashboard_show_the_slot_time_of_this_research_runs_runs(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.1, sleep=1)
    lab.ok("run_experiment", description="worse")
    lab.ok("discard")
    spent = cost.run_hours(lab.loop.state.load())
    devices = {json.loads(path.read_text())["device"] for path in (lab.ws / "runs").glob("*.report.json")}
    kind = "slot_hours" if all(cost.on_cpu(d) for d in devices) else "gpu_hours"  # a CPU here, a GPU on a GPU host
    assert spent["runs"] == 2 and spent[{"slot_hours": "gpu_hours", "gpu_hours": "slot_hours"}[kind]] == 0
    assert math.isclose(spent[kind], sum(walls(lab.ws)) / HOUR, abs_tol=2e-6) and sum(walls(lab.ws)) >= 1
    text = f"{spent[kind]:.2f} " + ("slot-hours on the CPU" if kind == "slot_hours" else "GPU-hours") + " over 2 runs"
    assert lab.ok("status")["compute"] == text
    assert dashboard.live_view(lab.ws)["spent"] == text
    # a new research run starts from nothing; the earlier runs' records stay in runs/
    lab.ok("setup", tag="t2")
    assert lab.ok("status")["compute"] is None and len(list((lab.ws / "runs").glob("*[0-9a-f].json"))) == 2


def test_max_gpu_hours_ends_the_research_run_for_the_server_and_the_hook(lab):
    budget = 2 / HOUR  # two seconds of slot time
    lab.ok("setup", tag="t", max_gpu_hours=budget)
    assert lab.ok("status")["limits"] == "0 of 10 failures in a row; 0 of 0.000555556 GPU-hours spent"
    set_knobs(lab.ws, sleep=3)
    lab.ok("run_experiment", description="baseline")
    status = lab.ok("status")
    spent = sum(walls(lab.ws)) / HOUR
    assert status["ended"] == f"{spent:.3g} of 0.000555556 GPU-hours spent" and spent >= budget
    assert "has ended" in lab.refused("run_experiment", description="one more")
    lab.ok("keep")  # the result in hand is still decided
    # the Stop hook and the overnight runner read the same state
    state = limits.recorded_state(lab.ws)
    assert limits.ended(state, [("keep", 1.0)]) == status["ended"]


def test_deleted_records_do_not_give_back_gpu_hours(lab):
    """The max_gpu_hours limit is the server's own sum in its state: runs/*.json, which a shell can
    delete or edit, only show it."""
    lab.ok("setup", tag="t", max_gpu_hours=1.0)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    first = sum(walls(lab.ws))
    for record in (lab.ws / "runs").glob("*.json"):
        record.unlink()
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description="second")
    second = sum(walls(lab.ws))
    assert limits.slot_hours(limits.recorded_state(lab.ws)) == pytest.approx((first + second) / HOUR, abs=1e-5)


@pytest.mark.parametrize("value, message", [
    (-1, "max_gpu_hours must be more than 0"),
    (0, "max_gpu_hours must be more than 0"),
])
def test_max_gpu_hours_that_sets_no_limit_is_refused(lab, value, message):
    assert message in lab.refused("setup", tag="t", max_gpu_hours=value)
    assert not lab.ok("status")["set_up"]
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="max_gpu_hours must be a number"):
            limits.make_limits(max_gpu_hours=bad)


def test_the_label_follows_the_device_each_run_trained_on():
    assert cost.hours_text({"gpu_hours": 1.5, "slot_hours": 0.0, "runs": 3}) == "1.50 GPU-hours over 3 runs"
    assert cost.hours_text({"gpu_hours": 1.0, "slot_hours": 0.25, "runs": 4}) == \
        "1.00 GPU-hours + 0.25 slot-hours on the CPU over 4 runs"
    assert cost.hours_text({"gpu_hours": 0.0, "slot_hours": 0.0, "runs": 0}) is None
    assert [cost.on_cpu(d) for d in ("NVIDIA H100 80GB HBM3", "cpu", "cpu: AMD EPYC 9454", None)] == \
        [False, True, True, True]


def test_the_overnight_summary_shows_the_slot_time(lab, capsys):
    from mcp_server.overnight import overnight
    lab.baseline()
    parser = argparse.ArgumentParser()
    overnight.add_arguments(parser)
    overnight.Runner(parser.parse_args(["--tag", "t", "--workspace", str(lab.ws)]), "claude").summary()
    spent = cost.run_hours(lab.loop.state.load())
    assert f"spent: {cost.hours_text(spent)}\n" in capsys.readouterr().out and spent["runs"] == 1


def test_shrunk_or_deleted_records_do_not_shrink_the_slot_time_shown(lab):
    """status, the dashboard and the morning report show the server's own sum: a record's wall
    time cut to nothing, or the record deleted, changes none of them."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.1, sleep=1)
    lab.ok("run_experiment", description="worse")
    lab.ok("discard")
    shown = lab.ok("status")["compute"]
    assert shown and dashboard.live_view(lab.ws)["spent"] == shown
    reported = lab.ok("report")["slot_hours"]
    first, second = sorted(p for p in (lab.ws / "runs").glob("*[0-9a-f].json"))
    shrunk = json.loads(first.read_text())
    shrunk["run"]["wall_seconds"] = 0.001
    first.write_text(json.dumps(shrunk))
    second.unlink()
    assert lab.ok("status")["compute"] == shown and dashboard.live_view(lab.ws)["spent"] == shown
    assert lab.ok("report")["slot_hours"] == reported and reported >= 1 / HOUR


def test_a_line_nested_past_jsons_depth_is_skipped_not_fatal(tmp_path):
    """The session's output and the runner's session records are files the agent can write: a line of
    100,000 brackets raised RecursionError (not ValueError) out of the runner's accounting."""
    nested = "[" * 100_000 + "\n"
    read_end, write_end = os.pipe()
    with open(tmp_path / "session.jsonl", "ab") as log:
        output = cost.SessionOutput(open(read_end, "rb"), log)
        with open(write_end, "wb") as pipe:
            pipe.write(b'{"type": "result", "total_cost_usd": 0.5, "usage": {}}\n' + nested.encode())
        assert output.settled() == {"cost_usd": 0.5, "usage": {}}
    records = tmp_path / cost.SESSIONS_FILE
    records.parent.mkdir(parents=True)
    records.write_text(nested + '{"tag": "t", "cost_usd": 0.25, "usage": {}}\n')
    assert cost.sessions_spent(tmp_path, "t")["cost_usd"] == 0.25
