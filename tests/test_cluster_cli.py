"""`--executor ray|slurm` where the engine cannot be used: the server does not start, and says why
and what to install or where to run. (Real subprocesses; the extra is hidden from the import.)"""
import shutil
import subprocess
import sys

from server_support import REPO, make_workspace

HIDE_AND_START = ("import sys; sys.modules[{module!r}] = None; from mcp_server.__main__ import main; "
                  "main(['--workspace', {ws!r}, '--executor', {executor!r}])")


def start(ws, executor, module, env=None):
    code = HIDE_AND_START.format(module=module, ws=str(ws), executor=executor)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


def test_without_the_ray_extra_the_server_says_how_to_install_it(tmp_path):
    out = start(make_workspace(tmp_path), "ray", "ray")
    assert out.returncode != 0
    assert "--executor ray needs Ray, which is not installed: uv sync --extra ray" in out.stderr


def test_without_the_slurm_extra_the_server_says_how_to_install_it(tmp_path):
    out = start(make_workspace(tmp_path), "slurm", "submitit")
    assert out.returncode != 0
    assert "--executor slurm needs submitit, which is not installed: uv sync --extra slurm" in out.stderr


def test_slurm_without_sbatch_says_where_to_run(tmp_path):
    bin_dir = tmp_path / "bin"  # git and nothing of SLURM's
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    out = start(make_workspace(tmp_path), "slurm", "no-such-module", env=env)
    assert out.returncode != 0
    assert "sbatch, scontrol, scancel not found" in out.stderr and "login node" in out.stderr
