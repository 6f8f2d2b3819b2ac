"""Log parsing, ledger rows, the state's locks and the run worker, without a server."""
import importlib.util
import json
import math
import re
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mcp_server.core import ledger, logparse, noise
from mcp_server.executors.bytecode import compile_bytecode
from mcp_server.executors.executor import training_env
from mcp_server.core.models import Refusal
from mcp_server.core.state import State

FIXTURE = Path("/work/shared/fixtures/upstream-format-cpu-run.log")
FIXTURE_TEXT = FIXTURE.read_bytes().decode() if FIXTURE.exists() else None


@pytest.fixture
def upstream_log() -> str:
    if FIXTURE_TEXT is not None:
        return FIXTURE_TEXT
    # the same shape, for a checkout without the shared fixture
    steps = "".join(f"\rstep {i:05d} ({i * 2.0:.1f}%) | loss: {9 - i * 0.1:.6f} | lrm: 1.00 | dt: 1431ms | "
                    f"tok/sec: 5,725 | mfu: 0.0% | epoch: 2 | remaining: {51 - i}s    " for i in range(52))
    return ("Vocab size: 8,192\n" + steps + "\n---\nval_bpb:          1.588468\ntraining_seconds: 60.9\n"
            "total_seconds:    134.7\npeak_vram_mb:     0.0\nmfu_percent:      0.02\ntotal_tokens_M:   0.4\n"
            "num_steps:        52\nnum_params_M:     11.5\ndepth:            4\n")


def test_summary_of_upstream_log(upstream_log):
    summary = logparse.parse_summary(upstream_log)
    assert summary.val_bpb == pytest.approx(1.588468)
    assert summary.training_seconds == pytest.approx(60.9)
    assert summary.total_seconds == pytest.approx(134.7)
    assert summary.peak_vram_mb == 0.0
    assert summary.num_steps == 52
    assert summary.depth == 4


def test_last_progress_line_is_found_among_carriage_returns(upstream_log):
    progress = logparse.last_progress(upstream_log)
    assert progress.step == 51
    assert progress.percent == pytest.approx(99.2) if FIXTURE_TEXT else progress.percent > 90
    assert progress.remaining_s == 0
    assert progress.loss < 5


def test_progress_of_a_partial_log_and_of_no_log():
    partial = "\rstep 00003 (7.5%) | loss: 6.1 | lrm: 1.00 | dt: 9ms | tok/sec: 1 | mfu: 0.0% | epoch: 1 | remaining: 50s"
    assert logparse.last_progress(partial).step == 3
    assert logparse.last_progress("Vocab size: 8,192\n") is None
    nan_line = partial.replace("6.1", "nan")
    assert math.isnan(logparse.last_progress(nan_line).loss)


def test_no_summary_and_fail_detection():
    assert logparse.parse_summary("step 1\nTraceback ...\nRuntimeError: boom\n") is None
    assert logparse.parse_summary("---\nnot a summary\n") is None
    assert logparse.failed("step 00010 ...\nFAIL\n")
    assert not logparse.failed("all fine\nFAILURE is not FAIL\n")


def test_tail_shows_last_frame_of_each_line_and_is_bounded(upstream_log):
    tail = logparse.tail(upstream_log)
    assert tail.splitlines()[-1].startswith("depth:")
    assert "step 00051" in tail and "step 00000" not in tail
    long_text = "\n".join("x" * 5000 for _ in range(100))
    bounded = logparse.tail(long_text)
    assert len(bounded.splitlines()) == logparse.TAIL_LINES
    assert len(bounded) < logparse.TAIL_LINES * (logparse.TAIL_LINE_CHARS + 5)


def test_read_text_keeps_carriage_returns(tmp_path):
    path = tmp_path / "run.log"
    path.write_bytes(b"a\rb\rc\n")
    assert logparse.read_text(path) == "a\rb\rc\n"
    assert logparse.read_tail_bytes(path, 3) == "\rc\n"


def test_rows_are_formatted_as_upstream(tmp_path):
    path, state = tmp_path / "results.tsv", {}
    ledger.add_row(state, ledger.make_row("abc1234", 0.9979, 44.0, "keep", "baseline"))
    ledger.add_row(state, ledger.make_row("def5678", 1.2, 3.3, "crash", "double width (OOM)"))
    ledger.mirror(path, ledger.rows_of(state), None, tmp_path / ".research-loop" / "archive")
    assert path.read_text() == (
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        "abc1234\t0.997900\t44.0\tkeep\tbaseline\n"
        "def5678\t0.000000\t0.0\tcrash\tdouble width (OOM)\n")
    rows, bad = ledger.read_rows(path)
    assert [r.commit for r in rows] == ["abc1234", "def5678"] and bad == 0


@pytest.mark.parametrize("args, message", [
    (("abc1234", 1.0, 1.0, "maybe", "x"), "Unknown status"),
    (("ABC1234", 1.0, 1.0, "keep", "x"), "7-character"),
    (("abc123", 1.0, 1.0, "keep", "x"), "7-character"),
    (("abc1234", 1.0, 1.0, "keep", "a\tb"), "tab"),
    (("abc1234", 1.0, 1.0, "keep", "a\nb"), "line break"),
    (("abc1234", 1.0, 1.0, "keep", "  "), "empty"),
    (("abc1234", float("nan"), 1.0, "keep", "x"), "finite"),
    (("abc1234", 1.0, -1.0, "discard", "x"), "finite"),
    (("abc1234", 0.0, 1.0, "keep", "x"), "only valid for a crash"),
])
def test_bad_rows_are_refused(args, message):
    with pytest.raises(Refusal, match=message):
        ledger.make_row(*args)


