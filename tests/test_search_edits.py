"""The search's edits to train.py: only the named constants change, the file compiles, and a
search space that does not fit train.py is a clear error before anything runs."""
import ast
import json
import subprocess
import sys

import pytest

from autosearch.constants import evaluate_constants, find_constants, harness_exports
from mcp_server.constants import ConstantError, changed_statements, format_value, rewrite_constants
from autosearch.driver import budget_left, experiments_done
from autosearch.report import best_kept, ledger_table, read_ledger
from autosearch.space import DEFAULT_SPACE, Dimension, SpaceError, applicable, load_space, validate_space
from autosearch.strategies import GreedyCoordinateSearch, RandomSearch

# A constants block in train.py's style: literals, arithmetic, a profile lookup, comments.
TRAIN_LIKE = '''"""A model."""
from prepare import TRAIN_DEFAULTS, MAX_SEQ_LEN

# Model architecture
DEPTH = TRAIN_DEFAULTS["depth"]  # number of layers
WINDOW_PATTERN = TRAIN_DEFAULTS["window_pattern"]  # L = full context
ASPECT_RATIO = 64  # width per layer

# Optimization
TOTAL_BATCH_SIZE = TRAIN_DEFAULTS["total_batch_size"]  # tokens per step
DEVICE_BATCH_SIZE = TRAIN_DEFAULTS["device_batch_size"]
EMBEDDING_LR = 0.6  # Adam, token embeddings
MATRIX_LR = 0.04    # Muon, 2-D matrices — étalonné
WEIGHT_DECAY = 0.2
ADAM_BETAS = (0.8, 0.95)
WARMDOWN_RATIO = 0.5
TOKENS_PER_STEP = 2**13 * 2


def lr_multiplier(progress):
    return 1.0 if progress < 1 - WARMDOWN_RATIO else (1 - progress) / WARMDOWN_RATIO
'''
HARNESS = {"TRAIN_DEFAULTS": {"depth": 4, "window_pattern": "L", "total_batch_size": 8192,
                              "device_batch_size": 16}, "MAX_SEQ_LEN": 256}


def names_in(source):
    return set(find_constants(source))


def test_evaluates_literals_arithmetic_and_profile_lookups():
    values = evaluate_constants(TRAIN_LIKE, ["DEPTH", "MATRIX_LR", "ADAM_BETAS", "TOKENS_PER_STEP",
                                             "TOTAL_BATCH_SIZE"], HARNESS)
    assert values == {"DEPTH": 4, "MATRIX_LR": 0.04, "ADAM_BETAS": (0.8, 0.95), "TOKENS_PER_STEP": 16384,
                      "TOTAL_BATCH_SIZE": 8192}


def test_rewrite_changes_only_the_named_constants_and_compiles():
    changes = {"MATRIX_LR": 0.056, "DEPTH": 5, "WINDOW_PATTERN": "SSLL", "TOTAL_BATCH_SIZE": 16384,
               "ADAM_BETAS": (0.9, 0.95)}
    new = rewrite_constants(TRAIN_LIKE, changes)
    compile(new, "train.py", "exec")
    assert changed_statements(TRAIN_LIKE, new) == set(changes)
    assert evaluate_constants(new, list(changes), HARNESS) == changes
    # Comments and all other lines are untouched, character for character.
    old_lines, new_lines = TRAIN_LIKE.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    differing = [(o, n) for o, n in zip(old_lines, new_lines) if o != n]
    assert len(differing) == len(changes)
    assert "MATRIX_LR = 0.056    # Muon, 2-D matrices — étalonné" in new_lines
    assert "TOTAL_BATCH_SIZE = 2**14  # tokens per step" in new_lines
    assert 'WINDOW_PATTERN = "SSLL"  # L = full context' in new_lines


def test_rewrite_of_a_multiline_value():
    source = "X = (\n    1,\n    2,\n)  # pair\nY = 3\n"
    new = rewrite_constants(source, {"X": (4, 5)})
    assert new == "X = (4, 5)  # pair\nY = 3\n"


def test_changed_statements_refuses_other_edits():
    edited = TRAIN_LIKE.replace("return 1.0 if", "return 2.0 if")
    with pytest.raises(ConstantError, match="beyond a constant"):
        changed_statements(TRAIN_LIKE, edited)


def test_unknown_or_ambiguous_constant_is_a_clear_error():
    with pytest.raises(ConstantError, match="no constant MATRX_LR"):
        rewrite_constants(TRAIN_LIKE, {"MATRX_LR": 0.1})
    twice = TRAIN_LIKE + "MATRIX_LR = 0.05\n"
    with pytest.raises(ConstantError, match="assigned more than once"):
        rewrite_constants(twice, {"MATRIX_LR": 0.1})
    with pytest.raises(ConstantError, match="no constant NOPE"):
        evaluate_constants(TRAIN_LIKE, ["NOPE"], HARNESS)


