"""The training environment is pinned at setup: what the agent plants in it between runs (a .pth,
a sitecustomize.py, an edited package file) refuses the next run until it is restored."""
import os
import subprocess
import sys

import pytest

from server_support import Lab, make_workspace


@pytest.fixture
def venv_lab(fake_env):
    """A fake-trainer workspace whose runs train with the workspace's own venv, holding one
    installed module."""
    ws = make_workspace(fake_env)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(ws / ".venv")], check=True)
    (ws / ".git" / "info" / "exclude").write_text(".venv/\n")
    (site,) = (ws / ".venv").glob("lib/python*/site-packages")
    (site / "tinymod").mkdir()
    (site / "tinymod" / "__init__.py").write_text("SCALE = 1.0\n")
    lab = Lab(ws, train_command=[str(ws / ".venv" / "bin" / "python"), "fake_train.py"])
    yield lab, site
    lab.loop.shutdown()


def plant_pth(site):
    (site / "evil.pth").write_text("import os; os.environ['FAKE_VAL_BPB'] = '0.5'\n")
    return lambda: (site / "evil.pth").unlink()


def plant_sitecustomize(site):
    (site / "sitecustomize.py").write_text("SCALE = 0.5\n")
    return lambda: (site / "sitecustomize.py").unlink()


def edit_module(site):
    module = site / "tinymod" / "__init__.py"
    before, st = module.read_bytes(), module.stat()
    module.write_text("SCALE = 0.5\n")
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    def restore():
        module.write_bytes(before)
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    return restore


@pytest.mark.parametrize("plant", [plant_pth, plant_sitecustomize, edit_module])
def test_a_changed_training_environment_refuses_runs_until_restored(venv_lab, plant):
    lab, site = venv_lab
    lab.baseline()
    restore = plant(site)
    refusal = lab.refused("run_experiment", description="same train.py", rerun=True)
    assert "training environment changed since setup" in refusal and str(site) in refusal
    assert "uv sync --reinstall" in refusal
    restore()
    lab.ok("run_experiment", description="same train.py", rerun=True)


def test_a_state_from_before_the_pin_is_pinned_at_the_next_run(venv_lab):
    lab, site = venv_lab
    lab.baseline()
    with lab.loop.state.transaction() as state:
        del state["environment_pin"]
    lab.ok("run_experiment", description="pins now", rerun=True)
    lab.ok("discard")
    plant_pth(site)
    assert "training environment changed" in lab.refused("run_experiment", description="planted", rerun=True)


def test_bytecode_an_import_writes_outside_the_sandbox_is_no_change(venv_lab):
    """The agent's own `python -c 'import tinymod, toplevel'` in the workspace writes __pycache__, in a
    package and in site-packages itself (a module that is one file): runs go on."""
    lab, site = venv_lab
    (site / "toplevel.py").write_text("X = 1\n")
    lab.baseline()
    subprocess.run([str(lab.ws / ".venv" / "bin" / "python"), "-c", "import tinymod, toplevel"], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    assert list((site / "tinymod").glob("__pycache__/*.pyc")) and list(site.glob("__pycache__/toplevel.*.pyc"))
    lab.ok("run_experiment", description="same train.py", rerun=True)


def test_a_reapply_is_refused_too(venv_lab):
    """reapply dispatches a run as run_experiment does: the same check, nothing lost."""
    lab, site = venv_lab
    lab.baseline()
    train = lab.ws / "train.py"
    train.write_text("VAL_BPB = 1.0\nSLEEP = 2\n")
    first = lab.ok("run_experiment", description="first", wait=False)
    train.write_text("# second\nVAL_BPB = 1.0\n")
    lab.ok("run_experiment", description="second", wait=False)
    lab.ok("wait")
    lab.ok("keep", run=first["run"])
    lab.ok("wait")
    restore = plant_pth(site)
    assert "training environment changed since setup" in lab.refused("reapply", run=first["run"] + 1)
    restore()
    assert lab.ok("reapply", run=first["run"] + 1)["status"] in ("running", "ok")
