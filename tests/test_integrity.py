"""The number in the ledger is the harness's: each way a train.py (or an agent between runs) could
bend it, played by the fake trainer, is refused or marked with the reason in the answer.

The export, the separate evaluation and the causality check need the real train.py: they are in
test_server_e2e.py."""
import contextlib
import ctypes
import json
import os
import select
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ensure_debian_package
from server_support import Lab, answer, error, git, ledger_lines, make_cache, make_workspace, set_knobs, wait_until


@pytest.fixture
def sandboxed_lab(fake_env, bubblewrap):
    """Without the opt-in: these runs must be sandboxed, or refused."""
    lab = Lab(make_workspace(fake_env), unsandboxed=False)
    yield lab
    lab.loop.shutdown()


def start(lab, **knobs):
    """setup, then the attack's train.py, then its run."""
    answer(lab.call("setup", tag="integrity"))
    set_knobs(lab.ws, **knobs)
    return lab.call("run_experiment", description="the attack")


def test_a_run_that_trains_four_times_its_budget_is_no_result(fake_env, bubblewrap):
    make_cache(fake_env, budget=1.0)
    lab = Lab(make_workspace(fake_env))
    try:
        run = answer(start(lab, SLEEP=4, STEPS=8))
    finally:
        lab.loop.shutdown()
    assert run["status"] == "crash" and "over the 1s budget" in run["tail"], run
    assert answer(lab.call("discard", reason="over budget"))["row"]["status"] == "crash"


def test_a_run_that_trains_past_its_budget_and_says_it_did_not_is_no_result(fake_env, bubblewrap, monkeypatch):
    """Review 46: the training time is train.py's own report, checked only against its budget and the run's
    wall; a run's timeout is the agent's to raise (up to a day). A train.py that trained eight times its budget (here six)
    and printed a training time within it was kept as ok. So was one whose budget the agent raised in the
    prepared record while it trained (the server read it again when it recorded the run), and put back before
    the next run's check of the cache. What a run may take is fixed when it is submitted: the budget, and
    the server's own timeout for it as the most wall time a result may take, whatever timeout was asked."""
    from mcp_server.core import workspace
    monkeypatch.setattr(workspace, "MIN_TIMEOUT_MARGIN_S", 2.0)  # the server's timeout for a 1 s budget: 3 s
    cache = make_cache(fake_env, budget=1.0)
    lab = Lab(make_workspace(fake_env))
    try:
        answer(lab.call("setup", tag="integrity"))
        set_knobs(lab.ws, SLEEP=6, STEPS=8, CLAIM_SECONDS=0.9)  # past 3 s * 1.05 + the clocks' 2 s of slack
        run = answer(lab.call("run_experiment", description="six budgets", timeout_seconds=60))
        assert run["status"] == "crash" and "more than the 3s" in run["tail"], run
        lab.ok("discard")
        record = (cache / "prepared.json").read_text()
        set_knobs(lab.ws, SLEEP=1.6, STEPS=8)  # honest: training_seconds 1.6, over one step past 1 s; its wall well in 5 s
        answer(lab.call("run_experiment", description="a longer budget", wait=False))
        (cache / "prepared.json").write_text(json.dumps(dict(json.loads(record), time_budget=10.0)))
        run = answer(lab.call("wait"))["results"][0]
        (cache / "prepared.json").write_text(record)
        assert run["status"] == "crash" and "over the 1s budget" in run["tail"], run
    finally:
        lab.loop.shutdown()


class RecordSwapper(threading.Thread):
    """The agent's process beside the server: it watches the cache folder (inotify) and, as soon as the
    server has read prepared.json once (its check against setup's fingerprint), puts an edited record in its
    place, then the original back after the server's next read: each check sees the record as set up."""

    def __init__(self, cache: Path, edited: dict):
        super().__init__(daemon=True)
        self.path, self.reads = cache / "prepared.json", 0
        self.original = self.path.read_bytes()
        for name, data in (("edited", json.dumps(edited).encode()), ("original", self.original)):
            (cache / f".{name}").write_bytes(data)
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0 and libc.inotify_add_watch(self.fd, bytes(cache), 0x10) >= 0  # IN_CLOSE_NOWRITE
        self.done = threading.Event()

    def run(self):
        from mcp_server.scripts import inotify_events
        while not self.done.is_set():
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            for _, _, name in inotify_events.queued(self.fd):
                if name == "prepared.json" and self.reads < 2:
                    self.reads += 1
                    os.link(self.path.parent / (".edited" if self.reads == 1 else ".original"), f"{self.path}.new")
                    os.replace(f"{self.path}.new", self.path)

    def stop(self):
        self.done.set()
        self.join()
        os.close(self.fd)


