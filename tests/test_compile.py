"""The compiled training path on the CPU, end to end: prepare.py builds what is built once per
machine, a cold run compiles its own graphs and says so, a rerun and a constants-only edit load
every graph from the compile cache (counted, not timed), and a platform where compiling fails
trains eager after one line in the log."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import parse_summary, run_train

SHORT_BUDGET = "2"  # seconds: the warm runs only have to show what they loaded
CACHE_ENTRY_DIRS = ("fxgraph", "aotautograd")
# train.py as it is but small (one block, 1k-token micro-batches), so that its cold compile takes
# seconds, not a minute, and a 2 s budget holds tens of steps over which the schedules move
SMALL = {'\nDEPTH = TRAIN_DEFAULTS["depth"]': "\nDEPTH = 1",
         '\nTOTAL_BATCH_SIZE = TRAIN_DEFAULTS["total_batch_size"]': "\nTOTAL_BATCH_SIZE = 2048",
         '\nDEVICE_BATCH_SIZE = TRAIN_DEFAULTS["device_batch_size"]': "\nDEVICE_BATCH_SIZE = 4"}
needs_compiler = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                                    reason="no C++ compiler here: the CPU cannot compile (the fallback test still runs)")
CONSTANTS_ONLY = {"\nMATRIX_LR = 0.04": "\nMATRIX_LR = 0.055", "\nWARMDOWN_RATIO = 0.5": "\nWARMDOWN_RATIO = 0.7"}


def compiled_env(prepared_env, compile_cache: Path, **extra) -> dict:
    env = {k: v for k, v in prepared_env.items() if k != "AUTORESEARCH_COMPILE"}
    return dict(env, TORCHINDUCTOR_CACHE_DIR=str(compile_cache), **extra)


def cache_entries(compile_cache: Path) -> set:
    """The compiled graphs stored in the cache: a run that compiles nothing adds none."""
    return {p.relative_to(compile_cache) for d in CACHE_ENTRY_DIRS for p in (compile_cache / d).rglob("*") if p.is_file()}


def edited(source: str, edits: dict) -> str:
    for old, new in edits.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    return source


def write_train(folder: Path, source: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "train.py").write_text(source)
    return folder / "train.py"


def run_copy(script: Path, env: dict, repo_root: Path):
    return run_train(script, dict(env, PYTHONPATH=str(repo_root)), script.parent)  # it imports the harness


def checked(result) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "compile failed" not in result.stdout
    return parse_summary(result.stdout)


@pytest.fixture(scope="module")
def small_train(repo_root, tmp_path_factory) -> Path:
    return write_train(tmp_path_factory.mktemp("small"), edited((repo_root / "train.py").read_text(), SMALL))


def recording_compiler(folder: Path) -> tuple[Path, Path]:
    """A C++ compiler that writes each command line to a log, then runs the real one."""
    folder.mkdir(exist_ok=True)
    script, log = folder / "cxx", folder / "cxx.log"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nexec {os.environ.get("CXX", "g++")} "$@"\n')
    script.chmod(0o755)
    return script, log


def compilations(log: Path) -> set:
    """The compiler's command lines that built something (not its version checks); empties the log."""
    lines = {line for line in log.read_text().splitlines() if " -o " in line} if log.exists() else set()
    log.unlink(missing_ok=True)
    return lines


@pytest.fixture(scope="module")
def runs(prepared_env, repo_root, small_train, tmp_path_factory):
    """prepare.py's compiler step into a fresh compile cache that holds only headers another
    environment built (a clone at another path shares the cache, not the venv); then the small
    train.py, the same again, and a copy whose constants differ, with the compiler's command lines
    recorded."""
    compile_cache = tmp_path_factory.mktemp("compile-cache")
    for others in ("precompiled_headers", "precompiled_headers/0123456789ab"):
        (compile_cache / others).mkdir(parents=True, exist_ok=True)
        (compile_cache / others / "another_venvs_torch.h.gch").write_bytes(b"built against another torch")
    # in the compile cache: the one folder prepare's sandboxed warm-up may write (the log) besides its private /tmp
    cxx, log = recording_compiler(compile_cache / "recording-compiler")
    env = compiled_env(prepared_env, compile_cache, AUTORESEARCH_TIME_BUDGET=SHORT_BUDGET, CXX=str(cxx))
    prepare = subprocess.run([sys.executable, "prepare.py"], cwd=repo_root, env=env, capture_output=True, text=True)
    built_by_prepare = compilations(log)
    cold = checked(run_copy(small_train, env, repo_root))
    built_by_cold = compilations(log)
    after_cold = cache_entries(compile_cache)
    warm = checked(run_copy(small_train, env, repo_root))
    after_warm = cache_entries(compile_cache)
    constants_edit = write_train(tmp_path_factory.mktemp("edited"), edited(small_train.read_text(), CONSTANTS_ONLY))
    edit = checked(run_copy(constants_edit, env, repo_root))
    return dict(cold=cold, warm=warm, edited=edit, after_cold=after_cold, after_warm=after_warm,
                after_edit=cache_entries(compile_cache), prepare=prepare, built_by_prepare=built_by_prepare,
                built_by_cold=built_by_cold, compile_cache=compile_cache, env=env)


