"""The harness note setup writes for a whole research run (review 86: review 85's "does not evaluate exported models"
was said only on the setup that dropped the evaluator)."""
from server_support import Lab, exporting_workspace, git

SAID = "does not evaluate exported models: every val_bpb of this research run is the one train.py prints"


def test_a_second_harness_change_without_the_evaluator_keeps_saying_whose_the_numbers_are(fake_env):
    """Review 86: after the setup that dropped the evaluator and exporter (noted), the agent stopped again, changed one
    harness file more (a comment) and set up a third tag: the note compared with the second run's kept commit, which
    had no evaluator either, and said only that the harness differed; every number was still train.py's own."""
    lab = Lab(exporting_workspace(fake_env))
    try:
        lab.ok("setup", tag="first")
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep", unverified=True)
        lab.ok("stop", reason="a new harness")
        git(lab.ws, "rm", "-q", "nanochat/evaluate_export.py", "nanochat/export.py")
        git(lab.ws, "commit", "-q", "-m", "a lighter harness")
        assert SAID in lab.ok("setup", tag="second")["harness_changed"]
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep")
        lab.ok("stop", reason="one more harness tweak")
        with open(lab.ws / "prepare.py", "a") as f:
            f.write("# a comment\n")
        git(lab.ws, "commit", "-q", "-am", "a comment in the harness")
        assert SAID in lab.ok("setup", tag="third")["harness_changed"]
        assert SAID in lab.ok("status")["harness_changed"]
    finally:
        lab.loop.shutdown()