def test_format_value_reads_like_hand_written_code():
    assert format_value(524288) == "2**19"
    assert format_value(1000) == "1000"
    assert format_value(0.04) == "0.04"
    assert format_value("SSSL") == '"SSSL"'
    assert format_value((0.8, 0.95)) == "(0.8, 0.95)"
    assert format_value(True) == "True"


def current_values():
    source = TRAIN_LIKE
    names = [dim.name for dim in DEFAULT_SPACE if dim.name in names_in(source)] + ["DEVICE_BATCH_SIZE"]
    return {n: None for n in names_in(source)} | evaluate_constants(source, names, HARNESS)


def test_default_space_fits_and_proposes_valid_edits():
    current = current_values()
    space = tuple(dim for dim in DEFAULT_SPACE if dim.name in current)
    validate_space(space, current)
    depth = next(dim for dim in space if dim.name == "DEPTH")
    assert depth.candidates(4) == [5, 3, 6]
    lr = next(dim for dim in space if dim.name == "MATRIX_LR")
    assert lr.candidates(0.04) == [0.056, 0.028, 0.08, 0.02]
    wd = next(dim for dim in space if dim.name == "WEIGHT_DECAY")
    assert wd.candidates(0.2) == [0.0, 0.1, 0.4]


def test_space_with_unknown_name_or_wrong_type_is_refused():
    current = current_values()
    with pytest.raises(SpaceError, match="MATRX_LR: train.py has no such constant"):
        validate_space((Dimension("MATRX_LR", "choices", (0.1,)),), current)
    with pytest.raises(SpaceError, match=r"DEPTH is int \(4\) but the space offers 4.5"):
        validate_space((Dimension("DEPTH", "choices", (4.5,)),), current)
    with pytest.raises(SpaceError, match="WINDOW_PATTERN is str"):
        validate_space((Dimension("WINDOW_PATTERN", "choices", (4,)),), current)
    with pytest.raises(SpaceError, match="scale needs a numeric constant"):
        validate_space((Dimension("WINDOW_PATTERN", "scale", (2,)),), current)
    with pytest.raises(SpaceError, match="shift needs an integer"):
        validate_space((Dimension("MATRIX_LR", "shift", (1,)),), current)
    # An int where a float is expected is fine: 0 means 0.0.
    validate_space((Dimension("WEIGHT_DECAY", "choices", (0, 0.1)),), current)


def test_space_file_parsing(tmp_path):
    good = tmp_path / "space.json"
    good.write_text(json.dumps({"MATRIX_LR": [0.02, 0.08], "DEPTH": {"shift": [1]}}))
    assert load_space(good) == (Dimension("MATRIX_LR", "choices", (0.02, 0.08)), Dimension("DEPTH", "shift", (1,)))
    for bad in ('{"MATRIX_LR": 0.02}', '{"DEPTH": {"grow": [1]}}', "[1, 2]", "{", '{"X": []}'):
        path = tmp_path / "bad.json"
        path.write_text(bad)
        with pytest.raises(SpaceError, match="bad.json"):
            load_space(path)


def test_strategies_are_seeded_skip_tried_and_respect_the_batch():
    current = current_values()
    space = tuple(dim for dim in DEFAULT_SPACE if dim.name in current)
    first = RandomSearch(space, 7, HARNESS).propose(current, [current] * 3)
    assert first == RandomSearch(space, 7, HARNESS).propose(current, [current] * 3)
    assert RandomSearch(space, 7, HARNESS).propose(current, [current] * 2 + [current | first]) != first
    # A total batch that is not a whole number of device batches (16 x 256 tokens) is never proposed.
    small = current | {"TOTAL_BATCH_SIZE": 4096}
    for n in range(50):
        change = RandomSearch(space, n, HARNESS).propose(small, [small])
        assert change.get("TOTAL_BATCH_SIZE") != 2048


def test_greedy_is_coordinate_descent_on_a_grid_around_the_baseline():
    baseline = current_values()
    space = tuple(dim for dim in DEFAULT_SPACE if dim.name in baseline)
    greedy = GreedyCoordinateSearch(space, HARNESS)
    assert greedy.propose(baseline, [baseline]) == {"MATRIX_LR": 0.056}
    # 0.056 was kept: the rest of the MATRIX_LR grid is tried from it, then the next constant.
    best = baseline | {"MATRIX_LR": 0.056}
    history = [baseline, best]
    proposals = []
    for _ in range(5):
        change = greedy.propose(best, history)
        proposals.append(change)
        history.append(best | change)
    # (MATRIX_LR back at 0.04 with the rest unchanged is the baseline itself: already tried.)
    assert proposals == [{"MATRIX_LR": 0.028}, {"MATRIX_LR": 0.08}, {"MATRIX_LR": 0.02},
                         {"EMBEDDING_LR": 0.84}, {"EMBEDDING_LR": 0.42}]
    # Every single-constant move from the best tried: the search is over.
    one_dim = (Dimension("DEPTH", "shift", (1,)),)
    assert GreedyCoordinateSearch(one_dim, HARNESS).propose(baseline, [baseline, baseline | {"DEPTH": 5}]) is None