def test_a_budget_swapped_in_the_record_between_its_check_and_its_read_is_not_the_runs(fake_env, bubblewrap,
                                                                                        monkeypatch):
    """Review 48: submit checked the prepared record against setup's fingerprint, then read it again for the
    budget a quarter of a second later (the environment's check and the commit came between). The agent's
    process put a ten times longer budget there after the check and the original back after the read: a run
    that trained eight times its budget was ok, with its budget and the wall it may take ten times the
    research run's. The budget (and the flops clock's rate) now come from the very bytes that were checked."""
    from mcp_server.core import workspace
    monkeypatch.setattr(workspace, "MIN_TIMEOUT_MARGIN_S", 2.0)  # the server's timeout for a 1 s budget: 3 s
    cache = make_cache(fake_env, budget=1.0)
    lab = Lab(make_workspace(fake_env))
    try:
        answer(lab.call("setup", tag="integrity"))
        set_knobs(lab.ws, SLEEP=8, STEPS=8)  # honest about its time: 8 s of training
        swapper = RecordSwapper(cache, dict(json.loads((cache / "prepared.json").read_text()), time_budget=10.0))
        swapper.start()
        try:
            run = answer(lab.call("run_experiment", description="ten budgets", timeout_seconds=60))
        finally:
            swapper.stop()
        assert swapper.reads == 2 and (cache / "prepared.json").read_bytes() == swapper.original
        # judged by the budget checked (or, where the swap comes before the run starts, not started)
        assert run["status"] == "crash" and ("more than the 3s" in run["tail"] or "changed since setup" in run["tail"]), run
    finally:
        lab.loop.shutdown()


def test_a_run_that_claims_more_training_than_its_worker_measured_is_no_result(sandboxed_lab):
    # within the 60 s budget, but the run took a second
    run = answer(start(sandboxed_lab, CLAIM_SECONDS=45))
    assert run["status"] == "crash" and "reports 45.0s of training, but the whole run took" in run["tail"], run


def test_the_training_process_cannot_write_the_ledger_or_the_state(sandboxed_lab):
    ws = sandboxed_lab.ws
    run = answer(start(sandboxed_lab, TAMPER=1, VAL_BPB=0.9))
    log = (ws / run["log"]).read_text()
    assert "tamper: refused results.tsv" in log and "tamper: refused .research-loop/state.json" in log, log
    # nothing outside the run's own folders either: no file in the user's home, no new .git link
    assert "tamper: refused home" in log and "tamper: refused .git" in log, log
    assert run["status"] == "ok" and "planted" not in (ws / "results.tsv").read_text()
    assert answer(sandboxed_lab.call("keep", note="honest"))["row"]["val_bpb"] == 0.9
    status = answer(sandboxed_lab.call("status"))
    assert status["best_val_bpb"] == 0.9 and len(ledger_lines(ws)) == 2


