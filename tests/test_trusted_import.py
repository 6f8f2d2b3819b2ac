"""Review of the imports' digests (scripts/trusted_import.py): what a module the agent edited can do
about its own digest once it runs, and a run whose interpreter never says what it compiled."""
import os
import queue
import sys
from pathlib import Path

from test_envpin import edit_through_a_link, stand_in_torch, EVALUATOR_WITH_LOSSMOD  # noqa: F401  (fixture)

CHANGED = "{} (compiled from other contents than its check found)"
# the edited module, once it runs, takes its own digest back out of the importer's record
ERASE_ITSELF = "sys.modules['trusted_import']._IMPORTED.pop(__file__, None) if 'trusted_import' in sys.modules else 0"


def start(lab, n: int, outcomes, evaluator=None):
    lab.pool.start(lab.spec(n, False, lab.pool.environment_position([lab.python]), evaluator),
                   lambda r, o: outcomes.put(o))


def test_an_edit_that_erases_its_own_digest_still_makes_the_run_no_result(stand_in_torch):
    from mcp_server.core import envpin
    from server_support import wait_until
    lab, source = stand_in_torch, stand_in_torch.source
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    lab.hold.unlink()
    restore, imported = edit_through_a_link(source, f"{ERASE_ITSELF}\nSOURCE = 'edited through a link'")
    start(lab, 1, outcomes)
    assert wait_until(imported.exists, 60)
    restore()
    outcome = outcomes.get(timeout=120)
    assert outcome.report["exit_code"] == 0 and "edited through a link" in lab.log(1), lab.log(1)
    assert outcome.report.get("environment_changed") == [CHANGED.format(source)], outcome.report


def test_an_evaluator_edit_that_erases_its_own_digest_still_makes_the_run_no_result(stand_in_torch):
    from mcp_server.core import envpin
    from mcp_server.scripts import harness_eval
    from server_support import wait_until
    lab = stand_in_torch
    lossmod = lab.site / "lossmod.py"
    lossmod.write_text("VALUE = 1.5\n")
    script = lab.folder / "evaluator.py"
    script.write_text(EVALUATOR_WITH_LOSSMOD.format(site=str(lab.site)))
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    restore, imported = edit_through_a_link(lossmod, f"{ERASE_ITSELF}\nVALUE = 0.5")
    start(lab, 1, outcomes, harness_eval.evaluator_command(sys.executable, script))
    assert wait_until(imported.exists, 60)
    restore()
    lab.hold.unlink()
    outcome = outcomes.get(timeout=120)
    assert outcome.report["evaluation"]["val_bpb"] == 0.5, outcome.report
    assert outcome.report.get("environment_changed") == [CHANGED.format(lossmod)], outcome.report


def test_an_edit_that_ends_the_servers_importer_never_runs_unchecked(stand_in_torch):
    """The edited torch ends the interpreter on warm_train.py as it imports it, before that says what
    it compiled: the worker used to start the run on a plain interpreter instead, which compiled the
    edit unseen (a result). Now the run is not started, and says why."""
    from mcp_server.core import envpin
    lab, source = stand_in_torch, stand_in_torch.source
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    plain = lab.folder / "plain-import"
    lab.hold.unlink()
    restore, _ = edit_through_a_link(source, "import os\nif 'trusted_import' in sys.modules: os._exit(3)\n"
                                     f"if sys.argv[0].endswith('train.py'): open({str(plain)!r}, 'w').close()\n"
                                     "SOURCE = 'edited through a link'")
    start(lab, 1, outcomes)
    outcome = outcomes.get(timeout=120)
    restore()
    assert not plain.exists() and "edited through a link" not in lab.log(1), lab.log(1)
    assert outcome.report["exit_code"] == 127 and "exited (code 3), before it said what it compiled" in lab.log(1)


def test_a_warm_interpreter_lost_before_its_run_is_replaced_by_a_fresh_one(stand_in_torch):
    """The slot's warm interpreter is killed (by the agent, or the kernel) before its run is handed to
    it: the run starts on a fresh interpreter through the server's importer, and is a result."""
    import signal
    from mcp_server.core import envpin
    from server_support import wait_until
    lab = stand_in_torch
    envpin.pin_sources([lab.python])
    outcomes = queue.Queue()
    lab.hold.unlink()
    start(lab, 1, outcomes)
    assert outcomes.get(timeout=120).report["exit_code"] == 0
    assert wait_until(lambda: 0 in lab.pool.ahead and children(lab.pool.ahead[0].proc.pid), 30)
    (stub,) = children(lab.pool.ahead[0].proc.pid)
    os.kill(stub, signal.SIGKILL)
    start(lab, 2, outcomes)
    outcome = outcomes.get(timeout=120)
    assert outcome.report["exit_code"] == 0 and not outcome.report["warm_start"], (outcome.report, lab.log(2))
    assert "torch: compiled from its source" in lab.log(2) and "environment_changed" not in outcome.report


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