@needs_compiler
def test_prepare_builds_once_what_every_model_would_compile_again(runs):
    """prepare.py builds the precompiled C++ headers and Inductor's checks of the CPU into the compile
    cache, though another environment's are there; the first run of a model then compiles only its
    own graphs."""
    prepare = runs["prepare"]
    assert prepare.returncode == 0, prepare.stdout[-2000:] + prepare.stderr[-3000:]
    assert "compiler ready" in prepare.stdout
    assert any("-x c++-header" in line for line in runs["built_by_prepare"]), runs["built_by_prepare"]
    cold_builds = runs["built_by_cold"]
    assert any(".main.cpp" in line for line in cold_builds) and any(".optimized.cpp" in line for line in cold_builds)
    assert not any("-x c++-header" in line for line in cold_builds)
    assert not cold_builds & runs["built_by_prepare"]  # not one thing built twice


def test_the_warm_up_writes_a_compile_cache_inside_the_prepared_cache(prepared_env, repo_root, tmp_path, bubblewrap):
    """The usual layout, `<cache>/compile`: prepare's sandbox hides the prepared cache and shows its compile cache
    again, writable. The cache was hidden over the writable compile cache (a hidden folder that holds no read-only
    path is hidden last), so the warm-up built the precompiled headers into the sandbox's own memory, and every
    first run built them again."""
    cache = tmp_path / "cache"
    shutil.copytree(prepared_env["AUTORESEARCH_CACHE"], cache, ignore=shutil.ignore_patterns("compile"))
    marker = cache / "compile" / "built-by-the-warm-up"
    write = f"open({str(marker)!r}, 'w')"
    script = ("import subprocess, sys, prepare\n"
              f"command, why, _ = prepare.compiler_sandbox([sys.executable, '-c', {write!r}], "
              f"prepare.Path({str(cache / 'compile')!r}))\n"
              "assert command, why\nsubprocess.run(command, check=True, cwd=prepare.REPO)\n")
    subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=dict(prepared_env, AUTORESEARCH_CACHE=str(cache)),
                   check=True, timeout=120)
    assert marker.exists()