def test_a_run_cannot_read_where_the_validation_text_comes_from(fake_env, bubblewrap, monkeypatch):
    """The validation shard is cut from a data set's source: a downloaded file, the user's folder, or
    the standard library picked by the cache's secret seed. A train.py that read one could rebuild
    the validation text and train on it; in its sandbox each is empty, while the cache's other files
    stay readable."""
    cache, folder = fake_env / "cache", fake_env / "my-texts"
    folder.mkdir()
    (folder / "book.txt").write_text("SECRET-FOLDER")
    (cache / "downloads").mkdir()
    (cache / "downloads" / "TinyStoriesV2-GPT4-valid.txt").write_text("SECRET-DOWNLOAD")
    (cache / "offline_seed").write_text("SECRET-SEED")
    record = json.loads((cache / "prepared.json").read_text())
    (cache / "prepared.json").write_text(json.dumps(dict(record, dataset=str(folder))))
    sources = [folder / "book.txt", cache / "downloads" / "TinyStoriesV2-GPT4-valid.txt", cache / "offline_seed"]
    monkeypatch.setenv("FAKE_READ", ",".join(map(str, [*sources, cache / "prepared.json"])))
    lab = Lab(make_workspace(fake_env), unsandboxed=False)
    try:
        run = answer(start(lab, VAL_BPB=0.9))
    finally:
        lab.loop.shutdown()
    log = (lab.ws / run["log"]).read_text()
    assert run["status"] == "ok" and '"profile": "cpu"' in log, log  # the reads ran, the record was readable
    assert "SECRET" not in log, log
    assert all(f"read {path}: refused" in log or f"read {path}: ''" in log for path in sources), log


def test_an_edited_prepared_record_or_an_added_shard_is_refused(sandboxed_lab, fake_env):
    cache = fake_env / "cache"
    (cache / "data").mkdir()
    (cache / "data" / "shard_00000.parquet").write_bytes(b"train")
    answer(sandboxed_lab.call("setup", tag="cache"))
    record = json.loads((cache / "prepared.json").read_text())
    (cache / "prepared.json").write_text(json.dumps(dict(record, time_budget=600)))
    refused = error(sandboxed_lab.call("run_experiment", description="a longer budget"))
    assert "changed since setup" in refused and "prepared.json edited" in refused
    (cache / "prepared.json").write_text(json.dumps(record))
    (cache / "data" / "shard_00001.parquet").write_bytes(b"a new last shard: the validation split would move")
    assert "changed since setup" in error(sandboxed_lab.call("run_experiment", description="moved split"))
    (cache / "data" / "shard_00001.parquet").unlink()
    assert answer(sandboxed_lab.call("run_experiment", description="as prepared"))["status"] == "ok"


def test_a_train_shard_rewritten_at_its_size_is_refused_and_one_rewritten_during_a_run_makes_it_no_result(
        sandboxed_lab, fake_env):
    """Review 64: the cache's fingerprint holds the data shards' names and sizes only. A train shard rewritten at
    its size (the validation text in it, here its bytes) changed what every later run trained on, with train.py
    and its diff as they were. Now setup pins the shards' content: a rewritten shard is refused until it is put
    back, and one rewritten once a run's check passed, put back before its end, makes that run no result."""
    data = fake_env / "cache" / "data"
    data.mkdir()
    train, val = data / "shard_00000.parquet", data / "shard_00001.parquet"
    train.write_bytes(b"the train text")
    val.write_bytes(b"the validation")
    answer(sandboxed_lab.call("setup", tag="shards"))
    train.write_bytes(val.read_bytes())
    refused = error(sandboxed_lab.call("run_experiment", description="trained on the validation text"))
    assert "shard_00000.parquet" in refused and "content changed since setup" in refused, refused
    train.write_bytes(b"the train text")  # its content is setup's again, whatever its stat says
    assert answer(sandboxed_lab.call("run_experiment", description="as prepared"))["status"] == "ok"
    answer(sandboxed_lab.call("discard"))
    set_knobs(sandboxed_lab.ws, SLEEP=2)
    answer(sandboxed_lab.call("run_experiment", description="the shard swapped while it trains", wait=False))
    train.write_bytes(val.read_bytes())
    train.write_bytes(b"the train text")
    result = answer(sandboxed_lab.call("wait"))["results"][0]
    assert result["status"] == "crash" and str(train) in result["tail"], result


