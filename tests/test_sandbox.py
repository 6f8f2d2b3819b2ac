"""No run without a sandbox unless the user asked for it (mcp_server/scripts/sandbox.py).

Where no sandbox can run (bubblewrap missing, or installed but refused its namespaces), a run is
refused with what to install or how to opt in, before anything is committed; with the opt-in,
every answer, ledger row and the dashboard say "unsandboxed". The worker and a cluster's node
refuse too, unless the server passes the opt-in on. The macOS profile (sandbox-exec) is checked
as text and command line here: these tests run on Linux.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mcp_server.dashboard import dashboard
from mcp_server.executors import cluster
from mcp_server.overnight import overnight
from mcp_server.scripts import node, sandbox, worker
from mcp_server.__main__ import parse_args
from mcp_server.executors.executor import RunSpec
from server_support import Lab, error, git, ledger_lines, make_workspace, set_knobs

WORKER = Path(worker.__file__)
ORIGINAL_PATH = os.environ["PATH"]
BROKEN_BWRAP = "#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"


def path_without_sandbox(tmp_path: Path, bwrap: str | None = None) -> str:
    """A PATH with git and sh, and no bubblewrap (or a stand-in that fails as in a locked-down container)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("git", "sh"):
        (bin_dir / name).symlink_to(os.path.realpath(shutil.which(name)))
    if bwrap is not None:
        (bin_dir / "bwrap").write_text(bwrap)
        (bin_dir / "bwrap").chmod(0o755)
    return str(bin_dir)


@pytest.fixture
def no_sandbox(fake_env, monkeypatch):
    monkeypatch.setenv("PATH", path_without_sandbox(fake_env))
    monkeypatch.delenv(sandbox.UNSANDBOXED_ENV, raising=False)
    return fake_env


@pytest.mark.parametrize("bwrap", [None, BROKEN_BWRAP], ids=["missing", "installed-but-unusable"])
def test_without_a_sandbox_a_run_is_refused_before_anything_is_committed(fake_env, monkeypatch, bwrap):
    monkeypatch.setenv("PATH", path_without_sandbox(fake_env, bwrap))
    lab = Lab(make_workspace(fake_env), unsandboxed=False)
    try:
        lab.ok("setup", tag="nobwrap")
        set_knobs(lab.ws, TAMPER=1, VAL_BPB=0.5)  # a train.py that would rewrite the ledger and the state
        refs, ledger, state = git(lab.ws, "for-each-ref"), ledger_lines(lab.ws), lab.loop.state.load()
        refused = error(lab.call("run_experiment", description="the attack"))
        assert "No sandbox for the runs" in refused and "--unsandboxed" in refused
        assert "apt-get install bubblewrap" in refused and "dnf install bubblewrap" in refused
        assert ("cannot run here" in refused and "No permissions" in refused) if bwrap else "not installed" in refused
        # nothing committed, queued or logged, and the agent's edit is still there
        assert git(lab.ws, "for-each-ref") == refs and ledger_lines(lab.ws) == ledger
        assert lab.loop.state.load() == state and not state.get("runs")
        assert (lab.ws / "train.py").read_text() == "TAMPER = 1\nVAL_BPB = 0.5\n"
        assert not (lab.ws / "runs").exists()
    finally:
        lab.loop.shutdown()


def test_with_the_opt_in_every_answer_the_rows_and_the_dashboard_say_unsandboxed(no_sandbox):
    lab = Lab(make_workspace(no_sandbox), unsandboxed=True)
    try:
        lab.ok("setup", tag="optin")
        assert "unsandboxed" in lab.ok("status")["unsandboxed"]  # before any run: this server's runs will be
        run = lab.ok("run_experiment", description="baseline")  # a harness that does not export, too
        assert run["status"] == "ok" and "unsandboxed" in run["unsandboxed"], run
        assert "unsandboxed" in lab.ok("read_metrics")["unsandboxed"]
        assert "unsandboxed" in lab.ok("read_metrics", run="1")["unsandboxed"]
        pending = next(r for r in dashboard.live_view(lab.ws)["runs"] if r["run"] == run["run"])
        assert pending["unsandboxed"] is True
        kept = lab.ok("keep")
        assert kept["row"]["description"] == "baseline (unsandboxed)" and "unsandboxed" in kept["unsandboxed"]
        set_knobs(lab.ws, VAL_BPB=1.2)
        lab.ok("run_experiment", description="worse")
        discarded = lab.ok("discard", reason="worse")
        assert discarded["row"]["description"] == "worse (unsandboxed) (worse)" and discarded["unsandboxed"]
        rows = dashboard.ledger_view(lab.ws)["rows"]
        assert [r["description"] for r in rows] == ["baseline (unsandboxed)", "worse (unsandboxed) (worse)"]
        assert ledger_lines(lab.ws)[1].endswith("\tkeep\tbaseline (unsandboxed)")
    finally:
        lab.loop.shutdown()


