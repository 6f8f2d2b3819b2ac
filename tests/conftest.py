"""Shared fixtures: the repository root, and a harness prepared once per test session.

The prepared cache holds the offline corpus and a tokenizer for the CPU profile, in a
temp folder, so no test touches ~/.cache/autoresearch or the network.
"""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_TIME_BUDGET = "4"  # seconds of training per real run in tests
TEST_EVAL_TOKENS = "8192"  # two batches of the CPU profile's 16 x 256: each harness evaluation and its
# causality check is half of what 16384 cost (~3 s of a real run's ~25 s on 2 cores); the checks need no more

# The tests' Ray cluster uses token authentication, and every Ray client here (the servers, in
# this process or started by a test) has the token, so each Ray test goes through it. Ray reads
# these once per process: they are set before anything imports it.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)

# A shell without job control starts a background command with SIGINT ignored, and every process
# the tests start would inherit that: submitit's local cancel (a SIGINT) would then stop nothing.
# Python's own handler is restored here, which its children see as the default disposition.
signal.signal(signal.SIGINT, signal.default_int_handler)

# The test files that take 10 s or more, slowest first (CI's junit times at stop 45 on 2 cores: test_comparable.py
# 381 s ... test_cost.py 13 s; test_loop_properties.py early, as its random nights took 72 s in one run and 333 s in
# another; test_confirmations.py, split out of test_comparable.py at stop 47, holds most of that file's time). They
# are handed to the two workers in this order (pyproject's --no-loadscope-reorder keeps it), so that the suite never
# ends on a long file running alone while the other worker has nothing left; the quick files left out follow in the
# alphabet's order.
SLOWEST_FIRST = (
    "test_comparable.py", "test_warm_start.py", "test_compile.py", "test_confirmations.py", "test_server_e2e.py",
    "test_demo.py", "test_loop_properties.py", "test_envpin.py", "test_cluster_ray.py", "test_overnight.py", "test_tracking.py",
    "test_prepare.py", "test_device_check.py", "test_slot_copy.py", "test_sweep.py", "test_never_stuck.py",
    "test_server_tools.py", "test_wandb_tracking.py", "test_ledger_trust.py", "test_slots.py", "test_trusted_import.py",
    "test_cluster_slurm.py", "test_morning_report.py", "test_server_stdio.py", "test_killed_measurements.py",
    "test_plugin.py", "test_early_stop.py", "test_integrity.py", "test_held_orders.py", "test_novelty.py",
    "test_train.py", "test_evaluation.py", "test_notify.py", "test_data_order.py", "test_server_inspector.py",
    "test_dashboard_browser.py", "test_gpu_models.py", "test_export_archive.py", "test_hooks.py",
    "test_server_units.py", "test_dashboard.py", "test_download.py", "test_dataloader.py", "test_cost.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: each file's own order kept


@pytest.fixture(autouse=True)
def lab_clients():
    """The Labs' clients (server_support.Lab.client) closed as each test ends, after its own fixtures."""
    yield
    if "server_support" in sys.modules:
        sys.modules["server_support"].close_clients()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def prepared_env(tmp_path_factory, bubblewrap) -> dict:
    """Environment for a child process that sees a prepared CPU-profile harness."""
    cache = tmp_path_factory.mktemp("autoresearch-cache")
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the compile cache is the one beside the data
    env.update(
        AUTORESEARCH_CACHE=str(cache),
        AUTORESEARCH_TIME_BUDGET=TEST_TIME_BUDGET,
        AUTORESEARCH_EVAL_TOKENS=TEST_EVAL_TOKENS,
        # eager: the tests of the loop need a trained model, not a compiled one (a cold compile of
        # a model costs a minute on 2 cores); test_compile.py covers the compiled path
        AUTORESEARCH_COMPILE="0",
        PYTHONUNBUFFERED="1",
    )
    subprocess.run(
        [sys.executable, "prepare.py", "--profile", "cpu", "--dataset", "offline"],
        cwd=REPO, env=env, check=True,
    )
    return env


@pytest.fixture(scope="session")
def ray_head():
    """One local Ray head for the whole session (starting one takes half a minute on 2 cores):
    127.0.0.1 only, free ports, 2 CPUs and 2 logical GPUs; stopped at the end with no process left."""
    pytest.importorskip("ray", reason="the ray extra is not installed: uv sync --extra ray")
    from cluster_support import RayHead
    head = RayHead()
    head.wait_ready()
    yield head
    assert head.stop() == [], "Ray processes were left after the head stopped"


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """For in-process servers: a prepared-looking cache, no budget override, no fake-trainer knobs."""
    from server_support import FAKE_KNOBS, make_cache
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(make_cache(tmp_path)))
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    monkeypatch.delenv("RESEARCH_LOOP_SLOTS", raising=False)
    for knob in FAKE_KNOBS:
        monkeypatch.delenv(f"FAKE_{knob}", raising=False)
    return tmp_path