def test_a_shard_swapped_through_a_link_added_or_its_folder_swapped_during_a_run_makes_it_no_result(
        sandboxed_lab, fake_env):
    """Review 67: the data pin's stat followed links and looked at the shards only. A train shard made a link to a
    copy of itself passed the check (same content), and its target swapped for the validation text while the run
    trained, put back before its end, moved no stat the pin held; nor did a shard added for the run to list and
    removed before its end, or the data folder swapped for another and put back. A shard that is not a plain file
    is now refused, and the folder's own stat counts: each of these runs is no result."""
    data = fake_env / "cache" / "data"
    data.mkdir()
    train, val = data / "shard_00000.parquet", data / "shard_00001.parquet"
    train.write_bytes(b"the train text")
    val.write_bytes(b"the validation")
    answer(sandboxed_lab.call("setup", tag="links"))
    same, other = fake_env / "same.parquet", fake_env / "other.parquet"
    same.write_bytes(train.read_bytes())
    other.write_bytes(val.read_bytes())
    train.unlink()
    train.symlink_to(same)
    refused = error(sandboxed_lab.call("run_experiment", description="trained through a link"))
    assert "shard_00000.parquet" in refused and "not a plain file" in refused, refused
    train.unlink()
    train.write_bytes(same.read_bytes())
    assert answer(sandboxed_lab.call("run_experiment", description="as prepared"))["status"] == "ok"
    answer(sandboxed_lab.call("discard"))
    set_knobs(sandboxed_lab.ws, SLEEP=2)
    added = data / "shard_00000a.parquet"

    def add_and_remove():
        added.write_bytes(val.read_bytes())
        added.unlink()

    def swap_the_folder():
        (fake_env / "tampered").mkdir()
        (fake_env / "tampered" / train.name).write_bytes(val.read_bytes())
        (fake_env / "tampered" / val.name).write_bytes(val.read_bytes())
        data.rename(fake_env / "kept")
        (fake_env / "tampered").rename(data)
        data.rename(fake_env / "tampered")
        (fake_env / "kept").rename(data)

    for n, tamper in enumerate((add_and_remove, swap_the_folder)):
        answer(sandboxed_lab.call("run_experiment", description=f"tampered {n}", wait=False, rerun=n > 0))
        tamper()
        result = answer(sandboxed_lab.call("wait"))["results"][0]
        assert result["status"] == "crash" and str(data) in result["tail"], result
        answer(sandboxed_lab.call("discard"))


def test_a_data_folder_made_a_chain_of_links_is_refused(sandboxed_lab, fake_env, monkeypatch):
    """Review 67: the data folder made a link to a link to itself between runs passed the check (the same shards);
    the middle link pointed at a copy whose train shard holds the validation text while a run read it, and back
    before its end, moved neither the first link's stat nor the folder's nor the shards', and the worker's one look
    at the data folder its sandbox shows comes in the run's first moments (a real train.py lists its shards seconds
    later). A data folder that is a link is refused, saying how to keep it on another disk."""
    data = fake_env / "cache" / "data"
    data.mkdir()
    train = data / "shard_00000.parquet"
    train.write_bytes(b"the train text")
    (data / "shard_00001.parquet").write_bytes(b"the validation")
    answer(sandboxed_lab.call("setup", tag="chained"))
    # in the cache: the sandbox shows it (links elsewhere in the machine's /tmp would lead nowhere in its own /tmp)
    real, middle, copy = (fake_env / "cache" / name for name in ("real-data", "middle", "copy"))
    data.rename(real)
    middle.symlink_to(real)
    data.symlink_to(middle)
    shutil.copytree(real, copy)
    (copy / train.name).write_bytes(b"the validation")
    monkeypatch.setenv("FAKE_READ", str(train))
    set_knobs(sandboxed_lab.ws, SLEEP=2)
    started = sandboxed_lab.call("run_experiment", description="through the chain", wait=False)
    if not started.is_error:  # the agent's part, where the check let it through
        middle.unlink()
        middle.symlink_to(copy)
        log = sandboxed_lab.ws / answer(started)["log"]
        wait_until(lambda: "read " in log.read_text(errors="replace"), 30)
        middle.unlink()
        middle.symlink_to(real)
        pytest.fail(f"{log.read_text()}\n{answer(sandboxed_lab.call('wait'))['results'][0]}")
    assert "is a link" in error(started) and "AUTORESEARCH_CACHE" in error(started)