def test_duplicate_commit_refused_and_records_unchanged():
    state = {}
    ledger.add_row(state, ledger.make_row("abc1234", 1.0, 1.0, "keep", "baseline"))
    before = json.dumps(state)
    with pytest.raises(Refusal, match="already in"):
        ledger.add_row(state, ledger.make_row("abc1234", 0.9, 1.0, "discard", "again"))
    assert json.dumps(state) == before


def test_rows_made_from_the_state_follow_every_change():
    """rows_of reuses the rows it made for the same list, and extends them when the list grew."""
    state = {}
    for i in range(3):
        ledger.add_row(state, ledger.make_row(f"{i:07x}", 1.0 - i / 10, 1.0, "keep", f"run {i}"))
    assert [r.commit for r in ledger.rows_of(state)] == ["0000000", "0000001", "0000002"]
    assert [r.val_bpb for r in ledger.rows_of({"rows": state["rows"][:2]})] == [1.0, 0.9]
    other = {"rows": [["aaaaaaa", 0.5, 1.0, "discard", "x"], *state["rows"][1:]]}  # same length and last row
    assert ledger.rows_of(other)[0].commit == "aaaaaaa"
    ledger.add_row(other, ledger.make_row("bbbbbbb", 0.4, 1.0, "crash", "y"))
    assert [r.commit for r in ledger.rows_of(other)] == ["aaaaaaa", "0000001", "0000002", "bbbbbbb"]
    assert ledger.rows_of({}) == []


def test_a_foreign_ledger_is_archived_whole_and_rows_are_appended_to_the_servers_own(tmp_path):
    path, archive = tmp_path / "results.tsv", tmp_path / ".research-loop" / "archive"
    foreign = ledger.HEADER + "garbage line\nabc1234\t1.0\t1.0\tkeep\tok"  # no final newline
    path.write_text(foreign)
    rows, bad = ledger.read_rows(path)
    assert len(rows) == 1 and bad == 1  # malformed lines are counted, not fatal
    rows = [ledger.make_row("def5678", 0.9, 1.0, "keep", "next")]
    written, notice = ledger.mirror(path, rows, None, archive)
    assert path.read_text() == ledger.HEADER + "def5678\t0.900000\t1.0\tkeep\tnext\n"
    assert "1 recorded row(s) missing or altered, 2 line(s) the server never wrote" in notice
    assert [p.read_text() for p in archive.iterdir()] == [foreign]  # nothing lost
    inode = path.stat().st_ino
    rows.append(ledger.make_row("aaa1111", 0.8, 1.0, "discard", "then"))
    assert ledger.mirror(path, rows, written, archive)[1] is None
    assert path.stat().st_ino == inode and path.read_text().splitlines()[-1] == "aaa1111\t0.800000\t1.0\tdiscard\tthen"


def test_best_kept_ignores_discards_and_crashes():
    rows = [ledger.make_row("a" * 7, 1.0, 1, "keep", "x"), ledger.make_row("b" * 7, 0.5, 1, "discard", "x"),
            ledger.make_row("c" * 7, 0, 0, "crash", "x"), ledger.make_row("d" * 7, 0.9, 1, "keep", "x")]
    assert ledger.best_kept(rows).commit == "ddddddd"
    assert ledger.best_kept(rows[1:3]) is None


def test_noise_estimate_and_verdict():
    estimate = noise.estimate([1.0, 1.002, 0.998])
    assert estimate.std == pytest.approx(0.002)
    assert estimate.threshold == pytest.approx(0.004)
    assert "beyond noise" in noise.verdict(-0.01, estimate.model_dump())
    assert "within noise" in noise.verdict(-0.001, estimate.model_dump())
    assert "noise not measured: run measure_noise" in noise.verdict(-0.01, None)
    assert "baseline" in noise.verdict(None, None)


