"""Experiment tracking (mcp_server/core/tracking.py, the `mlflow` extra): a night's runs in a real `mlflow
server` on 127.0.0.1 and in MLflow's local SQLite store, read back through MLflow's own client; a
tracker that hangs or is not there never holds up a tool call, and catches up when it answers."""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest
from mlflow import MlflowClient

from autosearch.driver import SearchPlan, catch_up_tracking
from mcp_server.core import tracking
from mcp_server.__main__ import parse_args
from server_support import (Lab, answer, exporting_workspace, free_port, git, make_cache, make_workspace, set_knobs, stdio_client_for,
                            wait_until)

SERVER_START_S = 300  # `mlflow server` imports for a minute on a loaded 2-core machine
SYNC_S = 120



class MlflowServer:
    """`mlflow server` on 127.0.0.1, a free port, its SQLite store and artifacts in a folder of its own."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
            cwd=folder, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def wait_ready(self) -> None:
        ok = wait_until(lambda: self.proc.poll() is not None or self.healthy(), SERVER_START_S, 0.5)
        assert ok and self.proc.poll() is None, f"mlflow server did not start: {Path(self.log.name).read_text()[-2000:]}"

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # uvicorn may linger on TERM (then 10 s): killed
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


class Relay:
    """A TCP relay on 127.0.0.1 in front of the MLflow server: while it hangs, it takes each
    connection and never answers (a tracker that is slow without end); then it forwards."""

    def __init__(self, target: int, port: int = 0, hanging: bool = True):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.hanging = hanging
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.hanging:
                self.held.append(conn)
            else:
                threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def waiting_requests(self) -> int:
        """Requests sent and held unanswered."""
        count = 0
        for conn in self.held:
            conn.setblocking(False)
            try:
                count += bool(conn.recv(65536, socket.MSG_PEEK))
            except OSError:
                pass
        return count

    def forward(self) -> None:
        self.hanging = False
        for conn in self.held:
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def quick_retries(monkeypatch):
    """The tracker's HTTP calls wait for an answer for as long as the test runs (a relay that hangs
    holds them), and a failed pass is retried within a second."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "900")
    return dict(poll_s=0.2, retry_s=(0.2, 1.0))


def night(lab: Lab) -> dict:
    """Baseline kept, a better run kept, a worse one discarded, a crash: {description: run number}."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9, steps=12)
    runs = {"baseline": 1, "better": lab.ok("run_experiment", description="better")["run"]}
    lab.ok("keep", unconfirmed=True)
    set_knobs(lab.ws, val_bpb=0.95, steps=12)
    runs["worse"] = lab.ok("run_experiment", description="worse")["run"]
    lab.ok("discard", reason="no gain")
    set_knobs(lab.ws, val_bpb=0.9, steps=12, crash=1)
    runs["crash"] = lab.ok("run_experiment", description="crashes")["run"]
    lab.ok("discard")
    return runs


def tracked(client: MlflowClient, ws: Path) -> dict:
    """The workspace's tracked runs by description, each at the stage it was synced to."""
    experiment = client.get_experiment_by_name(tracking.experiment_name(ws, "autoresearch/t"))
    if experiment is None:
        return {}
    return {run.data.tags["mlflow.note.content"]: run for run in client.search_runs([experiment.experiment_id])
            if run.data.tags.get(tracking.STAGE_TAG)}


def synced(client: MlflowClient, ws: Path, stages: dict) -> bool:
    runs = tracked(client, ws)
    return {d: r.data.tags[tracking.STAGE_TAG] for d, r in runs.items()} == stages


NIGHT_STAGES = {"baseline": "keep", "better": "keep", "worse": "discard", "crashes": "crash"}


