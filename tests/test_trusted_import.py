"""The imports' digests (scripts/trusted_import.py) against what a module the agent edited can do
about its own digest once it runs, and a run whose interpreter never says what it compiled."""
import os
import queue
import sys
from pathlib import Path

import pytest
from envpin_support import edit_through_a_link

CHANGED = "{} (compiled from other contents than its check found)"
# the edited module, once it runs, takes its own digest back out of the importer's record
ERASE_ITSELF = "sys.modules['trusted_import']._IMPORTED.pop(__file__, None) if 'trusted_import' in sys.modules else 0"


def start(lab, n: int, outcomes, evaluator=None):
    lab.pool.start(lab.spec(n, False, lab.pool.environment_position([lab.python]), evaluator),
                   lambda r, o: outcomes.put(o))


# ...and writes the genuine digest and the end line to the worker's socket itself
FORGE_STREAM = ("import hashlib, os\nif 'trusted_import' in sys.modules: os.write(int(sys.argv[1]), "
                "('%s %s\\n\\n' % (hashlib.sha256(open(__file__ + '.genuine', 'rb').read()).hexdigest(), "
                "__file__.encode().hex())).encode())")


@pytest.mark.parametrize("cover", [ERASE_ITSELF, f"{ERASE_ITSELF}\n{FORGE_STREAM}"], ids=["erase", "forge"])
def test_an_edit_that_erases_its_own_digest_still_makes_the_run_no_result(stand_in_torch, cover):
    """The edited torch, once it runs in the run's interpreter, takes its digest back out of the
    importer's record (a digest missing is a source the check leaves out): the digests used to be
    sent from that record after the imports, so the run was a result. Each is now written to the
    worker before its module's code runs."""
    from mcp_server.core import envpin
    from server_support import wait_until
    lab, source = stand_in_torch, stand_in_torch.source
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    lab.hold.unlink()
    Path(f"{source}.genuine").write_bytes(source.read_bytes())
    restore, imported = edit_through_a_link(source, f"{cover}\nSOURCE = 'edited through a link'")
    start(lab, 1, outcomes)
    assert wait_until(imported.exists, 60)
    restore()
    outcome = outcomes.get(timeout=120)
    # a forged end line hands the run over early: the interpreter may then fail to write its own
    assert cover != ERASE_ITSELF or outcome.report["exit_code"] == 0 and "edited through a link" in lab.log(1)
    assert outcome.report.get("environment_changed") == [CHANGED.format(source)], (outcome.report, lab.log(1))


def test_an_edit_that_ends_the_servers_importer_never_runs_unchecked(stand_in_torch):
    """The edited torch ends the interpreter on warm_train.py as it imports it, before that says what
    it compiled: the worker used to start the run on a plain interpreter instead, which compiled the
    edit unseen (a result). Now the run is not started, and says why."""
    from mcp_server.core import envpin
    lab, source = stand_in_torch, stand_in_torch.source
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    plain = lab.folder / "plain-import"
    lab.hold.unlink()
    restore, _ = edit_through_a_link(source, "import os\nif 'trusted_import' in sys.modules: os._exit(3)\n"
                                     f"if sys.argv[0].endswith('train.py'): open({str(plain)!r}, 'w').close()\n"
                                     "SOURCE = 'edited through a link'")
    start(lab, 1, outcomes)
    outcome = outcomes.get(timeout=120)
    restore()
    assert not plain.exists() and "edited through a link" not in lab.log(1), lab.log(1)
    assert outcome.report["exit_code"] == 127 and "before it said what it compiled" in lab.log(1), lab.log(1)


def test_a_warm_interpreter_lost_before_its_run_is_replaced_by_a_fresh_one(stand_in_torch):
    """The slot's warm interpreter is killed (by the agent, or the kernel) before its run is handed to
    it: the run starts on a fresh interpreter through the server's importer, and is a result."""
    import signal
    from mcp_server.core import envpin
    from server_support import wait_until
    lab = stand_in_torch
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    lab.hold.unlink()
    start(lab, 1, outcomes)
    assert outcomes.get(timeout=120).report["exit_code"] == 0
    assert wait_until(lambda: 0 in lab.pool.ahead and children(lab.pool.ahead[0].proc.pid), 30)
    (stub,) = children(lab.pool.ahead[0].proc.pid)
    os.kill(stub, signal.SIGKILL)
    start(lab, 2, outcomes)
    outcome = outcomes.get(timeout=120)
    assert outcome.report["exit_code"] == 0 and not outcome.report["warm_start"], (outcome.report, lab.log(2))
    assert "torch: compiled from its source" in lab.log(2) and "environment_changed" not in outcome.report


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


