"""The morning report over a real small research run (fake trainer, in-process server): each section's
content, the pull request's branch in the real git repository, the names it refuses, and a ledger
edited by hand that the report does not believe."""
import json
import os
import re
import stat
import subprocess
import sys

import pytest

from mcp_server import cli
from mcp_server.core import cost, history
from mcp_server.core.state import records_dir
from mcp_server.phases import morning
from mcp_server.core import plot
from mcp_server.dashboard import dashboard
from plugin_support import REPO
from server_support import Lab, answer, git, make_workspace, set_knobs

TRAIN = "VAL_BPB = {val}\nNOISE = 0.002\n{crash}\n\ndef attention(x):\n    return x{scale}\n"


def edit(ws, val=1.0, crash="", scale=""):
    (ws / "train.py").write_text(TRAIN.format(val=val, crash=crash, scale=scale))


@pytest.fixture
def night(fake_env):
    """baseline (kept); two noise repeats; a marginal idea confirmed beside a control, then kept; an
    edit of the attention code, kept beyond the noise; a worse idea, discarded; a crash."""
    ws = make_workspace(fake_env, TRAIN.format(val=1.0, crash="", scale=""))
    lab = Lab(ws)
    start = lab.head()
    lab.ok("setup", tag="night")
    lab.ok("run_experiment", description="baseline")  # run 1: 1.0
    lab.ok("keep")
    lab.ok("measure_noise", repeats=2)  # runs 2, 3: 1.002, 0.998 (threshold 0.004)
    edit(ws, val=0.99)
    marginal = lab.ok("run_experiment", description="a marginal idea")  # run 4: 0.99
    assert answer(lab.call("confirm"))["confirmed"]  # runs 5 (control) and 6 (confirmation)
    lab.ok("keep")
    edit(ws, val=0.9, scale=" * 2")
    scaled = lab.ok("run_experiment", description="scaled attention")  # run 7: 0.9, beyond the noise
    lab.ok("keep")
    edit(ws, val=0.95, scale=" * 2")
    lab.ok("run_experiment", description="worse | idea")  # run 8
    lab.ok("discard")
    edit(ws, val=0.9, crash="CRASH = 1", scale=" * 2")
    lab.ok("run_experiment", description="it crashes")  # run 9
    lab.ok("discard")
    lab.start, lab.kept = start, {"marginal": marginal["commit"], "scaled": scaled["commit"]}
    yield lab
    lab.loop.shutdown()


