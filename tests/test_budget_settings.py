"""A research run's budget settings (the budget clock, the time budget, the evaluation's tokens) are recorded at
setup and govern every run of it (reviews 71 and 73 left them open: a server started again with another
AUTORESEARCH_BUDGET_CLOCK, AUTORESEARCH_TIME_BUDGET or AUTORESEARCH_EVAL_TOKENS trained queued runs, and reused
measurements, at it). The fake trainer prints the budget variables the harness gave it."""
import json
import logging

import pytest

from mcp_server.core.limits import records_dir
from server_support import Lab, answer, git, make_workspace

BEST = "VAL_BPB = 1.0\nORDER_EFFECT = 0.0001\nORDER_LUCK = 0.002\n"
IDEA = "VAL_BPB = 0.999\nORDER_EFFECT = 0.0001\nORDER_LUCK = 0.002\n"
BUDGET_VARIABLES = ("AUTORESEARCH_BUDGET_CLOCK", "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS")
# the fake cache's record: no clock (wall), a 60 s budget, no evaluation size (upstream's 40 x 524288)
AT_SETUP = "budget: BUDGET_CLOCK=flops TIME_BUDGET=- EVAL_TOKENS=-"


def budget_line(lab: Lab, run: int) -> str:
    """What the run's training process was told of its budget (the fake prints it)."""
    log = next((lab.ws / "runs").glob(f"{run:04d}-*.log")).read_text()
    return next(line for line in log.splitlines() if line.startswith("budget: "))


def written_before_the_settings(lab: Lab) -> None:
    """The stopped server's state as the version before budget settings wrote it (its copy in the records too)."""
    for path in (lab.ws / ".research-loop" / "state.json", records_dir(lab.ws) / "state.json"):
        state = json.loads(path.read_text())
        del state["budget_settings"]
        path.write_text(json.dumps(state))


def flops_lab(fake_env, monkeypatch) -> Lab:
    for name in BUDGET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "flops")
    monkeypatch.setenv("FAKE_FLOPS_CLOCK", "1")
    return Lab(make_workspace(fake_env, BEST))