PROBE = """import sys
import trusted_import
imported = trusted_import.digests()
loaders = {name: type(getattr(getattr(module, "__spec__", None), "loader", None)).__name__ for name, module in list(sys.modules.items())}
print(sorted(name for name, module in list(sys.modules.items()) if loaders[name] == "SourceFileLoader"
             and module.__spec__.origin not in imported and name != "__main__"))
"""


def test_the_evaluator_compiles_nothing_before_the_importer_but_its_start_up(tmp_path):
    """What the evaluator's interpreter compiles before trusted_import.install() is seen by no digest:
    only the interpreter's own start-up (`encodings`, docs/trust.md), not `__future__`, which the
    importer's `from __future__ import annotations` compiled first."""
    import ast
    import subprocess
    from mcp_server.scripts import harness_eval
    (tmp_path / "probe.py").write_text(PROBE)
    found = subprocess.run(harness_eval.evaluator_command(sys.executable, tmp_path / "probe.py"), capture_output=True,
                           text=True, check=True).stdout
    assert all(name.startswith("encodings") for name in ast.literal_eval(found)), found


def test_an_interpreter_finishes_its_imports_before_its_hand_over_whatever_their_digests_weigh(stand_in_torch):
    """Torch's imports write some 600 kB of digests, more than a socket holds unread: the worker reads
    them as they come, so a warm interpreter is done importing long before its run is handed to it."""
    from mcp_server.scripts import worker
    from server_support import wait_until
    lab, done = stand_in_torch, stand_in_torch.folder / "imported-all"
    names = [f"a_module_whose_name_weighs_in_the_stream_{'x' * 60}_{i:04d}" for i in range(3000)]
    for name in names:
        (lab.source.parent / f"{name}.py").write_text("")
    lab.source.write_text(f"import importlib\nfor name in {names!r}:\n    importlib.import_module('torch.' + name)\n"
                          f"open({str(done)!r}, 'w').close()\n")
    read_end, write_end = os.pipe()
    stub, channel = worker.start_warm([lab.python, "train.py"], None, None, write_end, None)
    try:
        assert wait_until(done.exists, 120), "the interpreter waits for its digests to be read"
        assert worker.hand_over(stub, channel, [lab.python, "-c", ""], dict(os.environ), 60)[1][str(lab.source)]
    finally:
        stub.kill()
        stub.wait()
        os.close(read_end)
        os.close(write_end)


START_UP = """import builtins, json, site, sys
seen = {"path": sys.path, "prefix": [sys.prefix, sys.exec_prefix, sys.base_prefix, getattr(sys, "_home", None)],
        "site": [site.PREFIXES, site.ENABLE_USER_SITE], "meta_path": [type(f).__name__ for f in sys.meta_path],
        "builtins": [n for n in ("quit", "exit", "help", "copyright", "credits", "license") if hasattr(builtins, n)],
        "editable": __import__("mcp_server").__file__, "torch": __import__("torch").__file__}
if "trusted_import" in sys.modules:
    imported = sys.modules["trusted_import"].digests()
    seen["unseen"] = sorted(name for name, module in list(sys.modules.items()) if name != "__main__"
                            and type(getattr(getattr(module, "__spec__", None), "loader", None)).__name__
                            == "SourceFileLoader" and module.__spec__.origin not in imported)
print("START-UP " + json.dumps(seen))
"""


def run_on_a_runs_interpreter(python: str, script: Path, timeout: float) -> tuple[str, dict]:
    """script run as a run is, on a warm interpreter the worker starts and hands it over to at once:
    (its output, the digests the worker read from its importer)."""
    from mcp_server.scripts import worker
    read_end, write_end = os.pipe()
    stub, channel = worker.start_warm([python, "train.py"], None, None, write_end, None)
    try:
        handed, digests = worker.hand_over(stub, channel, [python, str(script)], dict(os.environ), timeout)
        assert handed and stub.wait(timeout=timeout) == 0
    finally:
        stub.kill()
        os.close(write_end)
    with os.fdopen(read_end, "rb") as output:
        return output.read().decode(), digests


