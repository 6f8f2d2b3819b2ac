"""Experiment tracking in W&B (mcp_server/core/wandb_tracking.py, the `wandb` extra), offline: a night's
runs written as W&B offline runs in the workspace, read back from W&B's own run files; written once
across restarts; a broken W&B never holds up a tool call; its service process ends with the server and
never reaches for the network. (The demo's --track wandb with the real train.py: tests/test_demo.py's
interrupt and resume.)"""
import json
from pathlib import Path

import anyio
import pytest
from google.protobuf.message import DecodeError

from mcp_server.__main__ import parse_args
from mcp_server.core import trackers, tracking, wandb_tracking
from server_support import (answer, make_cache, make_workspace, processes_running, set_knobs, stdio_client_for,
                            wait_until)
from test_tracking import NIGHT_STAGES, Relay, night
from wandb_support import offline, offline_runs  # noqa: F401 (offline: a fixture)

SYNC_S = 120
QUICK = dict(poll_s=0.2, retry_s=(0.2, 1.0))


def stages(ws: Path) -> dict:
    """The stages noted as written, by run key."""
    return {rid.split("-", 1)[1]: stage for rid, stage in wandb_tracking.stored_stages(runs_dir(ws)).items()}


def by_stage(ws: Path) -> dict:
    """{description: stage} of the runs the tracker noted as written ({} while W&B is still writing one)."""
    try:
        runs = {r.config[tracking.KEY_TAG]: r for r in offline_runs(runs_dir(ws)).values()}
    except (AssertionError, AttributeError, KeyError, ValueError, DecodeError):
        return {}
    return {runs[key].run.notes: stage for key, stage in stages(ws).items() if key in runs}


def runs_dir(ws: Path) -> Path:
    return ws / ".research-loop" / "wandb"


def test_each_run_is_an_offline_wandb_run_with_config_history_summary_and_files(lab, offline, capfd):
    tracker = wandb_tracking.tracker(lab.ws, **QUICK).start()
    try:
        lab.baseline()
        set_knobs(lab.ws, val_bpb=0.9, steps=12)
        lab.ok("run_experiment", description="better")
        # undecided, it is written already, as pending; the decision rewrites it
        assert wait_until(lambda: by_stage(lab.ws) == {"baseline": "keep", "better": "pending"}, SYNC_S)
        lab.ok("keep", unconfirmed=True)
        set_knobs(lab.ws, val_bpb=0.95, steps=12)
        lab.ok("run_experiment", description="worse")
        lab.ok("discard", reason="no gain")
        set_knobs(lab.ws, val_bpb=0.9, steps=12, crash=1)
        lab.ok("run_experiment", description="crashes")
        lab.ok("discard")
        assert wait_until(lambda: by_stage(lab.ws) == NIGHT_STAGES, SYNC_S)
    finally:
        tracker.stop()
    assert capfd.readouterr().out == ""  # stdout is the MCP protocol's channel over stdio
    assert offline.connections == 0  # offline: W&B asked nothing of the network
    folders = list(runs_dir(lab.ws).glob("offline-run-*"))
    assert len(folders) == 4  # one offline run per run: the pending copy was replaced
    runs = offline_runs(runs_dir(lab.ws))

    better = runs["better"]
    assert better.exited and better.run.run_group == tracking.experiment_name(lab.ws, "autoresearch/t")
    assert better.run.display_name == "0002 better" and better.run.project == wandb_tracking.DEFAULT_PROJECT
    record = lab.ws / "runs" / f"0002-{lab.head()[:7]}.json"
    assert better.run.run_id == wandb_tracking.run_id(lab.ws, "autoresearch/t", record.stem)
    assert {k: v for k, v in better.config.items() if k != "_wandb"} == {
        "VAL_BPB": "0.9", "STEPS": "12", "other_lines": "0", tracking.KEY_TAG: record.stem, "workspace": str(lab.ws)}
    curve = [row for row in better.history if "train_loss" in row]
    assert [row["_step"] for row in curve] == list(range(12))  # every progress line of its log
    summary = better.summary
    assert summary["val_bpb"] == 0.9 and summary["num_steps"] == 12 and summary["kept"] == 1.0
    assert summary["memory_gb"] == 2.0 and summary["mfu_percent"] == 40.0 and summary["delta"] == pytest.approx(-0.1)
    assert {"training_seconds", "total_seconds", "wall_seconds"} <= set(summary)
    assert summary["decision"] == "keep" and summary["ledger"] == "better" and summary["commit"] == lab.head()
    assert summary["evidence"].startswith("kept unconfirmed on request: the noise is not measured yet")
    assert summary["changes"] == "STEPS (new)->12; VAL_BPB 1.0->0.9" and summary["result.noise"].startswith("better by")
    assert set(better.tags) == {"keep", "status:ok", "autoresearch/t"}

    assert better.files == {"train.py.diff", "record.json", record.with_suffix(".log").name}
    files = better.folder / "files"
    diff = (files / "train.py.diff").read_text()
    assert "-VAL_BPB = 1.0" in diff and "+VAL_BPB = 0.9" in diff and "+STEPS = 12" in diff
    assert (files / record.with_suffix(".log").name).read_bytes() == record.with_suffix(".log").read_bytes()
    assert json.loads((files / "record.json").read_text()) == json.loads(record.read_text())
    assert not any(p.is_symlink() for p in files.iterdir())  # copies: `wandb sync` may run after runs/ changed

    worse, crash = runs["worse"], runs["crashes"]
    assert worse.summary["decision"] == "discard" and worse.summary["ledger"] == "worse (no gain)"
    assert worse.summary["kept"] == 0.0 and "evidence" not in worse.summary
    assert crash.summary["result.status"] == "crash" and "val_bpb" not in crash.summary
    assert set(crash.tags) == {"crash", "status:crash", "autoresearch/t"}
    assert runs["baseline"].summary["evidence"] == "the first result of the research run"


