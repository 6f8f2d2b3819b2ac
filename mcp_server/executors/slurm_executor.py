"""Runs on SLURM through submitit (the `slurm` extra: `uv sync --extra slurm`).

Each run is one batch job: `--gpus=1`, `--time` from the run's timeout (plus room for a node's
first data preparation), the partition and account given to the server. Its code is copied to a
per-run folder on the file system the nodes share; submitit's job folder beside it holds the
sbatch script and the job's output, which the server reads back as the run's log. Cancel and the
watchdog are scancel (through submitit). The job's state comes from scontrol, which every SLURM
has (sacct needs an accounting database). The server runs where sbatch works (a login node);
the job runs node.py with this server's Python, so the shared folder and the Python must be
visible from the nodes, as on any SLURM cluster.

cluster="local" runs the same jobs with submitit's local executor, for machines without SLURM.
"""
import math
import re
import shutil
import subprocess
from pathlib import Path

from mcp_server.scripts import node
from mcp_server.executors.cluster import DONE, PENDING, RUNNING, ClusterExecutor, EngineUnreachable, Job, job_env, node_args, \
    workspace_id
from mcp_server.core.models import Refusal

INSTALL_HINT = "uv sync --extra slurm (or pip install 'research-loop[slurm]')"
DEFAULT_CAPACITY = 4  # jobs submitted at once; SLURM queues them until GPUs are free
TIME_SLACK_S = 900  # --time beyond the training's timeout: start-up, a first data preparation, evaluation
PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED", "RESIZING"}
SCONTROL_TIMEOUT_S = 30


def submitit_module():
    """submitit, or a Refusal that says how to install it."""
    try:
        import submitit
    except ImportError:
        raise Refusal(f"--executor slurm needs submitit, which is not installed: {INSTALL_HINT}.") from None
    return submitit


def check_cluster() -> None:
    missing = [tool for tool in ("sbatch", "scontrol", "scancel") if not shutil.which(tool)]
    if missing:
        raise Refusal(f"--executor slurm: {', '.join(missing)} not found. Start the server where SLURM jobs are "
                      "submitted (a login node), or choose --executor local or ray.")


def slurm_state(job_id: str) -> tuple[str, str]:
    """(PENDING, RUNNING or DONE, SLURM's state and reason) from scontrol."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnreachable(f"scontrol: {exc}") from None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return DONE, "SLURM no longer knows the job"
        raise EngineUnreachable(f"scontrol: {out.stderr.strip() or out.returncode}")
    state = re.search(r"\bJobState=(\S+)", out.stdout)
    reason = re.search(r"\bReason=(\S+)", out.stdout)
    name = state.group(1) if state else "UNKNOWN"
    message = name + (f" ({reason.group(1)})" if reason and reason.group(1) != "None" else "")
    return (PENDING if name in PENDING_STATES else RUNNING if name in RUNNING_STATES else DONE), message


class SlurmExecutor(ClusterExecutor):
    engine = "slurm"
    stopped_states = ("CANCELLED", "PREEMPTED")

    def __init__(self, workspace, train_command: list[str], capacity: int, folder: Path,
                 partition: str | None = None, account: str | None = None, cluster: str = "slurm"):
        super().__init__(workspace, capacity, train_command)
        self.submitit = submitit_module()
        self.folder = Path(folder).resolve()
        self.partition, self.account, self.cluster = partition, account, cluster

    def run_dir(self, run: int, commit: str) -> Path:
        return self.folder / workspace_id(self.ws.root) / f"{run:04d}-{commit[:7]}"

    def code_dir(self, job: Job) -> Path:
        path = self.run_dir(job.spec.run, job.spec.commit) / "code"
        shutil.rmtree(path, ignore_errors=True)  # a retried run number starts from its own commit only
        return path

    def parameters(self, job: Job) -> dict:
        params = {"name": self.job_name(job.spec), "timeout_min": math.ceil((job.spec.timeout + TIME_SLACK_S) / 60)}
        if self.cluster == "slurm":
            params["slurm_additional_parameters"] = {"gpus": 1}
            params |= {f"slurm_{k}": v for k, v in (("partition", self.partition), ("account", self.account)) if v}
        return params

    def submit(self, job: Job, code: Path) -> None:
        executor = self.submitit.AutoExecutor(folder=code.parent / "submitit", cluster=self.cluster)
        executor.update_parameters(**self.parameters(job))
        try:
            # the job's arguments are pickled into the shared folder, which the training then must not read
            job.handle = executor.submit(node.run_job, str(code),
                                         ["--hide", str(self.folder), *node_args(job.spec, self.ws.root)],
                                         job_env(job.spec))
        except Exception as exc:  # submitit raises FailedJobError, or sbatch's own error
            raise Refusal(f"SLURM did not take the job: {exc}") from None
        job.id = str(job.handle.job_id)

    def poll(self, job: Job) -> tuple[str, str]:
        if self.cluster == "local":
            return (DONE if job.handle.done() else RUNNING), job.handle.state
        return slurm_state(job.id)

    def output(self, job: Job) -> str:
        try:
            return job.handle.paths.stdout.read_text(errors="replace")
        except FileNotFoundError:
            return ""  # not started yet
        except OSError as exc:
            raise EngineUnreachable(f"cannot read {job.handle.paths.stdout}: {exc}") from None

    def stop(self, job: Job) -> None:
        job.handle.cancel(check=False)

    def release_code(self, job: Job, code: Path) -> None:
        shutil.rmtree(code, ignore_errors=True)  # submitit's folder stays: the script and the raw output

    def find(self, record: dict) -> Job | None:
        if self.cluster != "slurm":
            return None  # local jobs are children of their server
        try:
            state, _ = slurm_state(record["job"])
        except EngineUnreachable:
            state = RUNNING  # follow it, and give it up if SLURM stays away
        if state == DONE and not (self.run_dir(record["run"], record["commit"]) / "submitit").is_dir():
            return None
        folder = self.run_dir(record["run"], record["commit"]) / "submitit"
        return Job(spec=None, on_done=None, token="", id=record["job"],
                   handle=self.submitit.SlurmJob(folder=folder, job_id=record["job"]))
