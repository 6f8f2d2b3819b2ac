"""The training environment is pinned at setup: what the agent plants in it between runs (a .pth,
a sitecustomize.py, an edited package file) refuses the next run until it is restored; bytecode
planted beside a module (which the pin leaves out) never runs in a sandboxed run."""
import importlib.util
import marshal
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from envpin_support import edit_through_a_link
from server_support import Lab, answer, git, make_workspace


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
    return edit_module_file(site / "tinymod" / "__init__.py")


def edit_module_file(module):
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


def test_an_edit_that_keeps_the_size_and_puts_the_mtime_back_refuses_runs(venv_lab):
    """The stat walk cannot see it (size and mtime as pinned; the edit could as well go through a hard
    link or a memory mapping, which inotify misses): the sources' contents are pinned too."""
    lab, site = venv_lab
    lab.baseline()
    module = site / "tinymod" / "__init__.py"
    before, st = module.read_bytes(), module.stat()
    module.write_bytes(b"SCALE = 0.5\n".ljust(len(before), b" ")[:len(before)])
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    refusal = lab.refused("run_experiment", description="same train.py", rerun=True)
    assert "Python sources the runs and the evaluator import changed" in refusal and str(site / "tinymod") in refusal
    module.write_bytes(before)
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
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


def test_a_warm_interpreter_imports_the_servers_bytecode_never_a_crafted_pyc(stand_in_torch, bubblewrap):
    """Both interpreters of a run (cold: started with the run; warm: started ahead) import torch before
    the run is handed to them. Here torch is a stand-in package in the training's venv; the agent
    planted a .pyc for it crafted with its source's size and mtime, and kept torch's source edited
    (same size, mtime put back) while the server built its archive, then put it back. Neither run
    runs planted code: both import through the server's importer, which reads no .pyc from a
    __pycache__ and takes the archive's code only where its checked hash fits the source: the edited
    source's no longer does, so torch is compiled afresh."""
    import queue
    from mcp_server.executors import bytecode
    from mcp_server.scripts import bytecode_archive
    from server_support import wait_until
    lab, source = stand_in_torch, stand_in_torch.source
    crafted_bytecode(source, "print('PLANTED bytecode ran')\nSOURCE = 'planted'\n")
    genuine, st = source.read_bytes(), source.stat()
    source.write_bytes(b"print('PLANTED source ran'); SOURCE = 'planted'  #".ljust(len(genuine) - 1, b"#") + b"\n")
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    bytecode.build_once(lab.python, dict(os.environ))  # as the slot's first run starts it
    assert wait_until(lambda: bytecode.fileno(lab.python) is not None, 120)
    archive = marshal.loads(bytecode_archive.read(bytecode.fileno(lab.python)))
    source.write_bytes(genuine)  # put back before any run
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    outcomes = queue.Queue()
    lab.hold.unlink()
    lab.pool.start(lab.spec(1, sandboxed=True), lambda run, outcome: outcomes.put(outcome))
    first = outcomes.get(timeout=120)
    assert wait_until(lambda: 0 in lab.pool.ahead, 30)
    lab.pool.start(lab.spec(2, sandboxed=True), lambda run, outcome: outcomes.put(outcome))
    second = outcomes.get(timeout=120)
    assert b"PLANTED source ran" in archive[str(source)]  # built from the edited source
    assert first.report["exit_code"] == 0 and second.report["exit_code"] == 0, (first.report, second.report)
    assert second.report["warm_start"] and second.report["sandbox"] and not first.report.get("warm_start"), second.report
    for run in (1, 2):
        assert "torch: compiled from its source" in lab.log(run) and "PLANTED" not in lab.log(run), lab.log(run)


