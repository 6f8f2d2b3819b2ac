"""A workspace that tracks its own progress.png (upstream's autoresearch commits one): the server's chart drawn over it
is no change of the harness or of train.py, so it stops no run and no setup."""
from server_support import Lab, git, make_workspace, set_knobs


def test_a_tracked_progress_png_redrawn_by_the_server_stops_no_run_and_no_setup(fake_env):
    """Review 85: plot_progress (and the overnight runner's summary) write progress.png in the workspace; where git
    tracks it, every run_experiment after was refused ("Only train.py may change ... progress.png") and the next
    night's setup too ("Uncommitted changes to tracked files: progress.png"), until the agent put it back by hand."""
    ws = make_workspace(fake_env)
    (ws / "progress.png").write_bytes(b"upstream's chart")
    git(ws, "add", "progress.png")
    git(ws, "commit", "-q", "-m", "the chart, as upstream tracks it")
    lab = Lab(ws)
    try:
        lab.baseline()
        lab.ok("plot_progress")
        assert git(ws, "status", "--porcelain", "--untracked-files=no").strip() == "M progress.png"
        set_knobs(ws, val_bpb=0.9)
        run = lab.ok("run_experiment", description="an idea")
        assert git(ws, "show", f"{run['commit']}:progress.png") == "upstream's chart"  # the run's tree: git's
        lab.ok("keep", unconfirmed=True)
        lab.ok("stop", reason="the next night")
        git(ws, "checkout", "-q", "main")
        lab.ok("setup", tag="second")
    finally:
        lab.loop.shutdown()
