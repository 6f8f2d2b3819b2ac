"""The harness note setup writes for a whole research run (review 86: review 85's "does not evaluate exported models"
was said only on the setup that dropped the evaluator)."""
import json
import subprocess
import sys

from mcp_server.core.state import records_dir
from server_support import Lab, exporting_workspace, git, set_knobs
from test_morning_report import section

SAID = "does not evaluate exported models: every val_bpb of this research run is the one train.py prints"


def drop_the_evaluator(lab) -> None:
    """A research run on the harness that evaluates exported models, stopped; then that harness committed without its
    evaluator and exporter."""
    lab.ok("setup", tag="first")
    lab.ok("run_experiment", description="baseline")
    lab.ok("keep", unverified=True)
    lab.ok("stop", reason="a new harness")
    git(lab.ws, "rm", "-q", "nanochat/evaluate_export.py", "nanochat/export.py")
    git(lab.ws, "commit", "-q", "-m", "a lighter harness")


def test_a_harness_that_no_longer_evaluates_exports_says_whose_the_numbers_are(fake_env):
    """Review 85: with the harness that evaluates exported models, the agent stopped the research run, committed the
    harness without its evaluator and exporter, and set up a new tag: every number of the new research run was the one
    train.py printed, kept with no marker and no unverified=true, and setup, status and the report said only that the
    harness differed and its numbers were not comparable."""
    lab = Lab(exporting_workspace(fake_env))
    try:
        drop_the_evaluator(lab)
        assert SAID in lab.ok("setup", tag="second")["harness_changed"]
        assert SAID in lab.ok("status")["harness_changed"]
        lab.ok("run_experiment", description="baseline")
        lab.ok("keep")
        assert SAID in section((lab.ws / lab.ok("report")["path"]).read_text(), "Summary")
    finally:
        lab.loop.shutdown()


def test_a_second_harness_change_without_the_evaluator_keeps_saying_whose_the_numbers_are(fake_env):
    """Review 86: after the setup that dropped the evaluator and exporter (noted), the agent stopped again, changed one
    harness file more (a comment) and set up a third tag: the note compared with the second run's kept commit, which
    had no evaluator either, and said only that the harness differed; every number was still train.py's own."""
    lab = Lab(exporting_workspace(fake_env))
    try:
        drop_the_evaluator(lab)
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


def forge_start(ws, start: str) -> None:
    """The server's copy of the state (what a reader that owns nothing believes: the command-line report), its
    start_commit changed."""
    copy = records_dir(ws) / "state.json"
    forged = json.loads(copy.read_text())
    forged["start_commit"] = start
    copy.write_text(json.dumps(forged))


def test_a_start_in_the_copy_that_is_no_commit_of_the_research_run_is_refused_by_the_report(lab):
    """Review 86: start_commit (review 85) is checked for its shape only. Put in the server's copy as a tree, a blob or
    an object git lacks, the command-line report failed with a traceback; as a commit of the agent's own with a
    harness edit, its pull request's branch was built on that commit's tree (the edit in none of the report's diffs)."""
    lab.baseline()
    start = git(lab.ws, "rev-parse", lab.loop.state.load()["start_commit"]).strip()
    set_knobs(lab.ws, val_bpb=0.9)
    lab.ok("run_experiment", description="an idea")
    lab.ok("keep", unconfirmed=True)
    (lab.ws / "nanochat" / "common.py").write_text("# harness stand-in\nSMUGGLED = True\n")
    git(lab.ws, "commit", "-q", "-am", "a harness edit")
    mine = lab.head()
    git(lab.ws, "reset", "-q", "--hard", "HEAD^")
    odd = [git(lab.ws, "rev-parse", name).strip() for name in (f"{start}^{{tree}}", f"{start}:train.py")]
    for n, forged in enumerate([*odd, "0" * 40, mine]):
        forge_start(lab.ws, forged)
        done = subprocess.run([sys.executable, "-m", "mcp_server.cli", "report", "--workspace", str(lab.ws),
                               "--branch", f"pr/{n}"], capture_output=True, text=True)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "start_commit" in done.stderr, done.stderr
        assert not git(lab.ws, "branch", "--list", f"pr/{n}").strip()
    forge_start(lab.ws, start)
    done = subprocess.run([sys.executable, "-m", "mcp_server.cli", "report", "--workspace", str(lab.ws),
                           "--branch", "pr/real"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert git(lab.ws, "rev-parse", "pr/real^").strip() == start