def test_a_cache_swapped_as_its_run_starts_and_put_back_makes_the_run_no_result(sandboxed_lab, fake_env, monkeypatch):
    """Review 67: the sandbox binds the prepared cache as it finds it when the run starts, a moment after the
    dispatch's check of the data. The cache swapped in that moment for a copy whose train shard holds the validation
    text, and put back once the run read it, left the checked folder untouched at the path the run's end looks at:
    the run trained on the copy and was a result. The worker now compares the data folder the sandbox shows with the
    one the check looked at: the run is no result."""
    from mcp_server.core import integrity
    cache = fake_env / "cache"
    (cache / "data").mkdir()
    train = cache / "data" / "shard_00000.parquet"
    train.write_bytes(b"the train text")
    (cache / "data" / "shard_00001.parquet").write_bytes(b"the validation")
    answer(sandboxed_lab.call("setup", tag="swapped"))
    checked = integrity.worker_args

    def then_swapped(*args, **kwargs):  # the agent's process, as soon as the check passed
        found = checked(*args, **kwargs)
        shutil.copytree(cache, fake_env / "copy")
        (fake_env / "copy" / "data" / train.name).write_bytes(b"the validation")
        cache.rename(fake_env / "kept")
        (fake_env / "copy").rename(cache)
        return found
    monkeypatch.setattr(integrity, "worker_args", then_swapped)
    monkeypatch.setenv("FAKE_READ", str(train))
    set_knobs(sandboxed_lab.ws, SLEEP=2)
    log = sandboxed_lab.ws / answer(sandboxed_lab.call("run_experiment", description="swapped", wait=False))["log"]
    assert wait_until(lambda: "the validation" in log.read_text(errors="replace"), 30), log.read_text()
    cache.rename(fake_env / "copy")
    (fake_env / "kept").rename(cache)  # put back: the run's end finds the checked folder as it was
    result = answer(sandboxed_lab.call("wait"))["results"][0]
    assert result["status"] == "crash" and "not the one the server checked" in result["tail"], result


def test_changes_hidden_from_git_by_index_flags_are_refused(sandboxed_lab):
    ws = sandboxed_lab.ws
    answer(sandboxed_lab.call("setup", tag="hidden"))
    git(ws, "update-index", "--assume-unchanged", "prepare.py")
    (ws / "prepare.py").write_text("# harness stand-in, edited where no diff shows it\nMAX_SEQ_LEN = 8\n")
    assert git(ws, "status", "--porcelain") == ""  # what the agent hoped for
    refused = error(sandboxed_lab.call("run_experiment", description="hidden harness edit"))
    assert "assume-unchanged" in refused and "prepare.py" in refused
    git(ws, "update-index", "--no-assume-unchanged", "prepare.py")
    assert "Only train.py may change" in error(sandboxed_lab.call("run_experiment", description="visible now"))


def test_untracked_files_in_the_workspace_never_reach_a_run(sandboxed_lab):
    """A module that shadows the harness, or an interpreter start-up hook, left untracked in the
    workspace: runs execute in a checkout of the candidate commit, where it does not exist."""
    ws = sandboxed_lab.ws
    for name in ("sitecustomize.py", "nanochat/evaluation.py"):
        (ws / name).write_text("raise SystemExit('the shadow ran')\n")
    run = answer(start(sandboxed_lab, VAL_BPB=1.0))
    assert run["status"] == "ok" and "the shadow ran" not in (ws / run["log"]).read_text()
    tracked = git(ws, "ls-tree", "-r", "--name-only", f"refs/research-loop/runs/{run['run']}").split()
    assert "sitecustomize.py" not in tracked and "nanochat/evaluation.py" not in tracked
    assert (ws / "sitecustomize.py").exists()  # the user's files are left alone