def test_a_restarted_server_writes_no_run_twice_and_redoes_a_run_cut_short(lab, offline):
    night(lab)
    first = wandb_tracking.tracker(lab.ws)
    assert first.sync() == 4 and first.sync() == 0
    assert wandb_tracking.tracker(lab.ws).sync() == 0  # a new server: knows what was written from the workspace
    worse = offline_runs(runs_dir(lab.ws))["worse"]
    # a pass cut short after W&B wrote the run, before it was noted: written again, the copy replaced
    (worse.folder / wandb_tracking.STAGE_FILE).unlink()
    (worse.folder / "stale").write_text("")  # W&B may name the new copy as the old (to the second)
    restarted = wandb_tracking.tracker(lab.ws)
    assert restarted.sync() == 1 and restarted.sync() == 0
    assert len(list(runs_dir(lab.ws).glob("offline-run-*"))) == 4
    redone = offline_runs(runs_dir(lab.ws))["worse"]
    assert not (worse.folder / "stale").exists()
    assert redone.summary["decision"] == "discard" and redone.exited
    # the notes deleted (by hand, or by the agent): every run written again, still once each
    for note in runs_dir(lab.ws).glob(f"offline-run-*/{wandb_tracking.STAGE_FILE}"):
        note.unlink()
    assert wandb_tracking.tracker(lab.ws).sync() == 4
    assert len(list(runs_dir(lab.ws).glob("offline-run-*"))) == 4
    assert by_stage(lab.ws) == NIGHT_STAGES


def test_the_catch_up_after_a_server_was_ended_mid_write_leaves_every_run_whole(lab, offline):
    """The MCP client gives a server 2 s to exit, then ends it: on a busy machine its tracker's last pass
    was cut inside W&B, which left a run's folder with no run file (CI at stop 49: the demo's report
    named a night with a broken run, and its last run missing). The demo's catch-up, once the server
    is gone, writes what is left and replaces the broken folder."""
    night(lab)
    first = wandb_tracking.tracker(lab.ws)
    assert first.sync() == 4
    crash = offline_runs(runs_dir(lab.ws))["crashes"]
    for item in crash.folder.iterdir():  # what the cut left: W&B's folder, without its run file or note
        if item.is_file():
            item.unlink()
    lab.loop.shutdown()  # the server gone, as the demo's is once its session closed
    assert trackers.catch_up(lab.ws, "wandb") == 1
    assert trackers.catch_up(lab.ws, "wandb") == 0
    assert len(list(runs_dir(lab.ws).glob("offline-run-*"))) == 4
    assert by_stage(lab.ws) == NIGHT_STAGES and offline_runs(runs_dir(lab.ws))["crashes"].exited


