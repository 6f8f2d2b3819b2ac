"""Real engines for the cluster tests, started and stopped by session fixtures.

Ray: a head on 127.0.0.1 only, on free ports, with 2 CPUs and 2 logical GPUs (Ray pins them with
CUDA_VISIBLE_DEVICES without any GPU), run with `ray start --block` from an empty folder inside a
short temp folder that also holds Ray's temp dir: every process it starts works in that folder or
names it, so stopping it and finding what is left both go by that folder. SLURM: slurmctld and slurmd from Debian's slurm-wlm, one node with two fake
GPUs (gres on /dev/null and /dev/zero), configured in a temp folder (SLURM_CONF), munge for auth.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from server_support import free_port, processes_in, wait_until

RAY_START_TIMEOUT_S = 180  # a loaded 2-core machine needs most of a minute
SLURM_START_TIMEOUT_S = 30



def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# The jobs pass no objects; Ray's default store (30% of memory, in /dev/shm) would stay reserved
# for the rest of the session while the demo and overnight tests train beside the head.
OBJECT_STORE_BYTES = 100 * 2**20


def auth_headers() -> dict:
    """What Ray's own clients send where the cluster uses token authentication (tests/conftest.py)."""
    token = os.environ.get("RAY_AUTH_TOKEN") if os.environ.get("RAY_AUTH_MODE") == "token" else None
    return {"Authorization": f"Bearer {token}"} if token else {}


class RayHead:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="rl-ray-", dir="/tmp"))  # unix socket paths must stay short
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        ray = Path(sys.executable).with_name("ray")
        # RAY_ENABLE_UV_RUN_RUNTIME_ENV=0: the tests run under `uv run`, and Ray's hook for it would
        # make every Ray driver (the head's own job agent included) ship its working directory, here
        # the folder that holds the head's growing temp dir: a zip that fills the disk
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take the loopback address as the node's
        # everywhere (--node-ip-address alone leaves the client server on the machine's address)
        env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_USAGE_STATS_ENABLED="0")
        home = self.folder / "cwd"  # empty: nothing to ship even if a driver ships its cwd
        home.mkdir()
        self.log = open(self.folder / "ray-start.log", "wb")
        self.proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.port), "--include-dashboard=true",
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--num-cpus", "2", "--num-gpus", "2", "--object-store-memory", str(OBJECT_STORE_BYTES),
             "--temp-dir", str(self.folder / "t"), "--disable-usage-stats"],
            cwd=home, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.address}/api/version", timeout=2, headers=auth_headers()).ok \
                and self._node_alive()
        except requests.RequestException:
            return False

    def _node_alive(self) -> bool:
        nodes = requests.get(f"{self.address}/nodes?view=summary", timeout=5, headers=auth_headers())
        return nodes.ok and "ALIVE" in nodes.text

    def wait_ready(self) -> None:
        if not wait_until(lambda: self.proc.poll() is None and self.ready(), RAY_START_TIMEOUT_S, 1.0):
            log = (self.folder / "ray-start.log").read_text()[-3000:]  # stop() removes the folder
            self.stop()
            raise RuntimeError(f"the Ray head did not start: {log}")

    def processes(self) -> list[int]:
        return processes_in(self.folder)

    def stop(self) -> list[int]:
        """Stops the head; returns the processes that were still there afterwards (then killed)."""
        self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        wait_until(lambda: not self.processes(), 30, 0.5)
        left = self.processes()
        kill_all(left)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return left


SLURM_CONF = """ClusterName=rltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmUser={user}
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
GRES_CONF = "NodeName={host} Name=gpu File=/dev/null\nNodeName={host} Name=gpu File=/dev/zero\n"


class SlurmCluster:
    """One node, two fake GPUs; None from start() where SLURM cannot run (not root, not installed)."""

    @classmethod
    def start(cls):
        if os.geteuid() != 0 or not all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch")):
            return None
        cluster = cls()
        if not wait_until(cluster.ready, SLURM_START_TIMEOUT_S, 0.5):
            cluster.stop()
            return None
        return cluster

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="rl-slurm-", dir="/tmp"))
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        host = socket.gethostname().split(".")[0]
        conf = self.folder / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=host, ctld_port=free_port(), d_port=free_port(), folder=self.folder,
                                          user="root", cpus=os.cpu_count()))
        (self.folder / "gres.conf").write_text(GRES_CONF.format(host=host))
        self.env = {"SLURM_CONF": str(conf)}
        env = dict(os.environ, **self.env)
        self.munged = None
        if not Path("/run/munge/munge.socket.2").exists():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            self.munged = subprocess.Popen(["munged", "--foreground", "--force"], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
            wait_until(lambda: Path("/run/munge/munge.socket.2").exists(), 10)
        self.daemons = [subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
                        for daemon in ("slurmctld", "slurmd")]

    def ready(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=dict(os.environ, **self.env), capture_output=True,
                             text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self) -> None:
        for proc in [*self.daemons, *([self.munged] if self.munged else [])]:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def jobs_running(self) -> bool:
        out = subprocess.run(["squeue", "-h"], env=dict(os.environ, **self.env), capture_output=True, text=True)
        return bool(out.stdout.strip())


def trainers(folder: Path) -> list[int]:
    """The fake trainers and what they spawned (tests/fake_train.py), among the processes that
    work in `folder` or name it."""
    found = []
    for pid in processes_in(folder):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"fake_train.py" in cmdline or b"time.sleep(600)" in cmdline or b"os.setsid()" in cmdline:
            found.append(pid)
    return found


def wait_for(predicate, timeout: float) -> bool:
    return wait_until(predicate, timeout, 0.2)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
