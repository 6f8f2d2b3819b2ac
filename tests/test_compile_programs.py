"""The compile cache kept per program (scripts/compile_programs.py): no run writes what a run of another program
loads, while a new program starts from its best's graphs."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mcp_server.scripts import compile_programs
from server_support import Lab, answer, make_workspace, set_knobs
from test_integrity import STASHES_THE_VALIDATION_DATA

WORKER = Path(__file__).resolve().parent.parent / "mcp_server" / "scripts" / "worker.py"


def test_a_run_cannot_put_code_into_what_the_bests_rerun_loads(fake_env, bubblewrap, monkeypatch):
    """Review 64, played in part at stop 53 with torch's Inductor: a line appended to a cached graph's module ran in
    the next process that loaded the graph, so a candidate's run could put code into the best's rerun (a control)
    and train it worse. Each run now compiles in a folder of its own, filled from its program's folder (a new
    program's from its best's) and saved to its program's alone: the candidate starts from the best's graph, and
    what it appends reaches no run of the best."""
    monkeypatch.setenv("FAKE_COMPILE", "1")
    lab = Lab(make_workspace(fake_env), unsandboxed=False)
    try:
        answer(lab.call("setup", tag="programs"))
        answer(lab.call("run_experiment", description="baseline"))
        lab.ok("keep")
        set_knobs(lab.ws, VAL_BPB=0.9, POISON=1)
        candidate = answer(lab.call("run_experiment", description="poisons what it compiled"))
        lab.ok("discard")
        control = answer(lab.call("run_experiment", description="the best again", rerun=True))
    finally:
        lab.loop.shutdown()
    logs = [(lab.ws / run["log"]).read_text() for run in (candidate, control)]
    assert "cache graph.py: 'compiled by run 1'" in logs[0], logs[0]  # warm from the best's graph
    assert "cache graph.py: 'compiled by run 1'" in logs[1] and "POISON" not in logs[1], logs[1]
    programs = fake_env / "cache" / "compile" / compile_programs.FOLDER
    saved = sorted((folder / "graph.py").read_text() for folder in programs.iterdir())
    assert saved == ["compiled by run 1", "compiled by run 1 POISON"], saved  # the candidate's in its own folder
    assert not list((fake_env / "cache" / "compile" / compile_programs.WORK).glob("run-*"))  # each run's removed


def test_what_a_run_left_is_kept_as_plain_files_without_headers(tmp_path):
    """A run's folder may hold anything the run made: its program's folder gets the plain files and folders only
    (a link would be followed by whoever reads the folder next; a FIFO would hang the copy), and no precompiled
    headers (prepare's are shared; 300 MB per program is not kept)."""
    own, programs, program = tmp_path / "own", tmp_path / "programs", "a" * 40
    (own / "fx").mkdir(parents=True)
    (own / "fx" / "graph.py").write_text("graph")
    (own / compile_programs.HEADERS / "env").mkdir(parents=True)
    (own / compile_programs.HEADERS / "env" / "h.gch").write_text("header")
    (own / "link").symlink_to("/etc/passwd")
    (own / "linked-folder").symlink_to(tmp_path)
    os.mkfifo(own / "fifo")
    compile_programs.save(own, programs, program)
    kept = sorted(str(p.relative_to(programs / program)) for p in (programs / program).rglob("*"))
    assert kept == ["fx", "fx/graph.py"] and not own.exists(), kept
    into = tmp_path / "next"
    compile_programs.fill(into, programs, "b" * 40, program)  # a new program starts from its best's
    assert (into / "fx" / "graph.py").read_text() == "graph"


def deep_tree(folder, depth: int) -> None:
    """depth folders one inside the next, made relative to each other (as a run can: no path grows past PATH_MAX)."""
    fd = os.open(folder, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)


def test_a_sparse_file_a_run_left_is_not_made_dense(tmp_path):
    """Review 89: a file a run truncates to terabytes costs it nothing (sparse), but the save copied every byte of it
    outside the sandbox, after the run's time (3 GiB: 8 s and 3 GiB of disk here; 16 TiB fills any disk, and then
    the server's own writes fail), and again into each later run of the program. A folder past the limits is not
    kept: its program compiles again."""
    own, programs, program = tmp_path / "own", tmp_path / "programs", "a" * 40
    (own / "fx").mkdir(parents=True)
    (own / "fx" / "graph.py").write_text("graph")
    with open(own / "fx" / "sparse", "wb") as f:
        f.truncate(compile_programs.MAX_BYTES + (1 << 20))
    compile_programs.save(own, programs, program)
    assert not own.exists() and not list(programs.iterdir()), list(programs.iterdir())  # no .saving- left either


def test_a_deep_tree_a_run_left_neither_ends_the_worker_nor_stays(tmp_path):
    """Review 89: Python 3.11's os.walk and shutil.rmtree recurse, so 1100 nested folders a run made raised
    RecursionError from the save, in the worker before it wrote the run's report, and left the run's folder and a
    .saving- copy on disk."""
    own, programs, program = tmp_path / "own", tmp_path / "programs", "a" * 40
    (own / "fx").mkdir(parents=True)
    deep_tree(own / "fx", 1100)
    try:
        compile_programs.save(own, programs, program)
        assert not own.exists() and not list(programs.iterdir()), list(programs.iterdir())
    finally:  # pytest's own removal of old temporary folders recurses too
        subprocess.run(["rm", "-rf", "--", str(tmp_path)], check=True)


def test_a_fill_that_fails_starts_the_run_cold(tmp_path):
    """Review 89: two runs of one program at once (the best's reruns in two slots): one's save renames the program's
    folder away and removes it while the other's fill copies it, and the fill raised FileNotFoundError in the worker
    before its run started (played with threads: 2 fills of 200 raised). Here a copy that fails for certain stands for
    it: a file of the program's where the run's folder holds a folder of that name. A fill that fails leaves the
    run's folder empty, and the run compiles again."""
    programs, program, own = tmp_path / "programs", "a" * 40, tmp_path / "own"
    (programs / program).mkdir(parents=True)
    (programs / program / "a.py").write_text("graph")
    (programs / program / "b.py").write_text("graph")
    (own / "b.py").mkdir(parents=True)
    compile_programs.fill(own, programs, program, None)
    assert own.is_dir() and not list(own.iterdir()), list(own.iterdir())


def test_a_run_that_never_starts_leaves_no_copy_of_its_programs_folder(tmp_path, bubblewrap):
    """Review 89: the worker filled the run's folder with a copy of its program's (hundreds of MB on a GPU) and then,
    where the run's command never started (here: the server never sent its commit's files), returned without saving
    or removing it: one copy left in `work/` per such run, for good."""
    cache, program = tmp_path / "compile", "a" * 40
    (cache / compile_programs.FOLDER / program).mkdir(parents=True)
    (cache / compile_programs.FOLDER / program / "graph.py").write_text("graph")
    spec = json.dumps({"readonly": [str(tmp_path)], "writable": ["."]})
    log, report = tmp_path / "run.log", tmp_path / "report.json"
    (tmp_path / "worktree").mkdir()
    subprocess.run([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), "--timeout", "30",
                    "--sandbox", spec, "--compile-cache", str(cache), "--compile-program", program, "--files-on-stdin",
                    "--", sys.executable, "-c", "pass"], cwd=tmp_path / "worktree", stdin=subprocess.DEVNULL, timeout=60)
    assert "never sent the run's commit's files" in log.read_text(), log.read_text()
    assert not list((cache / compile_programs.WORK).glob("run-*"))