def test_the_reports_summary_and_status_say_the_best_ran_unsandboxed(no_sandbox):
    """Review 72: the morning report's summary gave an unsandboxed best as "best val_bpb 0.900000 (`abc1234`)", its
    run's lack of a sandbox said only in the kept change's heading further down."""
    lab = Lab(make_workspace(no_sandbox), unsandboxed=True)
    try:
        lab.ok("setup", tag="optin")
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep")
        set_knobs(lab.ws, VAL_BPB=0.9)
        lab.ok("run_experiment", description="a gain")
        kept = lab.ok("keep", unconfirmed=True)["row"]["commit"]
        assert "its run had no sandbox" in lab.ok("status")["best_note"]
        summary = (lab.ws / lab.ok("report")["path"]).read_text().split("## Progress")[0]
        assert f"| best val_bpb | 0.900000 (`{kept}`: its run had no sandbox: {sandbox.RISK})" in summary, summary
    finally:
        lab.loop.shutdown()


def test_the_pages_headline_cuts_the_bests_description_not_its_unsandboxed_marker(browser, no_sandbox):
    """Review 75: the page's headline cut the best's description at 60 characters, and with it the "(unsandboxed)" at
    its end: an unsandboxed best with a long description (here a note after the marker too) read as any best."""
    from mcp_server.dashboard.dashboard_http import DashboardServer
    lab = Lab(make_workspace(no_sandbox), unsandboxed=True)  # browser first: launched with the usual PATH
    page, server = browser.new_page(), DashboardServer(lab.ws, 0, None).start()
    try:
        lab.ok("setup", tag="optin")
        lab.ok("run_experiment", description="baseline " + "with a long story " * 5)
        assert lab.ok("keep", note="as it was")["row"]["description"].endswith(" (unsandboxed) (as it was)")
        page.goto(server.url)
        page.wait_for("document.querySelector('#summary .big') !== null")
        headline = page.evaluate("document.querySelector('#summary .big').nextSibling.textContent")
        # the description is cut before the marker, never through it
        assert headline.startswith(" best val_bpb") and headline.endswith("... (unsandboxed)”"), headline
    finally:
        page.close()
        server.close()
        lab.loop.shutdown()


def test_the_end_ping_says_the_best_ran_unsandboxed(no_sandbox):
    """Review 72: the ping that a research run ended named the best's number, and whose it is where the harness did
    not measure it, but not that no sandbox ran it."""
    from mcp_server.core import notify
    from server_support import Webhook, wait_until
    webhook = Webhook()
    lab = Lab(make_workspace(no_sandbox), unsandboxed=True)
    lab.loop.notifier = notify.Notifier(webhook.url)
    try:
        lab.ok("setup", tag="optin")
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep")
        lab.ok("stop", reason="done")
        assert wait_until(lambda: any("has ended" in m for m in webhook.messages()), 15), webhook.messages()
        assert f"best val_bpb 1.000000 (its run had no sandbox: {sandbox.RISK})" in webhook.messages()[-1]
    finally:
        lab.loop.notifier.close()
        lab.loop.shutdown()
        webhook.close()


def test_a_record_that_forgets_the_missing_sandbox_does_not_clean_the_row(no_sandbox):
    """What an unsandboxed run (or a process it left) could do: erase its mark from the state."""
    lab = Lab(make_workspace(no_sandbox), unsandboxed=True)
    try:
        lab.ok("setup", tag="erase")
        lab.ok("run_experiment", description="baseline")
        path = lab.ws / ".research-loop" / "state.json"
        state = json.loads(path.read_text())
        for entry in state["runs"].values():
            entry.pop("unsandboxed", None)
            entry["result"].pop("unsandboxed", None)
        path.write_text(json.dumps(state))
        kept = lab.ok("keep")
        assert kept["row"]["description"] == "baseline (unsandboxed)" and kept["unsandboxed"]
    finally:
        lab.loop.shutdown()


def test_with_a_sandbox_the_opt_in_changes_nothing(fake_env, bubblewrap):
    """The opt-in allows runs without a sandbox; where one runs, they are sandboxed all the same."""
    lab = Lab(make_workspace(fake_env), unsandboxed=True)
    try:
        lab.ok("setup", tag="both")
        assert lab.ok("status")["unsandboxed"] is None
        run = lab.ok("run_experiment", description="baseline")
        assert run["status"] == "ok" and run["unsandboxed"] is None
        assert lab.ok("keep")["row"]["description"] == "baseline"
    finally:
        lab.loop.shutdown()


def worker_run(tmp_path: Path, path: str, *options: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """The worker asked for a sandbox (the folder read-only), running a command that writes into it."""
    spec = json.dumps({"readonly": [str(tmp_path)], "writable": []})
    log, report = tmp_path / "run.log", tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), "--timeout", "30",
                           "--sandbox", spec, *options, "--", sys.executable, "-c", "open('ran', 'w').write('x')"],
                          cwd=tmp_path, env=dict(os.environ, PATH=path), timeout=60)
    return done, json.loads(report.read_text()), log.read_text()