def test_the_catch_up_writes_nothing_while_a_server_owns_the_workspace(lab, offline):
    """Review 82: the catch-up tracked with no owner check, so where the demo's server had not exited yet (its own
    last pass under way) or another server had taken the workspace, both wrote the same runs. It writes only once
    it can take the owner lock itself, as a server's tracker writes only while its server holds it."""
    night(lab)  # lab's in-process server owns the workspace
    assert trackers.catch_up(lab.ws, "wandb") == 0
    assert not runs_dir(lab.ws).exists() or not list(runs_dir(lab.ws).glob("offline-run-*"))
    lab.loop.shutdown()  # the owner gone: its lock with it
    assert trackers.catch_up(lab.ws, "wandb") == 4
    assert by_stage(lab.ws) == NIGHT_STAGES


def test_a_list_of_written_runs_or_notes_the_agent_plants_keep_no_run_out_of_wandb(lab, offline):
    """The agent notes every run of the night as written at its last stage before the tracker starts:
    in the list an older tracker kept (.research-loop/wandb-tracked.json), and as W&B folders of its
    own with the tracker's note but no run W&B wrote. What counts is W&B's store: every run is written."""
    night(lab)
    branch = json.loads((lab.ws / ".research-loop" / "state.json").read_text())["branch"]
    keys = [path.stem for path in (lab.ws / "runs").glob("*.json") if not path.name.endswith(".report.json")]
    decided = {"0001": "keep", "0002": "keep", "0003": "discard", "0004": "crash"}
    planted = {wandb_tracking.run_id(lab.ws, branch, key): decided[key[:4]] for key in keys}
    runs_dir(lab.ws).mkdir(parents=True)
    (runs_dir(lab.ws).parent / "wandb-tracked.json").write_text(json.dumps(planted))
    for rid, stage in planted.items():
        folder = runs_dir(lab.ws) / f"offline-run-20260101_000000-{rid}"
        folder.mkdir()
        (folder / wandb_tracking.STAGE_FILE).write_text(stage)
    assert len(planted) == 4 and wandb_tracking.tracker(lab.ws).sync() == 4
    assert by_stage(lab.ws) == NIGHT_STAGES


def test_a_log_replaced_by_a_symbolic_link_is_not_copied_into_wandb(lab, offline, tmp_path):
    """Review 39b: the W&B tracker copied whatever the run's log pointed to into the run's files (which
    `wandb sync` uploads): a symbolic link in its place, to ~/.netrc say. Only a plain file is copied;
    otherwise the summary says why not."""
    secret = tmp_path / "netrc"
    secret.write_text("machine api.wandb.ai login me password SECRET\n")
    lab.baseline()
    log = next((lab.ws / "runs").glob("0001-*.log"))
    log.unlink()
    log.symlink_to(secret)
    assert wandb_tracking.tracker(lab.ws).sync() == 1
    baseline = offline_runs(runs_dir(lab.ws))["baseline"]
    assert baseline.files == {"train.py.diff", "record.json"}
    assert baseline.summary["log_note"] == f"runs/{log.name} was not uploaded: it is a symbolic link, not the log the worker wrote"
    assert not any(b"SECRET" in path.read_bytes() for path in baseline.folder.rglob("*") if path.is_file())


def test_a_broken_wandb_costs_no_tool_call_and_catches_up(lab, offline):
    runs_dir(lab.ws).parent.mkdir(exist_ok=True)
    runs_dir(lab.ws).write_text("in the way")  # W&B's folder cannot be made: every pass fails
    tracker = wandb_tracking.tracker(lab.ws, **QUICK).start()
    try:
        night(lab)
        lab.ok("status")
        assert wait_until(lambda: tracker.problem is not None, SYNC_S)
        assert tracker._thread.is_alive() and stages(lab.ws) == {}
        runs_dir(lab.ws).unlink()
        assert wait_until(lambda: by_stage(lab.ws) == NIGHT_STAGES, SYNC_S)
        assert wait_until(lambda: tracker.problem is None, SYNC_S)
    finally:
        tracker.stop()


