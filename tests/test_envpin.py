"""The training environment is pinned at setup: what the agent plants in it between runs (a .pth,
a sitecustomize.py, an edited package file) refuses the next run until it is restored; bytecode
planted beside a module (which the pin leaves out) never runs in a sandboxed run."""
import importlib.util
import json
import marshal
import os
import subprocess
import sys
from pathlib import Path

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


def crafted_bytecode(source: Path, code: str) -> Path:
    """A .pyc of other code whose header carries the source's size and mtime, the fields Python checks
    it by, planted in the __pycache__ beside the source: what the agent can write between runs."""
    st = source.stat()
    header = b"".join((importlib.util.MAGIC_NUMBER, bytes(4), (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little"),
                       (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")))
    target = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(header + marshal.dumps(compile(code, str(source), "exec")))
    return target


PLANTED = "import os\nos.environ['FAKE_VAL_BPB'] = '0.5'\nSCALE = 1.0\n"


def test_a_crafted_pyc_beside_a_module_the_run_imports_never_runs(venv_lab, bubblewrap, monkeypatch):
    """As a reward-seeking agent would: a .pyc that makes the run report 0.5, crafted with the size and
    mtime of tinymod's source, planted in tinymod's __pycache__ (the pin leaves bytecode out, so the run
    is not refused). Outside the sandbox that .pyc is what an import runs; the sandboxed run reads
    bytecode only from its own folder, so it compiles tinymod from its source and reports what the code
    gives."""
    lab, site = venv_lab
    monkeypatch.setenv("FAKE_IMPORTS", "tinymod")  # the fake trainer imports it first, as train.py imports torch
    lab.baseline()
    crafted_bytecode(site / "tinymod" / "__init__.py", PLANTED)
    python = str(lab.ws / ".venv" / "bin" / "python")
    outside = subprocess.run([python, "-c", "import os, tinymod; print(os.environ.get('FAKE_VAL_BPB'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert outside == "0.5"  # the crafted file is a working attack where bytecode is read beside the source
    result = lab.ok("run_experiment", description="same train.py", rerun=True)
    assert result["val_bpb"] == 1.0, result


WARM_TRAIN = """import os, time
while os.path.exists({hold!r}):
    time.sleep(0.05)
import torch
print("torch:", torch.SOURCE)
export = os.environ["RESEARCH_LOOP_EXPORT"]
open(export + ".json", "w").write("{{}}")
open(export, "w").write("model")
print("val_bpb: 1.5")
"""


def test_a_warm_interpreter_imports_the_servers_bytecode_never_a_crafted_pyc(fake_env, bubblewrap, monkeypatch):
    """The warm interpreter imports torch before any run is handed to it. Here torch is a stand-in
    package in the training's venv, and the agent planted a .pyc for it crafted with its source's size
    and mtime. Neither the cold first run nor the warm second one runs it: the cold one compiles torch
    in its sandbox's own bytecode folder, the warm one imports the server's archive (its own compile of
    torch, unpacked there), which holds torch's source as it is."""
    from mcp_server.executors import executor
    from mcp_server.scripts import bytecode_archive, harness_eval
    from mcp_server.core.workspace import Workspace
    from server_support import git, wait_until
    from test_warm_start import ANSWERING_EVALUATOR
    import queue
    monkeypatch.setenv(harness_eval.WARM_ENV, "0")  # the evaluator stand-in, started cold for each run
    monkeypatch.delenv(executor.WARM_START_ENV, raising=False)
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")  # the stand-in has no torch.cuda to ask
    hold = fake_env / "hold"
    hold.touch()
    ws = make_workspace(fake_env, WARM_TRAIN.format(hold=str(hold)))
    venv = fake_env / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text("SOURCE = 'compiled from its source'\n")
    crafted_bytecode(site / "torch" / "__init__.py", "print('PLANTED bytecode ran')\nSOURCE = 'planted'\n")
    python = str(venv / "bin" / "python")
    harness = fake_env / "harness"
    git(ws, "worktree", "add", "-q", "--detach", str(harness))

    def spec(run: int) -> executor.RunSpec:
        export = ws / ".research-loop" / "exports" / str(run) / "model.pt2"
        evaluate = {"argv": [sys.executable, "-c", ANSWERING_EVALUATOR, "1.5", str(fake_env / "go")],
                    "env": dict(os.environ), "timeout": 60, "harness": str(harness), "harness_commit": None}
        sandbox = {"readonly": [str(ws)], "writable": [".", str(export.parent)]}
        return executor.RunSpec(run=run, commit=git(ws, "rev-parse", "HEAD").strip(), command=[python, "train.py"],
                                timeout=120, log=fake_env / f"{run}.log", report=fake_env / f"{run}.report.json",
                                after_seconds=60, worker_args=["--sandbox", json.dumps(sandbox), "--export", str(export),
                                                               "--evaluate", json.dumps(evaluate)])
    pool = executor.LocalPool(Workspace(ws), 1, env=dict(os.environ))
    outcomes = queue.Queue()
    try:
        pool.start(spec(1), lambda run, outcome: outcomes.put(outcome))
        assert wait_until(lambda: pool.bytecode.fileno(python, pool.env) is not None, 120)  # built as run 1 waits
        archive = marshal.loads(bytecode_archive.read(pool.bytecode.fileno(python, pool.env)))
        hold.unlink()
        first = outcomes.get(timeout=120)
        assert wait_until(lambda: 0 in pool.ahead, 30)
        pool.start(spec(2), lambda run, outcome: outcomes.put(outcome))
        second = outcomes.get(timeout=120)
    finally:
        pool.shutdown()
    assert str(site / "torch" / "__init__.py") in archive
    assert second.report["warm_start"] and second.report["sandbox"] and not first.report.get("warm_start"), second.report
    for run in (1, 2):
        log = (fake_env / f"{run}.log").read_text()
        assert "torch: compiled from its source" in log and "PLANTED" not in log, log


def test_the_evaluator_compiles_what_it_imports_from_source(fake_env, tmp_path):
    """The harness's evaluator runs outside every sandbox and imports torch from the training's
    environment: its interpreter, as the server starts it, runs a module's source even where a .pyc
    crafted with that source's size and mtime sits in the __pycache__ beside it."""
    from mcp_server.core import integrity
    harness = tmp_path / "harness"
    argv = integrity.evaluation_spec(harness, "commit", 60)["argv"]
    interpreter = argv[:argv.index(str(harness / integrity.EVALUATOR))]
    site = tmp_path / "site"
    site.mkdir()
    (site / "evalmod.py").write_text("VALUE = 'source'\n")
    crafted_bytecode(site / "evalmod.py", "VALUE = 'planted'\n")
    show = f"import sys; sys.path.insert(0, {str(site)!r}); import evalmod; print(evalmod.VALUE)"
    plain = [sys.executable, "-I", "-S", "-B"]  # isolated, but reading bytecode beside the sources
    assert subprocess.run([*plain, "-c", show], capture_output=True, text=True).stdout.strip() == "planted"
    assert subprocess.run([*interpreter, "-c", show], capture_output=True, text=True).stdout.strip() == "source"