def test_each_run_is_an_mlflow_run_with_params_metrics_tags_and_artifacts(lab, mlflow_server, quick_retries, tmp_path,
                                                                          capfd):
    tracker = tracking.Tracker(lab.ws, mlflow_server.url, **quick_retries).start()
    client = MlflowClient(mlflow_server.url)
    try:
        lab.baseline()
        set_knobs(lab.ws, val_bpb=0.9, steps=12)
        lab.ok("run_experiment", description="better")
        # undecided, it is tracked already, as pending; the decision follows it
        assert wait_until(lambda: synced(client, lab.ws, {"baseline": "keep", "better": "pending"}), SYNC_S)
        assert tracked(client, lab.ws)["better"].data.tags["decision"] == "pending"
        lab.ok("keep", unconfirmed=True)
        set_knobs(lab.ws, val_bpb=0.95, steps=12)
        lab.ok("run_experiment", description="worse")
        lab.ok("discard", reason="no gain")
        set_knobs(lab.ws, val_bpb=0.9, steps=12, crash=1)
        lab.ok("run_experiment", description="crashes")
        lab.ok("discard")
        assert wait_until(lambda: synced(client, lab.ws, NIGHT_STAGES), SYNC_S)
    finally:
        tracker.stop()
    assert capfd.readouterr().out == ""  # stdout is the MCP protocol's channel over stdio
    runs = tracked(client, lab.ws)
    experiment = client.get_experiment_by_name(tracking.experiment_name(lab.ws, "autoresearch/t"))
    assert experiment.tags["research_loop.workspace"] == str(lab.ws)
    assert len(client.search_runs([experiment.experiment_id])) == 4  # one MLflow run per run, the update in place

    better = runs["better"]
    assert better.data.params == {"VAL_BPB": "0.9", "STEPS": "12", "other_lines": "0"}
    assert better.data.metrics["val_bpb"] == 0.9 and better.data.metrics["num_steps"] == 12
    assert better.data.metrics["memory_gb"] == 2.0 and better.data.metrics["mfu_percent"] == 40.0
    assert better.data.metrics["delta"] == pytest.approx(-0.1) and better.data.metrics["kept"] == 1.0
    assert {"training_seconds", "total_seconds", "wall_seconds"} <= set(better.data.metrics)
    curve = client.get_metric_history(better.info.run_id, "train_loss")
    assert [m.step for m in curve] == list(range(12))  # every progress line of its log
    tags = better.data.tags
    assert tags["decision"] == "keep" and tags["ledger"] == "better" and tags["branch"] == "autoresearch/t"
    assert tags["evidence"].startswith("kept unconfirmed on request: the noise is not measured yet")
    assert tags["changes"] == "STEPS (new)->12; VAL_BPB 1.0->0.9" and tags["result.noise"].startswith("better by")
    assert tags["commit"] == lab.head() and better.info.status == "FINISHED"
    assert better.info.run_name == "0002 better"

    files = {a.path for a in client.list_artifacts(better.info.run_id)}
    record = lab.ws / "runs" / f"0002-{lab.head()[:7]}.json"
    assert files == {"train.py.diff", "record.json", record.with_suffix(".log").name}
    got = Path(client.download_artifacts(better.info.run_id, "", str(tmp_path)))
    diff = (got / "train.py.diff").read_text()
    assert "-VAL_BPB = 1.0" in diff and "+VAL_BPB = 0.9" in diff and "+STEPS = 12" in diff
    assert (got / record.with_suffix(".log").name).read_bytes() == record.with_suffix(".log").read_bytes()
    assert json.loads((got / "record.json").read_text()) == json.loads(record.read_text())

    worse, crash = runs["worse"], runs["crashes"]
    assert worse.data.tags["decision"] == "discard" and worse.data.tags["ledger"] == "worse (no gain)"
    assert worse.data.metrics["kept"] == 0.0 and "evidence" not in worse.data.tags
    assert crash.info.status == "FAILED" and crash.data.tags["result.status"] == "crash"
    assert crash.data.tags["decision"] == "crash" and "val_bpb" not in crash.data.metrics
    assert runs["baseline"].data.tags["evidence"] == "the first result of the research run"


def test_a_hanging_tracker_holds_up_no_tool_call_and_catches_up(lab, mlflow_server, quick_retries):
    relay = Relay(mlflow_server.port)  # answers nothing until told to forward
    tracker = tracking.Tracker(lab.ws, f"http://127.0.0.1:{relay.port}", **quick_retries).start()
    client = MlflowClient(mlflow_server.url)
    try:
        lab.ok("setup", tag="t")
        lab.ok("run_experiment", description="baseline")
        assert wait_until(lambda: relay.waiting_requests() >= 1, SYNC_S)  # the tracker is stuck in a call
        lab.ok("keep")
        set_knobs(lab.ws, val_bpb=0.9, steps=12)
        lab.ok("run_experiment", description="better")
        lab.ok("keep", unconfirmed=True)
        set_knobs(lab.ws, val_bpb=0.95, steps=12)
        lab.ok("run_experiment", description="worse")
        lab.ok("discard", reason="no gain")
        lab.ok("status")
        # every tool answered while the tracker still waits for its first answer
        assert relay.waiting_requests() >= 1 and tracked(client, lab.ws) == {}
        assert tracker._thread.is_alive()
        relay.forward()
        assert wait_until(lambda: synced(client, lab.ws, {"baseline": "keep", "better": "keep", "worse": "discard"}),
                          SYNC_S)
    finally:
        tracker.stop()
        relay.close()