def test_wandb_raising_costs_no_tool_call(lab, offline, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")  # wandb refuses its settings on every pass
    tracker = wandb_tracking.tracker(lab.ws, **QUICK).start()
    try:
        night(lab)
        assert wait_until(lambda: tracker.problem is not None, SYNC_S)
        assert "no-such-mode" in tracker.problem
        assert stages(lab.ws) == {} and tracker._thread.is_alive()
    finally:
        tracker.stop()


def test_a_hanging_wandb_holds_up_no_tool_call(lab, offline, monkeypatch):
    """Online, W&B's requests go to a proxy that takes them and never answers: the night goes on."""
    relay = Relay(0)  # holds every connection; forwards none
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{relay.port}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "8")  # W&B gives up on its run after that: the tool calls take ~1 s of it
    tracker = wandb_tracking.tracker(lab.ws, **QUICK).start()
    try:
        lab.ok("setup", tag="t")
        lab.ok("run_experiment", description="baseline")
        assert wait_until(lambda: relay.waiting_requests() >= 1, SYNC_S)  # W&B is stuck in a call
        # that call keeps its 8 s; the retries and stop()'s last pass, which prove nothing more, give up after 1
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")
        lab.ok("keep")
        set_knobs(lab.ws, val_bpb=0.9, steps=12)
        lab.ok("run_experiment", description="better")
        lab.ok("discard")
        lab.ok("status")
        assert stages(lab.ws) == {} and tracker._thread.is_alive()  # every tool answered while W&B hangs
        assert wait_until(lambda: tracker.problem is not None, SYNC_S)  # then it is told, and retried
    finally:
        tracker.stop(SYNC_S)  # its last pass given up too: no W&B call left running into the next test
        relay.close()


def wandb_services(server_pid: int) -> list[int]:
    """wandb-core processes started for that process (W&B names its parent on the command line)."""
    found = []
    for pid in processes_running("wandb-core"):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--pid" in args and args[args.index(b"--pid") + 1] == str(server_pid).encode():
            found.append(pid)
    return found


def test_the_server_tracks_to_wandb_offline_in_the_workspace(tmp_path, offline):
    """--track wandb on the real server over stdio: the night under <workspace>/.research-loop/wandb/,
    nothing of W&B's on the protocol's stdout, and no W&B service left once a run is written."""
    ws, cache = make_workspace(tmp_path), make_cache(tmp_path)
    seen = {}

    async def go():
        async with stdio_client_for(ws, cache, "--track", "wandb") as client:
            answer(await client.call_tool("setup", {"tag": "t"}))
            (seen["server"],) = [p for p in processes_running(str(ws)) if b"mcp_server" in
                                 Path(f"/proc/{p}/cmdline").read_bytes()]
            answer(await client.call_tool("run_experiment", {"description": "baseline"}))
            answer(await client.call_tool("keep", {}))
            assert await anyio.to_thread.run_sync(lambda: wait_until(lambda: list(stages(ws).values()) == ["keep"],
                                                                     SYNC_S, 0.5))
            seen["services"] = wandb_services(seen["server"])  # the run is written: its service has ended
            answer(await client.call_tool("status", {}))  # the protocol still works after W&B's start
    anyio.run(go)
    assert seen["services"] == [] and wandb_services(seen["server"]) == []
    run = offline_runs(runs_dir(ws))["baseline"]
    assert run.summary["val_bpb"] == 1.0 and run.exited and "train.py.diff" in run.files
    assert not (tmp_path / "wandb").exists() and offline.connections == 0


def test_wandb_tracking_options(monkeypatch):
    for name in ("RESEARCH_LOOP_TRACK", "RESEARCH_LOOP_MLFLOW_URI"):
        monkeypatch.delenv(name, raising=False)
    assert parse_args(["--track", "wandb"]).track == "wandb"
    with pytest.raises(SystemExit):
        parse_args(["--track", "wandb", "--mlflow-uri", "http://team:5000"])
    monkeypatch.setenv("RESEARCH_LOOP_TRACK", "wandb")
    assert parse_args([]).track == "wandb"
    assert tracking.missing_extra("wandb") is None  # the dev group installs the extra
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_tracking.mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_tracking.mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_tracking.mode() == "offline"