def test_one_owner_per_workspace_and_the_lock_dies_with_its_process(tmp_path):
    first, second = State(tmp_path), State(tmp_path)
    assert first.try_own() and first.owned
    assert not second.try_own()  # another open file: as another server would be
    assert second.owner()["pid"] == os.getpid()
    first.release()
    assert second.try_own()
    second.release()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path; from mcp_server.core.state import State\n"
        "assert State(Path(%r)).try_own(); print('owned', flush=True)\n"
        "import time; time.sleep(60)\n") % (str(Path(__file__).parent.parent), str(tmp_path))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "owned"
        assert not first.try_own() and first.owner()["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    assert first.try_own()


def test_state_transactions_of_two_processes_never_lose_an_update(tmp_path):
    """Two servers updating state.json at once: every increment lands and the file stays valid
    (a shared temporary file name and no lock lost updates and corrupted it)."""
    State(tmp_path).update(count=0)
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path; from mcp_server.core.state import State\n"
        "s = State(Path(%r))\n"
        "for _ in range(150):\n"
        "    with s.transaction() as d: d['count'] += 1\n") % (str(Path(__file__).parent.parent), str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    for _ in range(150):
        with State(tmp_path).transaction() as data:
            data["count"] += 1
    assert [p.wait() for p in procs] == [0, 0]
    assert State(tmp_path).load()["count"] == 450
    assert not list((tmp_path / ".research-loop").glob("*.tmp"))


def test_reads_beside_the_owners_writes_never_take_its_own_writes_for_a_change(tmp_path):
    """The owner checks what it reads against what it wrote; a read that lands between the two
    renames of a save (its copy, then state.json) must wait for the save, not report it."""
    state = State(tmp_path)
    assert state.try_own()
    state.update(count=0, rows=[])
    stop = threading.Event()

    def read():
        while not stop.is_set():
            state.load()
    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i in range(150):
            with state.transaction() as data:
                data["count"] += 1
                data["rows"].append([f"{i:07x}", 1.0, 1.0, "discard", f"run {i}"])
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert state.take_notices() == [] and state.load()["count"] == 150
    assert len((tmp_path / "results.tsv").read_text().splitlines()) == 151
    state.release()


def test_time_budget_comes_from_env_record_profile_or_upstream(tmp_path, monkeypatch, repo_root):
    from mcp_server.core.workspace import time_budget
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    assert time_budget(repo_root) == 300.0  # nothing prepared: upstream's budget
    (cache / "prepared.json").write_text(json.dumps({"profile": "cpu"}))
    assert time_budget(repo_root) == 60.0  # read from this project's nanochat/profiles.py
    assert time_budget(tmp_path) == 300.0  # an upstream checkout has no profiles file
    (cache / "prepared.json").write_text(json.dumps({"profile": "cpu", "time_budget": 42}))
    assert time_budget(tmp_path) == 42.0
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "4")
    assert time_budget(repo_root) == 4.0


def test_training_does_not_inherit_the_servers_virtual_env(tmp_path, monkeypatch):
    """The server runs in the plugin's environment; the workspace's `uv run` must find its own,
    and every slot shares the workspace's one environment."""
    monkeypatch.setenv("VIRTUAL_ENV", "/plugin/.venv")
    monkeypatch.delenv("UV_PROJECT_ENVIRONMENT", raising=False)
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "4")  # a run gets its research run's (RunSpec.env), never this
    env = training_env(tmp_path)
    assert "VIRTUAL_ENV" not in env and "AUTORESEARCH_TIME_BUDGET" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert env["UV_PROJECT_ENVIRONMENT"] == str(tmp_path / ".venv")


def test_the_training_environment_gets_its_bytecode_from_the_server(tmp_path, monkeypatch):
    """Runs import from an environment they cannot write (the sandbox), so the server compiles its
    packages' bytecode, even where the server's own environment says not to write any."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    package = tmp_path / "site-packages" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "broken_on_this_python.py").write_text("def f(:\n")  # as torch ships: never stops the rest
    compile_bytecode(sys.executable, str(tmp_path / "site-packages"))
    assert Path(importlib.util.cache_from_source(str(package / "__init__.py"))).is_file()


# --- the run worker -------------------------------------------------------------------------
WORKER = Path(__file__).resolve().parent.parent / "mcp_server" / "scripts" / "worker.py"


def run_worker(tmp_path, code: str, *options: str, stdin=subprocess.DEVNULL) -> tuple[dict, str]:
    log, report = tmp_path / "run.log", tmp_path / "report.json"
    subprocess.run([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), *options,
                    "--", sys.executable, "-c", code], stdin=stdin, check=True, timeout=60)
    return json.loads(report.read_text()), log.read_text()


ESCAPE = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    open('escaped.pid', 'w').write(str(os.getpid()))\\n    time.sleep(300)\\n"], start_new_session=True)
while not os.path.exists('escaped.pid'):
    time.sleep(0.05)
print('---\\nval_bpb: 1.0')
"""