def test_a_runs_interpreter_starts_as_a_plain_one_with_its_pth_files_read_through_the_importer(tmp_path):
    """The runs' interpreter starts without site, installs the importer, then does what site does:
    in this project's own venv (an editable install's .pth, setuptools' distutils-precedence.pth and the
    module its line imports, real torch), the run sees the sys.path, prefixes, meta path and builtins a
    plain interpreter of the venv has, imports torch and the editable package; the worker hands the
    server the SHA-256 of each .pth file as read, and nothing was compiled unseen but `encodings`
    (before, site compiled `_distutils_hack` before the importer, and no .pth had a digest)."""
    import hashlib
    import json
    import subprocess
    probe = tmp_path / "probe.py"
    probe.write_text(START_UP)
    python = str(Path(sys.prefix) / "bin" / "python")  # the venv's, as the runs' command names it
    plain = subprocess.run([python, str(probe)], capture_output=True, text=True, check=True).stdout
    run, digests = run_on_a_runs_interpreter(python, probe, 300)
    seen = json.loads(run.split("START-UP ", 1)[1].splitlines()[0])
    unseen = seen.pop("unseen")  # but the importer itself, the server's own file
    assert all(name.startswith("encodings") or name == "trusted_import" for name in unseen), unseen
    assert seen == json.loads(plain.split("START-UP ", 1)[1]), (seen, plain)
    (site,) = {p for p in seen["path"] if p.endswith("site-packages")}
    pths = sorted(Path(site).glob("*.pth"))
    assert pths and all(digests[str(p)] == hashlib.sha256(p.read_bytes()).hexdigest() for p in pths), digests


def test_a_pth_file_is_acted_on_twice_from_the_bytes_hashed_once(tmp_path):
    """site goes over a venv's site folder twice (for the venv, then for its prefixes), reading each
    .pth file each time: a file rewritten between the two (here by its own first line; by the agent
    through a hard link, with the timing) ran lines the stream had no digest of, as the first line of a
    path counts. The runs' interpreter acts twice, as site does, on the bytes it read and hashed once."""
    import hashlib
    import json
    import subprocess
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    pth, python = site / "twice.pth", str(venv / "bin" / "python")
    genuine = (f"import sys; sys.RAN = getattr(sys, 'RAN', 0) + 1; "
               f"open({str(pth)!r}, 'w').write('import sys; sys.EDITED = True\\n')\n")
    probe = tmp_path / "probe.py"
    probe.write_text("import json, sys\nprint('RAN ' + json.dumps([getattr(sys, 'RAN', 0), hasattr(sys, 'EDITED')]))\n")
    pth.write_text(genuine)
    plain = subprocess.run([python, str(probe)], capture_output=True, text=True, check=True).stdout
    assert json.loads(plain.split("RAN ", 1)[1]) == [1, True]  # what site does: the second reading ran the edit
    pth.write_text(genuine)
    run, digests = run_on_a_runs_interpreter(python, probe, 60)
    assert json.loads(run.split("RAN ", 1)[1].splitlines()[0]) == [2, False], run
    assert digests[str(pth)] == hashlib.sha256(genuine.encode()).hexdigest()


@pytest.mark.parametrize("swapped", ["train.py", "helper.py"])
def test_a_file_swapped_in_the_slot_after_checkout_never_runs(stand_in_torch, monkeypatch, swapped):
    """The slot's worktree is checked out and found clean, then the agent (watching it) writes other code
    into its train.py, or a module train.py imports from its folder (prepare.py, nanochat/ in a
    workspace), before the interpreter reads it: the run trained code no commit holds and was logged as
    the commit's (review 43). The server passes the commit's files and the interpreter copies them, each
    checked, and runs from its copy (checkout_copy.py); the honest run after it is a result."""
    from mcp_server.core import integrity
    from mcp_server.core.workspace import Workspace
    from server_support import git
    lab = stand_in_torch
    (lab.ws / "helper.py").write_text("VALUE = 'the commit'\n")
    (lab.ws / "train.py").write_text((lab.ws / "train.py").read_text().replace(
        "import torch\n", "import torch\nimport helper\nprint('helper:', helper.VALUE)\n"))
    git(lab.ws, "add", ".")
    git(lab.ws, "commit", "-qm", "train.py imports a module of its folder")
    files = integrity.commit_files(Workspace(lab.ws), git(lab.ws, "rev-parse", "HEAD").strip())
    outcomes = queue.Queue()
    lab.hold.unlink()
    checkout, swap = lab.pool.ws.checkout_slot, [True]

    def checkout_then_swap(slot, commit):  # the agent's write, timed after the server's check
        path = checkout(slot, commit)
        if swap[0]:
            (path / swapped).write_text("print('SWAPPED code ran')\nVALUE = 'SWAPPED'\n")
        return path
    monkeypatch.setattr(lab.pool.ws, "checkout_slot", checkout_then_swap)
    for n in (1, 2):
        spec = lab.spec(n, False, lab.pool.environment_position([lab.python]))
        spec.files = files
        lab.pool.start(spec, lambda r, o: outcomes.put(o))
        outcome = outcomes.get(timeout=120)
        if n == 1:
            assert "SWAPPED" not in lab.log(1).replace(f"{swapped} is not", ""), lab.log(1)
            assert outcome.report["exit_code"] != 0 and f"{swapped} is not the run's commit's" in lab.log(1), \
                lab.log(1)
            swap[0] = False
        else:
            assert outcome.report["exit_code"] == 0 and "helper: the commit" in lab.log(2), lab.log(2)