def test_a_runs_folder_reads_prepares_headers_and_a_folder_elsewhere_is_cold(tmp_path, repo_root):
    """Inside the harness's compile cache (a run's own folder under the loop, where it may write nothing else) the
    precompiled headers are prepare's; a compile folder elsewhere (a benchmark's fresh one) is truly cold, or
    prepare.py into it would find the cache's headers and build nothing."""
    cache = tmp_path / "cache"
    script = ("from nanochat.compile import compile_cache_dir, headers_dir\n"  # prepare's headers, then where a run looks
              "(compile_cache_dir() / 'precompiled_headers' / headers_dir().name).mkdir(parents=True, exist_ok=True)\n"
              "print(headers_dir())\n")
    seen = {}
    for name, folder in (("run's", cache / "compile" / compile_programs.WORK / "run-x"), ("elsewhere", tmp_path / "fresh")):
        env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), TORCHINDUCTOR_CACHE_DIR=str(folder))
        done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env, capture_output=True, text=True,
                              check=True)
        seen[name] = done.stdout.strip()
    assert seen["run's"].startswith(str(cache / "compile" / "precompiled_headers")), seen
    assert seen["elsewhere"].startswith(str(tmp_path / "fresh")), seen


# a worker's part in the compile cache, in a process of its own: makes its run's folder, starts a save, then dies
# outright (SIGKILL: no save ends, no folder is removed) or lives on
HOLDER = """import os, signal, sys, time
from pathlib import Path
from mcp_server.scripts import compile_programs as programs
cache = Path(sys.argv[1])
own = programs.make_own(cache)
(own / "graph.py").write_text("compiled")
(cache / programs.FOLDER / (programs.SAVING + own.name)).mkdir(parents=True)
(cache / programs.FOLDER / (programs.OLD + own.name)).mkdir()
print(own, flush=True)
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)
"""