def test_a_tracker_that_is_gone_costs_nothing_and_its_runs_appear_once_it_is_back(lab, mlflow_server, quick_retries):
    port = free_port()  # nothing listens there: every call is refused
    tracker = tracking.Tracker(lab.ws, f"http://127.0.0.1:{port}", **quick_retries).start()
    client = MlflowClient(mlflow_server.url)
    relay = None
    try:
        night(lab)
        assert wait_until(lambda: tracker.problem is not None, SYNC_S)
        assert tracked(client, lab.ws) == {}
        relay = Relay(mlflow_server.port, port, hanging=False)  # the server is back on that port
        assert wait_until(lambda: synced(client, lab.ws, NIGHT_STAGES), SYNC_S)
        assert wait_until(lambda: tracker.problem is None, SYNC_S)
    finally:
        tracker.stop()
        if relay:
            relay.close()


def test_train_pys_own_number_is_not_tracked_as_the_harnesss_val_bpb(fake_env, mlflow_server):
    """Review 59: a run the harness did not evaluate (it exported no model) was tracked under the same val_bpb
    metric as the harness's numbers, marked only in tags: sorted by val_bpb, train.py's 0.5 came first."""
    ws = exporting_workspace(fake_env)
    lab = Lab(ws)
    try:
        lab.ok("setup", tag="t")
        set_knobs(ws, val_bpb=0.5)
        assert lab.ok("run_experiment", description="baseline")["verified"] is False
        lab.ok("keep", unverified=True)
        assert tracking.Tracker(ws, mlflow_server.url).sync() == 1
        metrics = tracked(MlflowClient(mlflow_server.url), ws)["baseline"].data.metrics
        assert "val_bpb" not in metrics and metrics["val_bpb_unverified"] == 0.5, metrics
    finally:
        lab.loop.shutdown()


def test_a_right_to_left_override_in_train_py_is_tracked_written_out(lab, mlflow_server, tmp_path):
    """Review 59 left it open: the report and the dashboard write hidden characters out, but MLflow's params,
    tags and diff carried train.py's U+202E as it is, so the code read in the tracker's UI was not the code that
    ran ("trojan source")."""
    lab.baseline()
    (lab.ws / "train.py").write_text("VAL_BPB = 0.9\nNAME = 'a\u202eb'\n# look \u202e here\n")
    lab.ok("run_experiment", description="hidden")
    lab.ok("discard")
    assert tracking.Tracker(lab.ws, mlflow_server.url).sync() == 2
    client = MlflowClient(mlflow_server.url)
    run = tracked(client, lab.ws)["hidden"]
    assert run.data.params["NAME"] == "'a<U+202E>b'", run.data.params
    assert not any("\u202e" in v for v in [*run.data.params.values(), *run.data.tags.values()]), run.data.tags
    diff = Path(client.download_artifacts(run.info.run_id, "train.py.diff", str(tmp_path))).read_text()
    assert "+# look <U+202E> here" in diff and "\u202e" not in diff, diff


def test_a_delta_over_a_best_logged_by_hand_is_not_tracked_as_the_harnesss(fake_env, mlflow_server):
    """Found by review 62: after log_result(keep) of the agent's own 99.0, the next run (1.04, worse than the
    harness's 1.0) was tracked with delta -97.96 and best_val_bpb 99.0 under the harness's metrics: sorted by
    delta it was the night's great gain. Numbers from a best the harness did not measure carry the suffix too."""
    lab = Lab(make_workspace(fake_env))
    try:
        lab.baseline()
        set_knobs(lab.ws, val_bpb=1.05)
        git(lab.ws, "commit", "-q", "-am", "my idea, measured by hand")
        lab.ok("log_result", commit=lab.head(), val_bpb=99.0, memory_gb=1.0, status="keep", description="my idea")
        set_knobs(lab.ws, val_bpb=1.04)
        lab.ok("run_experiment", description="worse than the measured best")
        lab.ok("discard")
        assert tracking.Tracker(lab.ws, mlflow_server.url).sync() == 2
        metrics = tracked(MlflowClient(mlflow_server.url), lab.ws)["worse than the measured best"].data.metrics
        assert metrics["val_bpb"] == 1.04 and "delta" not in metrics and "best_val_bpb" not in metrics, metrics
        assert metrics["delta_unverified"] == -97.96 and metrics["best_val_bpb_unverified"] == 99.0
    finally:
        lab.loop.shutdown()