@contextlib.contextmanager
def stalled(path: Path):
    """A named pipe at `path` while inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    try:
        yield
    finally:
        path.unlink()


HOOKS = ("post-checkout", "post-commit", "post-index-change", "reference-transaction", "pre-auto-gc")


def test_hooks_the_agent_plants_in_the_repository_never_run_in_the_servers_git(lab):
    """Sleeping hooks (and an fsmonitor) would hang every dispatch under the state lock, and act on the
    server's checkouts: the server's git runs none of them, from setup to keep."""
    ws, ran = lab.ws, lab.ws.parent / "hook-ran"
    hook = f"#!/bin/sh\necho \"$0\" >> {ran}\nsleep 20\n"
    for name in HOOKS:
        (ws / ".git" / "hooks" / name).write_text(hook)
        (ws / ".git" / "hooks" / name).chmod(0o755)
    (ws / ".git" / "fsmonitor").write_text(hook)
    (ws / ".git" / "fsmonitor").chmod(0o755)
    git(ws, "config", "core.fsmonitor", str(ws / ".git" / "fsmonitor"))
    lab.baseline()
    assert lab.loop.state.load()["input_pins"] == {}  # pinned at setup (this fake cache holds no tokenizer)
    set_knobs(lab.ws, VAL_BPB=0.9)
    assert lab.ok("run_experiment", description="after the hooks")["status"] == "ok"
    lab.ok("keep", unconfirmed=True)
    set_knobs(lab.ws, VAL_BPB=0.95)
    lab.ok("run_experiment", description="worse")
    lab.ok("discard")
    assert not ran.exists(), f"the agent's hooks ran: {ran.read_text()}"


def test_a_git_call_that_hangs_is_stopped_with_a_clear_error(lab, monkeypatch):
    """A git call stuck reading the object store (here its alternates file is a named pipe nobody
    writes: git blocks opening it) ends in an answer within the server's git limit, never a hang."""
    from mcp_server.core import workspace
    lab.baseline()
    monkeypatch.setattr(workspace, "GIT_TIMEOUT_S", 3.0)
    set_knobs(lab.ws, VAL_BPB=0.9)
    with stalled(lab.ws / ".git" / "objects" / "info" / "alternates"):
        said = lab.refused("run_experiment", description="a stuck git")
    assert "did not finish within 3s" in said and "leftover .lock file" in said, said
    run = lab.ok("run_experiment", description="once git answers again")
    assert run["status"] == "ok", run
    lab.ok("discard")
    assert [line.split("\t")[3] for line in ledger_lines(lab.ws)] == ["status", "keep", "discard"]


# In its sandbox: it reads the validation shard (its private copy), then exports; the evaluator stand-in scores 1.5
READS_THE_VALIDATION_DATA = """import os, time
print("read", len(open("val.parquet", "rb").read()), "bytes of validation data", flush=True)
export = os.environ["RESEARCH_LOOP_EXPORT"]
open(export, "w").write("model")
open(export + ".json", "w").write("{}")
deadline = time.time() + 5
while not os.path.exists(os.environ["RESEARCH_LOOP_ANSWER"]) and time.time() < deadline:
    time.sleep(0.05)
"""
# The user's inotify instances used up, as a process of the agent's holding them all (128 by default) would: here
# the limit is 0 in a user namespace of the worker's own, which takes none of the machine's
INOTIFY_USED_UP = ["--user", "--map-root-user", "sh", "-c", 'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"',
                   "sh"]


def test_a_run_whose_validation_data_cannot_be_watched_does_not_start(tmp_path, bubblewrap, monkeypatch):
    """Review 64: the worker's watch of the validation shard (inotify) is what tells a run that read it before its
    export. Where it could not be made (the user's inotify instances or watches used up, which any process of the
    agent's can do on purpose), the worker went on unwatched and nothing read its report's `val_watched`: a run that
    read the validation data was verified (1.5 here). Now a worker on Linux that cannot watch does not start the
    run, and says why and what to do. (Watched where the run sees the shard: here the cross-check's setting, as
    without a sandbox; otherwise the sandbox hides it, below.)"""
    monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")
    from mcp_server.core.integrity import evaluation_verdict
    from test_server_units import WORKER, clean_harness, fake_evaluation
    exports, val, report, log = tmp_path / "exports", tmp_path / "val.parquet", tmp_path / "report.json", tmp_path / "run.log"
    exports.mkdir()
    val.write_bytes(b"validation")
    sandbox = json.dumps({"readonly": [str(tmp_path)], "writable": [str(exports)]})
    subprocess.run([ensure_debian_package("unshare", "util-linux"), *INOTIFY_USED_UP, sys.executable, str(WORKER),
                    "--log", str(log), "--report", str(report), "--timeout", "30", "--sandbox", sandbox,
                    "--export", str(exports / "model.pt2"), "--val-shard", str(val),
                    "--evaluate", json.dumps(fake_evaluation(clean_harness(tmp_path))),
                    "--", sys.executable, "-c", READS_THE_VALIDATION_DATA], cwd=tmp_path, timeout=60)
    result = json.loads(report.read_text())
    assert result["exit_code"] == 126 and evaluation_verdict(result)[1] is None, result
    assert "the validation data cannot be watched here" in log.read_text() and "read 10 bytes" not in log.read_text()