class Planted:
    """What a run may leave in the compile cache it writes: an entry Inductor unpickles, which runs a
    shell command as whoever loads it. The command notes that it ran (in the compile cache, which a
    run may write), then tries to read what runs must not (the offline seed, the data's names) into
    the compile cache, and to write outside it."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@needs_compiler
def test_code_a_run_plants_in_the_compile_cache_runs_in_the_sandbox_at_the_next_prepare(
        runs, prepared_env, repo_root, tmp_path, outside_tmp, bubblewrap):
    """Review 39b: a run overwrites the compile cache's entries with pickles of its own and deletes the
    precompiled headers, so that the user's next `uv run prepare.py` prepares the compiler again.
    Inductor unpickles the entries; prepare.py compiles in the runs' sandbox, so the planted code runs
    with a run's powers (it cannot write outside the compile cache, nor read the prepared cache), and
    prepare ends as usual. (The warm-up in the sandbox builds the headers of an honest cache:
    test_prepare_builds_once_what_every_model_would_compile_again.)"""
    compile_cache = tmp_path / "compile-cache"  # the cold run's, its headers deleted as the run would
    shutil.copytree(runs["compile_cache"], compile_cache, ignore=shutil.ignore_patterns("*.gch"))
    cache, marker = Path(prepared_env["AUTORESEARCH_CACHE"]), outside_tmp / "ran-outside-the-sandbox"
    command = (f"id -u > {compile_cache}/planted-code-ran; cat {cache}/offline_seed > {compile_cache}/seed-seen; "
               f"ls {cache}/data > {compile_cache}/data-seen; id -u > {marker}")
    planted = 0
    for folder in CACHE_ENTRY_DIRS:
        for entry in (compile_cache / folder).rglob("*"):
            if entry.is_file():
                entry.write_bytes(pickle.dumps(Planted(command)))
                planted += 1
    assert planted and (cache / "offline_seed").is_file() and not list(compile_cache.rglob("*.gch"))

    # the fixture's environment: its compiler (CXX) is part of every entry's key, so the entries are found
    env = dict(runs["env"], TORCHINDUCTOR_CACHE_DIR=str(compile_cache))
    done = subprocess.run([sys.executable, "prepare.py"], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Preparing the compiler" in done.stdout
    assert not marker.exists(), f"the planted code ran outside the sandbox: {marker.read_text()}"
    assert (compile_cache / "planted-code-ran").is_file(), "the planted entries were never loaded: no test"
    assert (compile_cache / "seed-seen").read_text() == "" and (compile_cache / "data-seen").read_text() == ""


def test_without_a_sandbox_prepare_compiles_only_where_the_user_accepts_unsandboxed_runs(prepared_env, repo_root,
                                                                                          tmp_path):
    """No bubblewrap (nothing on PATH): the warm-up would load from a cache runs write, so prepare leaves it
    to the first run and says why; with the user's opt-in (runs are then unsandboxed and could write
    anything) it runs in prepare's own process, here failing for want of a compiler on PATH."""
    (tmp_path / "empty").mkdir()
    env = compiled_env(prepared_env, tmp_path / "compile-cache", PATH=str(tmp_path / "empty"))
    env.pop("RESEARCH_LOOP_UNSANDBOXED", None)
    skipped = subprocess.run([sys.executable, "prepare.py"], cwd=repo_root, env=env, capture_output=True, text=True)
    assert skipped.returncode == 0, skipped.stdout[-2000:] + skipped.stderr[-3000:]
    assert "not prepared: no sandbox here (bubblewrap (bwrap) is not installed)" in skipped.stdout, skipped.stdout
    assert "train.py builds the same in its first run" in skipped.stdout
    opted_in = subprocess.run([sys.executable, "prepare.py"], cwd=repo_root, capture_output=True, text=True,
                              env=dict(env, RESEARCH_LOOP_UNSANDBOXED="1"))
    assert opted_in.returncode == 0, opted_in.stdout[-2000:] + opted_in.stderr[-3000:]
    assert "not prepared" not in opted_in.stdout
    assert "compiling does not work here" in opted_in.stdout, opted_in.stdout


@needs_compiler
def test_cold_run_compiles_and_reports_it(runs):
    cold = runs["cold"]
    assert cold["compile_cache"] == "cold"
    assert float(cold["compile_seconds"]) > 0
    assert int(cold["recompiles"]) == 0  # everything compiled in the untimed first step
    assert int(cold["num_steps"]) >= 5  # ... though the learning rates moved at every step since
    assert runs["after_cold"], "nothing was written to the compile cache"
    assert float(cold["val_bpb"]) > 0


RECOMPILE_SCRIPT = """
import json, torch
from nanochat.compile import Compiler
compiler = Compiler()
assert compiler.enabled
scale = compiler(lambda x, factor: x * factor, backend="eager", dynamic=False)  # dynamo only: no C++
x = torch.ones(3)
scale(x, torch.tensor(0.5)); scale(x, 5)
compiler.mark_warm()
for value in (0.1, 0.2, 0.3):
    scale(x, torch.tensor(value))
as_tensors = compiler.late_graphs()
scale(x, 7)  # an integer is baked into its graph: a new one compiles another
print(json.dumps(dict(as_tensors=as_tensors, as_number=compiler.late_graphs() - as_tensors)))
"""