def test_a_pth_planted_during_a_run_and_removed_makes_it_no_result(venv_lab):
    """Planted after the run's check (here: while it runs) and removed before the next one: the pin
    sees nothing at either check, the watch sees both changes, so the run is no result and says what
    changed; the next run, in an environment as setup left it, is a result again."""
    lab, site = venv_lab
    lab.baseline()
    (lab.ws / "train.py").write_text("VAL_BPB = 1.0\nSLEEP = 3\n")
    started = lab.ok("run_experiment", description="slow", wait=False)
    remove = plant_pth(site)
    remove()
    result = lab.ok("wait")["results"][0]
    assert result["run"] == started["run"] and result["status"] == "crash", result
    assert "changed between its check and its end" in result["tail"], result
    assert str(site / "evil.pth") in result["tail"], result
    lab.ok("discard")
    assert lab.ok("run_experiment", description="slow again", rerun=True)["status"] == "ok"


def test_a_warm_interpreter_started_with_a_planted_pth_never_serves_a_run(stand_in_torch):
    """The slot's next interpreter starts (as run 1 is evaluated) while the agent's .pth is in place;
    the agent removes it before submitting run 2, so run 2's check finds the environment as pinned.
    Run 1, in whose window the .pth came and went, is no result, and the interpreter started with it
    is thrown away with it: run 2 starts its own and is a result."""
    import queue
    from server_support import wait_until
    lab, planted, ran = stand_in_torch, stand_in_torch.site / "planted.pth", stand_in_torch.folder / "pth-ran"
    outcomes = queue.Queue()
    lab.pool.start(lab.spec(1, False, lab.pool.environment_position([lab.python])), lambda r, o: outcomes.put(o))
    planted.write_text(f"import sys; print('PTH ran', file=sys.stderr); open({str(ran)!r}, 'w').close()\n")
    lab.hold.unlink()
    first = outcomes.get(timeout=120)
    assert wait_until(ran.exists, 30)  # the slot's next interpreter started with the .pth in place
    planted.unlink()
    lab.pool.start(lab.spec(2, False, lab.pool.environment_position([lab.python])), lambda r, o: outcomes.put(o))
    second = outcomes.get(timeout=120)
    assert first.report["exit_code"] == 0 and second.report["exit_code"] == 0, (first.report, second.report)
    assert str(planted) in first.report.get("environment_changed", []), first.report
    assert not second.report["warm_start"] and "PTH ran" not in lab.log(2), lab.log(2)
    assert "environment_changed" not in second.report, second.report


def test_an_edit_to_the_evaluators_environment_refuses_runs(venv_lab, monkeypatch):
    """The harness's evaluator imports torch from the server's own environment, not the training's: an
    edited loss there would bend every verified number. Setup pins it beside the training's; an edit
    refuses the next run, naming it, until restored."""
    lab, _ = venv_lab
    for name in ("evaluate_export.py", "export.py"):  # a harness that evaluates exports, as this project's
        (lab.ws / "nanochat" / name).write_text("# harness stand-in\n")
    git(lab.ws, "add", ".")
    git(lab.ws, "commit", "-q", "-m", "an exporting harness")
    evaluator = lab.ws.parent / "evaluator-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(evaluator)], check=True)
    (site,) = evaluator.glob("lib/python*/site-packages")
    (site / "lossmod.py").write_text("SCALE = 1.0\n")
    monkeypatch.setattr(sys, "executable", str(evaluator / "bin" / "python"))  # the server's interpreter
    lab.ok("setup", tag="t")
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep", unverified=True)  # the fake trainer exports nothing
    restore = edit_module_file(site / "lossmod.py")
    refusal = lab.refused("run_experiment", description="same train.py", rerun=True)
    assert "harness evaluator's environment" in refusal and str(site / "lossmod.py") in refusal, refusal
    restore()
    lab.ok("run_experiment", description="same train.py", rerun=True)


def test_with_upstreams_harness_nothing_runs_from_the_servers_packages(venv_lab, monkeypatch):
    """Upstream's harness evaluates nothing outside train.py, so nothing the server runs for it imports the
    server's own packages: a worker runs without site (a .pth planted there runs nowhere), and the runs'
    checks do not walk them (with torch there, 0.4 s a run)."""
    lab, _ = venv_lab
    server = lab.ws.parent / "server-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(server)], check=True)
    (site,) = server.glob("lib/python*/site-packages")
    marker = lab.ws.parent / "pth-ran"
    monkeypatch.setattr(sys, "executable", str(server / "bin" / "python"))  # the server's interpreter
    lab.baseline()
    (site / "planted.pth").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    assert answer(lab.call("run_experiment", description="same train.py", rerun=True))["status"] == "ok"
    assert not marker.exists(), "a .pth of the server's environment ran in the run's worker"