def test_the_worker_never_runs_without_a_sandbox_unless_told(tmp_path):
    path = path_without_sandbox(tmp_path)
    done, report, log = worker_run(tmp_path, path)
    assert done.returncode == 126 and report["exit_code"] == 126 and not (tmp_path / "ran").exists()
    assert "refused to run" in log and "apt-get install bubblewrap" in log and "--unsandboxed" in log
    done, report, log = worker_run(tmp_path, path, "--unsandboxed")
    assert report["exit_code"] == 0 and report["sandbox"] is False and (tmp_path / "ran").exists()


def test_the_worker_sandboxes_where_bubblewrap_runs(tmp_path, bubblewrap):
    done, report, log = worker_run(tmp_path, os.environ["PATH"], "--unsandboxed")
    assert report["sandbox"] is True and report["exit_code"] != 0 and not (tmp_path / "ran").exists()
    assert "Read-only file system" in log


def test_a_node_without_a_sandbox_refuses_unless_the_server_passes_the_opt_in(tmp_path):
    code = tmp_path / "job"
    scripts = code / node.NODE_DIR
    scripts.mkdir(parents=True)
    for module in (worker, node, sandbox):  # as cluster.package ships them
        shutil.copy(module.__file__, scripts / Path(module.__file__).name)
    (code / "train.py").write_text("open('ran', 'w').write('x'); print('---'); print('val_bpb:          0.987000')\n")
    env = {"PATH": path_without_sandbox(tmp_path), "AUTORESEARCH_CACHE": str(tmp_path / "cache"),
           "HOME": str(tmp_path)}

    def job(*options: str) -> dict:
        out = subprocess.run([sys.executable, f"{node.NODE_DIR}/node.py", "--timeout", "30", *options, "--",
                              sys.executable, "train.py"], cwd=code, env=env, capture_output=True, text=True,
                             timeout=60).stdout
        return json.loads(next(l for l in reversed(out.splitlines()) if l.startswith(node.RESULT_MARK))
                          [len(node.RESULT_MARK):])
    refused = job()  # a harness that does not export: a sandbox all the same
    assert refused["exit_code"] == 126 and refused["val_bpb"] is None and not (code / "ran").exists()
    allowed = job("--unsandboxed")
    assert allowed["exit_code"] == 0 and allowed["sandbox"] is False and allowed["val_bpb"] == 0.987


def test_the_server_passes_the_opt_in_to_its_workers_and_nodes(tmp_path):
    spec = RunSpec(run=1, commit="c" * 40, command=["python", "train.py"], timeout=60, log=tmp_path / "l",
                   report=tmp_path / "r", unsandboxed=True)
    assert "--unsandboxed" in cluster.node_args(spec, tmp_path / "ws")
    spec.unsandboxed = False
    assert "--unsandboxed" not in cluster.node_args(spec, tmp_path / "ws")


def test_the_opt_in_is_a_flag_or_a_setting(monkeypatch):
    monkeypatch.delenv(sandbox.UNSANDBOXED_ENV, raising=False)
    assert parse_args([]).unsandboxed is False and parse_args(["--unsandboxed"]).unsandboxed is True
    monkeypatch.setenv(sandbox.UNSANDBOXED_ENV, "1")
    assert parse_args([]).unsandboxed is True
    monkeypatch.setenv(sandbox.UNSANDBOXED_ENV, "0")
    assert parse_args([]).unsandboxed is False


def test_the_overnight_runner_stops_before_its_first_session_without_a_sandbox(no_sandbox, tmp_path):
    ws = make_workspace(no_sandbox)
    (no_sandbox / "bin" / "uv").symlink_to(shutil.which("uv", path=os.environ["PATH"] + os.pathsep + ORIGINAL_PATH))
    with pytest.raises(overnight.RunnerError, match="No sandbox for the runs.*--unsandboxed"):
        overnight.preflight(ws, sys.executable, unsandboxed=False)
    assert overnight.preflight(ws, sys.executable, unsandboxed=True) == sys.executable


# --- macOS: sandbox-exec, checked as text and command line ------------------------------------
def test_the_macos_profile_denies_writes_but_the_runs_own_folders(tmp_path):
    ws, run, exports = tmp_path / "ws", tmp_path / "ws" / ".git" / "slot", tmp_path / "exports"
    spec = {"readonly": [str(ws), "/cache"], "writable": [".", str(exports)], "readonly_inside": ["prepare.py"]}
    lines = sandbox.seatbelt_profile(spec, str(run)).splitlines()
    assert lines[:3] == ["(version 1)", "(allow default)", "(deny file-write*)"]
    rules = lines[3:]
    order = [rules.index(f'(deny file-write* (subpath "{ws}"))'),
             rules.index(f'(allow file-write* (subpath "{run}"))'),
             rules.index(f'(allow file-write* (subpath "{exports}"))'),
             rules.index(f'(deny file-write* (subpath "{run}/prepare.py"))')]
    assert order == sorted(order)  # later rules win: the spec's order holds
    assert rules.index('(allow file-write* (subpath "/private/tmp"))') < order[0]  # a workspace in /tmp stays read-only
    assert '(deny file-write* (subpath "/cache"))' in rules