def test_recompiles_are_counted(prepared_env, repo_root, tmp_path):
    """What the summary's recompiles line counts: a new value passed as a tensor reuses the graph, a
    new integer compiles another."""
    env = compiled_env(prepared_env, tmp_path / "compile-cache")
    done = subprocess.run([sys.executable, "-c", RECOMPILE_SCRIPT], cwd=repo_root, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == dict(as_tensors=0, as_number=1)


@needs_compiler
def test_second_run_finds_the_cache_warm(runs):
    assert runs["warm"]["compile_cache"] == "warm"
    assert int(runs["warm"]["recompiles"]) == 0
    assert runs["after_warm"] == runs["after_cold"]  # it compiled nothing


@needs_compiler
def test_constants_only_edit_does_not_recompile(runs):
    edited = runs["edited"]
    assert edited["compile_cache"] == "warm"
    assert int(edited["recompiles"]) == 0
    assert runs["after_edit"] == runs["after_cold"]


OOM_SCRIPT = """
import json, torch
from nanochat.compile import Compiler
OOM = "CUDA out of memory. Tried to allocate 8.00 GiB"

def oom_while_compiling(graph, example_inputs):
    raise torch.cuda.OutOfMemoryError(OOM)  # Inductor's autotuning, say

def oom_while_running(x):
    raise torch.cuda.OutOfMemoryError(OOM)

found = {}
for name, fn, options in (("compiling", lambda x: x * 2, dict(backend=oom_while_compiling)),
                          ("running", oom_while_running, dict(backend="eager"))):
    compiler = Compiler()
    try:
        compiler(fn, **options)(torch.ones(3))
        found[name] = "no error"
    except Exception as error:
        found[name] = type(error).__name__
    found[name + " compiler"] = compiler.cache_state()
print(json.dumps(found))
"""


def test_an_out_of_memory_is_said_and_raised_not_trained_eager(prepared_env, repo_root, tmp_path):
    """Eager at the same batch needs more memory than compiled: an out-of-memory in the compiled
    path, while compiling or running, is no compile failure to train eager after."""
    env = compiled_env(prepared_env, tmp_path / "compile-cache")
    done = subprocess.run([sys.executable, "-c", OOM_SCRIPT], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training eager" not in done.stdout and done.stdout.count("out of memory (") == 2, done.stdout
    assert "lower DEVICE_BATCH_SIZE" in done.stdout
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["running"] == "OutOfMemoryError" and found["running compiler"] != "off", found
    assert found["compiling"] != "no error" and not found["compiling compiler"].startswith("off"), found


def test_compile_cache_defaults_to_the_harness_cache(prepared_env, repo_root):
    env = {k: v for k, v in prepared_env.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    script = "import json, os, nanochat.compile; print(json.dumps(os.environ['TORCHINDUCTOR_CACHE_DIR']))"
    found = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env, capture_output=True,
                           text=True, check=True).stdout
    assert Path(json.loads(found)) == Path(prepared_env["AUTORESEARCH_CACHE"]) / "compile"


def test_headers_any_run_could_write_before_are_not_read_after_an_upgrade(prepared_env, repo_root, tmp_path):
    """Before stop 53 every run could write the shared compile cache, its precompiled C++ headers among it, which
    every later compile includes (a planted header is code); an upgraded cache kept them, and prepare, finding them,
    built none. Headers are now kept under a key of their own: the old ones are never read, and prepare builds
    again."""
    cache = tmp_path / "cache"
    script = ("import hashlib, json, torch, nanochat.compile as c\n"
              "old = hashlib.sha256(f'{torch.__file__}|{torch.__version__}'.encode()).hexdigest()[:12]\n"
              "planted = c.compile_cache_dir() / 'precompiled_headers' / old\n"
              "planted.mkdir(parents=True)\n"
              "(planted / 'planted.h.gch').write_bytes(b'planted')\n"
              "print(json.dumps([str(planted), str(c.headers_dir()), c.compiler_needs_preparing()]))\n")
    env = {k: v for k, v in prepared_env.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "AUTORESEARCH_COMPILE")}
    out = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=dict(env, AUTORESEARCH_CACHE=str(cache)),
                         capture_output=True, text=True, check=True, timeout=120).stdout
    planted, read, needs_preparing = json.loads(out.splitlines()[-1])
    assert read != planted and needs_preparing, (planted, read)


def test_compile_failure_trains_eager(prepared_env, repo_root, small_train, tmp_path):
    """No working C++ compiler: the first compiled call fails, the run says so once and trains eager."""
    env = compiled_env(prepared_env, tmp_path / "compile-cache", CXX=str(tmp_path / "no-such-compiler"),
                       AUTORESEARCH_TIME_BUDGET=SHORT_BUDGET)
    result = run_copy(small_train, env, repo_root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    failures = [line for line in result.stdout.splitlines() if "compile failed" in line and "training eager" in line]
    assert len(failures) == 1, result.stdout[-2000:]
    summary = parse_summary(result.stdout)
    assert summary["compile_cache"].startswith("off (compile failed")
    assert float(summary["val_bpb"]) > 0


def test_prepare_without_a_working_compiler_says_train_py_will_train_eager(prepared_env, repo_root, tmp_path):
    env = compiled_env(prepared_env, tmp_path / "compile-cache", CXX=str(tmp_path / "no-such-compiler"))
    done = subprocess.run([sys.executable, "prepare.py"], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "compiling does not work here" in done.stdout and "train.py will train eager" in done.stdout