def section(text: str, title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found, f"no section {title!r} in:\n{text}"
    return found.group(1)


def test_the_report_holds_each_section(night):
    made = night.ok("report")
    path = night.ws / made["path"]
    assert path.parent == night.ws / ".research-loop" / "reports" and path.name.startswith("night-")
    assert (made["kept"], made["ideas"], made["extra_runs"]) == (3, 5, 4) and made["slot_hours"] > 0
    text = path.read_text()
    assert git(night.ws, "status", "--porcelain") == ""  # the report and its chart are ignored by git

    summary = section(text, "Summary")
    assert f"started from `{night.start[:7]}`" in summary
    assert "best val_bpb | 0.900000" in summary and "gain +0.100000 (10.00%)" in summary
    assert "9 logged: 5 ideas (3 kept, 1 discarded, 1 crashed) and 4 extra runs" in summary

    chart = re.search(r"!\[val_bpb of every run\]\((.+?)\)", section(text, "Progress")).group(1)
    assert (path.parent / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    kept = section(text, "Kept changes")
    assert [m for m in re.findall(r"^### \d+\. (.+)$", kept, re.M)] == ["baseline", "a marginal idea",
                                                                         "scaled attention"]
    marginal = kept.split("### 2.")[1].split("### 3.")[0]
    assert "val_bpb 1.000000 -> 0.990000 (gain +0.010000, 1.00%)" in marginal  # over its parent, the baseline
    assert "Evidence: confirmed: rerun beside a rerun of the best, the candidate won each pair (-0.014000) (reruns 5, " \
           "6); measured better by 0.010000, beyond noise (threshold 0.004000)." in marginal
    assert "-VAL_BPB = 1.0\n+VAL_BPB = 0.99" in marginal
    scaled = kept.split("### 3.")[1]
    assert "0.990000 -> 0.900000 (gain +0.090000" in scaled and "beyond the noise" in scaled
    assert "-    return x\n+    return x * 2" in scaled

    tried = section(text, "What was tried")
    assert "### constant VAL_BPB: 3 tried, 2 kept" in tried
    assert "### code: attention: 1 tried, 1 kept" in tried
    assert "### constant CRASH: 1 tried, 0 kept" in tried and "| crash | crash |" in tried
    assert "worse \\| idea" in tried  # a description cannot break the table
    assert "noise repeat" not in tried and "control" not in tried  # reruns are not ideas

    noise = section(text, "Noise")
    assert "std 0.002000" in noise and "beyond 0.004000" in noise

    extra = section(text, "Extra runs")
    assert "2 noise repeats, 1 confirmation, 1 control." in extra
    assert re.search(r"^\| 5 \| control \| 4 \|", extra, re.M) and re.search(r"^\| 6 \| confirmation \| 4 \|",
                                                                               extra, re.M)
    assert re.search(r"^\| 2 \| noise repeat \|  \| 1.002000 \|", extra, re.M)

    spent = section(text, "Time spent")
    assert "slot-hours on the CPU over 9 runs" in spent


def test_a_pull_request_branch_has_one_commit_per_kept_change(night):
    research_tip = git(night.ws, "rev-parse", "autoresearch/night").strip()
    working = (night.ws / "train.py").read_bytes()
    made = night.ok("report", branch="pr/night")
    assert made["branch"] == "pr/night" and len(made["commits"]) == 2  # the baseline changed nothing
    commits = git(night.ws, "rev-list", "--reverse", f"{night.start}..pr/night").split()
    assert [c[:7] for c in commits] == made["commits"]
    assert git(night.ws, "rev-parse", f"{commits[0]}^").strip() == night.start  # on the starting point
    for commit, kept in zip(commits, ("marginal", "scaled")):
        assert git(night.ws, "show", f"{commit}:train.py") == git(night.ws, "show", f"{night.kept[kept]}:train.py")
        # nothing else of the tree differs from the kept run's
        assert git(night.ws, "diff", "--name-only", commit, night.kept[kept]) == ""
    first = git(night.ws, "log", "-1", "--format=%B", commits[0])
    assert first.startswith("a marginal idea\n\nval_bpb 1.000000 -> 0.990000 (gain +0.010000, 1.00%)")
    assert "Evidence: confirmed" in first and "run 4" in first
    second = git(night.ws, "log", "-1", "--format=%B", commits[1])
    assert second.startswith("scaled attention\n") and "Evidence: beyond the noise" in second
    # the research branch, HEAD and the agent's working tree did not move
    assert git(night.ws, "rev-parse", "autoresearch/night").strip() == research_tip
    assert git(night.ws, "branch", "--show-current").strip() == "autoresearch/night"
    assert (night.ws / "train.py").read_bytes() == working and git(night.ws, "status", "--porcelain") == ""
    text = (night.ws / made["path"]).read_text()
    assert f"`pr/night`: 2 commit(s), one per kept change, on the research run's starting point `{night.start[:7]}`" \
           in section(text, "Pull request branch")


REFUSED_NAMES = [
    ("main", "never main, master"), ("master", "never main, master"), ("HEAD", "not a valid git branch name"),
    ("autoresearch/night", "research run's autoresearch/<tag>"), ("autoresearch/other", "autoresearch/<tag>"),
    ("pr/taken", "already exists"), ("bad..name", "not a valid git branch name"), ("-x", "not usable"),
    ("pr/lock.lock", "not a valid git branch name"), ("", "not usable"), (" pr/x", "not usable"),
    # review 93: names git reads as another ref (made refs/heads/refs/heads/main, which the report then said to push
    # as `git push origin refs/heads/main`: main), or cannot make beside one (git's own failure, after the report)
    ("refs/heads/main", "already names"), ("v1", "already names"), ("pr/taken/more", "beside the branch pr/taken"),
    ("pr/" + "x" * 300, "too long")]


def test_bad_branch_names_are_refused_and_nothing_moves(night):
    git(night.ws, "branch", "pr/taken", night.start)
    git(night.ws, "tag", "v1", night.start)
    before = git(night.ws, "for-each-ref", "refs/heads")
    reports = night.ws / ".research-loop" / "reports"
    for name, says in REFUSED_NAMES:
        message = night.refused("report", branch=name)
        assert says in message and "pr/" in message, (name, message)  # and what to name it instead
        assert git(night.ws, "for-each-ref", "refs/heads") == before
        assert not reports.exists()  # refused before anything was written


def test_a_branch_needs_a_kept_change(fake_env):
    lab = Lab(make_workspace(fake_env))
    try:
        assert "No research run" in lab.refused("report")
        lab.baseline()
        assert "nothing to put on a branch" in lab.refused("report", branch="pr/empty")
        assert git(lab.ws, "branch", "--list", "pr/*") == ""
        assert lab.ok("report")["kept"] == 1
    finally:
        lab.loop.shutdown()


def test_an_edited_ledger_does_not_change_the_report(night, capsys):
    worse = next(r for r in night.loop.rows() if r.status == "discard" and r.description.startswith("worse"))
    planted = f"{worse.commit}\t0.100000\t1.0\tkeep\tplanted best\n"  # a real commit, as a better keep
    with open(night.ws / "results.tsv", "a") as ledger:  # while the server runs: it puts its rows back
        ledger.write(planted)
    text = (night.ws / night.ok("report")["path"]).read_text()
    assert "planted" not in text and "best val_bpb | 0.900000" in text
    night.loop.shutdown()
    # the server gone: results.tsv and state.json edited by hand, the command reads the server's copy
    lines = (night.ws / "results.tsv").read_text().replace("0.900000", "0.500000")
    (night.ws / "results.tsv").write_text(lines + planted)
    state_file = night.ws / ".research-loop" / "state.json"
    state = json.loads(state_file.read_text())
    state["rows"].append([worse.commit, 0.1, 1.0, "keep", "planted best"])
    state_file.write_text(json.dumps(state))
    assert cli.main(["report", "--workspace", str(night.ws)]) == 0
    path = capsys.readouterr().out.split("report: ")[1].strip()
    text = open(path).read()
    assert "planted" not in text and "0.500000" not in text and "best val_bpb | 0.900000" in text


def test_progress_png_draws_reruns_apart(night):
    drawn = night.ok("plot_progress")
    assert (drawn["runs_plotted"], drawn["kept"], drawn["crashes_excluded"], drawn["reruns"]) == (8, 3, 1, 4)
    rows = night.loop.rows()
    assert history.rerun_commits(night.ws / "runs", night.loop.state.load(), [r.commit for r in rows]) == {
        r.commit: kind for r, kind in zip(rows[1:5], ("noise repeat", "noise repeat", "control", "confirmation"))}
    assert plot.plot_rows(rows, night.ws / "plain.png")[3] == 0  # without the records, no rerun is known


def test_an_idea_named_like_a_rerun_stays_an_idea(fake_env):
    lab = Lab(make_workspace(fake_env))
    try:
        lab.baseline()
        set_knobs(lab.ws, val_bpb=0.95)
        lab.ok("run_experiment", description="noise repeat 1/1 of abc1234, data order 1")
        lab.ok("discard")
        made = lab.ok("report")
        assert (made["ideas"], made["extra_runs"]) == (2, 0)
    finally:
        lab.loop.shutdown()


def test_spent_sums_each_runs_wall_time_into_the_state():
    state = {"started_at": 1400.0}
    for seconds, device in ((1800.0, "NVIDIA H100 80GB HBM3"), (3600.0, "NVIDIA H100 80GB HBM3"), (36.0, "cpu: x"),
                            (None, "cpu: x")):  # cancelled before it started: no slot time
        cost.add_slot_time(state, seconds, device)
    records = [{"run": {"ended_at": 5000.0, "device": "NVIDIA H100 80GB HBM3"}},
               {"run": {"wall_seconds": 10 ** 6, "ended_at": 4600.0, "device": "cpu: x"}}]  # a record says nothing of it
    times = morning.spent(records, state, now=9000.0)
    assert times == {"wall_hours": 1.0, "gpu_hours": 1.5, "slot_hours": 0.01, "runs": 3,
                     "devices": ["NVIDIA H100 80GB HBM3", "cpu: x"]}


def test_touched_parts_names_the_code_an_edit_changed():
    old = "LR = 1\n\nclass Block:\n    def forward(self, x):\n        return x\n\ndef main():\n    pass\n"
    new = old.replace("return x", "return x + 1").replace("LR = 1", "LR = 2") + "print('hi')\n"
    assert morning.touched_parts(old, new) == ["Block.forward", "module level"]
    assert morning.touched_parts(old, "def (") == ["train.py (does not parse)"]


def test_a_record_edited_for_a_better_story_is_not_believed_by_the_report(night):
    """The agent rewrites the kept change's record: a gain far beyond the noise, more confirmations,
    a smaller noise. The report keeps the server's own account and names the record it left out."""
    honest = (night.ws / night.ok("report")["path"]).read_text()
    record = next((night.ws / "runs").glob(f"0004-{night.kept['marginal'][:7]}.json"))
    forged = json.loads(record.read_text())
    forged["decision"]["evidence"] = "confirmed 5 times, each beyond the noise (threshold 0.000100)"
    forged["result"].update(delta=-0.5, val_bpb=0.49)
    record.write_text(json.dumps(forged))
    planted = night.ws / "runs" / f"0010-{night.kept['scaled'][:7]}.json"  # a record the server never wrote
    planted.write_text(json.dumps(forged | {"run": dict(forged["run"], run=10)}))
    text = (night.ws / night.ok("report")["path"]).read_text()
    marginal = section(text, "Kept changes").split("### 2.")[1].split("### 3.")[0]
    assert "confirmed 5 times" not in text and "0.000100" not in text and "0.49" not in text
    assert f"Evidence: {morning.UNTRUSTED}" in marginal and "val_bpb 1.000000 -> 0.990000 (gain +0.010000, 1.00%)" in marginal
    assert f"1 record(s) under runs/ are not what the server wrote (edited, deleted or unreadable: {record.name})" in text
    assert section(text, "Noise") == section(honest, "Noise")
    assert any(record.name in notice for notice in night.ok("status")["records_changed"])
    assert "confirmed 5 times" not in json.dumps(night.ok("history"))


def test_the_best_the_report_hook_and_dashboard_show_is_what_the_branch_holds(lab):
    """A worse result kept on purpose, then a keep row logged by hand with the agent's own number: the
    report's headline took the lowest keep row ever (0.9, which the branch no longer held, then the
    agent's 0.05 unmarked, "gain +0.95 (95%)"); the Stop hook and the dashboard did the same."""
    lab.ok("setup", tag="t")
    for val in (1.0, 0.9, 0.95):  # baseline, a gain, a worse one kept on request
        (lab.ws / "train.py").write_text(f"VAL_BPB = {val}\n")
        lab.ok("run_experiment", description=f"at {val}")
        lab.ok("keep", unconfirmed=True)
    (lab.ws / "train.py").write_text("VAL_BPB = 0.93\n")
    assert lab.ok("run_experiment", description="behind the best")["delta"] == pytest.approx(-0.02)
    lab.ok("discard")
    assert answer(lab.call("status"))["best_val_bpb"] == 0.95
    summary = section((lab.ws / lab.ok("report")["path"]).read_text(), "Summary")
    assert "best val_bpb | 0.950000" in summary, summary
    hook = subprocess.run([sys.executable, str(REPO / "hooks" / "research_loop_hook.py"), "session-start"],
                          input=json.dumps({"cwd": str(lab.ws)}), capture_output=True, text=True, timeout=30)
    assert "best val_bpb: 0.950000" in hook.stdout, hook.stdout
    assert [r["delta"] for r in dashboard.ledger_view(lab.ws)["rows"]] == [None, -0.1, 0.05, -0.02]

    (lab.ws / "train.py").write_text("VAL_BPB = 0.97\n")
    git(lab.ws, "commit", "-qam", "tuned by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=0.05, memory_gb=1.0, status="keep", description="by hand")
    summary = section((lab.ws / lab.ok("report")["path"]).read_text(), "Summary")
    assert "0.050000 (`" in summary and "the agent's, logged by hand, not measured by the harness)" in summary, summary


def test_a_gain_over_a_best_logged_by_hand_is_not_said_measured_in_the_report_or_the_pull_request(lab):
    """Found by review 62: after log_result(keep) of the agent's own 99.0, a run at 1.04 (worse than the harness's
    1.0), confirmed against a rerun of the hand-logged code and kept, read "99.000000 -> 1.040000 (gain +97.960000,
    98.95%)" in the report's kept changes and in its pull request's commit message, with "Evidence: confirmed"."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.05)
    git(lab.ws, "commit", "-q", "-am", "my idea, measured by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=99.0, memory_gb=1.0, status="keep", description="my idea")
    set_knobs(lab.ws, val_bpb=1.04)
    answer = lab.ok("run_experiment", description="worse than the measured best")
    run = answer["run"]
    # the run's own answer (and the dashboard's card, which shows it) judges no gain over that number either
    assert answer["noise"] == ("better by 97.960000 than the best's val_bpb 99.000000, which is the agent's, logged by "
                               "hand, not measured by the harness: not compared with the noise"), answer["noise"]
    (card,) = [r for r in dashboard.live_view(lab.ws)["runs"] if r["run"] == run]
    assert card["result"]["noise"] == answer["noise"]
    assert lab.ok("confirm", run=run)["confirmed"]
    lab.ok("keep", run=run)
    kept = section((lab.ws / lab.ok("report", branch="pr/night")["path"]).read_text(), "Kept changes")
    said = ("99.000000 -> 1.040000 (gain +97.960000, 98.95%; not a measured gain: the val_bpb before is the agent's, "
            "logged by hand, not measured by the harness)")
    assert said in kept, kept
    assert "1.000000 -> 99.000000 (gain -98.000000, -9800.00%; not a measured gain: this val_bpb is the agent's" in kept
    assert said in git(lab.ws, "log", "-1", "--format=%B", "pr/night")
    # the dashboard's ledger: no delta to or from the number logged by hand (98.0, then -97.95, -97.96, -97.96)
    rows = dashboard.ledger_view(lab.ws)["rows"]
    assert [r["description"][:16] for r in rows] == ["baseline", "my idea (logged ", "control 1/1 for ",
                                                     "confirmation 1/1", "worse than the m"]
    assert [r["delta"] for r in rows] == [None] * 5


def test_a_first_kept_result_logged_by_hand_makes_no_measured_gain_in_the_summary(lab):
    """Review 72: the agent logs its first commit by hand at 99.0 as the first keep, then a run the harness
    measures at 1.04 is confirmed and kept: the report's summary read "against 99.000000 for the first kept result:
    gain +97.960000 (98.95%)" unmarked (review 62 mended the kept changes' lines, not the summary's)."""
    lab.ok("setup", tag="t")
    set_knobs(lab.ws, val_bpb=1.05)
    git(lab.ws, "commit", "-q", "-am", "my start, measured by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=99.0, memory_gb=1.0, status="keep", description="my start")
    set_knobs(lab.ws, val_bpb=1.04)
    run = lab.ok("run_experiment", description="measured at last")["run"]
    assert lab.ok("confirm", run=run)["confirmed"]
    lab.ok("keep", run=run)
    summary = section((lab.ws / lab.ok("report")["path"]).read_text(), "Summary")
    assert ("against 99.000000 for the first kept result: gain +97.960000 (98.95%; not a measured gain: the first "
            "kept val_bpb is the agent's, logged by hand, not measured by the harness)") in summary, summary


def test_a_best_logged_by_hand_makes_no_measured_gain_in_the_summary(lab):
    """Review 74: review 72 marked the summary's gain where the first kept result was logged by hand, not where the
    best was: after a measured baseline at 1.0, the agent's keep logged by hand at 0.05 read "gain +0.950000 (95.00%)"
    as a bare number (the best's marker said only beside the best)."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.05)
    git(lab.ws, "commit", "-q", "-am", "tuned by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=0.05, memory_gb=1.0, status="keep", description="tuned")
    summary = section((lab.ws / lab.ok("report")["path"]).read_text(), "Summary")
    assert ("gain +0.950000 (95.00%; not a measured gain: the best val_bpb is the agent's, logged by hand, not "
            "measured by the harness)") in summary, summary


def test_status_says_whose_the_best_is_once_its_row_left_the_recent_ones(lab):
    """Review 72: status gave the best as a bare number. A keep logged by hand at 0.5 was marked in its row, but once
    five more runs were decided that row left status's recent rows, and status read "best_val_bpb 0.5" alone."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.05)
    git(lab.ws, "commit", "-q", "-am", "tuned by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=0.5, memory_gb=1.0, status="keep", description="by hand")
    for k in range(5):
        set_knobs(lab.ws, val_bpb=1.1 + k / 100)
        lab.ok("run_experiment", description=f"idea {k}")
        lab.ok("discard")
    status = lab.ok("status")
    assert status["best_val_bpb"] == 0.5 and all("by hand" not in r["description"] for r in status["recent"])
    assert status["best_note"] == "the agent's, logged by hand, not measured by the harness", status


def test_the_chart_draws_a_keep_logged_by_hand_apart_and_keeps_its_marker(lab):
    """Review 72: the chart drew a keep logged by hand like a measured one, green and on the best's line, its label cut
    at 40 characters before its marker: the agent's 0.05 read as a measured gain in plot_progress and the report."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.05)
    git(lab.ws, "commit", "-q", "-am", "tuned by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=0.05, memory_gb=1.0, status="keep",
           description="a long account of what was tuned by hand and why it should help")
    assert lab.ok("plot_progress")["not_measured"] == 1
    (row,) = [r for r in lab.loop.rows() if r.val_bpb == 0.05]
    assert plot.label(row) == "a long account of what... (logged by hand)"


def test_what_was_tried_and_history_show_no_delta_over_a_number_logged_by_hand(lab):
    """Review 72: review 62 took the delta over a best logged by hand out of the kept changes' lines, the run's answer
    and the dashboard, but the report's "What was tried" table and the history tool gave the run's recorded delta:
    a run at 1.04 after the agent's own 99.0 read "-97.960000" in both."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.05)
    git(lab.ws, "commit", "-q", "-am", "my idea, measured by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=99.0, memory_gb=1.0, status="keep", description="my idea")
    set_knobs(lab.ws, val_bpb=1.04)
    run = lab.ok("run_experiment", description="worse than the measured best")["run"]
    lab.ok("discard", run=run)
    tried = section((lab.ws / lab.ok("report")["path"]).read_text(), "What was tried")
    assert "worse than the measured best" in tried and "97.96" not in tried, tried
    (line,) = [x for x in lab.ok("history")["lines"] if x.startswith(f"run {run} ")]
    assert "1.040000 " in line and "97.96" not in line, line


def test_the_overnight_summary_and_status_line_show_the_best_the_branch_holds(lab, capsys):
    """Review 57: review 53 mended the report, the hook and the dashboard, not the runner. A worse result
    kept, then a keep row logged by hand with the agent's number: the runner's summary and its status line
    took the lowest keep row ever, 0.9 (which the branch no longer held), then the agent's 0.05, unmarked."""
    import argparse
    from mcp_server.overnight import overnight
    lab.ok("setup", tag="t")
    for val in (1.0, 0.9, 0.95):  # baseline, a gain, a worse one kept on request
        (lab.ws / "train.py").write_text(f"VAL_BPB = {val}\n")
        lab.ok("run_experiment", description=f"at {val}")
        lab.ok("keep", unconfirmed=True)
    parser = argparse.ArgumentParser()
    overnight.add_arguments(parser)
    runner = overnight.Runner(parser.parse_args(["--tag", "t", "--workspace", str(lab.ws)]), "claude")
    runner.summary()
    out = capsys.readouterr().out
    assert "best val_bpb 0.950000 at" in out and "at 0.95" in out, out
    assert "best 0.950000" in runner.status_line()

    (lab.ws / "train.py").write_text("VAL_BPB = 0.97\n")
    git(lab.ws, "commit", "-qam", "tuned by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=0.05, memory_gb=1.0, status="keep", description="by hand")
    runner.summary()
    out = capsys.readouterr().out
    assert "best val_bpb 0.050000 (the agent's, logged by hand, not measured by the harness)" in out, out
    assert "best 0.050000 (not the harness's)" in runner.status_line()


def test_a_kept_diff_with_a_right_to_left_override_is_shown_as_it_runs(lab):
    """Review 59: a bidi override inside train.py reached the report's diff as it was, where the line reads
    otherwise than it runs ("trojan source"): descriptions refuse such characters, train.py cannot."""
    lab.ok("setup", tag="t")
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    (lab.ws / "train.py").write_text((lab.ws / "train.py").read_text() + "WARMUP = 0  # \u202e 1 = PUMRAW\n")
    lab.ok("run_experiment", description="a commented constant")
    lab.ok("keep")
    kept = section((lab.ws / lab.ok("report")["path"]).read_text(), "Kept changes")
    assert "\u202e" not in kept and "# <U+202E> 1 = PUMRAW" in kept, kept
    assert "holds invisible characters** (U+202E RIGHT-TO-LEFT OVERRIDE)" in kept, kept
    shown = dashboard.kept_change(lab.ws, lab.ok("status")["best_commit"])["diff"]  # the dashboard's diff too
    assert "\u202e" not in shown and "# <U+202E> 1 = PUMRAW" in shown, shown


@pytest.mark.parametrize("planted", ["file", "fifo"])
def test_something_else_at_the_reports_folder_is_refused_saying_how_to_move_it(lab, planted):
    """A file (or a FIFO) the agent put at .research-loop/reports: the report tool answered an internal error and
    `research-loop report` ended on a FileExistsError traceback, after making the pull request's branch it was asked
    for. Now both refuse, saying how to move it aside, before any branch is made."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description="better")
    lab.ok("keep", unconfirmed=True)
    reports = lab.ws / ".research-loop" / "reports"
    reports.write_text("planted\n") if planted == "file" else os.mkfifo(reports)
    message = lab.refused("report", branch="pr/night")
    assert ".research-loop/reports is not a folder" in message and "mv .research-loop/reports" in message, message
    assert "pr/night" not in git(lab.ws, "branch", "--list", "pr/night")
    done = subprocess.run([sys.executable, "-m", "mcp_server.cli", "report", "--workspace", str(lab.ws)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert ".research-loop/reports is not a folder" in done.stderr, done.stderr
    assert (reports.read_text() == "planted\n") if planted == "file" else stat.S_ISFIFO(os.lstat(reports).st_mode)


def test_a_first_keep_logged_by_hand_sets_neither_the_start_nor_the_pull_requests_tree(lab):
    """Review 85: the report took the research run's starting point from the first kept commit's parent. A first keep
    logged by hand may sit on commits of the agent's own: one that edits the harness (and train.py), then one that puts
    the harness back. The keep row passes (the kept commit and the tip differ in train.py only), and the report said
    the run "started from" the agent's middle commit, showed the first kept diff against it (the middle commit's
    train.py edit hidden), and built the pull request's branch on its tree: the harness edit went into the branch the
    user pushes, in none of the report's diffs."""
    lab.ok("setup", tag="night")
    start = lab.head()
    (lab.ws / "nanochat" / "common.py").write_text("# harness stand-in\nSMUGGLED = True\n")
    set_knobs(lab.ws, val_bpb=1.0, steps=7)
    git(lab.ws, "commit", "-q", "-am", "a harness edit and a train.py rewrite")
    git(lab.ws, "checkout", start, "--", "nanochat/common.py")
    set_knobs(lab.ws, val_bpb=1.0, steps=8)
    git(lab.ws, "commit", "-q", "-am", "the harness put back, one constant changed")
    mine = lab.head()
    lab.ok("log_result", commit=mine, val_bpb=1.0, memory_gb=1.0, status="keep", description="my start")
    set_knobs(lab.ws, val_bpb=0.9, steps=8)
    lab.ok("run_experiment", description="measured")
    lab.ok("keep", unconfirmed=True)
    made = lab.ok("report", branch="pr/night")
    assert git(lab.ws, "diff", "--name-only", start, "pr/night").split() == ["train.py"]
    assert git(lab.ws, "rev-parse", f"{made['commits'][0]}^").strip() == start
    text = (lab.ws / made["path"]).read_text()
    assert f"started from `{start[:7]}`" in section(text, "Summary")
    first = section(text, "Kept changes").split("### 2.")[0]
    assert "-STEPS" not in first and "+STEPS = 8" in first  # the whole change from the start: STEPS was not there
    shown = dashboard.kept_change(lab.ws, mine[:7])  # the dashboard's diff of that keep: against the start too
    assert shown["parent"] == start[:7] and "-STEPS" not in shown["diff"] and "+STEPS = 8" in shown["diff"]


def test_the_report_tool_of_the_owner_believes_its_own_records_not_a_copy_forged_since(lab):
    """Review 85: the report tool read the server's copy of the state as it lay under the git directory, and the owner
    puts the copy right only in a transaction: a copy forged between two calls (the kept idea's 0.95 made 0.5, its
    evidence a gain of 0.5) was the report the owner wrote, though the owner's status said 0.95."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.95)
    lab.ok("run_experiment", description="an idea")
    lab.ok("keep", unconfirmed=True)
    copy = records_dir(lab.ws) / "state.json"
    forged = json.loads(copy.read_text())
    forged["rows"][1][1] = 0.5
    copy.write_text(json.dumps(forged))
    text = (lab.ws / lab.ok("report")["path"]).read_text()
    assert "0.500000" not in text and "1.000000 -> 0.950000" in text, section(text, "Kept changes")
    assert json.loads(copy.read_text())["rows"][1][1] == 0.95  # and the copy is the owner's again