def test_tracking_is_idempotent_and_a_half_done_run_is_redone(lab, mlflow_server):
    night(lab)
    first = tracking.Tracker(lab.ws, mlflow_server.url)
    assert first.sync() == 4 and first.sync() == 0
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name(tracking.experiment_name(lab.ws, "autoresearch/t"))
    worse = tracked(client, lab.ws)["worse"]
    # a pass cut short after it created the run: its key is there, the stage tag set last is not
    client.delete_tag(worse.info.run_id, tracking.STAGE_TAG)
    client.delete_tag(worse.info.run_id, "decision")
    restarted = tracking.Tracker(lab.ws, mlflow_server.url)  # a new server: knows only what the store says
    assert restarted.sync() == 1 and restarted.sync() == 0
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags[tracking.KEY_TAG] for r in runs) == sorted(p.stem for p in restarted._record_paths())
    redone = tracked(client, lab.ws)["worse"]
    assert redone.info.run_id != worse.info.run_id and redone.data.tags["decision"] == "discard"
    assert redone.data.metrics == worse.data.metrics


def test_the_demos_catch_up_writes_what_the_server_left_and_a_tracker_down_costs_it_nothing(lab, mlflow_server):
    """The MCP client ends a server 2 s after the session closes: its tracker's last pass (the night's last
    decisions) can be cut (CI at stop 49). The demo writes what is left once the server is gone; a tracker that
    does not answer then is told, and the night ends as it would."""
    night(lab)  # the server's tracker wrote none of it
    lab.loop.shutdown()  # the demo's catch-up comes once its server has gone
    said = []
    plan = SearchPlan(workspace=lab.ws, tag="t", strategy="greedy", experiments=0, hours=None, seed=0, space=(),
                      env={}, harness={}, tracking=("--track", "mlflow", "--mlflow-uri", mlflow_server.url))
    catch_up_tracking(plan, said.append)
    assert synced(MlflowClient(mlflow_server.url), lab.ws, NIGHT_STAGES)
    assert said == ["tracking: wrote the 4 run(s) the server had not written when it exited"]
    catch_up_tracking(plan, said.append)
    assert len(said) == 1  # nothing left: nothing said
    down = f"http://127.0.0.1:{free_port()}"
    plan.tracking = ("--track", "mlflow", "--mlflow-uri", down)
    catch_up_tracking(plan, said.append)
    assert said[-1].startswith("tracking failed (") and said[-1].endswith(f"--mlflow-uri {down} tracks them"), said


def test_records_the_server_did_not_write_are_not_tracked(lab, mlflow_server):
    """The agent wants a better number in the tracker: a forged record, or a real one edited."""
    night(lab)
    runs_dir = lab.ws / "runs"
    better = next(runs_dir.glob("0002-???????.json"))
    forged = json.loads(better.read_text())
    forged["result"].update(val_bpb=0.5, description="miracle")
    forged["run"].update(run=9, description="miracle")
    (runs_dir / f"0009-{forged['run']['commit'][:7]}.json").write_text(json.dumps(forged))
    worse = next(runs_dir.glob("0003-???????.json"))
    edited = json.loads(worse.read_text())
    edited["result"]["val_bpb"] = 0.5
    worse.write_text(json.dumps(edited))
    # an edit the ledger row cannot see: the same value, a better story
    told = json.loads(better.read_text())
    told["decision"]["evidence"] = "confirmed ten times"
    better.write_text(json.dumps(told))
    os.mkfifo(runs_dir / "0010-abcdef0.json")  # an open of it would block the tracker's thread
    tracker = tracking.Tracker(lab.ws, mlflow_server.url)
    assert tracker.sync() == 2
    runs = tracked(MlflowClient(mlflow_server.url), lab.ws)
    assert sorted(runs) == ["baseline", "crashes"]
    assert tracker.untracked == {worse.stem, better.stem, f"0009-{forged['run']['commit'][:7]}", "0010-abcdef0"}


def test_a_log_replaced_by_a_symbolic_link_uploads_nothing_it_points_to(lab, mlflow_server, tmp_path):
    """Review 39b: tracking uploaded whatever the run's log (in runs/, the agent's) pointed to: a symbolic
    link put in its place, to ~/.netrc or the offline seed, sent that file to the tracking server. Only
    a plain file at that path is uploaded; otherwise a tag says why not."""
    secret = tmp_path / "netrc"
    secret.write_text("machine api.example.com login me password SECRET\n")
    lab.baseline()
    log = next((lab.ws / "runs").glob("0001-*.log"))
    log.unlink()
    log.symlink_to(secret)
    assert tracking.Tracker(lab.ws, mlflow_server.url).sync() == 1
    client = MlflowClient(mlflow_server.url)
    run = tracked(client, lab.ws)["baseline"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"train.py.diff", "record.json"}
    assert run.data.tags["log_note"] == f"runs/{log.name} was not uploaded: it is a symbolic link, not the log the worker wrote"
    assert "SECRET" not in json.dumps(run.to_dictionary())


