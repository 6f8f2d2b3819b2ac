"""Shared fixtures: the repository root, and a harness prepared once per test session.

The prepared cache holds the offline corpus and a tokenizer for the CPU profile, in a
temp folder, so no test touches ~/.cache/autoresearch or the network.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_TIME_BUDGET = "4"  # seconds of training per real run in tests
TEST_EVAL_TOKENS = "16384"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def prepared_env(tmp_path_factory) -> dict:
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
