"""Never stuck, nothing lost: every outcome a run can have is resolvable, the records cannot be
bent, and bad input gets a clear refusal. Each test plays an odd, unlucky or hostile agent against
the real server (in-process MCP client, real git, the fake trainer)."""
import json
import threading
import time
from pathlib import Path

import pytest

from mcp_server.core.ledger import MAX_DESCRIPTION
from mcp_server.core.limits import STOPPED_EARLY
from mcp_server.core.programs import MAX_PROGRAM_BYTES
from server_support import (
    Lab, answer, exporting_workspace, git, ledger_lines, make_workspace, processes_in, set_knobs, slot_dir, wait_until,
)


# --- every result the server can produce can be resolved -----------------------------------
@pytest.mark.parametrize("value", ["0", "-0.5", "1e400"])
def test_a_summary_that_is_no_valid_result_is_a_crash_that_discard_resolves(lab, value):
    lab.baseline()
    (lab.ws / "train.py").write_text(f"VAL_BPB = {value}\n")
    result = lab.ok("run_experiment", description=f"prints val_bpb {value}")
    assert result["status"] == "crash" and "not a valid result" in result["tail"]
    assert "cannot be kept" in lab.refused("keep")
    assert lab.ok("discard")["row"]["status"] == "crash"
    assert lab.ok("status")["next"] == "edit train.py, then run_experiment(description)"


def test_long_descriptions_notes_and_markers_always_fit_the_ledger(lab):
    lab.baseline()
    long = "x" * MAX_DESCRIPTION
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description=long)
    kept = lab.ok("keep", unconfirmed=True, note="n" * MAX_DESCRIPTION)["row"]["description"]
    assert len(kept) <= MAX_DESCRIPTION and kept.startswith("xxx") and kept.endswith("...)")
    set_knobs(lab.ws, val_bpb=0.95)
    lab.ok("run_experiment", description=long)
    assert len(lab.ok("discard", reason="r" * MAX_DESCRIPTION)["row"]["description"]) <= MAX_DESCRIPTION
    set_knobs(lab.ws, sleep=60, steps=60)
    lab.ok("run_experiment", description=long, wait=False)
    lab.restart()  # interrupted: the row gets " (interrupted)" appended
    row = lab.ok("discard")["row"]
    assert row["description"].endswith("... (interrupted)") and len(row["description"]) == MAX_DESCRIPTION
    assert all(len(line.split("\t")) == 5 for line in ledger_lines(lab.ws))


def test_a_train_py_too_big_to_compare_at_every_answer_is_refused_before_it_runs(lab):
    """Found by review 80: every answer compares the undecided runs' train.py with their best's as programs, 17 s a
    call for a 6 MB one. A train.py over MAX_PROGRAM_BYTES is refused with the fix, and nothing is queued."""
    lab.baseline()
    head = lab.head()
    (lab.ws / "train.py").write_text("VAL_BPB = 0.5\n# " + "x" * MAX_PROGRAM_BYTES + "\n")
    refusal = lab.refused("run_experiment", description="a table in train.py")
    assert "more than the 1 MiB a run takes" in refusal and f"git checkout {head[:7]} -- train.py" in refusal, refusal
    assert lab.head() == head and len(ledger_lines(lab.ws)) == 2 and not lab.ok("status").get("running")



def test_a_train_py_nested_too_deep_for_the_parser_is_tried_and_discarded(lab):
    """Review 83: what each run changed in train.py (history.describe_change, at every decision, and at run_experiment
    once a decided run set a constant) parsed it catching SyntaxError only: nested 5,000 deep, the parser raises
    RecursionError (a crash of the run, as Python cannot compile it either), so run_experiment and then every discard
    of that run failed with an internal error, and the undecided run held the research run for good; once discarded,
    the morning report, which names the parts of train.py each idea touched, failed the same way."""
    lab.baseline()
    for attribute in ("a", "b"):  # the second once a decided run changed a constant, which run_experiment names
        (lab.ws / "train.py").write_text(f"VAL_BPB = 0.9\nX = y{('.' + attribute) * 5000}\n")
        deep = lab.ok("run_experiment", description="nested deep")
        assert lab.ok("discard", run=deep["run"])["row"]["status"] in ("discard", "crash")
        assert not lab.ok("status").get("undecided")
        if attribute == "a":
            set_knobs(lab.ws, val_bpb=0.95)
            lab.ok("discard", run=lab.ok("run_experiment", description="a constant changed")["run"])
    report = Path(lab.ok("report")["path"]).read_text()  # the report names the parts each idea touched
    assert "nested deep" in report and "does not parse" in report, report