@pytest.fixture
def own_python_lab(fake_env):
    """A fake-trainer workspace whose runs train with a venv of a Python install of the test's own (a
    copy of this one's interpreter and standard library), which the user can write, as pyenv's and
    uv's can be."""
    import shutil
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    install = fake_env / "python"
    (install / "bin").mkdir(parents=True)
    shutil.copy2(base / "bin" / version, install / "bin" / version)
    shutil.copytree(base / "lib" / version, install / "lib" / version, symlinks=True, ignore=shutil.ignore_patterns(
        "test", "site-packages", "__pycache__", "idlelib", "tkinter", "ensurepip", "lib2to3", "config-*"))
    ws = make_workspace(fake_env)
    subprocess.run([str(install / "bin" / version), "-m", "venv", "--without-pip", str(ws / ".venv")], check=True)
    (ws / ".git" / "info" / "exclude").write_text(".venv/\n")
    lab = Lab(ws, train_command=[str(ws / ".venv" / "bin" / "python"), "fake_train.py"])
    yield lab, install / "lib" / version
    lab.loop.shutdown()


def plant_stdlib_zip(stdlib: Path):
    """A zip of bytecode where the interpreter looks before its standard library's folder: a
    textwrap.pyc in it shadows the real module, no source needed."""
    import zipfile
    target = stdlib.parent / f"python{sys.version_info.major}{sys.version_info.minor}.zip"
    code = compile("import os\nos.environ['FAKE_VAL_BPB'] = '0.5'\n", "textwrap.py", "exec")
    with zipfile.ZipFile(target, "w") as z:
        z.writestr("textwrap.pyc", importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code))
    return target.unlink


def edit_stdlib_module(stdlib: Path):
    module = stdlib / "textwrap.py"
    before, st = module.read_bytes(), module.stat()
    module.write_bytes(before + b"\nimport os\nos.environ['FAKE_VAL_BPB'] = '0.5'\n")

    def restore():
        module.write_bytes(before)
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    return restore


def plant_through_pyvenv_cfg(stdlib: Path):
    """A .pth in the base install's own packages, which the venv reads once its pyvenv.cfg says so."""
    (stdlib / "site-packages").mkdir(exist_ok=True)
    (stdlib / "site-packages" / "evil.pth").write_text("import os; os.environ['FAKE_VAL_BPB'] = '0.5'\n")
    cfg = stdlib.parents[2] / "ws" / ".venv" / "pyvenv.cfg"
    before, st = cfg.read_text(), cfg.stat()
    cfg.write_text(before.replace("include-system-site-packages = false", "include-system-site-packages = true"))

    def restore():
        cfg.write_text(before)
        os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    return restore


@pytest.mark.parametrize("plant", [plant_stdlib_zip, edit_stdlib_module, plant_through_pyvenv_cfg])
def test_a_planted_standard_library_module_refuses_runs(own_python_lab, bubblewrap, monkeypatch, plant):
    """The standard library of a Python the user can write: a zip of bytecode planted where the
    interpreter looks first, or an edited module. Either would run in every run (and in the evaluator,
    where it is that Python); setup pins the standard library, so the next run is refused, naming it,
    until it is restored."""
    lab, stdlib = own_python_lab
    monkeypatch.setenv("FAKE_IMPORTS", "textwrap")
    lab.baseline()
    restore = plant(stdlib)
    python = str(lab.ws / ".venv" / "bin" / "python")
    shown = subprocess.run([python, "-c", "import os, textwrap; print(os.environ.get('FAKE_VAL_BPB'))"],
                           capture_output=True, text=True).stdout.strip()
    assert shown == "0.5"  # the plant works where the interpreter imports the module
    refusal = lab.refused("run_experiment", description="same train.py", rerun=True)
    assert "its standard library" in refusal and str(stdlib.parents[2]) in refusal, refusal
    restore()
    assert lab.ok("run_experiment", description="same train.py", rerun=True)["val_bpb"] == 1.0