def test_what_a_worker_killed_outright_left_is_removed_by_the_next_run(tmp_path, repo_root):
    """Review 89: a worker killed outright (SIGKILL, the machine's OOM killer, a node lost) left its run's folder in
    `work/` (a copy of its program's: hundreds of MB on a GPU) and a save's `.saving-` and `.old-` copies, for good.
    Each worker holds a lock on its folder while it lives; the next run's worker removes the folders no live worker
    holds on its machine, and leaves a live one's and another machine's (a cache on NFS shared by a cluster's nodes,
    whose locks may not reach across)."""
    cache = tmp_path / "compile"

    def holder(fate: str) -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache), fate], cwd=repo_root,
                                stdout=subprocess.PIPE, text=True)
        return proc, Path(proc.stdout.readline().strip())

    killed, killed_own = holder("killed")
    assert killed.wait(timeout=30) == -9 and (killed_own / "graph.py").exists()
    elsewhere = cache / compile_programs.WORK / "run-node7+x1"  # another node's, whose lock this one may not see
    elsewhere.mkdir()
    elsewhere.with_name(elsewhere.name + compile_programs.HELD).touch()
    live, live_own = holder("live")  # its own start removed the killed worker's
    try:
        left = sorted(p.name for folder in (cache / compile_programs.WORK, cache / compile_programs.FOLDER)
                      for p in folder.iterdir() if killed_own.name in p.name)
        assert not left and elsewhere.exists(), left
        own = compile_programs.make_own(cache)  # the live worker's is kept
        assert (live_own / "graph.py").exists() and (cache / compile_programs.FOLDER / (compile_programs.SAVING + live_own.name)).exists()
        compile_programs.release(own)
        assert not own.exists() and not list((cache / compile_programs.WORK).glob(f"{own.name}*"))
    finally:
        live.kill()
        live.wait()


# review 87's stash (test_integrity.py), into the run's compile folder, which outlives the run: for its program's later
# runs and those seeded from it once kept
STASHES_INTO_ITS_COMPILE_FOLDER = STASHES_THE_VALIDATION_DATA.replace(
    '"compile/stash"', 'os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "stash")')


def test_what_a_run_shown_the_validation_data_compiled_is_kept_for_no_later_run(tmp_path, bubblewrap, monkeypatch):
    """Review 90: AUTORESEARCH_EVAL_CROSSCHECK=1 in the server's environment (a platform's check, which nothing pins
    or reports, and which a session's own settings can give the server) shows each run the validation shard once it
    has exported. A run then copied the shard into its compile folder, saved as its program's: its reruns, and once it
    is kept every new program's run (filled from the best's folder), trained on the validation text, verified. What a
    run that was shown the shard compiled is not kept."""
    from mcp_server.core.integrity import evaluation_verdict
    from test_server_units import clean_harness, fake_evaluation
    monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")
    cache, program, exports, val = tmp_path / "compile", "a" * 40, tmp_path / "exports", tmp_path / "val.parquet"
    exports.mkdir()
    val.write_bytes(b"validation")
    report, log = tmp_path / "report.json", tmp_path / "run.log"
    spec = json.dumps({"readonly": [str(tmp_path)], "writable": [str(exports)]})
    subprocess.run([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), "--timeout", "30",
                    "--sandbox", spec, "--export", str(exports / "model.pt2"), "--val-shard", str(val),
                    "--evaluate", json.dumps(fake_evaluation(clean_harness(tmp_path))), "--compile-cache", str(cache),
                    "--compile-program", program, "--", sys.executable, "-c", STASHES_INTO_ITS_COMPILE_FOLDER],
                   cwd=tmp_path, timeout=60, check=True)
    result = json.loads(report.read_text())
    problem, value, note = evaluation_verdict(result)
    assert result["val_watched"] and (problem, value) == (None, 1.5), (result, log.read_text())
    assert "AUTORESEARCH_EVAL_CROSSCHECK=1" in note, note  # said in the run's answer
    assert not (cache / compile_programs.FOLDER / program / "stash").exists(), log.read_text()
    assert not list((cache / compile_programs.WORK).glob("run-*"))


# a run that holds every lock it can take in the compile cache's `work/`: read-only to it, but flock needs no write
# (before review 91 `work/.lock` among them, which every worker took to make its run's folder)
LOCKER = """import fcntl, os, sys, time
work = sys.argv[1]
held = []
for name in [os.path.join(work, name) for name in os.listdir(work)]:
    try:
        fd = os.open(name, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        held.append(name)
    except OSError:
        pass
print("holding", held, flush=True)
time.sleep(60)
"""
MAKER = """import sys
from pathlib import Path
from mcp_server.scripts import compile_programs as programs
own = programs.make_own(Path(sys.argv[1]))
print(own, flush=True)
"""