def test_every_proposal_is_a_clean_edit():
    current = current_values()
    space = tuple(dim for dim in DEFAULT_SPACE if dim.name in current)
    for n in range(30):
        change = RandomSearch(space, n, HARNESS).propose(current, [current] * n)
        new = rewrite_constants(TRAIN_LIKE, change)
        assert changed_statements(TRAIN_LIKE, new) == set(change)
        ast.parse(new)


def test_demo_rejects_a_bad_space_before_anything_runs(repo_root, prepared_env, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"MATRIX_LR": ["high"], "NOT_A_CONSTANT": [1]}))
    workspace = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "demo.py", "--profile", "cpu", "--dataset", "offline",
                           "--space", str(space), "--workspace", str(workspace)],
                          cwd=repo_root, env=prepared_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "NOT_A_CONSTANT: train.py has no such constant" in proc.stderr
    assert "MATRIX_LR is float" in proc.stderr
    assert not workspace.exists()  # nothing cloned, nothing run


def test_the_real_train_py_takes_every_proposal_cleanly(repo_root, prepared_env):
    """Proposals of both strategies, applied to this repository's train.py: it compiles and only
    the named constants differ; values resolve through prepare.py's TRAIN_DEFAULTS."""
    source = (repo_root / "train.py").read_text()
    harness = harness_exports(repo_root, prepared_env)
    names = set(find_constants(source))
    space = applicable(DEFAULT_SPACE, names)
    assert {dim.name for dim in space} == {dim.name for dim in DEFAULT_SPACE}  # train.py has them all
    current = evaluate_constants(source, [dim.name for dim in space] + ["DEVICE_BATCH_SIZE"], harness)
    assert current["DEPTH"] == harness["TRAIN_DEFAULTS"]["depth"]
    validate_space(space, {n: None for n in names} | current)
    changes = [RandomSearch(space, seed, harness).propose(current, [current]) for seed in range(10)]
    changes.append(GreedyCoordinateSearch(space, harness).propose(current, [current]))
    for change in changes:
        new = rewrite_constants(source, change)
        compile(new, "train.py", "exec")
        assert changed_statements(source, new) == set(change)
        assert evaluate_constants(new, list(change), harness) == change


def test_budget_in_experiments_or_hours():
    assert budget_left(done=2, experiments=3, hours=None, elapsed=1e6, typical=60)
    assert not budget_left(done=3, experiments=3, hours=None, elapsed=0, typical=60)
    assert not budget_left(done=50, experiments=None, hours=1, elapsed=3550, typical=60)
    assert budget_left(done=50, experiments=None, hours=1, elapsed=3000, typical=90)
    assert not budget_left(done=1, experiments=5, hours=1, elapsed=3590, typical=60)


def test_interrupted_runs_do_not_count_as_experiments():
    rows = [dict(status="crash", description="baseline (interrupted)"), dict(status="keep", description="baseline"),
            dict(status="crash", description="DEPTH=5 (interrupted)"), dict(status="discard", description="DEPTH=5"),
            dict(status="crash", description="DEPTH=3")]
    assert experiments_done(rows) == 2
    assert experiments_done(rows[:1]) == 0


def test_demo_never_works_in_a_folder_it_did_not_make(repo_root, tmp_path):
    """Your own checkout (any non-empty folder demo.py did not create) is refused, untouched."""
    checkout = tmp_path / "mine"
    checkout.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=checkout, check=True)
    (checkout / "train.py").write_text("DEPTH = 4\n")
    proc = subprocess.run([sys.executable, "demo.py", "--workspace", str(checkout)], cwd=repo_root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "is not a workspace made by demo.py" in proc.stderr
    assert sorted(p.name for p in checkout.iterdir()) == [".git", "train.py"]
    branches = subprocess.run(["git", "branch", "--list"], cwd=checkout, capture_output=True, text=True).stdout
    assert "autoresearch" not in branches


def test_ledger_reading_and_table(tmp_path):
    (tmp_path / "results.tsv").write_text(
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        "aaaaaaa\t1.500000\t1.1\tkeep\tbaseline\n"
        "bbbbbbb\t0.000000\t0.0\tcrash\tDEPTH=9 (interrupted)\n"
        "half-written line\n"
        "ccccccc\t1.400000\t1.2\tkeep\tMATRIX_LR=0.056\n")
    rows = read_ledger(tmp_path)
    assert [row["commit"] for row in rows] == ["aaaaaaa", "bbbbbbb", "ccccccc"]
    assert best_kept(rows)["commit"] == "ccccccc"
    table = ledger_table(rows).splitlines()
    assert table[0].split() == ["#", "commit", "val_bpb", "memory_gb", "status", "description"]
    assert table[3].startswith("2*") and table[3].endswith("MATRIX_LR=0.056")
    assert read_ledger(tmp_path / "nowhere") == []