def read_at_start_up(lab, target: str) -> tuple[Path, str]:
    """What the edit is made in, and the edit: the stand-in torch, which the run's interpreter imports
    before its run; or a .pth file of the training's venv, whose import line runs as the interpreter
    starts, or the module that line imports: site ran both before the importer was installed."""
    if target == "torch":
        return lab.source, "SOURCE = 'edited through a link'"
    (lab.site / "hook.pth").write_text("import hookmod\n")
    (lab.site / "hookmod.py").write_text("HOOKED = True\n")
    return lab.site / ("hook.pth" if target == "pth" else "hookmod.py"), \
        "print('edited through a link', file=sys.stderr)"


# The stand-in evaluation's length: long enough for the pool to start the slot's next interpreter while it
# evaluates (it looks every 0.5 s), the one a run that is no result must not hand the next run
EVALUATION_S = 1


@pytest.mark.parametrize("target", ["torch", "pth", "pth_import"])
def test_an_edit_through_a_hard_link_undone_after_the_runs_imports_makes_it_no_result(stand_in_torch, target):
    """An edit of torch (or of a .pth file, or of the module its import line imports) made through a
    hard link and undone once the run's interpreter has imported it: inotify sees neither write and
    the sources' pin finds it as pinned at every check. The interpreter (cold: started with the run
    and handed it at once; warm: started ahead) says what it compiled and read (it starts without
    site, installs the importer, then reads the .pth files itself: before, site ran them unseen), so
    both runs that ran the edit are no result; after each, the slot's next run starts a fresh
    interpreter (the warm one may hold what changed) and is a result again."""
    import queue
    from mcp_server.core import envpin
    from server_support import wait_until
    lab = stand_in_torch
    source, edit = read_at_start_up(lab, target)
    envpin.pin_sources([lab.python])  # setup's pin
    outcomes = queue.Queue()

    def run(n: int):
        spec = lab.spec(n, False, lab.pool.environment_position([lab.python]), evaluation_seconds=EVALUATION_S)
        lab.pool.start(spec, lambda r, o: outcomes.put(o))
        return n

    def edited_while(start, then=lambda: None):
        restore, imported = edit_through_a_link(source, edit)
        start()
        assert wait_until(imported.exists, 60)  # imported: put back
        restore()
        imported.unlink()
        then()

    lab.hold.unlink()
    edited_while(lambda: run(1))  # its interpreter imports torch as it starts
    first = outcomes.get(timeout=120)
    lab.hold.touch()
    run(2)
    assert wait_until(lambda: (lab.folder / "2.report.json").exists(), 30)  # started: torch imported as pinned
    edited_while(lab.hold.unlink)  # run 2 ends; the slot's next interpreter starts and imports torch
    second = outcomes.get(timeout=120)
    run(3)
    third = outcomes.get(timeout=120)
    run(4)
    fourth = outcomes.get(timeout=120)
    outcomes = (first, second, third, fourth)
    assert [o.report["exit_code"] for o in outcomes] == [0] * 4, [o.report for o in outcomes]
    changed = [f"{source} ({'read' if target == 'pth' else 'compiled'} from other contents than its check found)"]
    assert [o.report.get("environment_changed") for o in outcomes] == [changed, None, changed, None], \
        [o.report for o in outcomes]
    assert [o.report.get("warm_start") for o in outcomes] == [False, False, True, False], [o.report for o in outcomes]
    assert ["edited through a link" in lab.log(n) for n in (1, 2, 3, 4)] == [True, False, True, False]