def test_worker_kills_descendants_that_left_the_process_group(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report, log = run_worker(tmp_path, ESCAPE, "--timeout", "30")
    escaped = int((tmp_path / "escaped.pid").read_text())
    assert report["exit_code"] == 0 and report["stray_processes"] >= 1 and report["unkillable"] == 0
    assert "still running when it ended; killed" in log
    assert not os.path.exists(f"/proc/{escaped}") or "Z" in open(f"/proc/{escaped}/stat").read().split()[2]


def test_worker_caps_the_log_but_keeps_its_tail(tmp_path):
    code = "import sys\nfor i in range(200000): print('line', i)\nprint('---'); print('val_bpb: 0.5')"
    report, log = run_worker(tmp_path, code, "--timeout", "30", "--max-log-bytes", "10000")
    assert report["log_truncated"] and len(log) < 10000 + 2**20 + 65536 + 200  # head + tail + a read
    assert log.startswith("line 0\n") and log.rstrip().endswith("val_bpb: 0.5")
    assert "bytes of output dropped here" in log


def test_worker_timeout_ends_a_process_that_ignores_sigterm(tmp_path):
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(100)"
    started = time.monotonic()
    report, log = run_worker(tmp_path, code, "--timeout", "1", "--grace", "1")
    assert report["timed_out"] and time.monotonic() - started < 10
    assert "killed after the 1s timeout" in log


def test_worker_stops_the_run_when_its_server_goes(tmp_path):
    log, report = tmp_path / "run.log", tmp_path / "report.json"
    worker = subprocess.Popen([sys.executable, str(WORKER), "--log", str(log), "--report", str(report),
                               "--timeout", "60", "--watch-stdin", "--", sys.executable, "-c",
                               "import time; print('up', flush=True); time.sleep(100)"], stdin=subprocess.PIPE)
    assert wait_for(lambda: "up" in log.read_text() if log.exists() else False)
    worker.stdin.close()  # what the kernel does when the server dies
    assert worker.wait(timeout=20) == 0
    assert json.loads(report.read_text())["stopped"] == "server gone"


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# --- the sandbox and the validation watch (bubblewrap: the fixture installs it) ---------------------
WAIT_FOR_GO = "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\n"


def sandboxed_run(tmp_path, code: str, *options: str):
    """A run in its sandbox: the folder read-only but its export folder; records beside it."""
    exports = tmp_path / "exports"
    exports.mkdir()
    (tmp_path / "val.parquet").write_bytes(b"validation")
    (tmp_path / "results.tsv").write_text("commit\tval_bpb\n")
    sandbox = json.dumps({"readonly": [str(tmp_path)], "writable": [str(exports)]})
    log, report = tmp_path / "run.log", tmp_path / "report.json"
    worker = subprocess.Popen([sys.executable, str(WORKER), "--log", str(log), "--report", str(report),
                               "--timeout", "60", "--sandbox", sandbox, "--export", str(exports / "model.pt2"),
                               "--val-shard", str(tmp_path / "val.parquet"), *options,
                               "--", sys.executable, "-c", code], cwd=tmp_path)
    return worker, report, log


def test_a_sandboxed_run_is_not_said_to_leave_the_processes_its_sandbox_ends(tmp_path, bubblewrap):
    """Seen once under load: tests/test_server_tools.py::test_nan_fail_and_missing_summary_are_crashes found the
    note "1 process(es) started by the run were still running when it ended; killed" after its FAIL. bubblewrap's
    outer process exits with the run's code as soon as its namespace's init reports it, and that init (bubblewrap's
    own, killed as the outer one exits: --die-with-parent) ends after it, once every process of the namespace has;
    the worker (their subreaper) looked at once and counted what was still ending. Played here with a run whose
    child holds memory, which takes a while to free: the window a busy machine opened by chance. What the sandbox
    ends by itself is not the run's leftover: the tree is given a moment to end before what is left is counted."""
    code = ("import os, sys, time\nif os.fork() == 0:\n    held = b'x' * (1 << 30)\n    open('held', 'w').close()\n"
            "    time.sleep(300)\nwhile not os.path.exists('held'):\n    time.sleep(0.05)\nprint('FAIL')\nsys.exit(1)\n")
    exports = tmp_path / "exports"
    worker, report, log = sandboxed_run(tmp_path, code.replace("'held'", repr(str(exports / "held"))))
    assert worker.wait(timeout=60) == 0
    result = json.loads(report.read_text())
    assert result["sandbox"] and result["exit_code"] == 1, result
    assert result["stray_processes"] == 0 and "still running when it ended" not in log.read_text(), log.read_text()


def test_cuda_is_made_ready_outside_the_sandbox(tmp_path, bubblewrap, monkeypatch):
    """No new privileges inside bubblewrap: the setuid nvidia-modprobe that makes /dev/nvidia-uvm at
    the first CUDA use after a boot must run before, outside (a stand-in records that it did)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-modprobe").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'modprobe.calls'}\n")
    (bin_dir / "nvidia-modprobe").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    worker, report, _ = sandboxed_run(tmp_path, "import os\nprint('calls before:', os.path.exists('modprobe.calls'))")
    assert worker.wait(timeout=30) == 0
    assert json.loads(report.read_text())["sandbox"]
    assert (tmp_path / "modprobe.calls").read_text().split() == ["-u", "-c=0"]
    assert "calls before: True" in (tmp_path / "run.log").read_text()


def test_another_runs_validation_reads_are_not_this_runs(tmp_path, bubblewrap, monkeypatch):
    """Several slots: one run's harness evaluation reads the shared validation shard while another
    run trains. inotify sees every process's opens, so each run is watched on a private copy (where the run
    sees the shard: with the cross-check's setting; otherwise its sandbox hides it, test_integrity.py)."""
    monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")
    code = WAIT_FOR_GO + "open(os.environ['RESEARCH_LOOP_EXPORT'], 'w').write('model')\nprint('val_bpb: 1.0')"
    worker, report, _ = sandboxed_run(tmp_path, code, "--val-shared")
    assert wait_for(lambda: (tmp_path / "report.json").exists())
    for _ in range(3):
        (tmp_path / "val.parquet").read_bytes()  # the other slot's evaluation
    (tmp_path / "go").touch()
    assert worker.wait(timeout=30) == 0
    result = json.loads(report.read_text())
    assert result["sandbox"] and result["exported"] and result["val_watched"]
    assert result["val_opened_before_export"] == 0
    assert not list(tmp_path.glob("*.val-shard"))  # the private copy is gone with the run


def test_a_run_that_reads_validation_data_before_exporting_is_caught_and_cannot_touch_records(tmp_path, bubblewrap,
                                                                                           monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")  # the shard shown, watched (else hidden: test_integrity.py)
    code = ("import os\nopen('val.parquet', 'rb').read()\n"
            "try:\n    open('results.tsv', 'a').write('planted\\t0.1\\n')\nexcept OSError as exc:\n    print('refused:', exc)\n"
            "open(os.environ['RESEARCH_LOOP_EXPORT'], 'w').write('model')\n")
    worker, report, log = sandboxed_run(tmp_path, code, "--val-shared")
    assert worker.wait(timeout=30) == 0
    result = json.loads(report.read_text())
    assert result["val_opened_before_export"] >= 1
    assert "Read-only file system" in log.read_text()
    assert (tmp_path / "results.tsv").read_text() == "commit\tval_bpb\n"


def test_an_unsandboxed_runs_validation_read_names_the_other_processes_that_read_the_same():
    """Unsandboxed, the watch is on the cache's own shard, and inotify counts every process's opens:
    the verdict says so, and what to do, where a sandboxed run's (a private copy) does not."""
    from mcp_server.core import integrity
    unsandboxed, _, _ = integrity.evaluation_verdict({"val_opened_before_export": 1, "sandbox": False})
    sandboxed, _, _ = integrity.evaluation_verdict({"val_opened_before_export": 1, "sandbox": True})
    assert sandboxed == "the training opened the validation data before its model was exported: it may have trained on it"
    assert unsandboxed.startswith(sandboxed) and "AUTORESEARCH_CACHE" in unsandboxed and "second research run" in unsandboxed


def test_a_placeholder_at_the_export_path_does_not_end_the_validation_watch(tmp_path, bubblewrap, monkeypatch):
    """The watch stopped counting when a file appeared at the export path: a run planted an empty
    one, read the validation shard, took it away and exported at the end. The end of the watch is
    the worker's own copy of the exported program now, so here (no evaluation) it never ends. (The
    shard is shown, watched, with the cross-check's setting only.)"""
    monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")
    code = ("import os\npath = os.environ['RESEARCH_LOOP_EXPORT']\nopen(path, 'w').close()\n"
            "open('val.parquet', 'rb').read()\nos.remove(path)\nopen(path, 'w').write('model')\n")
    worker, report, _ = sandboxed_run(tmp_path, code)
    assert worker.wait(timeout=30) == 0
    result = json.loads(report.read_text())
    assert result["exported"] and result["val_opened_before_export"] >= 1, result


# --- the harness evaluation, handed to train.py while it waits ---------------------------------
# A stand-in for nanochat/evaluate_export.py with the same protocol: it is up before the export
# (it writes 'evaluator.up'), a line on stdin says go, the result goes to the descriptor after --out-fd.
FAKE_EVALUATOR = """
import json, os, sys, time
open('evaluator.up', 'w').write(str(os.getpid()))
if not sys.stdin.readline():
    open('evaluator.unused', 'w').write('end of file')
    sys.exit(0)
time.sleep(float(os.environ.get('EVAL_SECONDS', '0')))
os.write(int(sys.argv[-1]), json.dumps({'val_bpb': 1.5, 'causal': True}).encode())
"""
EXPORT_THEN_WAIT = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from nanochat import answer
while not os.path.exists('evaluator.up'):
    time.sleep(0.05)  # the evaluator started with the run, before any export
path = os.environ['RESEARCH_LOOP_EXPORT']
open(path + '.json', 'w').write('{{}}')
open(path, 'w').write('model')
{before_answer}
handed = answer.harness_answer()
print('---')
print('val_bpb:', handed['val_bpb'])
"""
REPO = Path(__file__).resolve().parent.parent


def clean_harness(tmp_path) -> Path:
    """A checkout with nothing changed, added or hidden: what the worker checks before evaluating."""
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "prepare.py").write_text("# the harness\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "h"]):
        subprocess.run(["git", "-C", str(harness), *args], check=True)
    return harness


def fake_evaluation(harness: Path, evaluator: str = FAKE_EVALUATOR, **env: str) -> dict:
    """The worker's --evaluate (before json) for FAKE_EVALUATOR, or `evaluator`, on this harness copy."""
    return {"argv": [sys.executable, "-c", evaluator], "env": dict(os.environ, **env), "timeout": 20,
            "harness": str(harness), "harness_commit": None}


def planting_bytecode(tmp_path) -> str:
    """A run's code that plants bytecode in the harness copy (clean_harness's), which its check finds."""
    return "os.makedirs({d!r}, exist_ok=True); open({f!r}, 'wb').write(b'planted')".format(
        d=str(tmp_path / "harness" / "__pycache__"), f=str(tmp_path / "harness" / "__pycache__" / "prepare.cpython-311.pyc"))


def test_a_harness_copy_changed_during_the_run_makes_the_evaluation_no_result(tmp_path, monkeypatch):
    """Without a sandbox the run can write the harness copy the evaluator imports from: bytecode or
    a module planted there is found after the evaluation, and its number does not stand."""
    monkeypatch.chdir(tmp_path)
    plant = planting_bytecode(tmp_path)
    report, log, _ = handoff_run(tmp_path, before_answer=plant)
    assert "val_bpb" not in report["evaluation"], report
    assert "was changed during the run" in report["evaluation"]["error"] and "__pycache__" in report["evaluation"]["error"]


def test_programs_named_in_the_harness_copys_git_never_run_in_the_worker_nor_speak_on_its_socket(tmp_path,
                                                                                                  monkeypatch):
    """Review 39b: the worker's check of the harness copy ran `git ls-files` there, whose index read runs
    the core.fsmonitor that .git/config names (the agent's to write), and `git status`, which runs the
    clean filter an attribute names. Such a program ran outside the sandbox with the worker's stdin, the
    server's socket, and wrote a report digest of its own there, which the server believed. Now neither
    runs, and no child of the worker holds the socket: the digest the server reads is its report's."""
    import hashlib
    from mcp_server.executors import executor
    from mcp_server.scripts import harness_copy
    monkeypatch.chdir(tmp_path)
    harness = clean_harness(tmp_path)
    ran = tmp_path / "agent-program-ran"
    fsmonitor, clean = tmp_path / "fsmonitor.sh", tmp_path / "clean.sh"
    fsmonitor.write_text(f"#!/bin/sh\necho fsmonitor >> {ran}\nprintf 'report-sha256 {'f' * 64}\\nX' >&0\nexit 1\n")
    clean.write_text(f"#!/bin/sh\necho clean >> {ran}\nprintf 'report-sha256 {'f' * 64}\\nX' >&0\ncat\n")
    for program in (fsmonitor, clean):
        program.chmod(0o755)
    subprocess.run(["git", "-C", str(harness), "config", "core.fsmonitor", str(fsmonitor)], check=True)
    subprocess.run(["git", "-C", str(harness), "config", "filter.agent.clean", str(clean)], check=True)
    (harness / ".git" / "info" / "attributes").write_text("* filter=agent\n")
    os.utime(harness / "prepare.py", (1e9, 1e9))  # stat-dirty: status would hash it through the filter
    evaluate = fake_evaluation(harness)
    report = tmp_path / "report.json"
    worker = executor.with_socket_stdin(
        [sys.executable, str(WORKER), "--log", str(tmp_path / "run.log"), "--report", str(report), "--watch-stdin",
         "--timeout", "30", "--export", str(tmp_path / "model.pt2"), "--evaluate", json.dumps(evaluate), "--",
         sys.executable, "-c", EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer="")])
    try:
        assert worker.wait(timeout=60) == 0
        told = executor.told_digest(worker)
    finally:
        worker.stdin.close()
    assert not ran.exists(), f"the agent's programs ran in the worker's git: {ran.read_text()}"
    assert told == hashlib.sha256(report.read_bytes()).hexdigest()
    assert executor.believed_report(report, told)["evaluation"]["val_bpb"] == 1.5
    # the check compares the files themselves: an edit that an index flag hides from git is found
    subprocess.run(["git", "-c", "core.fsmonitor=false", "-C", str(harness), "update-index", "--assume-unchanged",
                    "prepare.py"], check=True)
    (harness / "prepare.py").write_text("# the harness, edited\n")
    assert "prepare.py" in str(harness_copy.harness_problem(str(harness), None))
    assert not ran.exists()


@pytest.mark.parametrize("failure", ["a note nested past json's depth", "a result that is not an object"])
def test_a_failure_after_the_evaluation_skips_neither_the_answer_nor_the_harness_check(tmp_path, monkeypatch, failure):
    """Review 39b: the export's note (model.pt2.json, written by the run) nested deeper than json's
    parser goes raised RecursionError after the evaluation's number was set: train.py got no answer
    and the harness check never ran, while the number stood. Whatever fails after the evaluation, the
    result is an error and the check runs: here it finds bytecode the run planted in the harness copy."""
    monkeypatch.chdir(tmp_path)
    plant = planting_bytecode(tmp_path)
    code = EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer=plant).replace(
        "handed = answer.harness_answer()",  # it waits 10 s at most, then prints a number of its own
        "deadline = time.time() + 10\nwhile not os.path.exists(os.environ['RESEARCH_LOOP_ANSWER']) and time.time() < deadline:"
        "\n    time.sleep(0.05)\nhanded = answer.harness_answer() if time.time() < deadline else {'val_bpb': 0.5}").replace(
        "handed['val_bpb']", "handed.get('val_bpb', 0.5)")
    evaluator = FAKE_EVALUATOR
    if failure.startswith("a note"):
        code = code.replace("write('{}')", "write('[' * 4096)")
    else:
        evaluator = evaluator.replace("json.dumps({'val_bpb': 1.5, 'causal': True})", "json.dumps([1.5])")
    evaluate = fake_evaluation(clean_harness(tmp_path), evaluator)
    report, log = run_worker(tmp_path, code, "--timeout", "30", "--export", str(tmp_path / "model.pt2"),
                             "--evaluate", json.dumps(evaluate))
    assert "val_bpb" not in report.get("evaluation", {}), report
    assert "was changed during the run" in report["evaluation"]["error"], report
    assert re.search(r"^harness evaluation: \{.*\} \(waited", log, re.M), log  # train.py had its answer