@pytest.mark.parametrize("variable, value, after_setup", [
    ("AUTORESEARCH_BUDGET_CLOCK", "wall", "budget: BUDGET_CLOCK=- TIME_BUDGET=- EVAL_TOKENS=-"),
    ("AUTORESEARCH_TIME_BUDGET", "30", "budget: BUDGET_CLOCK=flops TIME_BUDGET=30 EVAL_TOKENS=-"),
    ("AUTORESEARCH_EVAL_TOKENS", "4096", "budget: BUDGET_CLOCK=flops TIME_BUDGET=- EVAL_TOKENS=4096"),
])
def test_a_server_started_with_other_budget_settings_trains_at_the_research_runs(fake_env, monkeypatch, caplog,
                                                                                 variable, value, after_setup):
    """Flops clock: the best measured on data orders 1 and 2 (its noise repeats). The server is started again with
    another clock, budget or evaluation size: the idea trains at the research run's settings, the answer of that
    call, status and the server's log say so, and its confirmation reuses the best's values (they were measured at
    those settings). A setup then takes the environment's settings, and carries none of the values measured at the
    old ones: the same best's idea is confirmed against a control run again."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        lab.baseline()  # run 1
        answer(lab.call("measure_noise", repeats=2))  # runs 2 and 3: the best on data orders 1 and 2
        monkeypatch.setenv(variable, value)
        with caplog.at_level(logging.WARNING):
            lab.restart()
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert f"{variable} gives" in logged and "setup(tag) begins a new research run" in logged, logged
        said = answer(lab.call("status"))["budget_settings"]
        assert f"{variable} gives" in said and "budget clock flops, time budget 60 s" in said, said
        (lab.ws / "train.py").write_text(IDEA)
        ran = answer(lab.call("run_experiment", description="an idea"))  # run 4
        told = " ".join(ran.get("records_changed") or [])
        assert f"{variable} gives" in told and "with the new settings" in told, ran
        assert ran["budget_clock"] == "flops" and budget_line(lab, 4) == AT_SETUP  # the research run's, not the env's
        entry = lab.loop.state.load()["runs"]["4"]
        assert (entry["budget"], entry["eval_tokens"]) == (60.0, 40 * 524288), entry
        confirmed = answer(lab.call("confirm", pairs=1))
        assert confirmed["reused"], confirmed  # the best's value on order 1 stands: measured at these settings
        answer(lab.call("discard", run=4))

        answer(lab.call("setup", tag="new"))  # the environment's settings now
        assert f"{variable} gives" not in answer(lab.call("status"))["budget_settings"]
        (lab.ws / "train.py").write_text(BEST)
        answer(lab.call("run_experiment", description="baseline"))
        answer(lab.call("keep"))
        assert budget_line(lab, 6) == after_setup
        (lab.ws / "train.py").write_text(IDEA)
        answer(lab.call("run_experiment", description="the idea again", rerun=True))
        again = answer(lab.call("confirm", pairs=1))
        assert not again.get("reused"), again  # no value measured at the old settings is a control
    finally:
        lab.loop.shutdown()


def test_a_state_from_before_the_budget_settings_takes_the_environments_at_the_first_start(fake_env, monkeypatch):
    """A research run set up by the version before (its state has no budget settings): the first server started on
    it records its environment's (a 30 s budget), says so, and keeps them when started again without it."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        lab.baseline()
        lab.loop.shutdown()
        written_before_the_settings(lab)
        monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "30")
        lab.loop = lab.new_loop()
        status = answer(lab.call("status"))  # the first answer after the start says what was recorded
        assert "was set up before its budget settings were recorded" in " ".join(status["records_changed"]), status
        assert "time budget 30 s" in status["budget_settings"], status
        (lab.ws / "train.py").write_text(IDEA)
        answer(lab.call("run_experiment", description="an idea"))
        assert budget_line(lab, 2) == "budget: BUDGET_CLOCK=flops TIME_BUDGET=30 EVAL_TOKENS=-"
        answer(lab.call("discard"))
        monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET")
        lab.restart()
        said = answer(lab.call("status"))["budget_settings"]
        assert "the prepared record (AUTORESEARCH_TIME_BUDGET unset) gives 60 s, the research run recorded 30 s" \
            in said, said
        answer(lab.call("run_experiment", description="the idea again", rerun=True))
        assert budget_line(lab, 3) == "budget: BUDGET_CLOCK=flops TIME_BUDGET=30 EVAL_TOKENS=-"
    finally:
        lab.loop.shutdown()


@pytest.mark.parametrize("variable, value", [("AUTORESEARCH_BUDGET_CLOCK", "sundial"),
                                             ("AUTORESEARCH_TIME_BUDGET", "0"), ("AUTORESEARCH_EVAL_TOKENS", "many"),
                                             ("AUTORESEARCH_TIME_BUDGET", "0.5")])
def test_a_setup_refuses_budget_settings_no_run_can_train_at(lab, monkeypatch, variable, value):
    """A research run is set up at its budget settings for good: one no run can train at (prepare.py stops each run on
    it, and an evaluation size that is no number stopped each dispatch) is refused before anything is set up. A budget
    of 0.5 s from the variable was taken, and prepare.py, which reads it as whole seconds (0), stopped every run."""
    for name in BUDGET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    refused = lab.refused("setup", tag="t")
    assert f"{variable}={value!r}" in refused and "nothing was set up" in refused, refused
    assert git(lab.ws, "branch", "--show-current").strip() == "main"


def test_a_server_started_with_budget_settings_no_run_can_train_at_keeps_the_research_runs(fake_env, monkeypatch):
    """AUTORESEARCH_EVAL_TOKENS=many where the server is started again: the research run's runs train at its recorded
    settings, and status says what the environment gives. On a state from before the settings the server starts all
    the same, and each run is refused naming the variable until it is set right."""
    lab = flops_lab(fake_env, monkeypatch)
    try:
        lab.baseline()
        monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "many")
        lab.restart()
        said = answer(lab.call("status"))["budget_settings"]
        assert "AUTORESEARCH_EVAL_TOKENS gives many, the research run recorded 20971520" in said, said
        (lab.ws / "train.py").write_text(IDEA)
        assert answer(lab.call("run_experiment", description="an idea"))["status"] == "ok"
        answer(lab.call("discard"))
        lab.loop.shutdown()
        written_before_the_settings(lab)
        lab.loop = lab.new_loop()
        refused = lab.refused("run_experiment", description="the idea again", rerun=True)
        assert "AUTORESEARCH_EVAL_TOKENS='many'" in refused and "nothing was set up or run" in refused, refused
    finally:
        lab.loop.shutdown()