def test_the_macos_profile_denies_reads_of_the_data_sets_sources_last(tmp_path):
    """The downloads inside the cache are denied last; a folder that holds the run (a cluster's shared
    folder) first, and the run's folder, the cache and the program's environment inside it allowed
    again after."""
    downloads, around, run = tmp_path / "cache" / "downloads", tmp_path, tmp_path / "ws"
    downloads.mkdir(parents=True)
    spec = {"readonly": [str(tmp_path / "cache")], "writable": ["."], "hidden": [str(downloads), str(around)]}
    (tmp_path / "env" / "bin").mkdir(parents=True)  # the program's environment, inside the folder too
    (tmp_path / "env" / "bin" / "python").symlink_to(sys.executable)
    rules = sandbox.seatbelt_profile(spec, str(run), str(tmp_path / "env" / "bin" / "python")).splitlines()
    assert rules[-1] == f'(deny file-read* (subpath "{os.path.realpath(downloads)}"))', rules
    order = [rules.index(f'(deny file-read* (subpath "{os.path.realpath(around)}"))'),
             rules.index(f'(allow file-read* (subpath "{os.path.realpath(run)}"))'),
             rules.index(f'(allow file-read* (subpath "{os.path.realpath(tmp_path / "cache")}"))'),
             rules.index(f'(allow file-read* (subpath "{os.path.realpath(tmp_path / "env")}"))')]
    assert order == sorted(order), rules
    between = {"readonly": [str(tmp_path)], "hidden": [str(tmp_path / "cache")]}  # inside a shown path, holds the run
    assert "file-read*" not in sandbox.seatbelt_profile(between, str(tmp_path / "cache" / "run"))


def test_a_path_cannot_break_out_of_its_string_in_the_profile():
    profile = sandbox.seatbelt_profile({"writable": ['/w/a") (allow file-write* (subpath "/x', "/w/b\\"]}, "/")
    assert '(allow file-write* (subpath "/w/a\\") (allow file-write* (subpath \\"/x"))' in profile
    assert '(allow file-write* (subpath "/w/b\\\\"))' in profile


