"""The server's own records decide: results.tsv and state.json changed by anyone else are never believed.

Each test plays what a reward-seeking agent (or a run without a sandbox) would try against the
records, through the real MCP tools, and checks that the decision is the one the server's own
records give, that the change is reported, and that the files are set right with the edited
one kept in .research-loop/archive/.
"""
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from mcp_server.core.state import records_dir
from server_support import Lab, answer, error, git, ledger_lines, make_workspace, set_knobs, wait_until

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"


def edited(lab: Lab, change) -> None:
    """Rewrites results.tsv by hand, as an agent's editor or shell would."""
    path = lab.ws / "results.tsv"
    path.write_text(change(path.read_text()))


def archived(lab: Lab, prefix: str) -> list[str]:
    archive = lab.ws / ".research-loop" / "archive"
    return sorted(p.name for p in archive.glob(prefix + "*")) if archive.is_dir() else []


def regression_against(lab: Lab, value: float) -> dict:
    set_knobs(lab.ws, val_bpb=value)
    return lab.ok("run_experiment", description=f"val {value}")


def assert_told(result: dict, what: str) -> None:
    assert any(what in n and "outside the server" in n for n in result.get("records_changed") or []), result


def test_deleting_the_kept_row_does_not_make_a_regression_the_first_result(lab):
    base = lab.baseline()["row"]
    edited(lab, lambda text: "".join(line + "\n" for line in text.splitlines() if base["commit"] not in line))
    run = regression_against(lab, 1.4)
    assert run["best_val_bpb"] == 1.0 and run["best_commit"] == base["commit"] and run["delta"] == 0.4, run
    assert_told(run, "results.tsv")
    assert ledger_lines(lab.ws)[1].startswith(base["commit"] + "\t1.000000")  # set right
    assert len(archived(lab, "results-edited-")) == 1
    assert "first result" not in lab.ok("keep").get("evidence", "")


def test_deleting_the_ledger_does_not_make_a_regression_the_first_result(lab):
    base = lab.baseline()["row"]
    (lab.ws / "results.tsv").unlink()
    status = lab.ok("status")
    assert status["best_val_bpb"] == 1.0 and status["counts"]["keep"] == 1, status
    assert_told(status, "results.tsv was deleted")
    run = regression_against(lab, 1.4)
    assert run["delta"] == 0.4 and run["best_commit"] == base["commit"], run
    assert ledger_lines(lab.ws) == [HEADER, f"{base['commit']}\t1.000000\t2.0\tkeep\tbaseline"]


def test_a_sixth_column_does_not_hide_the_best(lab):
    lab.baseline()
    edited(lab, lambda text: "".join(line + "\textra\n" for line in text.splitlines()))
    run = regression_against(lab, 1.4)
    assert run["delta"] == 0.4 and run["best_val_bpb"] == 1.0, run
    assert_told(run, "results.tsv")
    assert all(line.count("\t") == 4 for line in ledger_lines(lab.ws))


def test_an_edited_best_value_does_not_move_the_comparison(lab):
    base = lab.baseline()["row"]
    edited(lab, lambda text: text.replace(f"{base['commit']}\t1.000000", f"{base['commit']}\t1.500000"))
    run = regression_against(lab, 1.2)
    assert run["best_val_bpb"] == 1.0 and run["delta"] == 0.2 and run["noise"].startswith("worse by 0.200000"), run
    assert_told(run, "results.tsv")
    assert "1.500000" not in (lab.ws / "results.tsv").read_text()
    assert "1.500000" in (lab.ws / ".research-loop" / "archive" / archived(lab, "results-edited-")[0]).read_text()


def test_a_planted_keep_row_for_a_pending_run_is_not_its_row(lab):
    lab.baseline()
    pending = regression_against(lab, 1.3)
    edited(lab, lambda text: text + f"{pending['commit']}\t0.500000\t1.0\tkeep\tplanted\n")
    status = lab.ok("status")
    assert_told(status, "results.tsv")
    assert [r["val_bpb"] for r in status["recent"]] == [1.0] and status["best_val_bpb"] == 1.0, status
    kept = lab.ok("keep")
    assert kept["row"]["val_bpb"] == 1.3 and kept["best_val_bpb"] == 1.3, kept
    mine = [line for line in ledger_lines(lab.ws) if line.startswith(pending["commit"])]
    assert mine == [f"{pending['commit']}\t1.300000\t2.0\tkeep\tval 1.3"]
    assert [r["val_bpb"] for r in lab.ok("status")["recent"]] == [1.0, 1.3]


def test_a_planted_discard_row_does_not_block_keeping_a_good_result(lab):
    lab.baseline()
    good = regression_against(lab, 0.8)
    edited(lab, lambda text: text + f"{good['commit']}\t0.800000\t2.0\tdiscard\tplanted\n")
    kept = lab.ok("keep", unconfirmed=True)
    assert kept["row"]["status"] == "keep" and kept["best_val_bpb"] == 0.8, kept
    assert_told(kept, "results.tsv")
    assert [line.split("\t")[3] for line in ledger_lines(lab.ws)[1:]] == ["keep", "keep"]


def test_rows_logged_for_outside_runs_stay_in_the_rewritten_ledger(lab):
    """log_result's rows are the server's records too: a ledger rewritten from them keeps them."""
    lab.baseline()
    outside = git(lab.ws, "commit-tree", "HEAD^{tree}", "-m", "trained elsewhere").strip()
    logged = lab.ok("log_result", commit=outside, val_bpb=0.97, memory_gb=1.0, status="crash",
                    description="tried on another machine")
    assert logged["rows_in_ledger"] == 2
    (lab.ws / "results.tsv").write_text(HEADER + "\n")
    assert lab.ok("status")["counts"] == {"keep": 1, "discard": 0, "crash": 1}
    assert ledger_lines(lab.ws)[2].endswith("\tcrash\ttried on another machine")