def make_own_elsewhere(cache: Path, repo_root: Path) -> subprocess.CompletedProcess:
    """Another slot's worker making its run's folder, in a process of its own (bounded: it may hang)."""
    return subprocess.run([sys.executable, "-c", MAKER, str(cache)], cwd=repo_root, capture_output=True, text=True,
                          timeout=20)


def test_a_run_that_holds_the_caches_lock_stalls_no_other_slots_start(tmp_path, repo_root, bubblewrap):
    """Review 91, played: `work/.lock` is read-only to runs, but flock works on a file opened read-only. A run that
    took it (a shared lock, held for its whole run) stalled every other worker's make_own on that machine (the other
    slot's next run, cold or warm) until the run ended: a cold worker's timeout counts from before it, so the other
    slot's run lost its time. Nothing in `work/` is held while a folder is made now, and a sweep a lock stops is
    left to the next run."""
    cache = tmp_path / "compile"
    live = compile_programs.make_own(cache)  # this run's own folder, made by its worker (and `.lock` with it)
    spec = json.dumps({"readonly": [str(tmp_path)], "writable": ["."]})
    (tmp_path / "worktree").mkdir()
    (tmp_path / "locker.py").write_text(LOCKER)
    log, report = tmp_path / "run.log", tmp_path / "report.json"
    run = subprocess.Popen([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), "--timeout", "60",
                            "--sandbox", spec, "--compile-cache", str(cache), "--",
                            sys.executable, str(tmp_path / "locker.py"), str(cache / compile_programs.WORK)],
                           cwd=tmp_path / "worktree", stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if "holding" in (log.read_text() if log.exists() else ""):
                break
            time.sleep(0.1)
        assert "holding" in log.read_text(), log.read_text()  # the sandboxed run holds what it could take
        made = make_own_elsewhere(cache, repo_root)  # hung here before, until the run ended
        assert made.returncode == 0 and Path(made.stdout.strip()).is_dir(), made.stderr
        assert live.is_dir()  # the live worker's folder is never taken for a dead one's
    finally:
        run.kill()
        run.wait()
        compile_programs.release(live)


def test_what_the_agent_plants_in_work_neither_hangs_nor_ends_the_next_worker(tmp_path, repo_root):
    """Review 91, played as the agent's shell between runs: a FIFO named like a run's lock (`run-<host>+x.held`)
    hung the sweep's open (no writer comes) in every later worker on the machine, and a folder so named ended it
    (IsADirectoryError) before its run started. The sweep opens only plain files, without waiting."""
    cache = tmp_path / "compile"
    work = cache / compile_programs.WORK
    work.mkdir(parents=True)
    os.mkfifo(work / f"{compile_programs.run_prefix()}fifo{compile_programs.HELD}")
    (work / f"{compile_programs.run_prefix()}dir{compile_programs.HELD}").mkdir()
    (work / f"{compile_programs.run_prefix()}link{compile_programs.HELD}").symlink_to(
        work / f"{compile_programs.run_prefix()}fifo{compile_programs.HELD}")
    made = make_own_elsewhere(cache, repo_root)
    assert made.returncode == 0 and Path(made.stdout.strip()).is_dir(), made.stderr


def test_a_folder_a_run_made_read_only_does_not_keep_its_folder(tmp_path):
    """Review 91, played as another uid than root (root's removal ignores modes): a run made a folder in its compile
    folder read-only (or unlistable) after writing in it; rmtree could not empty it, so the run's folder stayed in
    `work/`, its lock let go and never swept: any size the run wrote, for good, at every run."""
    script = ("import os, sys\nsys.path.insert(0, sys.argv[2])\nimport compile_programs as programs\n"
              "from pathlib import Path\nown = programs.make_own(Path(sys.argv[1]))\n"
              "for mode in (0o500, 0o000):\n    (own / str(mode) / 'sub').mkdir(parents=True)\n"
              "    (own / str(mode) / 'sub' / 'big').write_bytes(b'x' * 1000)\n    os.chmod(own / str(mode), mode)\n"
              "programs.release(own)\nprint(sorted(p.name for p in Path(sys.argv[1], 'work').iterdir()))\n")
    argv, folder = [sys.executable], tmp_path
    if os.geteuid() == 0:  # as nobody, with the system's interpreter, in a folder of its own
        if not (shutil.which("setpriv") and Path("/usr/bin/python3").exists()):
            pytest.skip("root removes whatever the modes say; no setpriv here to play it as another uid")
        folder = Path(tempfile.mkdtemp(prefix="review91-"))
        shutil.chown(folder, "nobody")
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3"]
    shutil.copy(Path(compile_programs.__file__), folder / "compile_programs.py")
    try:
        done = subprocess.run([*argv, "-c", script, str(folder / "compile"), str(folder)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
    finally:
        if folder != tmp_path:
            subprocess.run(["rm", "-rf", "--", str(folder)], check=False)