# how a train.py of the commit may run a file of its folder other than `import name` from the folder as spelled
OTHER_LOADERS = {
    "bytecode": "import swapped_pyc as m",  # a .pyc of the commit, on the path itself (no source)
    "zip": "sys.path.insert(0, 'lib.zip'); import inzip as m",
    "spec_from_file_location": ("import importlib.util; s = importlib.util.spec_from_file_location('m', 'pkg/mod.py')\n"
                                "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)"),
    "//": "sys.path.insert(0, '/' + os.getcwd()); import pkg.mod; m = pkg.mod",
    "/proc/self/cwd": "sys.path.insert(0, '/proc/self/cwd'); import pkg.mod; m = pkg.mod",
}


@pytest.mark.parametrize("way", OTHER_LOADERS)
def test_a_file_swapped_in_the_slot_never_runs_through_another_loader_or_spelling(tmp_path, way):
    """Review 44: expect() checked only the sources whose path began with the folder as the worker spelled it,
    loaded by the importer's source loader: a .pyc or a zip of the commit (`import name`), a module loaded
    with importlib.util.spec_from_file_location, or one on a path entry spelled `//slot` or `/proc/self/cwd`
    ran whatever the file held once swapped after checkout. A symlinked module of the commit is its target's."""
    import hashlib
    import py_compile
    import subprocess
    import textwrap
    import zipfile
    slot = tmp_path / "slot"
    (slot / "pkg").mkdir(parents=True)
    commit = "V = 'the commit'\n"
    (slot / "pkg" / "mod.py").write_text(commit)
    sources = {"pkg/mod.py": hashlib.sha256(commit.encode()).hexdigest()}
    swapped = tmp_path / "swapped.py"
    swapped.write_text("V = 'SWAPPED'\n")
    py_compile.compile(str(swapped), cfile=str(slot / "swapped_pyc.pyc"))
    with zipfile.ZipFile(slot / "lib.zip", "w") as z:
        z.writestr("inzip.py", "V = 'SWAPPED'\n")
    (slot / "pkg" / "mod.py").write_text("V = 'SWAPPED'\n")  # after checkout
    scripts = Path(__file__).resolve().parents[1] / "mcp_server" / "scripts"
    probe = (f"import sys; sys.path.insert(0, {str(scripts)!r}); import trusted_import; trusted_import.install()\n"
             f"import os; os.chdir({str(slot)!r}); trusted_import.expect(os.getcwd(), {sources!r})\n"
             "sys.path.insert(0, os.getcwd())\n"
             f"try:\n{textwrap.indent(OTHER_LOADERS[way], '    ')}\n    print('RAN', m.V)\n"
             "except ImportError as e:\n    print('REFUSED', e)\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", probe], capture_output=True, text=True, timeout=60)
    why = "No module named 'inzip'" if way == "zip" else "is not the run's commit's"
    assert done.stdout.startswith("REFUSED") and why in done.stdout, done.stdout + done.stderr


