"""The SLURM executor without a SLURM cluster: the same jobs through submitit's local executor, and
the sbatch script submitit would hand to SLURM, checked. (test_cluster_slurm.py runs a real SLURM
where it can.)"""
import pytest

import cluster_support as cluster
from mcp_server.executors import slurm_executor
from server_support import TRAIN_COMMAND, Lab, answer, make_workspace, set_knobs, wait_until

submitit = pytest.importorskip("submitit", reason="the slurm extra is not installed: uv sync --extra slurm")


def test_runs_through_submitits_local_executor(fake_env):
    folder = fake_env / "shared"
    lab = Lab(make_workspace(fake_env), executor=lambda ws: slurm_executor.SlurmExecutor(
        ws, TRAIN_COMMAND, 1, folder, cluster="local"))
    try:
        lab.baseline()
        set_knobs(lab.ws, val_bpb=0.9, sleep=1, steps=2)
        result = lab.ok("run_experiment", description="idea")
        assert result["status"] == "ok" and result["val_bpb"] == 0.9 and result["device"]
        assert result["slot"].startswith("slurm job ") and "RESEARCH_LOOP_RESULT" in (lab.ws / result["log"]).read_text()
        set_knobs(lab.ws, sleep=120, steps=120, spawn=1)
        lab.ok("discard")
        run = lab.ok("run_experiment", description="to cancel", wait=False)
        assert wait_until(lambda: len(cluster.trainers(folder)) >= 2, 180), cluster.trainers(folder)  # a loaded CI
        assert lab.ok("cancel", run=run["run"])["row"]["status"] == "crash"
        assert wait_until(lambda: not cluster.trainers(folder), 90), cluster.trainers(folder)
    finally:
        lab.loop.shutdown()


def test_a_jobs_training_reads_nothing_of_the_shared_folder_but_its_code(fake_env, outside_tmp, bubblewrap,
                                                                        monkeypatch):
    """submitit pickles a job's arguments (the offline seed among them) into the shared folder, beside
    the code folder the training runs in: the node hides the folder, but for that code folder."""
    folder = outside_tmp / "shared"  # outside /tmp, as a cluster's is: the sandbox's /tmp is its own
    lab = Lab(make_workspace(fake_env), executor=lambda ws: slurm_executor.SlurmExecutor(
        ws, TRAIN_COMMAND, 1, folder, cluster="local"))
    try:
        lab.baseline()
        (folder / "planted.txt").write_text("another workspace's secret")
        monkeypatch.setenv("FAKE_READ", f"{folder}/**/*_submitted.pkl,{folder}/planted.txt,train.py")
        set_knobs(lab.ws, val_bpb=0.9, steps=2)
        log = (lab.ws / lab.ok("run_experiment", description="reads the shared folder")["log"]).read_text()
    finally:
        lab.loop.shutdown()
    assert len(list(folder.glob("*/*/submitit/*_submitted.pkl"))) == 2  # there, outside the sandbox
    assert f"glob {folder}/**/*_submitted.pkl: []" in log, log
    assert f"read {folder}/planted.txt: refused" in log and "read train.py: 'VAL_BPB = 0.9" in log, log


def test_a_job_reads_no_earlier_runs_log_nor_the_state_where_the_node_sees_the_workspace(fake_env, outside_tmp,
                                                                                          bubblewrap, monkeypatch):
    """Review 90: the runs' logs (review 88) and the state (review 90) are hidden from a run on the server's machine,
    but a node's sandbox, built by node.py, hid neither: on a shared file system (a home on NFS, as SLURM clusters
    have) a job read every earlier run's log and the state, the harness's reasons in them. The server names them
    to the node to hide (--hide)."""
    ws = make_workspace(outside_tmp / "home")  # outside /tmp, as a shared file system is: the sandbox's /tmp is its own
    lab = Lab(ws, unsandboxed=False, executor=lambda w: slurm_executor.SlurmExecutor(
        w, TRAIN_COMMAND, 1, outside_tmp / "shared", cluster="local"))
    try:
        answer(lab.call("setup", tag="logs"))
        answer(lab.call("run_experiment", description="baseline"))
        lab.ok("keep")
        monkeypatch.setenv("FAKE_READ", f"{ws}/runs/*.log,{ws}/.research-loop/state.json")
        set_knobs(ws, VAL_BPB=0.9)
        run = answer(lab.call("run_experiment", description="reads the logs and the state"))
    finally:
        lab.loop.shutdown()
    log = (ws / run["log"]).read_text()
    assert run["status"] == "ok" and f"glob {ws}/runs/*.log: []" in log, log
    assert f"read {ws}/.research-loop/state.json: refused" in log, log


def test_the_sbatch_script_asks_for_one_gpu_the_time_partition_and_account(fake_env):
    from mcp_server.executors.cluster import Job
    from mcp_server.executors.executor import RunSpec
    lab = Lab(make_workspace(fake_env))
    try:
        executor = slurm_executor.SlurmExecutor(lab.loop.ws, TRAIN_COMMAND, 1, fake_env / "shared",
                                                partition="gpu", account="lab42")
        spec = RunSpec(run=3, commit="abcdef1234", command=TRAIN_COMMAND, timeout=600, log=fake_env / "l",
                       report=fake_env / "r")
        submit = submitit.AutoExecutor(folder=fake_env / "shared" / "submitit", cluster="slurm")
        submit.update_parameters(**executor.parameters(Job(spec=spec, on_done=None, token="")))
        script = submit._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    finally:
        lab.loop.shutdown()
    for line in ("--gpus=1", "--time=25", "--partition=gpu", "--account=lab42", "--nodes=1"):
        assert f"#SBATCH {line}\n" in script, script  # 600 s of training plus 900 s for the node: 25 min
    assert "#SBATCH --job-name=research-loop-" in script and "-3-abcdef1\n" in script


def test_a_jobs_run_cannot_put_code_into_what_the_bests_rerun_loads(fake_env, outside_tmp, bubblewrap, monkeypatch):
    """Stop 53's compile folder per program, on a cluster's node: the server names each run's program and its best's
    to the node, whose runs compile in folders of their own. A candidate that appends to what it compiled reaches no
    rerun of the best."""
    monkeypatch.setenv("FAKE_COMPILE", "1")
    lab = Lab(make_workspace(fake_env), executor=lambda ws: slurm_executor.SlurmExecutor(
        ws, TRAIN_COMMAND, 1, outside_tmp / "shared", cluster="local"))
    try:
        lab.baseline()
        set_knobs(lab.ws, val_bpb=0.9, poison=1)
        candidate = lab.ok("run_experiment", description="poisons what it compiled")
        lab.ok("discard")
        control = lab.ok("run_experiment", description="the best again", rerun=True)
    finally:
        lab.loop.shutdown()
    logs = [(lab.ws / run["log"]).read_text() for run in (candidate, control)]
    assert "cache graph.py: 'compiled by run 1'" in logs[0], logs[0]  # warm from the best's graph
    assert "cache graph.py: 'compiled by run 1'" in logs[1] and "POISON" not in logs[1], logs[1]
