"""What a change did beyond its constants, matched line by line (history.unmatched), in moments whatever the shape of
the two train.py: it runs inside a decision's transaction and for each idea of the report."""
import time
from pathlib import Path

from server_support import Lab, make_workspace


def test_a_long_best_rewritten_as_a_short_train_py_is_decided_and_reported_in_moments(fake_env):
    """Review 84: review 83's matching (history.unmatched) relied on SequenceMatcher's autojunk, which sets aside the
    popular lines of the second text only, and only of one of 200 lines or more. A best of 20,000 lines (`x`, `z`, `y`,
    `z` over again, under MATCHED_LINES beside 199) rewritten as 199 lines (`x`, `y` over again) took 12 s to match,
    within the transaction of its discard, and as long again in the report. The longer text is the second now."""
    base = "VAL_BPB = 1.0\n" + "x = 1\nz = 1\ny = 1\nz = 1\n" * 5000
    lab = Lab(make_workspace(fake_env, base))
    try:
        lab.baseline()
        (lab.ws / "train.py").write_text("VAL_BPB = 0.9\n" + "x = 1\ny = 1\n" * 99)
        run = lab.ok("run_experiment", description="most of it dropped")["run"]
        started = time.monotonic()
        lab.ok("discard", run=run)
        assert "other line(s)" in lab.ok("history")["lines"][-1]
        assert "code: module level" in Path(lab.ok("report")["path"]).read_text()
        assert time.monotonic() - started < 10
    finally:
        lab.loop.shutdown()