def handoff_run(tmp_path, before_answer="", eval_seconds=0.0, timeout=30):
    evaluate = fake_evaluation(clean_harness(tmp_path), EVAL_SECONDS=str(eval_seconds))
    code = EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer=before_answer)
    started = time.monotonic()
    report, log = run_worker(tmp_path, code, "--timeout", str(timeout), "--export", str(tmp_path / "model.pt2"),
                             "--evaluate", json.dumps(evaluate))
    return report, log, time.monotonic() - started


def run_with_export(tmp_path, monkeypatch, writes: str) -> dict:
    """A run whose export is what the code `writes` leaves at `path`, and which prints a number of its
    own: the worker's report."""
    monkeypatch.chdir(tmp_path)
    evaluate = fake_evaluation(clean_harness(tmp_path))
    code = EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer="").replace(
        "open(path, 'w').write('model')", writes).replace("handed['val_bpb']", "handed.get('val_bpb', 0.5)")
    report, _ = run_worker(tmp_path, code, "--timeout", "30", "--export", str(tmp_path / "model.pt2"),
                           "--evaluate", json.dumps(evaluate))
    return report


def test_an_export_larger_than_any_model_is_a_crash_not_a_copy(tmp_path, monkeypatch):
    """A 50 GiB sparse file at the export path costs the run a few bytes of disk; the harness's copy
    of it would fill the disk. It is refused at once, and the run is no result, whatever it prints."""
    from mcp_server.core import integrity
    started = time.monotonic()
    report = run_with_export(tmp_path, monkeypatch, "open(path, 'w').truncate(50 << 30)")
    assert (tmp_path / "model.pt2").stat().st_size == 50 << 30 and time.monotonic() - started < 20
    problem, number, _ = integrity.evaluation_verdict(report)
    assert number is None and "over 16 GiB, more than a real export of the model can be" in str(problem), report