def test_a_run_that_rewrites_the_state_and_the_ledger_is_not_believed(fake_env):
    """Without a sandbox a run can write anything the user can: here it sets the noise threshold to
    0, so every gain would be "beyond the noise", and appends a planted best row, while it trains."""
    lab = Lab(make_workspace(fake_env, "VAL_BPB = 1.0\nNOISE = 0.05\n"))  # runs 1, 2, 3: 1.0, 1.05, 0.95
    try:
        lab.baseline()
        assert lab.ok("measure_noise", repeats=2)["noise"]["threshold"] == 0.1
        set_knobs(lab.ws, val_bpb=0.95, sleep=3, steps=6)
        run = lab.ok("run_experiment", description="a small gain", wait=False)
        state_path = lab.ws / ".research-loop" / "state.json"
        assert wait_until(lambda: "step" in (lab.ws / run["log"]).read_text(), 30)
        state = json.loads(state_path.read_text())
        state["noise"]["threshold"] = 0.0
        state_path.write_text(json.dumps(state))
        with open(lab.ws / "results.tsv", "a") as f:
            f.write("abcdef1\t0.100000\t1.0\tkeep\tplanted\n")
        result = lab.ok("wait")
        told = " ".join(result.get("records_changed") or [])
        assert "state.json was changed outside the server (changed: noise)" in told, result
        assert "results.tsv was changed outside the server" in told, result
        pending = result["results"][0]
        assert pending["noise"] == "better by 0.050000, within noise (threshold 0.100000)", pending
        assert pending["confirm_first"], pending
        assert "needs confirming" in error(lab.call("keep"))
        assert json.loads(state_path.read_text())["noise"]["threshold"] == 0.1
        assert "planted" not in (lab.ws / "results.tsv").read_text()
        assert archived(lab, "state-edited-") and archived(lab, "results-edited-")

        # forged with the server's own copy too: memory tells it apart, and the copy is put back
        copy = records_dir(lab.ws) / "state.json"
        for path in (state_path, copy):
            state = json.loads(path.read_text())
            state["noise"]["threshold"] = 0.0
            path.write_text(json.dumps(state))
        status = lab.ok("status")
        assert status["noise"]["threshold"] == 0.1 and json.loads(copy.read_text())["noise"]["threshold"] == 0.1
        assert_told(status, "copy of state.json")

        # the same change made while no server runs is caught by the next one at start-up
        lab.loop.shutdown()
        state = json.loads(state_path.read_text())
        state["noise"]["threshold"] = 0.0
        state_path.write_text(json.dumps(state))
        lab.restart()
        status = lab.ok("status")
        assert status["noise"]["threshold"] == 0.1, status
        assert_told(status, "state.json")
    finally:
        lab.loop.shutdown()


def test_a_deleted_state_file_is_put_back_not_read_as_a_fresh_workspace(lab):
    base = lab.baseline()["row"]
    (lab.ws / ".research-loop" / "state.json").unlink()
    run = regression_against(lab, 1.4)
    assert run["best_commit"] == base["commit"] and run["delta"] == 0.4, run
    assert_told(run, "state.json was changed outside the server (deleted)")


def test_a_state_file_whose_bytes_alone_changed_is_told_as_such(lab):
    """Review 96, played: a byte-order mark put before state.json (or its spacing changed) was set right and told as
    "changed outside the server (changed: ): ...", naming no change."""
    lab.baseline()
    path = lab.ws / ".research-loop" / "state.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert_told(lab.ok("status"), "state.json was changed outside the server (its bytes changed, none of its values)")


def test_changes_are_told_once_in_answers_and_listed_in_status(lab):
    lab.baseline()
    edited(lab, lambda text: text + "planted\n")
    refused = error(lab.call("keep"))
    assert "Nothing to keep" in refused and "results.tsv was changed outside the server" in refused
    assert "records_changed" not in text_of(lab.call("history"))
    assert len(lab.ok("status")["records_changed"]) == 1


def text_of(result) -> str:
    return result.content[0].text