def test_a_train_py_rewritten_line_by_line_is_tried_decided_and_reported_in_moments(fake_env):
    """Review 83: what a run changed beyond its constants was counted with difflib.ndiff, whose pairing of similar lines
    within a replaced block is quadratic and more: 2,000 lines rewritten (27 kB, the size of upstream's train.py) took
    58 s, inside the transaction of each discard and keep (and of run_experiment, once a decided run had set a
    constant), holding the state's lock: every other call was refused as busy, and a run's end waited to be recorded.
    The report's parts of train.py each idea touched matched lines without autojunk: 2,000 lines of one text against
    the same alternating with another took 81 s, for each such idea. A rewrite of 2,000 lines is decided and reported
    at once."""
    lines = 2000
    base = "VAL_BPB = 1.0\n" + "x = 1\n" * lines
    lab = Lab(make_workspace(fake_env, base))
    try:
        lab.baseline()
        (lab.ws / "train.py").write_text(base.replace("VAL_BPB = 1.0", "VAL_BPB = 0.95"))
        lab.ok("discard", run=lab.ok("run_experiment", description="a constant changed")["run"])
        (lab.ws / "train.py").write_text("VAL_BPB = 0.9\n" + "x = 1\ny = 1\n" * (lines // 2))
        started = time.monotonic()
        lab.ok("discard", run=lab.ok("run_experiment", description="every other line rewritten")["run"])
        assert "other line(s)" in lab.ok("history")["lines"][-1]
        assert "code: module level" in Path(lab.ok("report")["path"]).read_text()
        assert time.monotonic() - started < 30
    finally:
        lab.loop.shutdown()

@pytest.mark.parametrize("padding", [b"# " + b"x" * MAX_PROGRAM_BYTES + b"\n", b"# \x00\n"],
                         ids=["over-1-MiB", "a-null-byte"])
def test_a_best_the_program_comparison_cannot_read_is_not_logged_by_hand(lab, padding):
    """Review 81: review 79's rule (a rerun of the best's own program is no change, however its best was logged) reads
    both train.py as programs, and a best it cannot read escaped it. The baseline's train.py with a comment of over
    1 MiB (the comparison's cap since review 80), or with a null byte in a comment (no Python, never run),
    committed and logged as a keep by hand, was a best same_program could not read: the baseline's program run again
    (rerun=true) was no "no change" but a candidate against the number logged by hand, a second draw of one program
    sent to confirm's one pair (a coin flip). A keep logged by hand must be a train.py the comparison reads."""
    lab.baseline()
    kept, lines = lab.loop.state.load()["kept_commit"], ledger_lines(lab.ws)
    (lab.ws / "train.py").write_bytes(b"VAL_BPB = 1.0\n" + padding)
    git(lab.ws, "commit", "-qam", "the baseline, noted by hand")
    refused = lab.refused("log_result", commit=lab.head(), val_bpb=1.0, memory_gb=0.0, status="keep",
                          description="noted by hand")
    assert "could not be told from a change to it" in refused and "Log it as a discard" in refused, refused
    assert (ledger_lines(lab.ws), lab.loop.state.load()["kept_commit"]) == (lines, kept)


# --- the ledger and the branch always agree ---------------------------------------------------
def test_log_result_cannot_plant_rows_for_the_servers_runs_the_branch_or_main(lab):
    lab.baseline()
    set_knobs(lab.ws, sleep=30, steps=30)
    running = lab.ok("run_experiment", description="slow", wait=False)
    refused = lab.refused("log_result", commit=running["commit"], val_bpb=0.5, memory_gb=1.0, status="keep",
                          description="planted")
    assert "run 2 of this server" in refused
    lab.ok("cancel", run=running["run"])
    main = git(lab.ws, "rev-parse", "main").strip()
    assert "on main" in lab.refused("log_result", commit=main, val_bpb=0.1, memory_gb=1.0, status="keep",
                                    description="main is best")
    assert "contradict the branch" in lab.refused("log_result", commit=main, val_bpb=0.1, memory_gb=1.0,
                                                  status="discard", description="x")
    status = lab.ok("status")
    assert status["best_val_bpb"] == 1.0 and status["kept_commit"] == lab.head()[:7]
    assert [line.split("\t")[3] for line in ledger_lines(lab.ws)[1:]] == ["keep", "crash"]  # baseline, cancel


def test_a_keep_logged_by_hand_must_be_the_branch_tip_and_becomes_the_kept_commit(lab):
    lab.baseline()
    (lab.ws / "train.py").write_text("VAL_BPB = 0.8\n")
    git(lab.ws, "commit", "-q", "-am", "run by hand")
    tip = lab.head()
    logged = lab.ok("log_result", commit=tip, val_bpb=0.8, memory_gb=1.0, status="keep", description="by hand")
    assert logged["row"]["commit"] == tip[:7]
    assert lab.ok("status")["kept_commit"] == tip[:7]
    set_knobs(lab.ws, val_bpb=0.7)
    result = lab.ok("run_experiment", description="on top of the hand-kept commit")
    assert result["best_commit"] == tip[:7] and result["delta"] == pytest.approx(-0.1)


def test_status_next_never_says_keep_for_a_result_keep_refuses(fake_env):
    """Review 58: status().next said "keep() or discard()" for a gain within the noise, which keep refuses until
    confirmed, and again once its confirmation failed; it now names confirm, then discard."""
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nORDER_EFFECT = 0.01\n"))  # each data order 0.01 worse
    try:
        lab.baseline()
        assert lab.ok("measure_noise", repeats=2)["noise"]["threshold"] == pytest.approx(0.02)
        set_knobs(lab.ws, val_bpb=0.99, order_effect=0.02)  # a gain on order 0 only
        n = lab.ok("run_experiment", description="a gain within the noise")["run"]
        assert lab.ok("status")["next"] == f"confirm(run={n}), then keep(run={n}) if the gain holds; or discard(run={n})"
        assert "needs confirming" in lab.refused("keep")
        assert not lab.ok("confirm", run=n)["confirmed"]  # on order 3: the candidate 1.05, the best 1.03
        assert lab.ok("status")["next"].startswith(f"discard(run={n}): its confirmation failed")
        assert "did not hold" in lab.refused("keep", run=n)
        assert lab.ok("discard", run=n)["row"]["status"] == "discard"
    finally:
        lab.loop.shutdown()


def test_status_next_asks_for_unverified_where_keep_does(fake_env):
    """Review 58: a result whose val_bpb is train.py's own (no export for the harness to score) got "keep() or
    discard()" from status().next, and keep() refused it without unverified=true."""
    ws = exporting_workspace(fake_env)
    lab = Lab(ws)
    try:
        lab.ok("setup", tag="t")
        n = lab.ok("run_experiment", description="baseline")["run"]
        assert lab.ok("status")["next"].startswith(f"keep(run={n}, unverified=true) or discard(run={n})")
        assert "unverified=true" in lab.refused("keep")
        assert lab.ok("keep", run=n, unverified=True)["row"]["status"] == "keep"
    finally:
        lab.loop.shutdown()


def test_a_keep_logged_by_hand_is_marked_and_reaches_no_target(lab):
    """log_result's keep row holds the agent's own number, which no harness measured: it was written
    unmarked (results.tsv, status, the dashboard read it as any kept result), and a number below the
    target ended the research run as "the target val_bpb is reached"."""
    lab.ok("setup", tag="t", target_val_bpb=0.6)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    (lab.ws / "train.py").write_text("VAL_BPB = 1.3\n")
    git(lab.ws, "commit", "-q", "-am", "my idea")
    logged = lab.ok("log_result", commit=lab.head(), val_bpb=0.5, memory_gb=1.0, status="keep", description="my idea")
    assert logged["row"]["description"] == "my idea (logged by hand)"
    assert ledger_lines(lab.ws)[-1].endswith("\tkeep\tmy idea (logged by hand)")
    status = lab.ok("status")
    assert status["ended"] is None and "reached" not in status["next"]
    assert "target val_bpb 0.6 (best 1.000000)" in status["limits"], status["limits"]  # not the hand-logged 0.5
    set_knobs(lab.ws, val_bpb=0.55)
    lab.ok("run_experiment", description="measured below the target")
    lab.ok("keep")
    assert "target val_bpb 0.6 is reached (0.550000)" in lab.ok("status")["ended"]


def test_a_gain_over_a_number_logged_by_hand_is_confirmed_before_keep(lab):
    """Review 58: a keep row logged by hand with a number of the agent's own (99.0) became the base of the next
    run's delta: code worse than the harness's measured best (1.04 against 1.0) was kept as a gain of 97.96,
    "beyond the noise", with no warning. A gain over a number the harness did not measure is now confirmed
    first, against a rerun of the best's code, and the number is no value of the noise either (it counted in the
    estimate as the kept commit's own)."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.05, noise=0.001)  # its repeats differ, as on other data orders (test_data_order)
    git(lab.ws, "commit", "-q", "-am", "my idea, measured by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=99.0, memory_gb=1.0, status="keep", description="my idea")
    assert "Two values are needed" in lab.refused("measure_noise", repeats=1)  # 99.0 is no value of the noise
    assert 99.0 not in lab.ok("measure_noise", repeats=2)["noise"]["values"]  # a keep beyond it needs no confirm
    set_knobs(lab.ws, val_bpb=1.04)
    result = lab.ok("run_experiment", description="worse than the measured best")
    assert result["delta"] == pytest.approx(-97.96)
    assert "logged by hand" in result["confirm_first"] and result["next"].startswith(f"confirm(run={result['run']})")
    refused = lab.refused("keep")
    assert "needs confirming before keep" in refused and "logged by hand" in refused
    confirmation = lab.ok("confirm", run=result["run"])  # a rerun of the hand-logged code (run 5: 1.051) beside it
    assert confirmation["confirmed"] and confirmation["control_val_bpb"] == [pytest.approx(1.051)]
    assert lab.ok("keep", run=result["run"])["evidence"].startswith("confirmed")


def test_the_bests_own_program_run_again_is_no_change_to_keep_or_confirm(lab, monkeypatch):
    """Stop 48: run_experiment(rerun=true) of the best unchanged (the refusal of a plain one names it) was an ordinary
    candidate: the agent ran it until its luck went its way, and keep made the lucky number the best ("noise not
    measured" as its evidence; beside a noise estimate, confirm's one pair was a coin flip), the morning report reading
    "gain +0.010000" beside "no change". The same program with a comment added is no change either."""
    monkeypatch.setenv("FAKE_NOISE", "0.01")  # runs 1, 2, 3 measure 1.0, 1.01, 0.99, then again
    lab.baseline()  # the first result of the research run: the same code as its start, kept
    worse = lab.ok("run_experiment", description="the best again", rerun=True)
    assert worse["val_bpb"] == 1.01 and worse["next"].startswith("run 2's train.py is the program of the best")
    assert lab.ok("status")["next"].startswith("discard(run=2): run 2's train.py is the program of the best")
    lab.ok("discard")
    (lab.ws / "train.py").write_text("VAL_BPB = 1.0  # the best, with a comment\n")
    lucky = lab.ok("run_experiment", description="the best, commented")
    assert lucky["val_bpb"] == 0.99 and lucky["delta"] == pytest.approx(-0.01)
    before = (ledger_lines(lab.ws), lab.head(), lab.loop.state.load().get("kept_commit"))
    for refused in (lab.refused("keep"), lab.refused("keep", unconfirmed=True), lab.refused("confirm")):
        assert "the luck of two runs of one program, no change to keep or confirm. discard(run=3)" in refused, refused
    assert (ledger_lines(lab.ws), lab.head(), lab.loop.state.load().get("kept_commit")) == before
    assert lab.ok("discard")["row"]["status"] == "discard"
    assert lab.ok("status")["best_val_bpb"] == 1.0


def test_the_bests_own_program_logged_by_hand_over_it_gives_no_second_draw(lab, monkeypatch):
    """Review 79: a rerun of a best logged by hand still keeps (its number is no measurement), so the agent made the
    measured best one logged by hand: the best's train.py with a comment, committed on the branch and kept with
    log_result at the best's number. Its rerun, the same program, was then an ordinary candidate again, kept once its
    luck went its way. The last best the harness measured is that program, so it is no change."""
    monkeypatch.setenv("FAKE_NOISE", "0.01")  # runs 1, 2, 3 measure 1.0, 1.01, 0.99
    lab.baseline()
    (lab.ws / "train.py").write_text("VAL_BPB = 1.0  # the best, noted by hand\n")
    git(lab.ws, "commit", "-qam", "the best, noted by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=1.0, memory_gb=0.0, status="keep", description="noted by hand")
    lab.ok("discard", run=lab.ok("run_experiment", description="the best again", rerun=True)["run"])
    lucky = lab.ok("run_experiment", description="the best again", rerun=True)
    assert lucky["val_bpb"] == 0.99 and lucky["next"].startswith("run 3's train.py is the program of the best"), lucky
    before = (ledger_lines(lab.ws), lab.loop.state.load().get("kept_commit"))
    for refused in (lab.refused("keep"), lab.refused("keep", unconfirmed=True), lab.refused("confirm")):
        assert "is that program" in refused and "no change to keep or confirm. discard(run=3)" in refused, refused
    assert (ledger_lines(lab.ws), lab.loop.state.load().get("kept_commit")) == before


def test_the_program_of_an_older_measured_best_logged_by_hand_gives_no_second_draw(lab, monkeypatch):
    """Review 80: review 79's rule looked only at the last best the harness measured before a best logged by hand. The
    agent kept a worse idea first (measured), then committed the baseline's train.py with a comment and logged it as a
    keep by hand: the last measured best was the worse idea's program, so a rerun of the hand-logged best, the
    baseline's program measured before, was a candidate again, sent to confirm's one pair of one program (a coin
    flip). Any keep the harness measured of that program makes its rerun no change."""
    monkeypatch.setenv("FAKE_NOISE", "0.01")  # runs 1, 2, 3 measure their VAL_BPB +0, +0.01, -0.01
    lab.baseline()  # 1.0, measured
    set_knobs(lab.ws, val_bpb=1.0, steps=6)  # another program, no better
    lab.ok("run_experiment", description="six steps")
    assert lab.ok("keep")["warning"]  # 1.01, measured: the last measured best is this program
    (lab.ws / "train.py").write_text("VAL_BPB = 1.0  # the baseline, noted by hand\n")
    git(lab.ws, "commit", "-qam", "the baseline, noted by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=1.0, memory_gb=0.0, status="keep", description="noted by hand")
    lucky = lab.ok("run_experiment", description="the best again", rerun=True)
    assert lucky["val_bpb"] == 0.99 and lucky["next"].startswith("run 3's train.py is the program of the best"), lucky
    before = (ledger_lines(lab.ws), lab.loop.state.load().get("kept_commit"))
    for refused in (lab.refused("keep"), lab.refused("keep", unconfirmed=True), lab.refused("confirm")):
        assert "no change to keep or confirm. discard(run=3)" in refused, refused
    assert (ledger_lines(lab.ws), lab.loop.state.load().get("kept_commit")) == before



def test_the_program_of_a_best_logged_by_hand_is_never_confirmed_against_itself(lab, monkeypatch):
    """Review 83: a best logged by hand whose program the harness never measured: its rerun keeps (the program's first
    measurement), but its answer and status said confirm first (a gain over a number logged by hand), and confirm
    reran that one program beside itself: a coin flip, whose win made the rerun's draw (the luckiest of as many as the
    agent cared to discard) a keep whose evidence read "confirmed". Confirm refuses it, and the answers say keep with
    unconfirmed=true, the evidence naming it for what it is."""
    monkeypatch.setenv("FAKE_NOISE", "0.01")  # run n measures its VAL_BPB + 0.01 x (n mod 3 - 1)
    lab.ok("setup", tag="t")
    lab.ok("run_experiment", description="baseline")  # run 1: the research run's start, no number to confirm against
    assert "keep(run=1) keeps it as the first result" in lab.refused("confirm", run=1)
    lab.ok("keep")
    for value in (0.97, 0.98):  # runs 2, 3: ideas tried and dropped
        set_knobs(lab.ws, val_bpb=value)
        lab.ok("discard", run=lab.ok("run_experiment", description=f"idea {value}")["run"])
    (lab.ws / "train.py").write_text("VAL_BPB = 1.0\nWIDTH = 2\n")  # a program the harness never measured
    git(lab.ws, "commit", "-qam", "my idea, measured by hand")
    lab.ok("log_result", commit=lab.head(), val_bpb=1.02, memory_gb=0.0, status="keep", description="by hand")
    first = lab.ok("run_experiment", description="my idea, measured", rerun=True)  # run 4: 1.0
    assert first["val_bpb"] == 1.0 and first["next"].startswith("keep(run=4, unconfirmed=true)"), first
    assert lab.ok("status")["next"].startswith("keep(run=4, unconfirmed=true)")
    refused = lab.refused("confirm", run=4)  # it would rerun the program on both sides: runs 5 (1.01) and 6 (0.99)
    assert "coin flip" in refused and "keep(run=4, unconfirmed=true)" in refused, refused
    assert not lab.ok("status").get("running")  # nothing was queued
    assert "needs confirming" in lab.refused("keep", run=4)
    assert lab.ok("keep", run=4, unconfirmed=True)["evidence"].startswith("kept unconfirmed on request")

def test_the_early_stops_marker_in_the_agents_words_does_not_hide_a_failure(lab):
    """Stop 48: a crash row counts toward max_failures_in_row unless it holds the early stop's marker " (stopped early: ",
    which the agent could write itself: discard(reason="stopped early: ...") of each crash, or a description or
    log_result row holding it, kept the failures in a row at 0, so a night of crashes never ended on the limit. The
    marker is the server's own now, like " (unverified)" and " (logged by hand)"."""
    lab.ok("setup", tag="t", max_failures_in_row=2)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    set_knobs(lab.ws, crash=1)
    lab.ok("run_experiment", description="broken")
    assert "(stopped early: ...) in the ledger" in lab.refused("discard", reason="stopped early: behind the best")
    lab.ok("discard", reason="a typo")
    commit = lab.loop.state.load()["kept_commit"]
    for refused in (lab.refused("run_experiment", description="x (stopped early: at 50%)", rerun=True),
                    lab.refused("log_result", commit=commit, val_bpb=0.0, memory_gb=0.0, status="crash",
                                description="by hand (stopped early: at 50%)")):
        assert "reword it" in refused, refused
    set_knobs(lab.ws, crash=1)
    lab.ok("run_experiment", description="broken again", rerun=True)  # the same broken code
    lab.ok("discard")
    assert "2 failures in a row" in lab.ok("status")["ended"]


def test_the_early_stops_marker_split_between_a_description_and_a_reason_does_not_hide_a_failure(lab):
    """Review 80: stop 48 refused the early stop's marker " (stopped early: " in the agent's description and in its
    reason, each alone; but a row's description is the run's, then " (reason)". A description ending "(stopped early:"
    (no space after: no marker) and any reason made the crash row read "broken (stopped early: (a typo)", the marker
    whole, so no crash counted toward max_failures_in_row and a night of crashes never ended. Such a description is
    refused as the marker is; the row of a log_result too, which the server follows with " (logged by hand)"."""
    lab.ok("setup", tag="t", max_failures_in_row=2)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    commit = lab.loop.state.load()["kept_commit"]
    set_knobs(lab.ws, crash=1)
    for refused in (lab.refused("run_experiment", description="broken (stopped early:"),
                    lab.refused("log_result", commit=commit, val_bpb=0.0, memory_gb=0.0, status="crash",
                                description="by hand (stopped early:")):
        assert "(stopped early: ...) in the ledger" in refused and "reword it" in refused, refused
    for n in range(2):
        set_knobs(lab.ws, crash=1, steps=5 + n)
        lab.ok("run_experiment", description=f"broken {n} (stopped early")
        assert STOPPED_EARLY not in lab.ok("discard", reason="a typo")["row"]["description"]
    assert "2 failures in a row" in lab.ok("status")["ended"]


def test_rows_logged_by_hand_between_crashes_do_not_reset_the_failures_in_a_row(lab):
    """Review 96, played: a discard row of log_result for a commit made by hand (`git commit-tree`) after each crash
    broke the crashes' streak, so a night of crashes never ended on max_failures_in_row; one logged after the limit
    was reached even ended the end (status said 0 failures and run_experiment ran again). A row logged by hand is
    no run of the server's: it neither counts as a failure nor ends the streak."""
    lab.ok("setup", tag="t", max_failures_in_row=2)
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    tree = git(lab.ws, "rev-parse", "HEAD^{tree}").strip()

    def by_hand(n):
        commit = git(lab.ws, "commit-tree", tree, "-m", f"outside {n}").strip()
        lab.ok("log_result", commit=commit, val_bpb=1.5, memory_gb=1.0, status="discard", description=f"outside {n}")

    for n in range(2):
        set_knobs(lab.ws, crash=1, steps=5 + n)
        lab.ok("run_experiment", description=f"broken {n}")
        lab.ok("discard")
        by_hand(n)
    assert "2 failures in a row" in lab.ok("status")["ended"]
    by_hand(2)
    assert "2 failures in a row" in lab.ok("status")["ended"]
    assert "has ended" in lab.refused("run_experiment", description="broken again")


def test_an_unverified_keep_reaches_no_target(fake_env):
    """Review 46: keep(unverified=true) keeps a run whose val_bpb is train.py's own (it exported no model for
    the harness to evaluate), marked " (unverified)"; review 43 kept hand-logged numbers off the target, but
    this one still counted: a train.py that printed val_bpb 0.01 ended the research run as "the target is
    reached"."""
    ws = exporting_workspace(fake_env)
    lab = Lab(ws)
    try:
        lab.ok("setup", tag="t", target_val_bpb=0.6)
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep", unverified=True)
        set_knobs(ws, val_bpb=0.01)
        assert lab.ok("run_experiment", description="my own number")["verified"] is False
        assert lab.ok("keep", unverified=True, note="as printed")["row"]["description"] == \
            "my own number (unverified) (as printed)"
        status = lab.ok("status")
        assert status["ended"] is None and "reached" not in status["next"], status
        assert "target val_bpb 0.6 (best" not in status["limits"], status["limits"]
    finally:
        lab.loop.shutdown()


def test_keep_refuses_when_the_branch_lost_the_kept_commit(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description="better")
    kept = lab.ok("keep", unconfirmed=True)["row"]["commit"]
    set_knobs(lab.ws, val_bpb=0.8)
    lab.ok("run_experiment", description="better still")
    git(lab.ws, "reset", "-q", "--hard", "HEAD~1")  # the agent rewinds the branch by hand
    message = lab.refused("keep", unconfirmed=True)
    assert f"no longer contains the kept commit {kept}" in message and f"git reset --hard {kept}" in message
    git(lab.ws, "reset", "-q", "--hard", kept)
    assert lab.ok("keep", unconfirmed=True)["row"]["val_bpb"] == 0.8
    rows = [line.split("\t") for line in ledger_lines(lab.ws)[1:]]
    on_branch = git(lab.ws, "rev-list", "--abbrev=7", "--abbrev-commit", "main..HEAD").split()
    assert sorted(r[0] for r in rows if r[3] == "keep") == sorted(on_branch)


def test_a_commit_made_by_the_agent_on_the_branch_is_never_dropped(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    git(lab.ws, "commit", "-q", "-am", "my own commit")
    mine = lab.head()
    message = lab.refused("run_experiment", description="x")
    assert "git reset --soft" in message and mine[:7] in message
    git(lab.ws, "reset", "-q", "--soft", "HEAD~1")
    assert lab.ok("run_experiment", description="x")["val_bpb"] == 0.9
    assert git(lab.ws, "cat-file", "-t", mine).strip() == "commit"


def test_setup_of_a_new_tag_never_drops_an_undecided_result(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description="pending")
    git(lab.ws, "checkout", "-q", "-f", "main")
    assert "not decided yet" in lab.refused("setup", tag="other")
    git(lab.ws, "checkout", "-q", "autoresearch/t")
    assert "differs from the new best" in lab.ok("keep", unconfirmed=True)["note"]  # the forced checkout reverted train.py
    git(lab.ws, "checkout", "-q", "-f", "main")
    assert lab.ok("setup", tag="other")["archived_ledger"]


def test_a_new_setup_on_an_edited_harness_is_refused_while_the_research_run_is_active(lab):
    """Review 46: setup pins whatever harness HEAD holds, and the agent may call it: mid-night it committed an
    edit of the harness (nanochat/, prepare.py: the evaluation itself) on a branch of its own and set up a new
    tag from there, and every later run of the night was measured by its harness, unsaid. A harness other
    than the active research run's is set up only once that run has ended or been stopped on purpose (a
    stop is an act of its own, with its reason, which the webhook pings)."""
    lab.baseline()
    git(lab.ws, "checkout", "-q", "-b", "mine")
    (lab.ws / "nanochat" / "common.py").write_text("# harness stand-in, edited\n")
    git(lab.ws, "commit", "-q", "-am", "a better evaluation")
    refused = lab.refused("setup", tag="other")
    assert "harness" in refused and "stop(" in refused, refused
    assert "autoresearch/other" not in git(lab.ws, "branch", "--list", "autoresearch/other")  # nothing made
    lab.ok("stop", reason="a new harness")
    answer = lab.ok("setup", tag="other")
    assert answer["branch"] == "autoresearch/other"
    # the new research run is measured by another harness: said at setup, in status and in the report
    said = "the harness differs from the one autoresearch/"
    assert said in answer["harness_changed"] and "nanochat/common.py" in answer["harness_changed"], answer
    assert said in lab.ok("status")["harness_changed"]
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep")
    report = Path(lab.ok("report")["path"]).read_text()
    assert "| harness | the harness differs" in report and "nanochat/common.py" in report, report


def test_a_second_stop_then_setup_on_the_same_edited_harness_still_says_it_changed(lab):
    """Review 47: the note compared the harness with the research run just before only, so a second stop and
    setup on the agent's edited harness (now the same as the one before's) dropped it: the night's last
    research run, the one the morning report shows, was measured by the edited harness, unsaid. The note is
    carried while the harness stays the one it named."""
    lab.baseline()
    git(lab.ws, "checkout", "-q", "-b", "mine")
    (lab.ws / "nanochat" / "common.py").write_text("# harness stand-in, edited\n")
    git(lab.ws, "commit", "-q", "-am", "a better evaluation")
    lab.ok("stop", reason="a new harness")
    assert lab.ok("setup", tag="other")["harness_changed"]
    lab.ok("stop", reason="once more")
    answer = lab.ok("setup", tag="third")
    assert answer["branch"] == "autoresearch/third"
    said = "the harness differs from the one autoresearch/"
    assert said in (answer["harness_changed"] or "") and "nanochat/common.py" in answer["harness_changed"], answer
    assert said in (lab.ok("status")["harness_changed"] or "")

# --- processes and logs -----------------------------------------------------------------------
def test_a_daemon_that_escaped_the_run_is_killed_and_cannot_write_the_next_result(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.95, escape=1.5)
    first = lab.ok("run_experiment", description="leaves a daemon behind")
    assert (slot_dir(lab.ws) / "escaped.pid").exists() and first["val_bpb"] == 0.95
    # in the sandbox's own PID namespace the daemon dies with the run; without one, the worker kills it and says so
    sandboxed = json.loads((lab.ws / first["log"].replace(".log", ".report.json")).read_text())["sandbox"]
    assert sandboxed or "still running when it ended" in " ".join(first["warnings"])
    assert wait_until(lambda: not processes_in(slot_dir(lab.ws)), 5)
    lab.ok("discard")
    set_knobs(lab.ws, val_bpb=0.97, sleep=3)
    second = lab.ok("run_experiment", description="the next run")
    assert second["val_bpb"] == 0.97  # never the daemon's 0.1
    assert "0.100000" not in (lab.ws / second["log"]).read_text()


def test_a_huge_log_is_capped_and_still_parsed(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9, spam_mb=70)
    result = lab.ok("run_experiment", description="prints 70 MB")
    assert result["val_bpb"] == 0.9 and "capped" in " ".join(result["warnings"])
    assert (lab.ws / result["log"]).stat().st_size < 66 * 2**20


def test_each_run_has_its_own_log(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    first = lab.ok("run_experiment", description="one")
    lab.ok("discard")
    set_knobs(lab.ws, crash=1)
    second = lab.ok("run_experiment", description="two")
    assert first["log"] != second["log"]
    assert "val_bpb:          0.900000" in (lab.ws / first["log"]).read_text()
    assert "fake crash" in (lab.ws / second["log"]).read_text()
    assert (lab.ws / "run.log").read_text() == (lab.ws / second["log"]).read_text()


# --- collisions -------------------------------------------------------------------------------
def test_identical_runs_within_a_second_get_their_own_commits_and_rows(lab):
    lab.baseline()
    set_knobs(lab.ws, val_bpb=1.1)
    commits = []
    for k in range(3):
        commits.append(lab.ok("run_experiment", description="same code, same message", rerun=True)["commit"])
        lab.ok("discard")
    assert len(set(commits)) == 3
    assert [line.split("\t")[0] for line in ledger_lines(lab.ws)[2:]] == commits


def test_ledger_archives_made_within_a_second_never_overwrite_each_other(lab):
    for tag in ("a", "b", "c"):
        git(lab.ws, "checkout", "-q", "main")
        lab.ok("setup", tag=tag)
        lab.ok("run_experiment", description=f"baseline {tag}")
        lab.ok("keep")
    git(lab.ws, "checkout", "-q", "main")
    lab.ok("setup", tag="d")
    archives = sorted((lab.ws / ".research-loop" / "archive").iterdir())
    assert len(archives) == 3
    assert sorted(a.read_text().splitlines()[1].split("\t")[4] for a in archives) == \
        ["baseline a", "baseline b", "baseline c"]


# --- inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("char", ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00", "\x1b"])
def test_characters_that_split_or_corrupt_a_row_are_refused(lab, char):
    lab.baseline()
    message = lab.refused("run_experiment", description=f"a{char}b")
    assert "control character" in message and "Internal error" not in message
    assert "control character" in lab.refused("log_result", commit="abcdef1", val_bpb=1.0, memory_gb=1.0,
                                              status="discard", description=f"a{char}b")
    assert len(ledger_lines(lab.ws)) == 2


@pytest.mark.parametrize("tag", ["nov26\n", "nov26\r", " nov26", "nov26 "])
def test_tags_with_whitespace_around_them_are_refused(lab, tag):
    assert "not a safe branch name" in lab.refused("setup", tag=tag)


@pytest.mark.parametrize("run", ["\u0663", "\u00b2", "1\x00", "1 2"])
def test_odd_run_ids_get_a_clear_refusal(lab, run):
    lab.baseline()
    message = lab.refused("read_metrics", run=run)
    assert "not a run number or a commit hash" in message and "Internal error" not in message


def test_noise_repeats_that_fail_again_are_counted_and_the_refusal_says_how_to_draw_a_fresh_order(fake_env,
                                                                                                   monkeypatch):
    """Found by review 60: the next measure_noise reruns every order an earlier one failed on first, so after two
    failed repeats repeats=2 (what the refusal asked for) measured the same two orders again, and failed again on a
    code that fails there every time; the failed repeats were not counted as extra runs either."""
    # one slot: a repeat that failed before the next was queued blocked it; NOISE: the repeats differ
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nNOISE = 0.001\n"))
    try:
        lab.baseline()
        monkeypatch.setenv("FAKE_CRASH", "1")  # every rerun fails now (the runs take the server's environment)
        lab.restart()
        assert "Too few successful repeats (0)" in lab.refused("measure_noise", repeats=2)  # orders 1, 2
        again = lab.refused("measure_noise", repeats=2)
        assert "data order(s) 1, 2 again before any fresh one: repeats=3 or more also draws a fresh order" in again
        assert lab.loop.state.load()["extra_runs"] == 4
        monkeypatch.delenv("FAKE_CRASH")
        lab.restart()
        for run in lab.loop.runs_of(lab.loop.state.load(), "pending"):
            lab.ok("discard", run=run["run"])
        assert len(lab.ok("measure_noise", repeats=3)["noise"]["values"]) == 4  # orders 1, 2 and a fresh 3
    finally:
        lab.loop.shutdown()


def test_a_process_holding_the_state_lock_gets_a_refusal_not_a_hang(lab, monkeypatch):
    """Found at stop 45: a command of the agent's holding the state's lock (`flock .research-loop/state.lock sleep
    1d`) hung every tool call that records something, until the client gave up. A tool call now waits at most
    LOCK_WAIT_S, is refused with the way out and changes nothing; a run that ends meanwhile is recorded once the
    lock is free (the server's own threads wait as long as it takes)."""
    import fcntl
    import os
    import subprocess

    from mcp_server.core import state
    monkeypatch.setattr(state, "LOCK_WAIT_S", 2.0)
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9, sleep=2)
    assert lab.ok("run_experiment", description="ends while the lock is held", wait=False)["run"] == 2
    lock = lab.ws / ".research-loop" / "state.lock"
    holder = subprocess.Popen(["flock", str(lock), "sleep", "60"], start_new_session=True)
    try:
        def held() -> bool:
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True
            finally:
                os.close(fd)
        assert wait_until(held, 10)
        refused = lab.refused("stop", reason="a night's end")
        assert f"The server's state is locked: {lock} was not free for 2 s" in refused and \
            f"fuser -v {lock}" in refused and "Nothing was changed" in refused, refused
        assert wait_until(lambda: not processes_in(slot_dir(lab.ws, 0)), 20)  # the run ended; its record waits
    finally:
        os.killpg(holder.pid, 9)  # flock and its sleep, which holds the lock too
        holder.wait()
    assert lab.ok("wait")["results"][0]["val_bpb"] == 0.9
    status = lab.ok("status")
    assert status["undecided"] == [2] and status["ended"] is None, status  # the stop changed nothing
    # the server's own thread lock, held longer than a call waits: busy, not a process to end (review 65)
    import threading
    held, release = threading.Event(), threading.Event()

    def hold():
        with lab.loop.state.mutex:
            held.set()
            release.wait(10)
    holder_thread = threading.Thread(target=hold)
    holder_thread.start()
    try:
        held.wait(5)
        busy = lab.refused("stop", reason="a night's end")
        assert "The server is busy" in busy and "Nothing was changed" in busy and "fuser" not in busy, busy
    finally:
        release.set()
        holder_thread.join()


def test_two_stop_now_calls_at_once_both_answer_the_stop_and_leave_nothing_in_flight(lab):
    """Review 63: stop(now=True) lists the runs in flight, then cancels each; a run that left the flight in between
    (another stop or cancel got there first, or it ended) made the call answer "Run N is not queued or running"
    though the research run was stopped, and the runs after it in its list were left training."""
    import anyio
    from mcp import Client
    from mcp_server.server import build_server
    from server_support import answer
    lab.baseline()
    set_knobs(lab.ws, VAL_BPB=0.9, SLEEP=60)
    runs = [lab.ok("run_experiment", description=f"idea {k}", wait=False, rerun=True)["run"] for k in range(6)]
    answers = []

    async def both():
        async with Client(build_server(lab.loop)) as client:
            async def one():
                answers.append(await client.call_tool("stop", {"reason": "morning", "now": True}))
            async with anyio.create_task_group() as calls:
                calls.start_soon(one)
                calls.start_soon(one)
    anyio.run(both)
    assert not any(a.is_error for a in answers), [a.content[0].text for a in answers]
    stops = [answer(a) for a in answers]
    cancelled = sorted(n for s in stops for n in s.get("cancelled") or [])
    assert cancelled == runs and all(s["stopped"] == "morning" for s in stops), stops
    status = lab.ok("status")
    assert not status.get("running") and not status.get("queued") and not status.get("undecided"), status


def test_a_read_only_servers_wait_answers_when_the_owners_run_ends_or_the_owner_dies(lab):
    """Stop 48: wait() on a second server (read-only: another session's, while the first server lives) followed the
    owner's run in flight through events that only the owner's threads set, so it was never answered, neither once
    the run ended nor once the owner died. It reads the state now, and takes over from an owner that has gone."""
    import anyio
    from mcp import Client

    lab.baseline()
    second = Lab(lab.ws)

    def wait_on_second() -> dict:
        async def go():
            with anyio.fail_after(30):  # never answered: fails here instead of hanging the suite
                async with Client(second.server()) as client:
                    return await client.call_tool("wait", {})
        return answer(anyio.run(go))
    try:
        set_knobs(lab.ws, val_bpb=0.9, sleep=1)
        assert lab.ok("run_experiment", description="the owner's run", wait=False)["run"] == 2
        assert [r["val_bpb"] for r in wait_on_second()["results"]] == [0.9]
        assert lab.ok("discard")["row"]["status"] == "discard"
        set_knobs(lab.ws, val_bpb=0.8, sleep=60, steps=60)
        assert lab.ok("run_experiment", description="dies with its owner", wait=False)["run"] == 3
        threading.Timer(2, lab.loop.shutdown).start()  # the owner's session ends while the second one waits
        waited = wait_on_second()
        assert waited["results"] == [] and waited["next"] == "discard() to log the interrupted run", waited
        assert second.loop.state.owned
    finally:
        second.loop.shutdown()
