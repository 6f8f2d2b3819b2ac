"""Runs on a Ray cluster, through the Ray Jobs API (the `ray` extra: `uv sync --extra ray`).

Each run is one Ray job: its submission id names the workspace, the run and the commit, so a
restarted server finds its jobs again; its working_dir is the candidate's tree with the node
scripts (Ray uploads it once per content); it asks for one GPU (one CPU on a cluster without
GPUs), and Ray pins it with CUDA_VISIBLE_DEVICES. Logs and status come through the API, so no
file system is shared with the nodes; cancel and the watchdog use stop_job, and the node's
worker kills the training's whole process tree before Ray's own SIGKILL would.

The address is the usual Ray one (--ray-address, else RAY_ADDRESS, else a cluster started on
this machine); token authentication uses Ray's own settings (RAY_AUTH_MODE=token and the
token), which the Ray client reads by itself.
"""
import shlex
import tempfile
from pathlib import Path

from mcp_server.executors.cluster import DONE, PENDING, RUNNING, ClusterExecutor, EngineUnreachable, Job, job_env, node_args
from mcp_server.core.models import Refusal
from mcp_server.scripts.node import NODE_DIR

INSTALL_HINT = "uv sync --extra ray (or pip install 'research-loop[ray]')"
NODE_PYTHON = "python3"  # node.py needs only the standard library: any Python on the node runs it


def ray_jobs():
    """The Ray Jobs API module, or a Refusal that says how to install it."""
    try:
        from ray import job_submission
    except ImportError:
        raise Refusal(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}.") from None
    return job_submission


def connect(address: str | None):
    """A Jobs API client for the cluster, or a Refusal saying how to reach one."""
    jobs = ray_jobs()
    where = address or "RAY_ADDRESS, or a cluster started on this machine"
    try:
        return jobs.JobSubmissionClient(address or None)
    except Exception as exc:  # the client raises ConnectionError, ValueError or RuntimeError
        if type(exc).__name__ == "AuthenticationError":  # ray.exceptions': reached, and turned away
            raise Refusal(f"The Ray cluster at {where} uses token authentication and did not accept this server "
                          f"({str(exc).splitlines()[0]}). Start the server with the cluster's token: RAY_AUTH_MODE=token "
                          "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token).") from None
        raise Refusal(f"Cannot reach the Ray cluster at {where}: {exc}. Start one (`ray start --head`) or point "
                      "the server at one (--ray-address http://HEAD:8265, or RAY_ADDRESS).") from None


def cluster_resources(client) -> dict:
    """Total resources of the cluster's live nodes (GPU, CPU), through the dashboard's state API."""
    from ray.util.state import list_nodes
    total: dict[str, float] = {}
    for n in list_nodes(address=client.get_address(), detail=True):
        if n.state == "ALIVE":
            for key, value in (n.resources_total or {}).items():
                total[key] = total.get(key, 0.0) + value
    return total


def unreachable(exc: Exception) -> bool:
    """Whether a client error means the cluster did not answer (as opposed to a refusal)."""
    import requests
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError)) or \
        "status code 5" in str(exc) and "does not exist" not in str(exc)


class RayExecutor(ClusterExecutor):
    engine = "ray"
    stopped_states = ("STOPPED",)

    def __init__(self, workspace, train_command: list[str], capacity: int, address: str | None = None,
                 gpus: bool = True):
        """capacity: jobs submitted at once (the cluster's GPUs by default, see default_capacity);
        gpus: one GPU per job, else one CPU (a cluster without GPUs)."""
        super().__init__(workspace, capacity, train_command)
        self.address = address
        self.resources = {"entrypoint_num_gpus": 1} if gpus else {"entrypoint_num_cpus": 1}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = connect(self.address)
        return self._client

    def code_dir(self, job: Job) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"research-loop-{job.spec.run}-")) / "code"

    def release_code(self, job: Job, code: Path) -> None:
        super().release_code(job, code.parent)

    def submit(self, job: Job, code: Path) -> None:
        job.id = self.job_name(job.spec)
        entrypoint = shlex.join([NODE_PYTHON, f"{NODE_DIR}/node.py", *node_args(job.spec, self.ws.root)])
        try:
            self.client.submit_job(entrypoint=entrypoint, submission_id=job.id, **self.resources,
                                   runtime_env={"working_dir": str(code), "env_vars": job_env(job.spec)},
                                   metadata={"research_loop_run": str(job.spec.run)})
        except Refusal:
            raise
        except Exception as exc:
            raise Refusal(f"Ray did not take the job ({self.address or 'RAY_ADDRESS'}): {exc}") from None
        finally:
            self.release_code(job, code)  # Ray has its own copy now

    def poll(self, job: Job) -> tuple[str, str]:
        try:
            info = self.client.get_job_info(job.id)
        except Exception as exc:
            if unreachable(exc) or isinstance(exc, Refusal):
                raise EngineUnreachable(str(exc)) from None
            return DONE, f"Ray no longer knows the job: {exc}"
        status = str(getattr(info.status, "value", info.status))
        state = PENDING if status == "PENDING" else RUNNING if status == "RUNNING" else DONE
        return state, f"{status}: {info.message}" if info.message else status

    def output(self, job: Job) -> str:
        try:
            return self.client.get_job_logs(job.id)
        except Exception as exc:
            if unreachable(exc) or isinstance(exc, Refusal):
                raise EngineUnreachable(str(exc)) from None
            return job.text

    def stop(self, job: Job) -> None:
        try:
            self.client.stop_job(job.id)
        except Exception as exc:
            if unreachable(exc) or isinstance(exc, Refusal):
                raise EngineUnreachable(str(exc)) from None

    def find(self, record: dict) -> Job | None:
        job = Job(spec=None, on_done=None, token="", id=record["job"])
        try:
            self.client.get_job_info(job.id)
        except Refusal:
            return job  # unreachable now: follow it, and give it up if the cluster stays away
        except Exception as exc:
            return job if unreachable(exc) else None
        return job