def plant_module(site: Path, imported: Path, kind: str) -> Path:
    """A module torch_extras planted in site that sets the stand-in torch's SOURCE and leaves imported
    once the server's importer has loaded it: its source, its bytecode without a source, or a compiled
    module (the standard library's _bisect under that name: it only proves it was loaded)."""
    import py_compile
    source = site / "torch_extras.py"
    source.write_text(f"import sys\nsys.modules['torch'].SOURCE = 'a planted module'\n"
                      f"if 'trusted_import' in sys.modules:\n    open({str(imported)!r}, 'w').close()\n")
    if kind == "source":
        return source
    if kind == "bytecode":
        planted = Path(py_compile.compile(str(source), cfile=str(site / "torch_extras.pyc"), doraise=True))
    else:
        import _bisect
        planted = site / "torch" / Path(_bisect.__file__).name
        shutil.copyfile(_bisect.__file__, planted)
    source.unlink()
    return planted


@pytest.mark.parametrize("kind", ["source", "bytecode", "compiled"])
def test_a_module_planted_and_removed_between_two_checks_makes_the_run_no_result(stand_in_torch, monkeypatch,
                                                                                   kind):
    """Where the watch cannot be made (inotify missing, or the user's inotify instances used up, which a
    process of the agent's can do on purpose), a module planted in the environment after a run's check
    and removed before the next is seen by no pin: here one that torch imports if it is there, as torch
    does its optional packages. The run's interpreter names each module it loaded from a file (with the
    digest of its source, where it has one), and one in the checked folders that no check found makes
    the run no result; the next run, without it, is a result."""
    import queue
    from mcp_server.core import envpin, envwatch
    from server_support import wait_until
    monkeypatch.setattr(envwatch, "watch_of", lambda python: None)  # as when inotify_init1 fails
    lab = stand_in_torch
    lab.source.write_text(lab.source.read_text() + "try:\n    import torch_extras\nexcept ImportError:\n    pass\n"
                          "try:\n    from torch import _bisect\nexcept ImportError:\n    pass\n")
    envpin.pin_sources([lab.python])  # setup's pin
    imported = lab.folder / "extras.imported"
    planted = plant_module(lab.site, imported, kind)
    outcomes = queue.Queue()
    lab.pool.start(lab.spec(1, False, lab.pool.environment_position([lab.python])), lambda r, o: outcomes.put(o))
    # its interpreter has imported torch once the worker reports the run started
    assert wait_until(lambda: (lab.folder / "1.report.json").exists(), 60)
    assert kind == "compiled" or imported.exists()
    planted.unlink()  # gone before the next check
    lab.hold.unlink()
    first = outcomes.get(timeout=120)
    lab.pool.start(lab.spec(2, False, lab.pool.environment_position([lab.python])), lambda r, o: outcomes.put(o))
    second = outcomes.get(timeout=120)
    assert [first.report["exit_code"], second.report["exit_code"]] == [0, 0], (first.report, second.report)
    assert (kind == "compiled" or "a planted module" in lab.log(1)) and "a planted module" not in lab.log(2)
    assert first.report.get("environment_changed") == [f"{planted} (not among the files its check found)"], \
        first.report
    assert second.report.get("environment_changed") is None, second.report


EVALUATOR_WITH_LOSSMOD = """import json, os, sys
sys.path.append({site!r})
import lossmod
sys.stdin.readline()
answer = {{"val_bpb": lossmod.VALUE, "imported": {{}}}}  # its word for what it compiled counts for nothing
os.write(int(sys.argv[sys.argv.index("--out-fd") + 1]), json.dumps(answer).encode())
"""


@pytest.mark.parametrize("cover", ["", "sys.modules['trusted_import']._IMPORTED.clear()",
                                   "os.write(int(os.environ['RESEARCH_LOOP_DIGESTS_FD']), b'\\n')"],
                         ids=["edit", "erase", "end"])