def test_on_macos_runs_go_under_sandbox_exec_with_that_profile(tmp_path, monkeypatch):
    """A stand-in sandbox-exec that runs its command: the probe passes and wrap() builds the line."""
    fake = tmp_path / "sandbox-exec"
    fake.write_text('#!/bin/sh\nshift 2\nexec "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    spec = {"readonly": [str(tmp_path)], "writable": ["."]}
    command, kind = sandbox.wrap(["python", "train.py"], spec, str(tmp_path / "run"))
    assert kind == sandbox.SANDBOX_EXEC
    assert command == [str(fake), "-p", sandbox.seatbelt_profile(spec, str(tmp_path / "run")),
                       "/usr/bin/env", "-u", "AUTORESEARCH_OFFLINE_SEED", "python", "train.py"]
    fake.write_text("#!/bin/sh\necho 'sandbox-exec: sandbox_apply: Operation not permitted' >&2\nexit 71\n")
    sandbox._probe.cache_clear()
    assert sandbox.wrap(["python"], spec, "/")[1] is None
    assert "sandbox-exec cannot run here: sandbox-exec: sandbox_apply: Operation not permitted" in sandbox.missing()


def test_a_runs_private_validation_copy_is_out_of_other_runs_reach(bubblewrap, tmp_path):
    """Each run reads its own copy of the validation shard (watched); another run's sandbox, which
    sees the workspace and its runs/ folder, must not see that copy, or it could read it unwatched."""
    shard = tmp_path / "shard_val.parquet"
    shard.write_bytes(b"validation")
    (tmp_path / "runs").mkdir()
    copy = worker.private_val_copy(shard, tmp_path / "runs" / "0001-abc1234.report.json")
    try:
        argv, kind = sandbox.wrap([sys.executable, "-c", f"import os; print(os.path.exists({str(copy)!r}))"],
                                  {"readonly": [str(tmp_path), sys.prefix]}, str(tmp_path))
        assert kind == sandbox.BUBBLEWRAP
        seen = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
        assert copy.read_bytes() == b"validation" and seen == "False"
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def data_sources(tmp_path: Path) -> tuple[Path, Path]:
    """A downloads folder with a book in it and an offline seed, as a cache holds them."""
    folder, seed = tmp_path / "downloads", tmp_path / "offline_seed"
    folder.mkdir()
    (folder / "book.txt").write_text("text")
    seed.write_text("seed")
    return folder, seed


def test_a_runs_shared_memory_is_its_own_and_the_data_sources_are_hidden(bubblewrap, tmp_path):
    """/dev/shm outlives a run and is shared by all: a run could leave its weights there for the next
    one to go on training. In the sandbox it is a private one. A hidden folder (a data set's source)
    is empty there and a hidden file unreadable, but one that holds the run's folder stays, or the
    run could not start."""
    planted = Path("/dev/shm") / f"research-loop-test-{os.getpid()}"
    planted.write_text("weights")
    folder, seed = data_sources(tmp_path)
    code = (f"import os\nprint('planted:', os.path.exists({str(planted)!r}))\n"
            f"open('/dev/shm/left-by-the-run', 'w').write('x')\n"
            f"try:\n    read = repr(open({str(seed)!r}).read())\nexcept OSError as exc:\n    read = type(exc).__name__\n"
            f"print('folder:', os.listdir({str(folder)!r}), 'seed:', read)\n"
            f"print('own folder:', sorted(os.listdir('.')))\n")
    spec = {"readonly": [str(tmp_path), sys.prefix], "hidden": [str(folder), str(seed), str(tmp_path)]}
    try:
        argv, _ = sandbox.wrap([sys.executable, "-c", code], spec, str(tmp_path))
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    finally:
        planted.unlink()
    assert "planted: False" in out and not Path("/dev/shm/left-by-the-run").exists(), out
    assert "folder: [] seed: PermissionError" in out and "own folder: ['downloads', 'offline_seed']" in out, out
    assert (folder / "book.txt").read_text() == "text" and seed.read_text() == "seed"


# A run's System V shared memory, through libc: shmget(key, size, flags) with IPC_CREAT (0o1000); the
# segment holds what the run wrote and outlives its process until removed (review 38's finding)
SYSV_SEGMENT = """import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
key, action = int(sys.argv[1]), sys.argv[2]
shmid = libc.shmget(key, 4096, (0o1000 | 0o600) if action == "leave" else 0)
if shmid < 0:
    print("segment: none")
    sys.exit(0)
address = libc.shmat(shmid, None, 0)
if action == "leave":
    ctypes.memmove(address, b"weights", 7)
print("segment:", ctypes.string_at(address, 7).decode())
"""


def test_system_v_shared_memory_a_run_leaves_is_gone_with_its_sandbox(bubblewrap, tmp_path):
    """A segment from shmget outlives the process that made it: one run could leave its weights there
    for the next to go on training past its budget, as with /dev/shm. Each sandbox has its own IPC
    namespace, which ends with it: the next run, and this machine, find nothing."""
    key = 0x52000000 + os.getpid() % 0xFFFFF
    spec = {"readonly": [str(tmp_path), sys.prefix]}
    argv = lambda action: sandbox.wrap([sys.executable, "-c", SYSV_SEGMENT, str(key), action], spec, str(tmp_path))[0]
    plain = [sys.executable, "-c", SYSV_SEGMENT, str(key)]
    try:
        left = subprocess.run(argv("leave"), capture_output=True, text=True, check=True).stdout
        found = subprocess.run(argv("read"), capture_output=True, text=True, check=True).stdout
        outside = subprocess.run([*plain, "read"], capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["ipcrm", "-M", str(key)], capture_output=True)  # what a sandbox without its own left
    assert left == "segment: weights\n", left  # the run could make one, inside
    assert found == "segment: none\n" and outside == "segment: none\n", (found, outside)


def test_a_runs_dev_is_its_own_with_the_accelerators_nodes(bubblewrap, tmp_path):
    """The machine's /dev outlives every run: as root (a GPU container's user) a run wrote a file there for the
    next run to train on, and could open the disks; on any uid it showed the machine's POSIX message
    queues (/dev/mqueue). A run's /dev is its own, gone when it ends, with the basic nodes and the
    accelerators' (each node alone, none of their folders)."""
    code = ("import os\n"
            "print('found:', os.path.exists('/dev/left-by-the-run'))\n"
            "open('/dev/null', 'w').write('x'); open('/dev/shm/mine', 'w').write('x')\n"
            "open('/dev/left-by-the-run', 'w').write('weights')\n"  # as root: the machine's /dev took it
            "print('seen:', sorted(set(os.listdir('/dev')) & {'kmsg', 'loop0', 'vda', 'sda', 'mqueue', 'cpu'}))\n")
    spec = {"readonly": [str(tmp_path), sys.prefix]}
    argv = sandbox.wrap([sys.executable, "-c", code], spec, str(tmp_path))[0]
    try:
        first = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        second = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    finally:
        left = Path("/dev/left-by-the-run")
        if left.exists():
            left.unlink()
    assert "seen: []" in first and "found: False" in second and not left.exists(), (first, second)
    assert "seen: []" in second
    assert not Path("/dev/shm/mine").exists()


# A key in the user's keyring, through libc's syscall: add_key("user", name, data, KEY_SPEC_USER_KEYRING = -4), then
# readable by the user (KEYCTL_SETPERM, 5), then KEYCTL_SEARCH (10) of that keyring; a key outlives its process, held by the keyring
USER_KEY = """import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
name, action = sys.argv[1].encode(), sys.argv[2]
if action == "leave":
    added = libc.syscall(248, b"user", name, b"weights", 7, -4)
    print("added:", added > 0 and libc.syscall(250, 5, added, 0x3f3f0000) == 0)  # KEYCTL_SETPERM: the user's
    sys.exit(0)
key = libc.syscall(250, 10, -4, b"user", name, 0)
print("key:", "found" if key > 0 else "none")
"""


def test_a_key_a_run_leaves_in_the_users_keyring_is_gone_with_its_sandbox(bubblewrap, tmp_path):
    """As root, bubblewrap made no user namespace, and root's user keyring is the machine's: a run added a key
    (up to 25 MB of them) that the next run read. Each sandbox has its own user namespace, and its own keyrings."""
    name = f"research-loop-test-{os.getpid()}"
    spec = {"readonly": [str(tmp_path), sys.prefix]}
    argv = lambda action: sandbox.wrap([sys.executable, "-c", USER_KEY, name, action], spec, str(tmp_path))[0]
    left = subprocess.run(argv("leave"), capture_output=True, text=True, check=True).stdout
    found = subprocess.run(argv("read"), capture_output=True, text=True, check=True).stdout
    outside = subprocess.run([sys.executable, "-c", USER_KEY, name, "read"], capture_output=True, text=True).stdout
    assert left == "added: True\n", left  # the run could make one, inside
    assert found == "key: none\n" and outside == "key: none\n", (found, outside)


def test_the_accelerators_nodes_are_bound_one_by_one(tmp_path):
    """What a run's private /dev shows of the machine's: its accelerators' character devices, each bound alone, at
    the top and in their folders; nothing else, and no folder (as root a run could write into one)."""
    dev = tmp_path / "dev"
    (dev / "dri" / "by-path").mkdir(parents=True)
    (dev / "nvidia-caps").mkdir()
    null = os.stat("/dev/null").st_rdev
    for device in ("nvidia0", "nvidiactl", "dri/renderD128", "nvidia-caps/nvidia-cap1", "kmsg", "vda"):
        os.mknod(dev / device, 0o600 | stat.S_IFCHR, null)
    (dev / "dri" / "by-path" / "pci-render").symlink_to("../renderD128")
    (dev / "nvidia-plain-file").write_text("x")
    binds = sandbox.accelerator_binds(str(dev))
    shown = [binds[i + 1] for i in range(0, len(binds), 3)]
    assert binds[::3] == ["--dev-bind"] * len(shown) and shown == binds[2::3]
    assert shown == [str(dev / n) for n in ("dri/renderD128", "nvidia-caps/nvidia-cap1", "nvidia0", "nvidiactl")]


def test_a_hidden_folder_that_holds_the_run_shows_the_run_and_what_it_reads_but_nothing_else(bubblewrap, outside_tmp):
    """A cluster's shared folder holds the run's code beside other runs' folders and submitit's job
    files (its arguments: the offline seed). Hidden, the run sees its own folder (writable) and the
    paths its spec shows, and nothing else there; an interpreter's environment inside it (a home on
    the shared file system) is shown too, or the run could not start."""
    shared = outside_tmp
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(shared / "env")], check=True)
    code, job_files, other_run = shared / "ws" / "0002-abc" / "code", shared / "ws" / "0002-abc" / "submitit", \
        shared / "ws" / "0001-def" / "code"
    for folder in (code, job_files, other_run, shared / "venv"):
        folder.mkdir(parents=True)
    (job_files / "7_submitted.pkl").write_text("the seed")
    (other_run / "train.py").write_text("another run")
    (code / "train.py").write_text("this run")
    (shared / "venv" / "site.txt").write_text("the environment")
    code_text = ("import os\n"
                 f"print('shared:', *(sorted(os.listdir(f)) for f in {[str(shared), str(shared / 'ws'), str(code.parent)]!r}))\n"
                 f"print('venv:', open({str(shared / 'venv' / 'site.txt')!r}).read(), 'own:', open('train.py').read())\n"
                 "open('written', 'w').write('x')\n")
    (shared / "here").symlink_to(".")  # named through a link (macOS: /var is /private/var), it sorts as itself
    spec = {"readonly": [str(shared / "venv")], "writable": ["."], "hidden": [str(shared / "here")]}
    argv, _ = sandbox.wrap([str(shared / "env" / "bin" / "python"), "-c", code_text], spec, str(code))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "shared: ['env', 'venv', 'ws'] ['0002-abc'] ['code']" in out and "venv: the environment own: this run" in out, out
    assert (code / "written").read_text() == "x" and (job_files / "7_submitted.pkl").read_text() == "the seed"