@pytest.fixture
def lab(fake_env):
    """A fake-trainer workspace served in-process with one slot."""
    from server_support import Lab, make_workspace
    lab = Lab(make_workspace(fake_env))
    yield lab
    lab.loop.shutdown()


def ensure_debian_package(binary: str, package: str) -> str:
    """A tool from Debian's archive, installed first when missing and this user may (as CI's root)."""
    found = shutil.which(binary)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
        found = shutil.which(binary)
    assert found, f"this test needs `{binary}`: apt-get install -y {package}"
    return found


@pytest.fixture(scope="session")
def bubblewrap() -> str:
    """The runs' sandbox; without it a server refuses runs unless started with the opt-in
    (server_support.UNSANDBOXED), and these tests are about sandboxed runs."""
    return ensure_debian_package("bwrap", "bubblewrap")


@pytest.fixture
def stand_in_torch(fake_env, monkeypatch):
    """A workspace whose runs train with a stand-in torch package (tests/envpin_support.py)."""
    from envpin_support import StandInTorch
    from mcp_server.executors import executor
    from mcp_server.scripts import harness_eval
    monkeypatch.setenv(harness_eval.WARM_ENV, "0")  # the evaluator stand-in, started cold for each run
    monkeypatch.delenv(executor.WARM_START_ENV, raising=False)
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")  # the stand-in has no torch.cuda to ask
    lab = StandInTorch(fake_env)
    yield lab
    lab.pool.shutdown()


@pytest.fixture
def outside_tmp():
    """A folder outside /tmp, seen in the sandbox as on the machine (the sandbox's /tmp is its own)."""
    folder = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="research-loop-test-"))
    yield folder
    shutil.rmtree(folder)


class Hold:
    """One run of the fake trainer held in flight until release() (fake_train.py's HOLD): a test's call made "while
    the run trains" is made then on any machine (a run that trained a few seconds had ended under load, and the call
    met another state)."""

    def __init__(self, monkeypatch, folder: Path):
        self.monkeypatch, self.file = monkeypatch, folder / "release"

    def __call__(self, run: int) -> None:
        """Holds `run` of a server started after this call (a run's environment is its server's as it started)."""
        self.file.unlink(missing_ok=True)
        self.monkeypatch.setenv("FAKE_HOLD", str(run))
        self.monkeypatch.setenv("FAKE_RELEASE", str(self.file))

    def release(self) -> None:
        self.file.touch()


@pytest.fixture
def hold(fake_env, monkeypatch, outside_tmp):
    """hold(run): that run waits, its steps done, until hold.release(); released as the test ends."""
    held = Hold(monkeypatch, outside_tmp)
    yield held
    held.release()


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (Debian's package, installed if missing and allowed)."""
    from browser_support import Browser, ensure_chromium
    try:
        executable = ensure_chromium()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    chromium = Browser(executable)
    yield chromium
    chromium.close()