def test_an_edit_through_a_hard_link_undone_after_the_evaluators_imports_makes_the_run_no_result(stand_in_torch,
                                                                                                 cover):
    """The same edit in a module the harness's evaluator imports (its loss), undone once the evaluator
    has imported it: the evaluator's importer streamed the digest to the worker before the module ran,
    so the run is no result, even where the edited module wipes the importer's own record or writes
    an end of its own into the stream (found by the review: the record was the evaluator's own)."""
    import queue
    from mcp_server.core import envpin
    from mcp_server.scripts import harness_eval
    from server_support import wait_until
    lab = stand_in_torch
    lossmod = lab.site / "lossmod.py"
    lossmod.write_text("VALUE = 1.5\n")
    script = lab.folder / "evaluator.py"
    script.write_text(EVALUATOR_WITH_LOSSMOD.format(site=str(lab.site)))
    evaluator = harness_eval.evaluator_command(sys.executable, script)
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    restore, imported = edit_through_a_link(lossmod, f"import os\n{cover}\nVALUE = 0.5")
    lab.pool.start(lab.spec(1, False, lab.pool.environment_position([lab.python]), evaluator),
                   lambda r, o: outcomes.put(o))
    assert wait_until(imported.exists, 60)  # the evaluator starts with the run
    restore()
    lab.hold.unlink()
    outcome = outcomes.get(timeout=120)
    assert outcome.report["evaluation"]["val_bpb"] == 0.5, outcome.report
    assert outcome.report.get("environment_changed") == \
        [f"{lossmod} (compiled from other contents than its check found)"], outcome.report


# The harness's evaluator, committed in the harness copy: it imports its loss from the copy (as the real one
# imports nanochat/evaluation.py), says so (argv[1]), then answers once (cold) or forks a child per request (warm)
HARNESS_EVALUATOR = """import json, os, signal, socket, sys
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import nanochat.evaluation as evaluation
SCALE = 1.0
open(sys.argv[1], "w").close()
answer = lambda out: os.write(out, json.dumps({"val_bpb": evaluation.VALUE * SCALE}).encode())
if "--serve-fd" in sys.argv:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    server = socket.socket(fileno=int(sys.argv[sys.argv.index("--serve-fd") + 1]))
    while (request := socket.recv_fds(server, 4096, 5))[0]:
        pid = os.fork()
        if pid == 0:
            answer(request[1][0])
            os._exit(0)
        [os.close(fd) for fd in request[1]]
        server.send(json.dumps({"id": json.loads(request[0])["id"], "pid": pid}).encode())
else:
    sys.stdin.readline()
    answer(int(sys.argv[sys.argv.index("--out-fd") + 1]))
"""


@pytest.mark.parametrize("evaluator,edited", [("warm", "nanochat/evaluation.py"), ("cold", "nanochat/evaluation.py"),
                                              ("warm", "evaluator.py")])
