"""Runs on a real single-node SLURM through the MCP tools: Debian's slurm-wlm (slurmctld, slurmd,
munge) started once for this module, one node with two fake GPUs, submitit submitting the jobs.
slurm-wlm and munge are installed from Debian's archive when missing (as for every Debian tool
the tests drive); test_cluster_slurm_local.py checks the same jobs through submitit's local executor."""
import os
import subprocess

import pytest

import cluster_support as cluster
from conftest import ensure_debian_package
from mcp_server.executors import slurm_executor
from mcp_server.core.state import State
from server_support import TRAIN_COMMAND, Lab, make_workspace, set_knobs, wait_until

pytest.importorskip("submitit", reason="the slurm extra is not installed: uv sync --extra slurm")


@pytest.fixture(scope="module")
def slurm():
    ensure_debian_package("slurmctld", "slurm-wlm")
    ensure_debian_package("munged", "munge")
    started = cluster.SlurmCluster.start()
    if started is None:
        pytest.fail("SLURM did not start: its daemons run as root (slurm-wlm and munge, installed above "
                    "when missing)")
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(started.env)  # sbatch, scontrol and scancel, from the server, find this cluster
    yield started
    assert wait_until(lambda: not started.jobs_running(), 60), "SLURM jobs were left running"
    started.stop()
    os.environ.pop("SLURM_CONF") if saved is None else os.environ.update(SLURM_CONF=saved)