def test_a_sparse_export_is_refused_before_the_harness_copies_it_into_memory(tmp_path, monkeypatch):
    """Review 39b: the harness copies the export into a memfd (the worker's memory) before any check of
    its content; a sparse file under the 16 GiB cap costs the run no disk and the worker as much RAM
    (per slot). A file that is mostly holes is refused before the copy, and the run is no result."""
    from mcp_server.core import integrity
    report = run_with_export(tmp_path, monkeypatch,
                             "f = open(path, 'w'); f.write('model'); f.truncate(256 << 20); f.close()")
    assert os.stat(tmp_path / "model.pt2").st_blocks * 512 < 1 << 20  # no disk taken
    problem, number, _ = integrity.evaluation_verdict(report)
    assert number is None and "is a sparse file" in str(problem) and "MiB are holes" in str(problem), report


def test_harness_inputs_swapped_after_setup_make_the_run_no_result(tmp_path, monkeypatch):
    """The agent swaps the tokenizer (or its byte table, or the validation shard, same size) after
    setup: each run is checked against what setup pinned, never against a hash taken as it starts."""
    from mcp_server.core import integrity
    from mcp_server.core.models import Refusal
    from server_support import make_cache
    monkeypatch.chdir(tmp_path)
    cache = make_cache(tmp_path)  # a record from before prepare pinned the shard's content
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    for rel, content in (("tokenizer/tokenizer.pkl", b"merges"), ("tokenizer/token_bytes.pt", b"\x01\x02"),
                         ("data/shard_00000.parquet", b"train"), ("data/shard_00001.parquet", b"validation")):
        (cache / rel).parent.mkdir(exist_ok=True)
        (cache / rel).write_bytes(content)
    pins = integrity.input_pins()  # setup
    harness = clean_harness(tmp_path)

    def scored(**swapped) -> dict:
        for rel, content in swapped.items():
            (cache / rel.replace("__", "/")).write_bytes(content)
        spec = dict(integrity.evaluation_spec(harness, None, 20, pins), argv=[sys.executable, "-c", FAKE_EVALUATOR])
        code = EXPORT_THEN_WAIT.format(repo=str(REPO), before_answer="").replace(
            "handed['val_bpb']", "handed.get('val_bpb', 0.5)")  # it prints a number whatever it is told
        report, _ = run_worker(tmp_path, code, "--timeout", "30", "--export", str(tmp_path / "model.pt2"),
                               "--evaluate", json.dumps(spec))
        (tmp_path / "model.pt2").unlink()
        return report["evaluation"]

    assert scored()["val_bpb"] == 1.5
    for rel, content, honest in (("tokenizer__tokenizer.pkl", b"MERGES", b"merges"),
                                 ("data__shard_00001.parquet", b"VALIDATION", b"validation")):
        assert "is not what prepare made" in scored(**{rel: content})["problem"], rel
        scored(**{rel: honest})
    integrity.check_pins(pins)
    (cache / "tokenizer" / "token_bytes.pt").write_bytes(b"\x02\x04")  # a doubled table halves val_bpb
    with pytest.raises(Refusal, match=r"token_bytes.pt is not the file this research run was set up with.*"
                                      r"re-run `uv run prepare.py` and call setup\(tag\)"):
        integrity.check_pins(pins)