def test_records_planted_to_hang_or_exhaust_the_server_are_refused_and_told(lab, tmp_path, monkeypatch):
    """runs/ is the agent's: the baseline's record becomes a FIFO (an open would block), the noise
    repeat's a link to /dev/zero (endless), an idea's a 2 GB file, and a giant is planted beside
    them. Every answer that reads the records comes back at once, from the server's own records,
    and each of the three is told as changed; the planted giant is never read."""
    import os
    import threading
    monkeypatch.setenv("FAKE_NOISE", "0.001")  # the noise repeat measures 1.001 (the idea's runs: 0.989, 0.99)
    lab.baseline()
    lab.ok("measure_noise", repeats=1)
    set_knobs(lab.ws, val_bpb=0.99)
    lab.ok("run_experiment", description="idea")
    lab.ok("discard")
    runs = lab.ws / "runs"
    fifo, endless, giant = (next(runs.glob(f"000{n}-*[0-9a-f].json")) for n in (1, 2, 3))
    for path in (fifo, endless, giant):
        path.unlink()
    os.mkfifo(fifo)
    endless.symlink_to("/dev/zero")
    with open(giant, "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GB to read, none of it on disk
    with open(runs / "0042-abcdef0.json", "wb") as f:
        f.truncate(2 << 30)
    answers = {}

    def calls():
        answers["history"] = lab.ok("history")
        answers["status"] = lab.ok("status")
        answers["report"] = lab.ok("report")
        set_knobs(lab.ws, val_bpb=0.99)
        answers["run"] = lab.ok("run_experiment", description="idea again")

    caller = threading.Thread(target=calls, daemon=True)
    caller.start()
    caller.join(120)
    assert not caller.is_alive(), "a planted record hung the server"
    assert answers["history"]["lines"] == [] and answers["run"]["val_bpb"] == 0.99
    for name in (fifo.name, endless.name, giant.name):
        assert_told(answers["history"], name)  # told in the first answer that read them
        assert_told(answers["status"], name)  # and listed in status
    assert "0042-abcdef0.json" not in json.dumps(answers)
    assert answers["run"]["best_val_bpb"] == 1.0


def test_a_workspace_from_before_record_digests_keeps_its_history_after_the_upgrade(lab):
    """A state written by a server from before the digests has none: the new owner takes the records
    in runs/ as they are, once, so the night's history survives; an edit after that is refused."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.99)
    lab.ok("run_experiment", description="idea")
    lab.ok("discard")
    lab.loop.shutdown()
    state_files = [lab.ws / ".research-loop" / "state.json", lab.loop.state.copy]
    for path in state_files:  # what the older server left: its state, copy included, without digests
        data = json.loads(path.read_text())
        del data["record_digests"]
        path.write_text(json.dumps(data))
    lab.loop = lab.new_loop()
    lines = lab.ok("history")["lines"]
    assert len(lines) == 2 and "baseline" in lines[0] and "idea" in lines[1], lines
    record = next((lab.ws / "runs").glob("0002-*[0-9a-f].json"))
    record.write_text(record.read_text().replace("idea", "a better story"))
    answer = lab.ok("history")
    assert len(answer["lines"]) == 1 and "story" not in json.dumps(answer["lines"]), answer
    assert_told(answer, record.name)


def test_a_workspace_from_before_log_digests_vouches_for_its_logs_as_they_are(lab):
    """A state from before the log digests (run records digested, logs not): the new owner vouches for
    the logs its records name, as they are, once; an edit after that is not believed."""
    from mcp_server.core import history, limits
    lab.baseline()
    lab.loop.shutdown()
    for path in (lab.ws / ".research-loop" / "state.json", lab.loop.state.copy):
        data = json.loads(path.read_text())
        del data["log_digests"]
        path.write_text(json.dumps(data))
    lab.loop = lab.new_loop()
    lab.ok("history")
    log = json.loads(next((lab.ws / "runs").glob("0001-*[0-9a-f].json")).read_text())["result"]["log"]
    assert history.checked_log(lab.ws, limits.recorded_state(lab.ws), log) == (lab.ws / log).read_bytes().decode()
    (lab.ws / log).write_text("step 1 (50.0%) | loss: 0.010000\n")
    assert history.checked_log(lab.ws, limits.recorded_state(lab.ws), log) is None


def test_a_restart_before_the_first_record_adopts_nothing_planted(lab):
    """A new research run has no records yet: a server restarted while its baseline is in flight
    takes no file planted in runs/ as its own (only a state an older server wrote is upgraded)."""
    lab.ok("setup", tag="t")
    lab.ok("run_experiment", description="baseline", wait=False)
    lab.loop.shutdown()
    (lab.ws / "runs" / "9999-deadbee.json").write_text(json.dumps(
        {"run": {"run": 9999, "commit": "deadbee"}, "decision": {"status": "keep", "val_bpb": 0.1}}))
    lab.loop = lab.new_loop()
    assert "deadbee" not in json.dumps(lab.ok("history")["lines"])
    assert "9999-deadbee.json" not in json.dumps(json.loads((lab.ws / ".research-loop" / "state.json").read_text()))


def test_a_report_and_log_written_while_no_server_watched_are_no_result(lab):
    """The agent kills the server during a run, then writes the worker's report (finished, exit 0)
    and a log whose summary says 0.5 (the baseline's, its number changed): the next server finds
    the run interrupted, believes neither file, and the best stays; the commit is kept for a rerun."""
    lab.baseline()
    baseline_log = next((lab.ws / "runs").glob("0001-*.log")).read_text()
    set_knobs(lab.ws, val_bpb=1.2, sleep=30)
    run = lab.ok("run_experiment", description="slow idea", wait=False)
    wait_until(lambda: (lab.ws / run["log"]).exists())
    lab.loop.shutdown()
    time.sleep(1)  # the worker, stopped with its server, has written its last report
    (lab.ws / run["log"].replace(".log", ".report.json")).write_text(json.dumps(
        {"exit_code": 0, "timed_out": False, "stopped": None, "wall_seconds": 0.01}))
    (lab.ws / run["log"]).write_text(baseline_log.replace("val_bpb:          1.000000", "val_bpb:          0.500000"))
    assert "0.500000" in (lab.ws / run["log"]).read_text()
    lab.loop = lab.new_loop()
    entry = json.loads((lab.ws / ".research-loop" / "state.json").read_text())["runs"][str(run["run"])]
    assert entry["status"] == "interrupted" and "result" not in entry, entry
    status = lab.ok("status")
    assert status["best_val_bpb"] == 1.0 and status["interrupted"], status
    assert error(lab.call("keep"))  # nothing pending to keep


def call_within(lab, seconds, name, **args):
    box = {}

    def go():
        try:
            box["answer"] = lab.call(name, **args)
        except BaseException as exc:  # noqa: BLE001 - what happened is the finding
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    return t.is_alive(), box


@pytest.mark.parametrize("planted,endless", [("results.tsv", False), ("results.tsv", True), ("progress.png", False),
                                            (".research-loop/state.json", False), (".research-loop/state.json", True)])
def test_a_fifo_planted_where_the_server_reads_or_writes_does_not_hang_a_tool(lab, planted, endless):
    """results.tsv or state.json replaced by a FIFO (an open blocks: before the fix every later call
    hung, the ledger's under the state lock) or a link to /dev/zero (a read that never ends)."""
    lab.baseline()
    path = lab.ws / planted
    plant_blocker(path, endless)
    try:
        hung = {}
        for tool in ("status", "plot_progress", "history"):
            alive, box = call_within(lab, 20, tool)
            hung[tool] = alive
            if alive:
                break
        assert not any(hung.values()), f"{planted} as a FIFO hung: {hung}"
        if planted != "progress.png":  # set right from the server's own records
            assert path.is_file() and not path.is_symlink() and path.read_bytes()
    finally:
        # unblock a hung thread: open the other end
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


@pytest.mark.parametrize("endless", [False, True], ids=["fifo", "dev-zero"])
def test_a_fifo_at_the_ledger_before_the_first_setup_hangs_no_setup(lab, endless):
    """Review 96, played: results.tsv made a FIFO before the first setup (no rows to archive it with): setup made the
    branch, then its write of the ledger's header blocked for ever under the state lock, and status with it. The
    header is written as every record is (a new file renamed over whatever lies there)."""
    path = lab.ws / "results.tsv"
    plant_blocker(path, endless)
    try:
        alive, box = call_within(lab, 20, "setup", tag="t")
        assert not alive, "a FIFO at results.tsv hung setup"
        assert answer(box["answer"])["branch"] == "autoresearch/t"
        assert path.is_file() and not path.is_symlink() and ledger_lines(lab.ws) == [HEADER]
    finally:
        try:  # unblock a hung thread: open the other end
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        except OSError:
            pass


def test_a_fifo_or_folder_at_a_charts_name_fails_no_report_and_no_runner_summary(lab, capsys):
    """Review 63: the charts were written where they lie (matplotlib opens progress.png, and the report's
    <tag>-<date>.png, in place): a FIFO there made plot_progress and report answer an internal error ("not
    seekable"), a folder likewise, and the overnight runner's end-of-night summary raised, so the runner ended on
    a traceback without its spending lines and without waiting for its queued pings. Charts are written like
    records now: a new file renamed over whatever lies there."""
    import argparse
    from mcp_server.overnight import overnight
    from mcp_server.phases.morning import REPORTS_DIR
    lab.baseline()
    chart = lab.ws / REPORTS_DIR / f"t-{time.strftime('%Y-%m-%d', time.gmtime())}.png"
    chart.parent.mkdir(parents=True, exist_ok=True)
    for planted in (os.mkfifo, os.mkdir):
        for path in (lab.ws / "progress.png", chart):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            planted(path)
        assert lab.ok("plot_progress")["runs_plotted"] == 1
        assert lab.ok("report")["path"].endswith(".md") and chart.read_bytes().startswith(b"\x89PNG")
        (lab.ws / "progress.png").unlink()
        planted(lab.ws / "progress.png")
        parser = argparse.ArgumentParser()
        overnight.add_arguments(parser)
        overnight.Runner(parser.parse_args(["--tag", "t", "--workspace", str(lab.ws)]), "claude").summary()
        out = capsys.readouterr().out
        assert "progress chart: " in out and "spent: " in out and "logs: " in out
        assert (lab.ws / "progress.png").read_bytes().startswith(b"\x89PNG")


def test_a_fifo_in_place_of_train_py_does_not_hang_keep(lab):
    """keep compares the working train.py with the kept code (a note): a FIFO there blocked the open."""
    lab.baseline()
    set_knobs(lab.ws, VAL_BPB=0.9)
    lab.ok("run_experiment", description="better")
    path = lab.ws / "train.py"
    path.unlink()
    os.mkfifo(path)
    try:
        alive, box = call_within(lab, 20, "keep")
        assert not alive, "a FIFO at train.py hung keep"
        alive, box = call_within(lab, 20, "status")
        assert not alive, "a FIFO at train.py hung status"
    finally:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        except OSError:
            pass


def test_the_workers_final_report_rewritten_before_the_server_reads_it_is_no_result(lab):
    """The worker's report (exit code, wall time, device, sandbox, the harness's evaluation with the
    verified val_bpb, the imports' digests) lies in runs/, the agent's folder, and the server reads it
    only after the worker has exited. A process of the agent that watches runs/ and rewrites the final
    report in that moment (found by review 37: the server believed it) makes the run no result: the
    worker sends the report's digest on the server's socket, and only that report is believed."""
    lab.baseline()
    runs = lab.ws / "runs"
    before = set(runs.glob("*.report.json"))
    stop, forged = threading.Event(), []

    def forger():
        while not stop.is_set():
            for path in set(runs.glob("*.report.json")) - before:
                try:
                    report = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if "running" in report or report.get("device") == "FORGED":
                    continue
                report |= {"device": "FORGED", "evaluation": {"val_bpb": 0.25, "causal": True}}
                tmp = path.with_name(path.name + ".forged")
                tmp.write_text(json.dumps(report))
                os.replace(tmp, path)
                forged.append(path.name)
            time.sleep(0.0005)

    thread = threading.Thread(target=forger, daemon=True)
    thread.start()
    try:
        set_knobs(lab.ws, VAL_BPB=0.9)
        run = lab.ok("run_experiment", description="idea")
    finally:
        stop.set()
        thread.join(5)
    assert forged, "the forger never saw the final report"
    assert run["status"] == "crash" and "was changed after the run's worker wrote it" in run["tail"], run
    assert json.loads((runs / (forged[0] + ".changed")).read_text())["device"] == "FORGED"  # kept beside, not believed


def test_a_workers_report_nested_past_the_parsers_depth_loses_no_run_and_no_slot(lab):
    """Review 39b: the server reads a run's report while it trains (has it trained?). The agent rewrites
    it as JSON nested deeper than the parser goes: RecursionError killed the run's waiting thread, the
    run was never recorded and its slot stayed busy for good. It reads as no report, and the run ends
    as any other."""
    lab.baseline()

    def nest(path):
        try:
            if "running" not in json.loads(path.read_text()):
                return False
        except (OSError, ValueError):
            return False
        tmp = path.with_name(path.name + ".nested")
        tmp.write_text("[" * 100000)
        os.replace(tmp, path)
        return True

    thread, nested = plant_on_new(lab.ws / "runs", "*.report.json", nest)
    set_knobs(lab.ws, VAL_BPB=0.9, SLEEP=3)
    alive, box = call_within(lab, 60, "run_experiment", description="idea")
    thread.join(5)
    assert nested, "the run's report was never seen while it trained"
    assert not alive, "a nested report left the run's thread dead and the tool waiting"
    assert answer(box["answer"])["val_bpb"] == 0.9
    lab.ok("discard")
    set_knobs(lab.ws, VAL_BPB=0.95)
    assert lab.ok("run_experiment", description="the slot is free")["val_bpb"] == 0.95


def test_a_state_file_nested_past_the_parsers_depth_is_set_right_or_refused_clearly(lab):
    """Review 39b: state.json rewritten as JSON nested deeper than the parser goes raised RecursionError
    out of every tool call. The owning server puts its own copy back (and tells), another reader
    refuses with the file and what to do."""
    from mcp_server.core.models import Refusal
    from mcp_server.core.state import State
    lab.baseline()
    state = lab.ws / ".research-loop" / "state.json"
    state.write_text("[" * 100000)
    status = lab.ok("status")
    assert_told(status, "state.json")
    assert status["best_val_bpb"] == 1.0 and isinstance(json.loads(state.read_text()), dict)
    state.write_text("[" * 100000)
    assert State(lab.ws).load()["rows"][0][1] == 1.0  # a server that does not own the workspace reads the owner's copy
    (records_dir(lab.ws) / "state.json").unlink()
    with pytest.raises(Refusal, match=r"state.json is not valid JSON .*move it away and call setup\(tag\)"):
        State(lab.ws).load()  # and without one, the file as it is


def test_a_fifo_in_place_of_the_owners_record_is_read_at_once_and_not_believed(lab):
    """A second server (read-only) names the owning server's pid from owner.lock in status and in its
    refusals: a FIFO planted there blocked that read, and the tool call with it."""
    import threading
    from mcp_server.core.state import OWNER_LOCK, State
    lab.baseline()
    record = lab.ws / ".research-loop" / OWNER_LOCK
    record.unlink()
    os.mkfifo(record)
    read = {}
    reader = threading.Thread(target=lambda: read.update(owner=State(lab.ws).owner()), daemon=True)
    reader.start()
    reader.join(10)
    try:
        assert not reader.is_alive() and read == {"owner": None}, "a FIFO at owner.lock hung the read"
    finally:
        os.close(os.open(record, os.O_RDWR | os.O_NONBLOCK))  # unblock a hung reader


def test_a_fifo_in_place_of_a_workers_report_is_read_at_once_and_not_believed(tmp_path):
    """The server reads a run's report while it runs (has it trained?) and after: a FIFO planted at
    its path blocked the open of that read, and the run's thread with it."""
    from mcp_server.executors.executor import believed_report, read_report
    fifo = tmp_path / "0001-abc1234.report.json"
    os.mkfifo(fifo)
    assert read_report(fifo) is None
    assert "was changed after the run's worker wrote it" in believed_report(fifo, "0" * 64)["report_changed"]


def plant_blocker(path: Path, endless: bool) -> None:
    """In place of path, a read that never ends (a link to /dev/zero) or an open that blocks (a FIFO)."""
    path.unlink(missing_ok=True)
    if endless:
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)


def plant_on_new(runs: Path, pattern: str, plant) -> tuple[threading.Thread, list]:
    """A thread that waits (30 s at most) for a file of runs/ matching pattern that was not there yet and
    calls plant(path) on it until one returns True: the agent acting on a run's file while it trains. The
    list gets the path it planted at."""
    before, planted = set(runs.glob(pattern)), []

    def watch():
        deadline = time.monotonic() + 30
        while not planted and time.monotonic() < deadline:
            planted.extend(path for path in set(runs.glob(pattern)) - before if plant(path))
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, planted


def _unblock(path):
    try:  # a hung thread's open of the FIFO ends once the other end is opened
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    except OSError:
        pass


def test_fifos_planted_at_the_servers_temporary_names_hang_no_tool(lab):
    """The server wrote a run's record through `runs/<n>-<commit>.json.tmp` and the morning report through
    `reports/<tag>-<date>.md.tmp`, names the agent knows: a FIFO there blocked keep's open under the state
    lock, and every later call (status too) hung."""
    lab.baseline()
    set_knobs(lab.ws, VAL_BPB=0.9)
    result = lab.ok("run_experiment", description="better")
    planted = [lab.ws / "runs" / f"{result['run']:04d}-{result['commit'][:7]}.json.tmp",
               lab.ws / "reports" / f"t-{time.strftime('%Y-%m-%d', time.gmtime())}.md.tmp"]
    planted[1].parent.mkdir(exist_ok=True)
    for path in planted:
        os.mkfifo(path)
    try:
        for tool, args in (("keep", {"unconfirmed": True}), ("status", {}), ("report", {})):
            alive, box = call_within(lab, 20, tool, **args)
            assert not alive, f"{tool} hung on a FIFO at a temporary name"
            answer(box["answer"])
        assert lab.ok("status")["best_val_bpb"] == 0.9
    finally:
        for path in planted:
            _unblock(path)


def test_a_fifo_at_run_log_fails_no_runs_record(lab):
    """run.log (the copy of the latest run's log) was copied over whatever lay there: a FIFO the agent put
    there failed the copy after the record was written, and the run became a crash ("could not record"),
    every run of the night."""
    lab.baseline()
    (lab.ws / "run.log").unlink()
    os.mkfifo(lab.ws / "run.log")
    try:
        set_knobs(lab.ws, VAL_BPB=0.9)
        alive, box = call_within(lab, 60, "run_experiment", description="better")
        assert not alive, "run_experiment hung on a FIFO at run.log"
        result = answer(box["answer"])
        assert result["status"] == "ok" and result["val_bpb"] == 0.9, result
        assert (lab.ws / "run.log").is_file() and "val_bpb" in (lab.ws / "run.log").read_text()
    finally:
        _unblock(lab.ws / "run.log")


def test_a_fifo_in_place_of_a_runs_own_log_hangs_no_record(lab):
    """Review 44: run.log is copied from the run's log (runs/<n>-<commit>.log, a name the agent knows) by
    a plain open: a FIFO put there while the run trained blocked that open after the record, under the
    state lock, and every later call hung (shutil.copyfile, before, refused a FIFO)."""
    lab.baseline()

    def fifo(path):
        path.unlink()
        os.mkfifo(path)
        return True

    thread, planted = plant_on_new(lab.ws / "runs", "*.log", fifo)
    set_knobs(lab.ws, VAL_BPB=0.9, SLEEP=3)
    try:
        alive, box = call_within(lab, 60, "run_experiment", description="idea")
        thread.join(5)
        assert planted, "the run's log never appeared"
        assert not alive, "a FIFO at the run's log hung the record"
        answer(box["answer"])
        alive, box = call_within(lab, 20, "status")
        assert not alive, "status hung after the run"
    finally:
        for path in planted:
            _unblock(path)


@pytest.mark.parametrize("planted,endless", [("prepared.json", False), ("tokenizer/tokenizer.pkl", False),
                                            ("tokenizer/tokenizer.pkl", True)])
def test_a_fifo_planted_in_the_prepared_cache_hangs_no_tool(lab, planted, endless):
    """Review 46: the harness's cache (~/.cache/autoresearch, the agent's to write) was read with plain opens
    under the state lock: the prepared record (the run's budget, its fingerprint) and the tokenizer's files
    (the fingerprint run_experiment checks). A FIFO there blocked run_experiment in its transaction, and
    every later call, status too, hung; a link to /dev/zero read without end."""
    lab.baseline()
    path = Path(os.environ["AUTORESEARCH_CACHE"]) / planted
    path.parent.mkdir(exist_ok=True)
    plant_blocker(path, endless)
    try:
        set_knobs(lab.ws, VAL_BPB=0.9)
        alive, box = call_within(lab, 30, "run_experiment", description="idea")
        assert not alive, f"a FIFO at the cache's {planted} hung run_experiment"
        assert "changed since setup" in error(box["answer"])
        alive, box = call_within(lab, 20, "status")
        assert not alive, "status hung after the refusal"
    finally:
        _unblock(path)


def test_a_huge_file_in_place_of_a_runs_own_log_is_not_copied_whole(lab):
    """Review 46: run.log was copied from the run's log (a plain file the agent may put at its name while the run
    trains) whole, under the state lock: a sparse file of a terabyte (truncate -s 1T) took that long to copy and
    filled the disk, every call waiting. The copy takes at most what a log of the worker's holds."""
    from mcp_server.core.logparse import MAX_TEXT_BYTES
    lab.baseline()

    def huge(path):
        sparse = path.with_name(".huge")
        with open(sparse, "wb") as f:
            f.truncate(MAX_TEXT_BYTES * 3)  # sparse: nothing written
        sparse.replace(path)
        return True

    thread, planted = plant_on_new(lab.ws / "runs", "*.log", huge)
    set_knobs(lab.ws, VAL_BPB=0.9, SLEEP=3)
    alive, box = call_within(lab, 60, "run_experiment", description="idea")
    thread.join(5)
    assert planted and not alive
    answer(box["answer"])
    assert (lab.ws / "run.log").stat().st_size <= MAX_TEXT_BYTES


def _folder_at(path: Path) -> None:
    path.unlink()
    (path / "inside").mkdir(parents=True)


def _file_at_archive_and_an_edit(lab: Lab) -> None:
    archive = lab.ws / ".research-loop" / "archive"
    if archive.exists():
        for found in archive.iterdir():
            found.unlink()
        archive.rmdir()
    archive.write_text("no folder\n")
    edited(lab, lambda text: text + "abcdef1\t0.100000\t1.0\tkeep\tplanted\n")


def _file_at_state_folder(lab: Lab) -> None:
    lab.restart()  # a server holds its owner lock in that folder
    lab.loop.shutdown()
    shutil.rmtree(lab.ws / ".research-loop")
    (lab.ws / ".research-loop").write_text("no folder\n")
    lab.loop = lab.new_loop()


@pytest.mark.parametrize("plant", ["a folder at results.tsv", "a folder at state.json",
                                   "a file at the archive, and an edited ledger", "a file at .research-loop"])
def test_a_folder_or_file_where_the_server_writes_fails_no_tool(lab, plant):
    """Review 49: a folder at results.tsv (or state.json) could neither be read (the error named a descriptor, not
    the file) nor replaced, and a file where the archive's folder goes failed its mkdir: every tool call, status
    included, was an internal error until the agent took it away. What lies there is moved aside, kept, and the
    server's records are written again."""
    lab.baseline()
    {"a folder at results.tsv": lambda: _folder_at(lab.ws / "results.tsv"),
     "a folder at state.json": lambda: _folder_at(lab.ws / ".research-loop" / "state.json"),
     "a file at the archive, and an edited ledger": lambda: _file_at_archive_and_an_edit(lab),
     "a file at .research-loop": lambda: _file_at_state_folder(lab)}[plant]()
    status = lab.ok("status")
    assert status["best_val_bpb"] == 1.0 and status["records_changed"]
    set_knobs(lab.ws, VAL_BPB=0.9)
    assert lab.ok("run_experiment", description="better")["val_bpb"] == 0.9
    assert lab.ok("keep", unconfirmed=True)["row"]["val_bpb"] == 0.9
    assert [line.split("\t")[1] for line in ledger_lines(lab.ws)[1:]] == ["1.000000", "0.900000"]
    moved = [p for p in [*lab.ws.glob(".*.moved"), *(lab.ws / ".research-loop").glob(".*.moved")]]
    assert len(moved) == 1 and next(moved[0].iterdir()).exists()  # kept as it was


def test_a_planted_or_edited_run_log_gives_read_metrics_and_the_dashboard_no_number(lab):
    """Review 63: read_metrics(run) found a run's log by its file name and read whatever it held. A log planted
    as runs/0002-0000000.log (sorted before the real one) answered crashed run 2 as ok at 0.5, one planted for a
    run number that never existed was a result, an edited log of run 1 gave 0.5 for a recorded 1.0, and the
    dashboard's tail of a kept run showed the edited text. Only the log the server recorded is read now."""
    from mcp_server.dashboard import dashboard
    baseline = lab.baseline()["row"]
    set_knobs(lab.ws, crash=1)
    lab.ok("run_experiment", description="broken")
    lab.ok("discard")
    forged = "step 00100 (100.0%) | loss: 0.500000\n---\nval_bpb:          0.500000\npeak_vram_mb:     1.0\n"
    (lab.ws / "runs" / "0002-0000000.log").write_text(forged)
    (lab.ws / "runs" / "0099-0000000.log").write_text(forged)
    own = lab.ws / "runs" / f"0001-{baseline['commit']}.log"
    own.write_text(own.read_text().replace("val_bpb:          1.000000", "val_bpb:          0.500000")
                   + "the harness verified val_bpb 0.5\n")

    second = lab.ok("read_metrics", run="2")
    assert second["status"] == "crash" and not second.get("summary") and "RuntimeError" in second["tail"], second
    assert "No run '99' in this research run's records" in lab.refused("read_metrics", run="99")
    first = lab.ok("read_metrics", run="1")
    assert first["status"] == "ok" and not first.get("summary"), first
    assert "not the log the server recorded" in first["note"]
    assert lab.ok("read_metrics", run=baseline["commit"]) == first
    tail = dashboard.run_tail(lab.ws, baseline["commit"])["tail"]
    assert "0.5" not in tail and "not the log the server recorded" in tail
    own.unlink()
    (lab.ws / "run.log").write_text(forged)  # run.log itself: a run by hand, never a recorded result
    by_hand = lab.ok("read_metrics")
    assert by_hand["summary"]["val_bpb"] == 0.5 and "no log of a run the server recorded" in by_hand["note"]


def test_a_second_server_reads_the_owners_copy_not_a_forged_state_file(lab):
    """Review 72: a server that does not own the workspace (a second session's, read-only) read state.json as it
    was: a best forged there between the owner's calls was its status's best (0.5 for a baseline at 1.0), its
    history and its read_metrics', where the dashboard and the report read the owner's copy."""
    lab.baseline()
    path = lab.ws / ".research-loop" / "state.json"
    state = json.loads(path.read_text())
    state["rows"].append(["abcdef1", 0.5, 1.0, "keep", "forged"])
    state["kept_commit"] = "abcdef1" + "0" * 33
    path.write_text(json.dumps(state))
    second = Lab(lab.ws)
    try:
        status = second.ok("status")
        assert "read_only" in status and status["best_val_bpb"] == 1.0, status
    finally:
        second.loop.shutdown()
    assert_told(lab.ok("status"), "state.json")  # the owner sets it right at its next call, and says so


def test_a_second_server_refuses_a_copy_of_the_state_with_wrong_types_and_says_so(lab):
    """Review 74: a forged copy of the state whose row's description was a number (not a string) made a second
    server's status fail with an internal error, and its report too: a refusal of service. A copy of another shape
    than the server writes is now not believed in any part (state.json, which the owner keeps, is read), and said."""
    lab.baseline()
    copy, path = records_dir(lab.ws) / "state.json", lab.ws / ".research-loop" / "state.json"
    forged = json.loads(copy.read_text())
    forged["rows"][0][1], forged["rows"][0][4] = 0.5, 5
    copy.write_text(json.dumps(forged))
    second = Lab(lab.ws)
    try:
        status = second.ok("status")
        assert status["best_val_bpb"] == 1.0, status
        assert "no state the server writes (row 1 is not [commit, val_bpb" in " ".join(status["records_changed"])
        assert second.ok("report")["kept"] == 1
        state = json.loads(path.read_text())
        state["runs"] = ["not", "a", "map"]
        path.write_text(json.dumps(state))  # state.json malformed too: refused, with what to do
        refused = second.refused("status")
        assert "is no state the server writes (runs is list), nor is its copy" in refused, refused
        assert "none of it is believed" in second.refused("report")
    finally:
        second.loop.shutdown()
    assert_told(lab.ok("status"), "state.json")  # the owner sets both right at its next call
    assert json.loads(copy.read_text())["rows"][0][4] == "baseline"


def test_an_owner_started_on_a_copy_of_the_state_with_wrong_types_reads_state_json_and_says_so(lab):
    """Review 75's leftover: an owner that started on a copy forged with wrong types while no server ran took it as its
    own, wrote it over state.json, and every tool then failed with an internal error. A copy of another shape is now
    no record: the owner takes state.json where that is of the server's shape (the copy is written again from it, the
    forgery archived), and refuses with what to do where neither is."""
    lab.baseline()
    copy, path = records_dir(lab.ws) / "state.json", lab.ws / ".research-loop" / "state.json"
    forged = json.loads(copy.read_text())
    forged["rows"][0][4] = 5
    lab.loop.shutdown()
    copy.write_text(json.dumps(forged))
    lab.loop = lab.new_loop()
    status = lab.ok("status")
    assert status["best_val_bpb"] == 1.0, status
    assert "no state the server writes (row 1 is not [commit, val_bpb" in " ".join(status["records_changed"])
    assert json.loads(copy.read_text())["rows"][0][4] == "baseline"
    archived = list((lab.ws / ".research-loop" / "archive").glob("state-copy-malformed-*.json"))
    assert [json.loads(a.read_text())["rows"][0][4] for a in archived] == [5]
    lab.loop.shutdown()
    copy.write_text(json.dumps(forged))
    path.write_text(json.dumps(forged))  # both of another shape: nothing to believe
    lab.loop = lab.new_loop()
    refused = lab.refused("status")
    assert "is a state the server writes (row 1 is not [commit, val_bpb" in refused, refused
    assert "call setup(tag)" in refused and "results.tsv is untouched" in refused, refused
    assert json.loads(path.read_text())["rows"][0][4] == 5  # refused, nothing changed: the user decides


FORGED_DEEPER = {  # review 80: what the shape check of stop 48 did not look at
    "a result's val_bpb of text": lambda run: run["result"].__setitem__("val_bpb", "x"),
    "a result missing its fields": lambda run: run.__setitem__("result", {"status": "ok"}),
    "a confirmation that is a number": lambda run: run.__setitem__("confirmation", 5),
    "a kept commit that is no commit id": lambda run: None,
}


@pytest.mark.parametrize("forgery", list(FORGED_DEEPER))
def test_a_copy_forged_below_its_keys_fails_no_call(lab, forgery):
    """Review 80: the shape check that makes a forged copy of the state no record (stop 48) looked at the keys' types
    and the rows, not inside a run's entry nor at the commits: a pending run's result with a val_bpb of "x" or missing
    its fields, a confirmation that is a number, or a kept_commit of "zzzz", in the copy, made a second server's status
    and wait fail with an internal error; written in both files while no server ran, every call of the owner. They are
    of another shape now, with what that means: the copy is not believed, and where neither file is, calls are
    refused saying what to do."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description="an idea")  # pending: its entry holds its result
    copy, path = records_dir(lab.ws) / "state.json", lab.ws / ".research-loop" / "state.json"
    forged = json.loads(copy.read_text())
    FORGED_DEEPER[forgery](forged["runs"]["2"])
    if forgery.startswith("a kept commit"):
        forged["kept_commit"] = "zzzz"
    copy.write_text(json.dumps(forged))
    second = Lab(lab.ws)
    try:
        for tool in ("status", "wait", "history", "report"):
            answer(second.call(tool))  # no error: state.json, which the owner keeps, is read instead
        assert second.ok("status")["pending"].startswith("run 2 ")
    finally:
        second.loop.shutdown()
    lab.loop.shutdown()
    copy.write_text(json.dumps(forged))
    path.write_text(json.dumps(forged))
    lab.loop = lab.new_loop()
    for tool in ("status", "wait", "keep"):
        refused = lab.refused(tool)
        assert "is a state the server writes" in refused and "call setup(tag)" in refused, refused


def test_an_owner_started_on_a_state_file_with_wrong_types_and_no_copy_refuses_and_says_so(lab):
    """The copy deleted while no server ran, and state.json forged with wrong types (a row's description a number):
    the owner that started took the file as the record (as for a state from before copies), wrote it as its copy,
    and status failed with an internal error. With no copy, a state.json of another shape is no record: each call
    is refused with what to do, and nothing is written over it."""
    lab.baseline()
    copy, path = records_dir(lab.ws) / "state.json", lab.ws / ".research-loop" / "state.json"
    forged = json.loads(copy.read_text())
    forged["rows"][0][4] = 5
    lab.loop.shutdown()
    copy.unlink()
    path.write_text(json.dumps(forged))
    lab.loop = lab.new_loop()
    refused = lab.refused("status")
    assert "no state the server writes (row 1 is not [commit, val_bpb" in refused, refused
    assert "copy of it" in refused and "is missing" in refused and "call setup(tag)" in refused, refused
    assert json.loads(path.read_text())["rows"][0][4] == 5 and not copy.exists()  # nothing written: the user decides


def test_a_forged_copy_read_by_the_report_does_not_stay_in_the_servers_rows(lab):
    """Review 72: the rows made from a state were kept by their count and their first and last entries, and a longer
    list that held the last one where it ended was taken to have grown from them. The report reads the server's copy
    of the state as it is (a copy forged in place is the one-uid limit): a copy cut to its first three rows, the best's
    0.95 forged to 1.5, made the report's rows, and the server's own four rows were taken to have grown from them, for
    good: status's best read 1.5, and a run at 1.0 was "better by 0.5"."""
    lab.baseline()
    for value, decide in ((0.95, "keep"), (1.1, "discard"), (1.2, "discard")):
        set_knobs(lab.ws, val_bpb=value)
        lab.ok("run_experiment", description=f"at {value}")
        lab.ok(decide, **({"unconfirmed": True} if decide == "keep" else {}))
    copy = records_dir(lab.ws) / "state.json"
    own = copy.read_bytes()
    forged = json.loads(own)
    forged["rows"] = forged["rows"][:3]
    forged["rows"][1][1] = 1.5
    copy.write_text(json.dumps(forged))
    lab.ok("report")
    copy.write_bytes(own)  # put back: only what the server wrote is left to read
    assert lab.ok("status")["best_val_bpb"] == 0.95
    set_knobs(lab.ws, val_bpb=1.0)
    assert lab.ok("run_experiment", description="worse than the best")["delta"] == pytest.approx(0.05)


def test_a_number_that_is_not_finite_in_the_states_copy_or_an_old_ledger_fails_no_answer(lab):
    """Review 76's leftover: Python's json reads NaN and Infinity, so a copy of the state planted with a NaN val_bpb
    passed the shape check, and status's answer failed the client's output-schema check (JSON has no NaN; it went out
    as null where the schema says number); an owner started on it took it as its record. A results.tsv from before
    the server kept rows may hold `nan`, and the owner adopted it as a row. Neither is a result: the copy is of no
    shape the server writes (state.json is read, said), and such a line is malformed (kept in the archive)."""
    lab.baseline()
    copy, path = records_dir(lab.ws) / "state.json", lab.ws / ".research-loop" / "state.json"
    own = json.loads(copy.read_text())
    second = Lab(lab.ws)
    try:
        nan_row = [own["rows"][0][0], float("nan"), 0.0, "keep", "baseline"]
        for forged, said in ((dict(own, rows=[nan_row]), "(row 1 is not [commit, val_bpb"),
                             (dict(own, slot_hours=float("inf")), "(slot_hours is inf)")):
            copy.write_text(json.dumps(forged))
            status = second.ok("status")  # through the client: its answer passes the output-schema check
            assert status["best_val_bpb"] == 1.0, status
            assert f"no state the server writes {said}" in " ".join(status["records_changed"]), status
            assert second.ok("history")["total"] == 1 and second.ok("report")["kept"] == 1
    finally:
        second.loop.shutdown()
    lab.loop.shutdown()
    copy.write_text(json.dumps(dict(own, noise={"values": [1.0, float("nan")], "std": 0.01, "spread": 0.01,
                                                "threshold": 0.02})))
    lab.loop = lab.new_loop()  # an owner started on such a copy: state.json is its record
    status = lab.ok("status")
    assert status["best_val_bpb"] == 1.0 and status["noise"] is None, status
    assert "(a noise estimate: a value is no finite number)" in " ".join(status["records_changed"]), status
    assert "NaN" not in copy.read_text()
    lab.loop.shutdown()
    base = own["rows"][0][0]
    for record in (copy, path):  # a state from before the server kept rows: results.tsv is the record
        record.write_text(json.dumps({k: v for k, v in own.items() if k != "rows"}))
    (lab.ws / "results.tsv").write_text(f"{HEADER}\n{base}\t1.000000\t2.0\tkeep\tbaseline\n"
                                        "bbbbbbb\tnan\t0.0\tdiscard\tdiverged\ncccccc1\t0.9\tinf\tkeep\tplanted\n")
    lab.loop = lab.new_loop()
    status = lab.ok("status")
    assert status["best_val_bpb"] == 1.0 and status["counts"].get("discard", 0) == 0, status
    assert "2 line(s) the server never wrote" in " ".join(status["records_changed"]), status
    assert lab.ok("history")["total"] == 1 and lab.ok("report")["kept"] == 1
    assert ledger_lines(lab.ws)[1:] == [f"{base}\t1.000000\t2.0\tkeep\tbaseline"]
    found = lab.ws / ".research-loop" / "archive" / archived(lab, "results-edited-")[0]
    assert "bbbbbbb\tnan\t" in found.read_text()  # kept, not lost