def test_a_run_cannot_unmount_what_hides_the_data_sources(bubblewrap, tmp_path):
    """Run as root (a container, a cloud GPU box), bubblewrap keeps root's capabilities in the
    sandbox unless told: train.py could then unmount the empty folder over the downloads, or the
    /dev/null over the offline seed, and read the validation text's source. It runs with none."""
    folder, seed = data_sources(tmp_path)
    code = (f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"for path in ({str(folder)!r}, {str(seed)!r}, '/dev/shm', '/tmp'):\n"
            f"    print(path, libc.umount2(path.encode(), 2), ctypes.get_errno())\n"  # MNT_DETACH
            f"print('folder:', os.listdir({str(folder)!r}))\n"
            f"print('caps:', [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')])\n")
    spec = {"readonly": [str(tmp_path), sys.prefix], "hidden": [str(folder), str(seed)]}
    argv, _ = sandbox.wrap([sys.executable, "-c", code], spec, str(tmp_path))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "folder: []" in out and "caps: ['0000000000000000']" in out, out
    assert all(line.split()[1] == "-1" for line in out.splitlines()[:4]), out


def test_a_run_never_sees_an_offline_seed_given_in_the_environment(bubblewrap, tmp_path, monkeypatch):
    """A cluster node's prepare gets the server's seed in AUTORESEARCH_OFFLINE_SEED, and a user may
    set it for the server: the worker and the nodes pass their environment on (AUTORESEARCH_* goes
    to the jobs), and with the seed train.py could draw the validation files from the library."""
    monkeypatch.setenv("AUTORESEARCH_OFFLINE_SEED", "the-secret")
    code = "import os\nprint('seed:', os.environ.get('AUTORESEARCH_OFFLINE_SEED'))\n"
    argv, _ = sandbox.wrap([sys.executable, "-c", code], {"readonly": [str(tmp_path), sys.prefix]}, str(tmp_path))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "seed: None" in out, out
    profile_argv = sandbox.seatbelt_argv("/usr/bin/sandbox-exec", [sys.executable, "-c", code], {}, str(tmp_path))
    assert "AUTORESEARCH_OFFLINE_SEED" in profile_argv[:profile_argv.index(sys.executable)], profile_argv