def test_the_harness_number_is_handed_to_train_py_and_the_evaluation_is_not_training_time(tmp_path, monkeypatch):
    """train.py waits in the harness for the separate evaluation's number and prints it; the wait
    does not count against the training's timeout (5 s of evaluation in a run with a 3 s timeout)."""
    monkeypatch.chdir(tmp_path)
    report, log, _ = handoff_run(tmp_path, eval_seconds=5, timeout=3)
    assert not report["timed_out"] and report["exit_code"] == 0, log
    assert report["evaluation"]["val_bpb"] == 1.5 and report["evaluation"]["wall_seconds"] >= 5
    assert re.search(r"^harness evaluation: \{\"val_bpb\": 1.5\} \(waited \d", log, re.M), log
    assert "val_bpb: 1.5" in log


def test_a_number_train_py_writes_in_place_of_the_answer_is_not_the_result(tmp_path, monkeypatch):
    """The answer file is in the run's writable export folder: train.py can print what it likes,
    but the report's number comes through the evaluator's pipe."""
    monkeypatch.chdir(tmp_path)
    forge = "open(os.environ['RESEARCH_LOOP_ANSWER'], 'w').write(json.dumps({'val_bpb': 0.1}))"
    report, log, _ = handoff_run(tmp_path, before_answer=forge, eval_seconds=1)
    assert report["evaluation"]["val_bpb"] == 1.5 and "val_bpb: 0.1" in log