def test_a_harness_copy_edited_while_its_evaluator_imports_and_restored_makes_the_run_no_result(
        stand_in_torch, monkeypatch, evaluator, edited):
    """The agent kills the slot's warm evaluator, edits the harness copy's loss (or the evaluator's own
    script) while the pool starts it again for the next run, and puts the file back once it is imported:
    the worker's check of the copy after the evaluation finds it clean, and the warm evaluator kept
    the edit for every later run of the slot (found by the review: the server left the digests of the
    harness copy's sources unchecked; the importer compiled the evaluator's script unseen). Cold alike.
    Each run is no result, named, and the warm evaluator is thrown away."""
    import hashlib
    import json
    import queue
    import signal
    from mcp_server.scripts import harness_eval
    from server_support import git, wait_until
    lab = stand_in_torch
    (lab.ws / "evaluator.py").write_text(HARNESS_EVALUATOR)
    (lab.ws / "nanochat" / "evaluation.py").write_text("VALUE = 1.5\n")
    git(lab.ws, "add", ".")
    git(lab.ws, "commit", "-qm", "the harness's evaluator")
    git(lab.harness, "checkout", "-q", "--detach", git(lab.ws, "rev-parse", "HEAD").strip())
    monkeypatch.setenv(harness_eval.WARM_ENV, "1" if evaluator == "warm" else "0")
    monkeypatch.setenv("RESEARCH_LOOP_WARM_START", "0")  # no interpreter started ahead: only the evaluator is warm
    imported = lab.folder / "evaluator-imported"
    command = [*harness_eval.evaluator_command(sys.executable, lab.harness / "evaluator.py"), str(imported)]
    inputs = {}  # a warm evaluator is asked only for an evaluation with both inputs
    for name in harness_eval.WARM_FDS:
        (lab.folder / name).write_text(name)
        inputs[name] = {"path": str(lab.folder / name), "sha256": hashlib.sha256(name.encode()).hexdigest()}
    outcomes = queue.Queue()

    def run(n: int):
        spec = lab.spec(n, False, None, command)
        at = spec.worker_args.index("--evaluate") + 1
        spec.worker_args[at] = json.dumps(dict(json.loads(spec.worker_args[at]), inputs=inputs))
        lab.pool.start(spec, lambda r, o: outcomes.put(o))
    if evaluator == "warm":  # a first run, scored by the slot's warm evaluator, which the agent then kills
        lab.hold.unlink()
        run(1)
        first = outcomes.get(timeout=60)
        assert first.report["evaluation"]["evaluator"] == "warm" and first.report["evaluation"]["val_bpb"] == 1.5 \
            and "environment_changed" not in first.report, first.report
        os.kill(lab.pool.evaluators[0].proc.pid, signal.SIGKILL)
        lab.pool.evaluators[0].proc.wait()
        imported.unlink()
        lab.hold.touch()
    target = lab.harness / edited
    genuine = target.read_text()
    target.write_text(genuine.replace("VALUE = 1.5", "VALUE = 0.5").replace("SCALE = 1.0", "SCALE = 1 / 3"))
    run(2)
    assert wait_until(imported.exists, 60)  # the evaluator (started again for this run) imported the edit
    target.write_text(genuine)
    lab.hold.unlink()
    outcome = outcomes.get(timeout=60)
    assert outcome.report["evaluation"] == dict(outcome.report["evaluation"], val_bpb=0.5, evaluator=evaluator), \
        outcome.report  # the edit scored the run
    assert outcome.report.get("environment_changed") == \
        [f"{target} (compiled from other contents than the harness commit holds)"], outcome.report
    assert 0 not in lab.pool.evaluators


def test_a_module_planted_in_a_bytecode_folder_makes_the_run_no_result(stand_in_torch):
    """A source planted in a `__pycache__` of the environment (which neither the pins' walk nor the
    watch looks into: bytecode) and imported from there as a namespace package's module (here by
    torch; by train.py alike, whose commit then holds only the import): the importer names it with its
    digest, and a source under a walked folder that no check found makes the run no result, wherever
    it lies (found by the review: one under a `__pycache__` counted as outside the checked folders)."""
    import queue
    from mcp_server.core import envpin
    lab = stand_in_torch
    lab.source.write_text(lab.source.read_text() + "try:\n    from torch.__pycache__ import torch_extras\n"
                          "except ImportError:\n    pass\n")
    envpin.pin_sources([lab.python])  # setup's pin
    cached = lab.site / "torch" / "__pycache__"
    cached.mkdir(exist_ok=True)
    planted = cached / "torch_extras.py"
    planted.write_text("import sys\nsys.modules['torch'].SOURCE = 'a planted module'\n")
    outcomes = queue.Queue()
    lab.pool.start(lab.spec(1, False, lab.pool.environment_position([lab.python])), lambda r, o: outcomes.put(o))
    lab.hold.unlink()
    outcome = outcomes.get(timeout=120)
    assert outcome.report["exit_code"] == 0 and "a planted module" in lab.log(1), outcome.report
    assert outcome.report.get("environment_changed") == [f"{planted} (not among the files its check found)"], \
        outcome.report