def test_a_sandboxed_run_reaches_no_process_and_no_network_of_the_machine(tmp_path, bubblewrap):
    """train.py could signal its worker or the evaluator, read the server's environment (its HTTP
    token) in /proc, or call the server's HTTP transport or dashboard on 127.0.0.1: in the sandbox
    it sees neither the machine's processes nor its network."""
    import http.server
    import threading
    listening = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=listening.serve_forever, daemon=True).start()
    code = (f"import os, socket\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {listening.server_port}), timeout=3); print('net: reached')\n"
            f"except OSError as exc:\n    print('net: unreachable', exc)\n"
            f"print('pid:', 'seen' if os.path.exists('/proc/{os.getpid()}/environ') else 'unseen')\n"
            f"try:\n    os.kill({os.getpid()}, 0); print('signal: delivered')\n"
            f"except ProcessLookupError:\n    print('signal: no such process')\n")
    log, report = tmp_path / "run.log", tmp_path / "report.json"
    try:
        subprocess.run([sys.executable, str(WORKER), "--log", str(log), "--report", str(report), "--timeout", "30",
                        "--sandbox", json.dumps({"readonly": [str(tmp_path), sys.prefix], "writable": []}),
                        "--", sys.executable, "-c", code], cwd=tmp_path, timeout=60, check=True)
    finally:
        listening.shutdown()
    assert json.loads(report.read_text())["sandbox"] is True
    text = log.read_text()
    assert "net: unreachable" in text and "pid: unseen" in text and "signal: no such process" in text, text


def test_a_sandbox_root_is_its_own_only_once_bubblewrap_has_made_it(tmp_path, bubblewrap):
    """Review 50: private_root took bubblewrap's child as soon as it existed, but that child sets up the sandbox
    (mounts, then pivot_root) after it is made, and until then /proc/CHILD/root is the machine's own root: the
    worker's poll in that window (a process of the agent's can stop the child there) took the machine's
    /tmp/export, which the agent writes, for the run's private export. A root whose /tmp is the machine's is no
    sandbox's yet."""
    import signal
    import time
    # a stand-in caught before its sandbox is made: a process whose one child still has the machine's root
    unmade = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    made = subprocess.Popen(sandbox.bwrap_argv(bubblewrap, ["sleep", "30"], {"readonly": [], "writable": []}, "/"))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sandbox.private_root(made.pid) is None:
            time.sleep(0.02)
        root = sandbox.private_root(made.pid)
        assert root is not None and os.path.isdir(root + os.path.dirname(sandbox.RUN_EXPORT))
        assert sandbox.private_root(unmade.pid) is None
    finally:
        os.killpg(unmade.pid, signal.SIGKILL)
        made.kill()
        for proc in (unmade, made):
            proc.wait()