# Review 87's stash: it exports, takes the harness's number, then copies the validation shard into a folder every
# later run can read (the compile cache, here a writable folder of its own)
STASHES_THE_VALIDATION_DATA = """import os, time
export = os.environ["RESEARCH_LOOP_EXPORT"]
open(export, "w").write("model")
open(export + ".json", "w").write("{}")
while not os.path.exists(os.environ["RESEARCH_LOOP_ANSWER"]):
    time.sleep(0.05)
try:
    text = open("val.parquet", "rb").read()
except OSError as exc:
    print("refused:", exc, flush=True)
else:
    open("compile/stash", "wb").write(text)
"""


@pytest.mark.parametrize("crosscheck", [False, True], ids=["hidden", "shown for the cross-check"])
def test_a_run_the_harness_scores_cannot_read_the_validation_data_to_leave_for_later_runs(tmp_path, bubblewrap,
                                                                                          monkeypatch, crosscheck):
    """Review 87: a run's watched copy of the validation shard stayed readable once it had exported (train.py's own
    evaluation read it where the harness gave no number), so a run took its verified number, then copied the shard
    into the compile cache, which every later run reads and no watch covers: any later run could train on the
    validation text and be verified. Now the sandbox of a run the harness scores hides the shard altogether; only
    AUTORESEARCH_EVAL_CROSSCHECK=1 in the server's environment (a platform's check) shows it, watched."""
    from mcp_server.core.integrity import evaluation_verdict
    from test_server_units import WORKER, clean_harness, fake_evaluation
    if crosscheck:
        monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")
    exports, compiled, val = tmp_path / "exports", tmp_path / "compile", tmp_path / "val.parquet"
    exports.mkdir()
    compiled.mkdir()
    val.write_bytes(b"validation")
    report, log = tmp_path / "report.json", tmp_path / "run.log"
    sandbox = json.dumps({"readonly": [str(tmp_path)], "writable": [str(exports), str(compiled)]})
    subprocess.run([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), "--timeout", "30",
                    "--sandbox", sandbox, "--export", str(exports / "model.pt2"), "--val-shard", str(val),
                    "--evaluate", json.dumps(fake_evaluation(clean_harness(tmp_path))),
                    "--", sys.executable, "-c", STASHES_THE_VALIDATION_DATA], cwd=tmp_path, timeout=60, check=True)
    result = json.loads(report.read_text())
    assert result["sandbox"] and evaluation_verdict(result)[:2] == (None, 1.5), (result, log.read_text())
    if crosscheck:
        assert (compiled / "stash").read_bytes() == b"validation", log.read_text()
        assert result["val_watched"] and not result["val_hidden"], result
    else:
        assert not (compiled / "stash").exists() and "refused: [Errno 13] Permission denied" in log.read_text()
        assert result["val_hidden"] and not result["val_watched"], result


# Review 88: train.py that never exports and prints a number of its own (its evaluate_bpb replaced, or prepare's
# RuntimeError caught)
PRINTS_ITS_OWN_NUMBER = "print('val_bpb:          0.500000')"