@pytest.mark.parametrize("planted", ["1e999", "[4096]"])
def test_an_evaluation_size_of_another_type_in_the_record_fails_no_call(lab, fake_env, planted):
    """The agent writes an evaluation size of 1e999 (json's infinity) or a list into the cache's prepared.json, which
    is its to edit: status compared the record's settings with the research run's and failed with an internal error
    (OverflowError, TypeError), and so did every call of a server started on it. Status answers, saying what the
    record gives; a run is refused as the record changed since setup, and a setup names the prepared record."""
    lab.baseline()
    record = fake_env / "cache" / "prepared.json"
    record.write_text(f'{{"profile": "cpu", "time_budget": 60, "eval_tokens": {planted}}}')
    said = lab.ok("status")["budget_settings"]
    assert "the prepared record (AUTORESEARCH_EVAL_TOKENS unset) gives" in said, said
    lab.restart()
    assert "the research run recorded 20971520" in lab.ok("status")["budget_settings"]
    assert "changed since setup" in lab.refused("run_experiment", description="an idea", rerun=True)
    assert "the prepared record" in lab.refused("setup", tag="new")


def test_a_setup_on_a_budget_the_agent_raised_in_the_record_says_so_for_the_whole_research_run(lab, fake_env):
    """The agent raises the budget in the cache's prepared.json, which is its to edit, from 60 s to 600 s and sets up a
    new tag: the research run trained every run at ten times the user's budget, and nothing said its settings
    differed from the research run before's. setup's answer, status for the whole research run and the report's
    summary say so, and a later setup at the same settings keeps saying it."""
    lab.baseline()
    record = fake_env / "cache" / "prepared.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"time_budget": 600}))
    said = "the budget settings differ from those autoresearch/t was measured at (time budget 600 s, 60 s there)"
    assert said in lab.ok("setup", tag="bigger")["settings_changed"]
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    assert said in lab.ok("status")["budget_settings"]
    report = (lab.ws / lab.ok("report")["path"]).read_text()
    assert f"| budget settings | {said}" in report, report[:2000]
    assert said in lab.ok("setup", tag="again")["settings_changed"]  # carried while the settings stay these


def test_a_profiles_file_the_parser_cannot_read_fails_no_status(lab, fake_env):
    """The agent takes the budget out of the cache's prepared.json, which is its to edit, and writes a nanochat/
    profiles.py of one expression nested 200,000 deep: status, which compares the budget settings the record gives
    with the research run's, read the budget from that file, and the parser's MemoryError failed it with an internal
    error (every call of a server started on it too). The file reads as naming no budget; runs are refused as the
    record changed since setup."""
    lab.baseline()
    (fake_env / "cache" / "prepared.json").write_text(json.dumps({"profile": "cpu"}))
    (lab.ws / "nanochat" / "profiles.py").write_text("x = " + "-" * 200_000 + "1\n")
    assert "the research run recorded 60 s" in lab.ok("status")["budget_settings"]
    lab.restart()
    assert "the research run recorded 60 s" in lab.ok("status")["budget_settings"]
    assert "changed since setup" in lab.refused("run_experiment", description="an idea", rerun=True)


def test_a_prepared_record_moved_away_gives_no_budget_of_its_own(lab, fake_env):
    """Review 80: with the cache's prepared.json moved away after setup, status said "the prepared record
    (AUTORESEARCH_TIME_BUDGET unset) gives 300 s, the research run recorded 60 s": there was no record, and 300 s is
    upstream's default, which nothing would train at (a run is refused for the missing data). Status says nothing
    differs where there is no record to differ."""
    lab.baseline()
    record = fake_env / "cache" / "prepared.json"
    record.rename(record.with_name("prepared.json.away"))
    said = lab.ok("status")["budget_settings"]
    assert said.startswith("budget clock wall, time budget 60 s") and "gives" not in said, said