SERVICE = """
import os, socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(1)
print("listening", flush=True)
server.settimeout(30)
try:
    conn, _ = server.accept()
except socket.timeout:
    sys.exit(0)
print("asked:", conn.recv(100).decode(), flush=True)
"""


@pytest.mark.parametrize("where", ["runtime folder", "machine's socket"])
def test_a_run_reaches_no_service_in_the_users_runtime_folder(bubblewrap, tmp_path, monkeypatch, where):
    """systemd's user manager, the session bus and rootless docker listen on Unix sockets in the user's
    runtime folder ($XDG_RUNTIME_DIR, /run/user/UID), and a socket is opened through a read-only mount too:
    a run that asked one (`systemd-run --user`) got a process outside its sandbox, which outlived its timeout
    and its cancel; as root, so did the machine's (systemd's, docker's). They are hidden from every run."""
    runtime = tmp_path / "run-user"  # inside a folder the run is shown, as a home or a workspace would be
    runtime.mkdir(mode=0o700)
    if where == "runtime folder":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    else:  # in place of /run/docker.sock, which a test cannot make
        monkeypatch.setattr(sandbox, "SERVICE_SOCKETS", (*sandbox.SERVICE_SOCKETS, str(runtime / "bus")))
    service = subprocess.Popen([sys.executable, "-c", SERVICE, str(runtime / "bus")], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout.readline() == "listening\n"
        code = ("import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n    s.connect(sys.argv[1]); s.sendall(b'start a trainer outside'); print('reached')\n"
                "except OSError as exc:\n    print('refused:', exc.strerror)\n")
        argv = sandbox.wrap([sys.executable, "-c", code, str(runtime / "bus")],
                            {"readonly": [str(tmp_path), sys.prefix]}, str(tmp_path))[0]
        ran = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        service.kill()
        asked = service.communicate()[0]
    assert ran.stdout.startswith("refused:") and "asked:" not in asked, (ran.stdout, ran.stderr, asked)
    assert {"/run/user", "/run/docker.sock"} <= set(sandbox.runtime_folders())


def test_a_runtime_folder_in_tmp_leaves_the_runs_home_and_export_folder(bubblewrap, tmp_path, monkeypatch):
    """Found by review 62: XDG_RUNTIME_DIR=/tmp (a usual fix for Qt's and others' "XDG_RUNTIME_DIR not set" in a
    container) was hidden like any runtime folder: an empty folder over the run's own /tmp took its home and its
    export folder: no run had a home to write, nor a folder to export its model into for the harness. A run's /tmp
    is its own already: nothing of the machine's /tmp is there to hide."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/tmp")
    code = "import os, sys; print(os.path.isdir(os.environ['HOME']), os.path.isdir(os.path.dirname(sys.argv[1])))"
    argv = sandbox.wrap([sys.executable, "-c", code, sandbox.RUN_EXPORT],
                        {"readonly": [str(tmp_path), sys.prefix]}, str(tmp_path))[0]  # tmp_path: under /tmp
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert ran.stdout == "True True\n", (ran.stdout, ran.stderr)
    assert "/tmp" not in sandbox.runtime_folders()


def test_a_pth_planted_in_the_servers_environment_unsandboxes_no_run(fake_env, bubblewrap, monkeypatch):
    """Review 81: stop 49 pins the server's own packages only where the harness evaluates exports, since a run's worker
    runs without site (-S: "a .pth planted there runs nowhere"). But the worker's check that bubblewrap runs
    (sandbox.usable) started the server's interpreter in it with site, so a .pth planted in the server's site-packages
    (pinned by nothing with upstream's harness, and planted before the run's window) ran in every worker. One that
    failed that check made the worker find no sandbox: with the user's opt-in (runs without a sandbox where none can
    run), every run then trained unsandboxed on a machine that has one, where the validation data and the records
    are not hidden from it. The check starts the interpreter without site now."""
    assert sandbox.usable()[0] == sandbox.BUBBLEWRAP  # this process's own answer, found before the plant
    planted = Path(sysconfig.get_paths()["purelib"]) / "zz-review81.pth"
    monkeypatch.setenv("REVIEW81_PLANTED", "1")  # the plant acts in this test's processes only
    lab = Lab(make_workspace(fake_env))  # the opt-in, as in the tests' servers
    try:
        lab.ok("setup", tag="planted")
        planted.write_text('import os; os.environ.get("REVIEW81_PLANTED") and os.getpid() < 5 and os._exit(7)\n')
        set_knobs(lab.ws, VAL_BPB=0.5)
        result = lab.ok("run_experiment", description="an idea")
    finally:
        planted.unlink(missing_ok=True)
        lab.loop.shutdown()
    assert result["val_bpb"] == 0.5 and not result.get("unsandboxed"), result