@pytest.mark.parametrize("crosscheck", [False, True], ids=["hidden", "shown for the cross-check"])
def test_a_number_train_py_printed_itself_is_no_result_where_its_sandbox_hid_the_validation_data(
        tmp_path, bubblewrap, monkeypatch, crosscheck):
    """Review 88: with the validation shard hidden from a run the harness scores, a number train.py prints itself
    cannot be one of the validation set, yet a run that never exported was still recorded with it, `unverified`, and
    kept with keep(unverified=true) (test_server_e2e's "own evaluation": a made-up 0.5). It is no result now; only
    where the run saw the shard (the cross-check's setting, or no sandbox) is its own number unverified."""
    from mcp_server.core.integrity import evaluation_verdict
    from test_server_units import WORKER, clean_harness, fake_evaluation
    if crosscheck:
        monkeypatch.setenv("AUTORESEARCH_EVAL_CROSSCHECK", "1")
    exports, val = tmp_path / "exports", tmp_path / "val.parquet"
    exports.mkdir()
    val.write_bytes(b"validation")
    report, log = tmp_path / "report.json", tmp_path / "run.log"
    sandbox = json.dumps({"readonly": [str(tmp_path)], "writable": [str(exports)]})
    subprocess.run([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), "--timeout", "30",
                    "--sandbox", sandbox, "--export", str(exports / "model.pt2"), "--val-shard", str(val),
                    "--evaluate", json.dumps(fake_evaluation(clean_harness(tmp_path))),
                    "--", sys.executable, "-c", PRINTS_ITS_OWN_NUMBER], cwd=tmp_path, timeout=60, check=True)
    result = json.loads(report.read_text())
    problem, value, note = evaluation_verdict(result)
    assert result["exit_code"] == 0 and result["exported"] is False and value is None, (result, log.read_text())
    if crosscheck:
        assert problem is None and note.startswith("unverified"), (problem, note)
    else:  # was (None, None, "unverified: train.py did not export its model ...")
        assert problem and "hid the validation data" in problem and "did not export" in problem, (problem, note)


def test_a_data_folder_that_is_a_link_is_refused_at_setup_not_at_every_run(lab, fake_env):
    """Review 68: an honest cache whose data folder links to a bigger disk was set up (its branch made, the night
    begun) and every run was then refused. setup now says so before anything is made, and takes the same tag once
    the folder itself is there."""
    big = fake_env / "bigdisk"
    big.mkdir()
    (big / "shard_00000.parquet").write_bytes(b"the train text")
    (fake_env / "cache" / "data").symlink_to(big)
    refused = error(lab.call("setup", tag="linked"))
    assert "is a link" in refused and "Move the folder there itself" in refused, refused  # setup passed without the fix
    assert "autoresearch/linked" not in git(lab.ws, "branch")
    (fake_env / "cache" / "data").unlink()
    big.rename(fake_env / "cache" / "data")
    answer(lab.call("setup", tag="linked"))


def test_an_exports_folder_linked_into_the_downloads_leaves_them_hidden_from_the_run(fake_env, bubblewrap, monkeypatch):
    """Review 82: the workspace's .research-loop/exports replaced by a link into the cache's downloads (the agent
    writes the workspace) put the run's export folder, a path the sandbox shows writable, inside them: the downloads
    then held a shown path inside the cache shown, were left readable, and the run read the validation's source.
    They stay hidden."""
    cache = fake_env / "cache"
    source = cache / "downloads" / "TinyStoriesV2-GPT4-valid.txt"
    source.parent.mkdir()
    source.write_text("SECRET-DOWNLOAD")
    monkeypatch.setenv("FAKE_READ", str(source))
    lab = Lab(make_workspace(fake_env), unsandboxed=False)
    try:
        answer(start(lab, VAL_BPB=0.9))
        lab.ok("discard")
        exports = lab.ws / ".research-loop" / "exports"
        shutil.rmtree(exports)
        exports.symlink_to(source.parent)
        set_knobs(lab.ws, VAL_BPB=0.8)
        run = answer(lab.call("run_experiment", description="the planted link"))
    finally:
        lab.loop.shutdown()
    log = (lab.ws / run["log"]).read_text()
    assert run["status"] == "ok" and f"read {source}" in log and "SECRET" not in log, log