def test_a_package_linked_into_the_environment_and_removed_between_two_checks_makes_the_run_no_result(
        stand_in_torch, monkeypatch):
    """Where the watch cannot be made, a symlink to a folder outside the environment planted in a site
    folder after a run's check and removed before the next: the module's real path lies outside the
    walked folders while the link is there (the server reads the stream as the run ends), but the path
    it was imported by lies in one, so the run is no result (found by the review: only the real path
    was looked up)."""
    import queue
    from mcp_server.core import envpin, envwatch
    from server_support import wait_until
    monkeypatch.setattr(envwatch, "watch_of", lambda python: None)  # as when inotify_init1 fails
    lab = stand_in_torch
    lab.source.write_text(lab.source.read_text() + "try:\n    import torch_extras\nexcept ImportError:\n    pass\n")
    envpin.pin_sources([lab.python])  # setup's pin
    outside = lab.folder / "outside"
    outside.mkdir()
    (outside / "__init__.py").write_text("import sys\nsys.modules['torch'].SOURCE = 'a planted module'\n")
    link = lab.site / "torch_extras"
    link.symlink_to(outside, target_is_directory=True)
    outcomes = queue.Queue()
    lab.pool.start(lab.spec(1, False, lab.pool.environment_position([lab.python])), lambda r, o: outcomes.put(o))
    assert wait_until(lambda: (lab.folder / "1.report.json").exists(), 60)  # torch imported
    lab.hold.unlink()
    outcome = outcomes.get(timeout=120)
    link.unlink()  # gone before the next check, after the server read the run's stream
    assert outcome.report["exit_code"] == 0 and "a planted module" in lab.log(1), outcome.report
    assert outcome.report.get("environment_changed") == \
        [f"{link / '__init__.py'} (not among the files its check found)"], outcome.report


def test_a_folder_moved_into_a_watched_environment_is_watched_too(tmp_path):
    """Review 67: the watch added the folders made in a site folder, not those moved in. A copy of a package moved
    into the place of the original (`cp -a` keeps every size and mtime, so the pins pass) was unwatched for the
    rest of the server's life: an edit of its compiled libraries made and undone between two checks went unseen."""
    from mcp_server.core import envpin, envwatch
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    watch = envwatch.EnvironmentWatch(python)
    try:
        site = Path(envpin.folders(python)[0][0])
        (tmp_path / "pkg" / "lib").mkdir(parents=True)
        (tmp_path / "pkg").rename(site / "pkg")
        moved_in = watch.generation()
        (site / "pkg" / "lib" / "kernels.so").write_bytes(b"edited")
        assert watch.generation() > moved_in and str(site / "pkg" / "lib" / "kernels.so") in watch.since(moved_in)
    finally:
        os.close(watch.fd)


def test_measurements_in_an_environment_set_up_again_are_no_controls(venv_lab, monkeypatch):
    """Review 73: the values a setup carries went with the harness and the prepared data alone. The agent edited an
    installed module of the training environment (every later number moves), which refuses every run until a setup
    (`uv sync --reinstall` and a new setup, the refusal says), and set up a new tag on it: the best's value on data
    order 1 from the old environment stood as the control of the idea's rerun in the new one, with no run of it.
    Values go with the environments setup pinned too; a setup on the same environment keeps them."""
    monkeypatch.setenv("AUTORESEARCH_BUDGET_CLOCK", "flops")
    monkeypatch.setenv("FAKE_FLOPS_CLOCK", "1")
    lab, site = venv_lab
    luck = "ORDER_EFFECT = 0.0001\nORDER_LUCK = 0.002\n"
    (lab.ws / "train.py").write_text("VAL_BPB = 1.0\n" + luck)
    git(lab.ws, "commit", "-qam", "the best")
    lab.baseline()
    (lab.ws / "train.py").write_text("VAL_BPB = 0.999\n" + luck)
    lab.ok("run_experiment", description="an idea")
    lab.ok("confirm", pairs=1)  # order 1: the best rerun
    lab.ok("discard")
    for tag, change in (("same-environment", None), ("edited-environment", edit_module)):
        if change:
            change(site)
        lab.ok("setup", tag=tag)
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep")
        (lab.ws / "train.py").write_text("VAL_BPB = 0.999\n" + luck + f"# reworded for {tag}\n")  # held to order 1
        lab.ok("run_experiment", description="the idea, reworded")
        again = lab.ok("confirm", pairs=1)
        lab.ok("discard")
        if not change:
            assert again.get("reused") and again["extra_runs"] == 1, again  # the same environment: the value stands
    assert not again.get("reused") and again["extra_runs"] == 2, again  # the old environment's control without the fix