@pytest.fixture
def slurm_lab(fake_env, slurm, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    folder = fake_env / "shared"
    lab = Lab(make_workspace(fake_env), slots=2, executor=lambda ws: slurm_executor.SlurmExecutor(
        ws, TRAIN_COMMAND, 2, folder, partition="debug"))
    lab.folder = folder
    yield lab
    lab.loop.shutdown()
    assert wait_until(lambda: not cluster.trainers(folder), 30), cluster.trainers(folder)


def visible(lab, result) -> str:
    line = next(l for l in (lab.ws / result["log"]).read_text().splitlines() if l.startswith("visible:"))
    return line.split()[1].split("=")[1]


def test_two_jobs_at_once_on_their_own_gpus_and_the_sbatch_script(slurm_lab):
    slurm_lab.baseline()
    runs = []
    for k, value in enumerate((0.91, 0.92)):
        set_knobs(slurm_lab.ws, val_bpb=value, sleep=2, steps=2)
        runs.append(slurm_lab.ok("run_experiment", description=f"idea {k}", wait=False, timeout_seconds=60))
    results = slurm_lab.ok("wait", all=True)["results"]
    assert sorted(r["val_bpb"] for r in results) == [0.91, 0.92], results
    answers = [slurm_lab.loop.answer_for(r["run"]).model_dump() for r in runs]
    assert {visible(slurm_lab, a) for a in answers} == {"0", "1"}  # SLURM's gres pinning
    assert all(a["slot"].startswith("slurm job ") and a["device"] for a in answers)
    scripts = sorted(slurm_lab.folder.rglob("*_submission.sh"))
    assert len(scripts) == 3  # the baseline's and the two ideas'
    script = scripts[-1].read_text()
    assert "#SBATCH --gpus=1" in script and "#SBATCH --partition=debug" in script
    assert "#SBATCH --time=16" in script  # the 60 s timeout plus the node's allowance, in minutes
    assert "#SBATCH --job-name=research-loop-" in script
    for r in runs:
        slurm_lab.ok("discard", run=r["run"])
    assert not list(slurm_lab.folder.rglob("code"))  # each run's copy of the code is gone; its logs stay


def test_cancel_and_timeout_kill_the_jobs_whole_process_tree(slurm_lab):
    slurm_lab.baseline()
    set_knobs(slurm_lab.ws, sleep=120, steps=120, spawn=1, escape=1)
    cancelled = slurm_lab.ok("run_experiment", description="to cancel", wait=False)
    # each job: the trainer, its grandchild, and a daemon that left its session. The timed job is sent once the first
    # one's are there: sent together, all six showed 2.2 s after (load 3.6), and the timed job ends 6 s after its own
    # start, so a start of one job ~5 s after the other's would never show all six
    assert wait_until(lambda: len(cluster.trainers(slurm_lab.folder)) >= 3, 60), cluster.trainers(slurm_lab.folder)
    timed = slurm_lab.ok("run_experiment", description="to time out", wait=False, timeout_seconds=6, rerun=True)
    assert wait_until(lambda: len(cluster.trainers(slurm_lab.folder)) >= 6, 60), cluster.trainers(slurm_lab.folder)
    row = slurm_lab.ok("cancel", run=cancelled["run"])["row"]
    assert row["status"] == "crash" and row["description"] == "to cancel (cancelled)"
    result = slurm_lab.ok("wait")["results"][0]
    assert result["run"] == timed["run"] and result["status"] == "timeout", result
    assert wait_until(lambda: not cluster.trainers(slurm_lab.folder), 30), cluster.trainers(slurm_lab.folder)
    slurm_lab.ok("discard")


def test_a_restarted_server_reattaches_to_its_jobs(slurm_lab):
    slurm_lab.baseline()
    set_knobs(slurm_lab.ws, val_bpb=0.8, sleep=5, steps=5)
    run = slurm_lab.ok("run_experiment", description="outlives its server", wait=False)
    assert wait_until(lambda: "step" in (slurm_lab.ws / run["log"]).read_text(), 60)
    slurm_lab.restart()  # the job goes on in SLURM; the new server finds it by its job id
    assert slurm_lab.loop.entry(run["run"])["status"] == "running"
    result = slurm_lab.ok("wait")["results"][0]
    assert result["run"] == run["run"] and result["status"] == "ok" and result["val_bpb"] == 0.8


def test_a_job_ended_by_slurm_itself_is_a_crash_with_the_reason(slurm_lab):
    slurm_lab.baseline()
    set_knobs(slurm_lab.ws, sleep=60, steps=60)
    run = slurm_lab.ok("run_experiment", description="ended by slurm", wait=False)
    job = slurm_lab.loop.entry(run["run"])["job"]
    assert wait_until(lambda: "step" in (slurm_lab.ws / run["log"]).read_text(), 60)
    subprocess.run(["scancel", job], check=True)  # an administrator, preemption: not this server
    result = slurm_lab.ok("wait")["results"][0]
    assert result["status"] == "crash" and "the slurm job was stopped outside this server" in result["tail"], result
    assert slurm_lab.ok("discard")["row"]["status"] == "crash"
    assert wait_until(lambda: not cluster.trainers(slurm_lab.folder), 30), cluster.trainers(slurm_lab.folder)


def test_a_queued_job_cancelled_by_slurm_is_a_crash_with_the_reason(slurm_lab):
    slurm_lab.baseline()
    # someone else's job holds both GPUs
    hog = subprocess.run(["sbatch", "--parsable", "--gres=gpu:2", "--output=/dev/null", "--wrap", "sleep 120"],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        run = slurm_lab.ok("run_experiment", description="never started", wait=False, rerun=True)
        job = slurm_lab.loop.entry(run["run"])["job"]
        assert wait_until(lambda: "PENDING" in slurm_executor.slurm_state(job)[1], 30), slurm_executor.slurm_state(job)
        subprocess.run(["scancel", job], check=True)  # no node ever ran: only SLURM can say what happened
        result = slurm_lab.ok("wait")["results"][0]
    finally:
        subprocess.run(["scancel", hog], check=True)
    assert result["status"] == "crash", result
    why = "the slurm job was stopped outside this server (CANCELLED"
    assert why in result["tail"] and "before its node reported" in result["tail"], result["tail"]
    assert slurm_lab.ok("discard")["row"]["status"] == "crash"


def test_a_job_slurm_no_longer_knows_is_a_crash_with_the_reason(slurm_lab):
    """A restarted server finds a job id that SLURM has forgotten (purged while the server was away)."""
    slurm_lab.baseline()
    set_knobs(slurm_lab.ws, sleep=60, steps=60)
    run = slurm_lab.ok("run_experiment", description="forgotten", wait=False)
    assert wait_until(lambda: "step" in (slurm_lab.ws / run["log"]).read_text(), 60)
    slurm_lab.loop.shutdown()  # the job goes on without its server
    state = State(slurm_lab.ws).load()
    entry = next(e for e in state["runs"].values() if e["run"] == run["run"])
    subprocess.run(["scancel", entry["job"]], check=True)
    entry["job"] = "999999"  # an id SLURM never had, as after its records were purged
    State(slurm_lab.ws).save(state)  # as the server wrote it then: a state.json edited by hand is not believed
    slurm_lab.loop = slurm_lab.new_loop()
    result = slurm_lab.ok("wait")["results"][0]
    assert result["run"] == run["run"] and result["status"] == "crash", result
    assert "SLURM no longer knows the job" in result["tail"], result["tail"]
    assert slurm_lab.ok("discard")["row"]["status"] == "crash"
