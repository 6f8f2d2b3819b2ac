"""Random nights: hypothesis drives the real server (in-process MCP client, real git, the fake
trainer) with random sequences of tool calls, training outcomes and server restarts, and checks
after every step what must always hold:

- no call ends in an internal error;
- results.tsv parses, with exactly one row per decided run and no other line;
- the research branch holds exactly the kept commits, in the ledger's order;
- status().next names a call that succeeds;
- no training process outlives its run.
"""
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mcp_server.ledger import read_rows
from server_support import Lab, git, make_workspace, pid_alive

OUTCOMES = {
    "better": "VAL_BPB = {value}\n",
    "worse": "VAL_BPB = 1.5\n",
    "crash": "CRASH = 1\n",
    "nan": "NAN = 1\n",
    "zero": "VAL_BPB = 0\n",
    "hang": "SLEEP = 60\nSTEPS = 60\n",  # run with a 1 s timeout
    "escape": "VAL_BPB = {value}\nESCAPE = 0.5\n",
    "slow": "VAL_BPB = {value}\nSLEEP = 1.5\nSTEPS = 3\n",
}
CALL_RE = re.compile(r"(\w+)\(([^)]*)\)")


def training_processes(ws: Path) -> list[int]:
    """Live processes whose working directory is one of the workspace's slots."""
    slots = str(ws / ".git" / "research-loop" / "slots")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = str((entry / "cwd").resolve())
        except OSError:
            continue
        if cwd.startswith(slots) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture
def machine_env(fake_env):
    NightMachine.base_path = fake_env
    return fake_env


class NightMachine(RuleBasedStateMachine):
    base_path: Path = None
    count = 0  # nights (examples) run
    steps = 0  # tool calls made by the rules

    @initialize(slots=st.sampled_from([1, 2]))
    def start(self, slots):
        NightMachine.count += 1
        self.lab = Lab(make_workspace(self.base_path / f"night{NightMachine.count}"), slots=slots)
        self.answer("setup", tag="night")
        self.base = self.lab.head()
        self.value = 1.0

    def teardown(self):
        if hasattr(self, "lab"):
            self.lab.loop.shutdown()

    def answer(self, name, **args):
        """Calls a tool; a refusal is fine (that is the rules working), an internal error is not."""
        NightMachine.steps += 1
        result = self.lab.call(name, **args)
        text = result.content[0].text
        assert "Internal error" not in text, text
        return None if result.is_error else result.structured_content

    def runs(self, *statuses):
        state = self.lab.loop.state.load()
        return [e["run"] for e in self.lab.loop.runs_of(state, *statuses)]

    # --- what the agent does ----------------------------------------------------------------
    @rule(outcome=st.sampled_from(sorted(OUTCOMES)), wait=st.booleans())
    def submit(self, outcome, wait):
        self.value = round(self.value - 0.01, 4)
        (self.lab.ws / "train.py").write_text(OUTCOMES[outcome].format(value=self.value))
        args = {"description": f"{outcome} {self.value}", "wait": wait}
        if outcome == "hang":
            args["timeout_seconds"] = 1
        self.answer("run_experiment", **args)

    @rule()
    def wait_for_one(self):
        if self.runs("queued", "running"):
            self.answer("wait")

    # Which run a rule picks is drawn as a plain index before looking at the server: how many runs
    # are pending depends on timing, and hypothesis needs the same draws when it replays a night.
    @staticmethod
    def pick(runs, index):
        return runs[index] if index < len(runs) else None

    @rule(index=st.integers(0, 3))
    def keep_one(self, index):
        run = self.pick(self.runs("pending", "interrupted"), index)
        self.answer("keep", **({} if run is None else {"run": run}))

    @rule(index=st.integers(0, 3))
    def discard_one(self, index):
        run = self.pick(self.runs("pending", "interrupted"), index)
        self.answer("discard", **({} if run is None else {"run": run}))

    @rule(index=st.integers(0, 1))
    def cancel_one(self, index):
        in_flight = self.runs("queued", "running")
        if in_flight:
            self.answer("cancel", run=in_flight[index % len(in_flight)])

    @rule()
    def restart_server(self):
        self.lab.restart()

    @rule()
    def follow_next(self):
        """Whatever status().next names must work."""
        next_step = self.answer("status")["next"]
        name, args = CALL_RE.search(next_step).groups()
        kwargs = dict(part.split("=") for part in args.split(", ") if "=" in part)
        kwargs = {k: int(v) if v.isdigit() else v for k, v in kwargs.items()}
        if name == "run_experiment":
            kwargs = {"description": "as next says", "wait": kwargs.get("wait") != "False"}
        result = self.lab.call(name, **kwargs)
        assert not result.is_error, f"status().next said {next_step!r}, and {name}{kwargs} failed: " \
                                    f"{result.content[0].text}"

    # --- what must always hold --------------------------------------------------------------
    @invariant()
    def ledger_has_one_row_per_decided_run(self):
        if not hasattr(self, "lab"):
            return
        rows, malformed = read_rows(self.lab.ws / "results.tsv")
        assert malformed == 0
        lines = (self.lab.ws / "results.tsv").read_text().split("\n")
        assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription" and lines[-1] == ""
        assert len(rows) == len(lines) - 2
        decided = sorted(json.loads(p.read_text())["result"]["commit"] for p in (self.lab.ws / "runs").glob("*.json")
                         if not p.name.endswith(".report.json") and '"decision"' in p.read_text())
        assert sorted(r.commit for r in rows) == decided

    @invariant()
    def branch_holds_exactly_the_kept_commits(self):
        if not hasattr(self, "lab"):
            return
        rows, _ = read_rows(self.lab.ws / "results.tsv")
        on_branch = git(self.lab.ws, "rev-list", "--reverse", "--abbrev=7", "--abbrev-commit",
                        f"{self.base}..autoresearch/night").split()
        assert on_branch == [r.commit for r in rows if r.status == "keep"]

    @invariant()
    def no_training_outlives_its_run(self):
        if not hasattr(self, "lab") or self.runs("queued", "running"):
            return
        assert not training_processes(self.lab.ws) or \
            self._settles(lambda: not training_processes(self.lab.ws))

    @staticmethod
    def _settles(predicate, seconds=3.0):
        import time
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


NightMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=10, deadline=None,
                                          suppress_health_check=list(HealthCheck))


def test_random_nights_keep_every_invariant(machine_env):
    NightMachine.count = NightMachine.steps = 0
    NightMachine.TestCase().runTest()
    print(f"{NightMachine.count} random nights, {NightMachine.steps} tool calls")
    assert NightMachine.count >= 20 and NightMachine.steps >= 100