def test_an_evaluator_started_for_a_run_that_never_exports_exits_unused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluate = fake_evaluation(clean_harness(tmp_path))
    code = "import os, time\nwhile not os.path.exists('evaluator.up'):\n    time.sleep(0.05)\nprint('---\\nval_bpb: 1.0')"
    report, log = run_worker(tmp_path, code, "--timeout", "30", "--export", str(tmp_path / "model.pt2"),
                             "--evaluate", json.dumps(evaluate))
    assert report["exit_code"] == 0 and not report["exported"] and "evaluation" not in report
    assert (tmp_path / "evaluator.unused").exists() and report["stray_processes"] == 0
    pid = int((tmp_path / "evaluator.up").read_text())
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def test_a_link_planted_where_the_answer_goes_cannot_make_the_worker_write_elsewhere(tmp_path, monkeypatch):
    """The worker writes the answer into the run's writable folder from outside the sandbox: a
    symlink the run put there must not turn that write into one on the records."""
    monkeypatch.chdir(tmp_path)
    records = tmp_path / "results.tsv"
    records.write_text("commit\tval_bpb\n")
    answer_dir = tmp_path
    plant = (f"os.symlink({str(records)!r}, os.environ['RESEARCH_LOOP_ANSWER'])\n"
             # and where a temporary file would be, by the obvious name
             f"os.symlink({str(records)!r}, {str(answer_dir / '.model.pt2.answer.json.tmp')!r})\n"
             "time.sleep(2)")
    handoff_run(tmp_path, before_answer=plant)
    answer = tmp_path / "model.pt2.answer.json"
    assert records.read_text() == "commit\tval_bpb\n"
    assert not answer.is_symlink() and json.loads(answer.read_text()) == {"val_bpb": 1.5}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask 022", "umask 077"])
def test_a_rewritten_record_keeps_the_users_umask(tmp_path, umask, mode):
    """The temp-file-then-rename write gives the mode a new file gets under the user's umask: a user who
    keeps their files private (077) gets a private ledger, as appending to it would."""
    path = tmp_path / "results.tsv"
    code = ("import sys; from pathlib import Path; from mcp_server.core import ledger; "
            "p = Path(sys.argv[1]); ledger.replace_bytes(p, b'rewritten'); ledger._append_bytes(p.with_suffix('.new'), b'x')")
    subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); {code}", str(path)], check=True)
    assert path.read_bytes() == b"rewritten"
    assert oct(path.stat().st_mode & 0o777) == oct(mode)
    assert oct(path.with_suffix(".new").stat().st_mode & 0o777) == oct(mode)


def test_shown_delta_takes_each_runs_base_from_the_last_keep_row_of_its_parent():
    """Review 75: shown_delta scanned the ledger's rows for each record (history and the report: quadratic in a
    night's length); the bases are now looked up in one map of the last keep row per commit, with the same answers:
    no delta over a best the harness did not measure, nor for train.py's own number."""
    from mcp_server.core import history, limits
    from mcp_server.core.models import Row

    def row(commit, status, description="idea"):
        return Row(commit=commit * 7, val_bpb=1.0, memory_gb=1.0, status=status, description=description)

    def delta(parent, **result):
        record = {"result": {"delta": -0.1, **result}, "run": {"parent": parent and parent * 40}}
        return history.shown_delta(record, kept)
    kept = history.last_keeps([row("a", "keep"), row("b", "keep", "mine" + limits.LOGGED_BY_HAND), row("a", "discard"),
                               row("c", "keep"), row("c", "keep", "printed" + limits.UNVERIFIED), row("d", "crash")])
    assert [delta(p) for p in ("a", "b", "c", "d", None)] == [-0.1, None, None, -0.1, -0.1]
    assert delta("a", verified=False) is None and delta("a", verified=True) == -0.1