def test_a_symlinked_module_of_the_commit_runs_as_its_target(tmp_path):
    """An honest commit with a module that is a symlink to another of its modules: checked as the target."""
    import hashlib
    import subprocess
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "helper.py").write_text("V = 'the commit'\n")
    (slot / "alias.py").symlink_to("helper.py")
    sources = {"helper.py": hashlib.sha256(b"V = 'the commit'\n").hexdigest(),
               "alias.py": hashlib.sha256(b"helper.py").hexdigest()}
    scripts = Path(__file__).resolve().parents[1] / "mcp_server" / "scripts"
    probe = (f"import sys; sys.path.insert(0, {str(scripts)!r}); import trusted_import; trusted_import.install()\n"
             f"import os; os.chdir({str(slot)!r}); trusted_import.expect(os.getcwd(), {sources!r})\n"
             "sys.path.insert(0, os.getcwd()); import alias; print('RAN', alias.V)\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", probe], capture_output=True, text=True, timeout=60)
    assert "RAN the commit" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("package,removed", [("regular", "pkg/__init__.py"), ("namespace", "pkg/mod.py")])
def test_a_source_removed_from_the_slot_is_not_stood_in_for_by_the_workspaces(tmp_path, package, removed):
    """Review 44: a file removed from the slot after checkout is never read, so expect() saw nothing: with the
    slot's nanochat/__init__.py gone its folder is a namespace portion, and `import nanochat` took the
    regular package further down the path, the workspace's own (an editable install's .pth adds it: this
    repository's clone, as the demo's workspace is), whose files the agent edits freely and no commit holds;
    a namespace package's module removed is found in the workspace's portion alike."""
    import hashlib
    import subprocess
    slot, ws = tmp_path / "slot", tmp_path / "ws"
    names = ["pkg/mod.py"] + (["pkg/__init__.py"] if package == "regular" else [])
    for root, value in ((slot, "the commit"), (ws, "SWAPPED")):
        (root / "pkg").mkdir(parents=True)
        for name in names:
            (root / name).write_text(f"V = {value!r}\n")
    sources = {name: hashlib.sha256((slot / name).read_bytes()).hexdigest() for name in names}
    (slot / removed).unlink()  # after checkout
    scripts = Path(__file__).resolve().parents[1] / "mcp_server" / "scripts"
    probe = (f"import sys; sys.path.insert(0, {str(scripts)!r}); import trusted_import; trusted_import.install()\n"
             f"import os; os.chdir({str(slot)!r}); trusted_import.expect(os.getcwd(), {sources!r})\n"
             f"sys.path.insert(0, os.getcwd()); sys.path.append({str(ws)!r})\n"
             "try:\n    import pkg.mod\n    print('RAN', pkg.mod.V)\nexcept ImportError as e:\n    print('REFUSED', e)\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("REFUSED") and f"stands in for {removed}" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("command", ["train.py", "fake_train.py", "a vendored library"])
def test_the_server_passes_each_run_its_commits_sources(fake_env, monkeypatch, command):
    """Review 44: the test above hands the pool the commit's files itself, so nothing failed if dispatch stopped
    passing them: a run of `python train.py` gets its own commit's files (train.py's digest among them), a
    run of another command none. A commit of 2,000 sources is past what one argument may hold (128 KiB):
    every run failed to start ("Argument list too long"), then ran without the check; the files now go on
    the worker's socket, and it is checked like any other."""
    import hashlib
    from server_support import Lab, answer, git, make_workspace
    train = "print('val_bpb: 1.0')\n"
    ws = make_workspace(fake_env, train)
    if command == "a vendored library":
        (ws / "vendor").mkdir()
        for i in range(2000):
            (ws / "vendor" / f"module_{i:04d}.py").write_text(f"X = {i}\n")
        git(ws, "add", ".")
        git(ws, "commit", "-qm", "a vendored library")
    lab = Lab(ws, train_command=[sys.executable, "fake_train.py" if command == "fake_train.py" else "train.py"])
    try:
        specs = []
        start = lab.loop.pool.start
        monkeypatch.setattr(lab.loop.pool, "start", lambda spec, on_done: (specs.append(spec), start(spec, on_done))[1])
        lab.ok("setup", tag="t")
        result = lab.call("run_experiment", description="baseline")
        files = specs[0].files
        if command == "fake_train.py":
            assert files is None
            return
        said = answer(result)  # it ran (this train.py prints no summary block: a crash, after it ran)
        assert "val_bpb: 1.0" in (lab.ws / said["log"]).read_text(), said["tail"]
        assert files["train.py"][1] == hashlib.sha256(train.encode()).hexdigest()
        assert set(files) == set(git(lab.ws, "ls-files").split())
    finally:
        lab.loop.shutdown()