def test_a_log_edited_after_its_run_was_recorded_is_not_uploaded_nor_drawn(lab, mlflow_server):
    """Review 63: tracking read the run's log when it tracked the run, after the agent could edit it: a log whose
    loss lines and summary were rewritten was uploaded as the run's log and drawn as its loss curve. Only the
    bytes the server digested when it recorded the run are tracked; otherwise a tag says why not."""
    lab.baseline()
    log = next((lab.ws / "runs").glob("0001-*.log"))
    honest = log.read_text()
    log.write_text(honest.replace("loss: ", "loss: 0.0").replace("val_bpb:          1.000000",
                                                                "val_bpb:          0.500000") + "verified 0.5\n")
    assert tracking.Tracker(lab.ws, mlflow_server.url).sync() == 1
    client = MlflowClient(mlflow_server.url)
    run = tracked(client, lab.ws)["baseline"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"train.py.diff", "record.json"}
    assert run.data.tags["log_note"] == (f"runs/{log.name} was not uploaded: it is not the log the server recorded "
                                         "for the run (changed since, or never recorded)")
    assert client.get_metric_history(run.info.run_id, "train_loss") == [] and run.data.metrics["val_bpb"] == 1.0


def test_only_the_owning_server_tracks(lab, mlflow_server):
    night(lab)
    assert tracking.Tracker(lab.ws, mlflow_server.url, owned=lambda: False).sync() == 0
    assert tracked(MlflowClient(mlflow_server.url), lab.ws) == {}


def stages_in(db: Path) -> list[str]:
    """The stage tags in an MLflow SQLite store, read only (an MLflow client would create the tables
    the server's tracker may be creating)."""
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
            return [v for (v,) in conn.execute("SELECT value FROM tags WHERE key = ?", (tracking.STAGE_TAG,))]
    except sqlite3.Error:
        return []


def test_the_server_tracks_to_the_workspace_store_by_default(tmp_path):
    """--track mlflow on the real server over stdio: the night in <workspace>/.research-loop/mlflow.db,
    artifacts beside it, and nothing of MLflow's on the protocol's stdout."""
    ws, cache = make_workspace(tmp_path), make_cache(tmp_path)
    db = ws / ".research-loop" / "mlflow.db"
    uri = f"sqlite:///{db}"

    async def go():
        async with stdio_client_for(ws, cache, "--track", "mlflow") as client:
            answer(await client.call_tool("setup", {"tag": "t"}))
            answer(await client.call_tool("run_experiment", {"description": "baseline"}))
            answer(await client.call_tool("keep", {}))
            assert await anyio.to_thread.run_sync(lambda: wait_until(lambda: stages_in(db) == ["keep"], SYNC_S, 0.5))
            answer(await client.call_tool("status", {}))  # the protocol still works after MLflow's start
    anyio.run(go)
    client = MlflowClient(uri)
    run = tracked(client, ws)["baseline"]
    assert run.data.metrics["val_bpb"] == 1.0
    artifacts = ws / ".research-loop" / "mlflow-artifacts"
    assert client.get_experiment(run.info.experiment_id).artifact_location == artifacts.as_uri()
    assert (artifacts / run.info.run_id / "artifacts" / "train.py.diff").is_file()
    assert client.get_experiment("0").artifact_location.startswith(artifacts.as_uri())  # not ./mlruns wherever it ran
    assert not (tmp_path / "mlruns").exists()


def test_tracking_options(monkeypatch):
    monkeypatch.delenv("RESEARCH_LOOP_TRACK", raising=False)
    monkeypatch.delenv("RESEARCH_LOOP_MLFLOW_URI", raising=False)
    assert parse_args([]).track is None
    assert parse_args(["--track", "mlflow"]).track == "mlflow"
    given = parse_args(["--mlflow-uri", "http://team:5000"])
    assert (given.track, given.mlflow_uri) == ("mlflow", "http://team:5000")
    monkeypatch.setenv("RESEARCH_LOOP_MLFLOW_URI", "http://team:5000")
    assert parse_args([]).track == "mlflow"
    monkeypatch.setenv("RESEARCH_LOOP_TRACK", "tensorboard")
    with pytest.raises(SystemExit):
        parse_args([])
    assert tracking.missing_extra("mlflow") is None  # the dev group installs the extra
