"""Log parsing, ledger rows and the run lock, without a server."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_server import ledger, logparse, noise
from mcp_server.runner import Run
from mcp_server.models import Refusal
from mcp_server.state import State

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
    path = tmp_path / "results.tsv"
    ledger.append_row(path, ledger.make_row("abc1234", 0.9979, 44.0, "keep", "baseline"))
    ledger.append_row(path, ledger.make_row("def5678", 1.2, 3.3, "crash", "double width (OOM)"))
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


def test_duplicate_commit_refused_and_file_unchanged(tmp_path):
    path = tmp_path / "results.tsv"
    ledger.append_row(path, ledger.make_row("abc1234", 1.0, 1.0, "keep", "baseline"))
    before = path.read_bytes()
    with pytest.raises(Refusal, match="already in"):
        ledger.append_row(path, ledger.make_row("abc1234", 0.9, 1.0, "discard", "again"))
    assert path.read_bytes() == before


def test_malformed_lines_are_counted_not_fatal_and_never_glued(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text(ledger.HEADER + "garbage line\nabc1234\t1.0\t1.0\tkeep\tok")  # no final newline
    rows, bad = ledger.read_rows(path)
    assert len(rows) == 1 and bad == 1
    ledger.append_row(path, ledger.make_row("def5678", 0.9, 1.0, "keep", "next"))
    assert path.read_text().splitlines()[-2:] == ["abc1234\t1.0\t1.0\tkeep\tok", "def5678\t0.900000\t1.0\tkeep\tnext"]


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


def test_lock_is_exclusive_and_recovered_from_a_dead_holder(tmp_path):
    state = State(tmp_path)
    assert state.acquire_run_lock() is None
    # a live holder (another process) keeps it
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        state.lock_path.write_text(json.dumps({"pid": sleeper.pid, "start": None}))
        assert state.acquire_run_lock()["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    # once it is dead, the lock is stale and taken over
    assert state.acquire_run_lock() is None
    assert json.loads(state.lock_path.read_text())["pid"] == os.getpid()
    # a reused pid (same pid, other start time) does not count as the holder
    state.lock_path.write_text(json.dumps({"pid": os.getpid(), "start": "1"}))
    assert state.acquire_run_lock() is None
    state.release_run_lock()
    assert not state.lock_path.exists()


def test_state_writes_are_atomic_replacements(tmp_path):
    state = State(tmp_path)
    state.update(branch="autoresearch/x", seq=3)
    state.update(seq=4)
    assert state.load() == {"branch": "autoresearch/x", "seq": 4}
    assert not list(state.dir.glob("*.tmp"))


def test_time_budget_comes_from_env_record_profile_or_upstream(tmp_path, monkeypatch, repo_root):
    from mcp_server.workspace import time_budget
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
    """The server runs in the plugin's environment; the workspace's `uv run` must find its own."""
    monkeypatch.setenv("VIRTUAL_ENV", "/plugin/.venv")
    show = "import os; print('VIRTUAL_ENV=' + os.environ.get('VIRTUAL_ENV', '(unset)'), os.environ['PYTHONUNBUFFERED'])"
    run = Run([sys.executable, "-c", show], cwd=tmp_path, log_path=tmp_path / "run.log", timeout=60)
    assert run.done.wait(60)
    assert run.exit_code == 0
    assert (tmp_path / "run.log").read_text().strip() == "VIRTUAL_ENV=(unset) 1"
