"""Dispatching runs to the executor's slots, and the executor's callback once a run is over.

Also ownership: one server per workspace runs the experiments (the owner lock); the one that
takes over settles what a previous owner left (a finished run recovered from its report or log,
else interrupted) and refills the slots.

Imports the core (runs), results and measurements.
"""
import functools
import os
import subprocess
import time

import git

from mcp_server.core import budget_settings, cost, history, integrity
from mcp_server.executors.bytecode import compile_bytecode
from mcp_server.executors.executor import WORKER_GRACE_SECONDS, RunSpec, kill_session, read_report, training_env
from mcp_server.core.models import Refusal
from mcp_server.phases.results import record, unrecordable
from mcp_server.phases.measurements import file_measurement
from mcp_server.phases.runs import DEFAULT_TRAIN_COMMAND, IN_FLIGHT, MEASURED_ON, LoopCore
from mcp_server.core.state import process_alive
from mcp_server.core.workspace import EDITABLE, RUNS_DIR, prepared_info
from mcp_server.scripts import sandbox

ENV_SYNC_TIMEOUT_S = 900  # the first `uv run` of a workspace may install torch
ENV_PROBE = "import sys, sysconfig; print(sys.executable); print(sysconfig.get_paths()['purelib'])"


def take_over(core: LoopCore) -> bool:
    """Become the server that runs this workspace's experiments if no live server is, and
    settle what a previous one left. True if this server is the owner."""
    if core.state.owned:
        return True
    if not core.state.try_own():
        return False
    with core.state.transaction() as state:
        _settings_at_start(core, state)
        if history.DIGESTS not in state and state.get("rows"):  # a research run an older server began
            history.adopt(core.root / RUNS_DIR, state)
        if history.LOG_DIGESTS not in state and state.get("rows"):  # and before log digests
            history.adopt_logs(core.root, state, core.records(state, decided=False))
        for entry in core.runs_of(state, "running"):
            if not core.pool.reattach(entry, functools.partial(on_done, core)):  # a cluster's jobs outlive their server
                _settle_orphan(core, state, entry)
    dispatch(core)
    return True


def _settings_at_start(core: LoopCore, state: dict) -> None:
    """The research run's budget settings, recorded now where an older server set it up without them; on the log,
    where this server's environment would set others (the next call that trains says so too: submit)."""
    record = prepared_info() or {}  # as found: no run starts on it (dispatch checks it against setup's)
    adopted = budget_settings.adopt(state, core.root, record)
    if adopted:
        core.state.tell(adopted)
    differ = budget_settings.differences(state, core.root, record)
    if differ:
        budget_settings.log.warning(differ)


def wait_ended(core: LoopCore, runs: list[int], until_all: bool, timeout: float) -> bool:
    """Blocks until one of the runs (or all) has left the flight, or the timeout; True if they have. A server that
    does not own the workspace hears of no run's end (the owner's threads end its runs), so the state says where they
    are, and once the owner has gone this server takes over (its runs then stand interrupted): stop 48, a read-only
    server's wait() never answered, after the owner's run ended or the owner died."""
    if core.wait_for(runs, until_all, timeout):
        return True
    if not core.state.owned:
        take_over(core)
    entries = core.state.load().get("runs") or {}
    return (all if until_all else any)((entries.get(str(n)) or {}).get("status") not in IN_FLIGHT for n in runs)


def require_owner(core: LoopCore) -> None:
    if not take_over(core):
        owner = core.state.owner() or {}
        raise Refusal(f"Another research-loop server (pid {owner.get('pid', '?')}) runs the experiments of "
                      "this workspace, so this one is read-only: use that server's session, or stop it. This "
                      "server takes over at the next call after it has gone.")


def _settle_orphan(core: LoopCore, state: dict, entry: dict) -> None:
    """A run whose server died is interrupted. Its worker's report and log, whatever they say now,
    were last written while no server watched (and an agent can kill the server, then write
    both), so neither is taken as a result: the run's commit stays, and a rerun measures it. Its slot time
    counts all the same (max_gpu_hours), as a cancelled run's does: else killing the server before each run's
    end trained for nothing on the budget."""
    worker = entry.get("worker_pid")
    if worker and process_alive(worker, entry.get("worker_start")):
        kill_session(worker)  # its server is gone: the pipe will end it, this makes sure
    entry["status"] = "interrupted"
    if isinstance(entry.get("started_at"), (int, float)):
        entry["wall_seconds"] = round(orphan_seconds(entry), 2)
        cost.add_slot_time(state, entry["wall_seconds"], (read_report(core.root / entry["report"]) or {}).get("device"))


def orphan_seconds(entry: dict) -> float:
    """How long a run whose server died may have trained, at most: until now (its worker ends with its
    server), and no longer than its worker's own limits. No file of the run's is asked (the agent could
    write one: a report's or log's time)."""
    limit = (entry.get("timeout") or 0) + integrity.evaluation_allowance(entry) + WORKER_GRACE_SECONDS
    return max(0.0, min(time.time() - entry["started_at"], limit))


def dispatch(core: LoopCore) -> None:
    """Starts queued runs, oldest first, while slots are free."""
    if core.closing or not core.state.owned:
        return
    while True:
        with core.state.transaction() as state:
            queued = core.runs_of(state, "queued")
            if not queued or core.pool.free() == 0:
                return
            entry = queued[0]
            try:
                extras, record = [], integrity.checked_record(state)
                settings = submitted_settings(core, state, entry, record)
                if core.make_executor is not None:  # a cluster's node makes its own sandbox (scripts/node.py)
                    extras = integrity.compile_programs(core.ws, entry["commit"], entry["parent"])
                else:
                    harness = integrity.harness_copy(core.ws, entry["parent"], state["fingerprint"]) \
                        if entry.get("verifies") else None
                    extras = integrity.worker_args(core.ws, core.root, entry["run"], entry["commit"],
                                                   entry["timeout"], harness,
                                                   core.ws.worktree_head(harness) if harness else "",
                                                   core.pool.capacity, entry.get("data_order", 0),
                                                   state.get("input_pins"), record, settings["eval_tokens"],
                                                   entry["parent"])
                    entry["data_stat"] = ((state.get("input_pins") or {}).get("data") or {}).get("stat")  # checked
                spec = RunSpec(run=entry["run"], commit=entry["commit"], command=run_command(core),
                               env=budget_settings.run_env(settings, core.root, record),
                               eval_tokens=settings["eval_tokens"],
                               timeout=entry["timeout"], log=core.root / entry["log"],
                               report=core.root / entry["report"], worker_args=extras,
                               after_seconds=integrity.evaluation_allowance(entry),
                               unsandboxed=core.unsandboxed, environment=entry.get("environment_watch"),
                               files=checkout_files(core, entry["commit"]))
                slot = core.pool.start(spec, functools.partial(on_done, core))
            except (Refusal, git.GitCommandError, OSError, subprocess.SubprocessError) as exc:
                entry["status"] = "pending"
                entry["result"] = unrecordable(entry, f"the run could not start: {exc}").model_dump()
                core.mark_finished(entry["run"])
                continue
            entry.update(status="running", slot=slot, started_at=time.time(), server_pid=os.getpid(),
                         **core.pool.worker_record(entry["run"]))
            if core.runs_unsandboxed():
                entry["unsandboxed"] = True  # for status and the dashboard while it runs


def submitted_settings(core: LoopCore, state: dict, entry: dict, record: dict) -> dict:
    """The budget settings a queued run trains and is evaluated at: those it was submitted with (the research
    run's, core/budget_settings.py); a run queued by a server from before them, the research run's as recorded."""
    settings = budget_settings.governing(state, core.root, record)
    submitted = {"budget_clock": entry.get("clock"), "time_budget": entry.get("budget"),
                 "eval_tokens": entry.get("eval_tokens")}
    return settings | {k: v for k, v in submitted.items() if v is not None}


def checkout_files(core: LoopCore, commit: str) -> dict | None:
    """The commit's files (integrity.commit_files), where the command runs train.py on this machine: the run's
    interpreter copies them from the slot, each checked, and runs from its copy (warm_train.py), whatever the
    slot's files became after checkout. A cluster's node checks its code folder out itself (node.py)."""
    if core.make_executor is not None or run_command(core)[1:2] != [EDITABLE]:
        return None
    return integrity.commit_files(core.ws, commit)


def run_command(core: LoopCore) -> list[str]:
    """What a slot runs. The default, upstream's `uv run train.py`, becomes the workspace
    environment's own interpreter, found (and the environment synced) once per server: every
    slot then shares that one environment, and no run has to write to it. A cluster's nodes
    get the command as it is: each node syncs its own environment (mcp_server/scripts/node.py)."""
    if core.train_command != DEFAULT_TRAIN_COMMAND or core.make_executor is not None:
        return core.train_command
    if core.python is None:
        for sync in ([], ["--no-sync"])[::-1]:  # the environment as it is, else synced
            found = subprocess.run(["uv", "run", "--project", str(core.root), *sync, "python", "-c",
                                    ENV_PROBE], cwd=core.root, capture_output=True,
                                   text=True, env=training_env(core.root), timeout=ENV_SYNC_TIMEOUT_S)
            if found.returncode == 0:
                python, site_packages = found.stdout.strip().splitlines()[-2:]
                if sandbox.usable()[0] != sandbox.BUBBLEWRAP:  # bubblewrap's runs read only their own bytecode
                    compile_bytecode(python, site_packages)
                core.python = python
                break
        else:
            raise OSError(f"`uv run` could not prepare the workspace's environment: "
                          f"{found.stderr.strip()[-500:]}")
    return [core.python, "train.py"]


def on_done(core: LoopCore, run: int, outcome) -> None:
    """On the executor's thread once the run is over: parse, record, make it pending."""
    try:
        with core.state.transaction() as state:
            entry = (state.get("runs") or {}).get(str(run))
            if entry is None or entry["status"] != "running":
                return  # cancelled meanwhile: already decided
            entry["ended_at"] = time.time()
            # where it ran, from the report the executor believed: the file in runs/ can change after
            entry.update({k: outcome.report[k] for k in MEASURED_ON if (outcome.report or {}).get(k) is not None})
            try:
                result = record(core, state, entry, outcome.report, outcome.slot)
            except Exception as exc:  # disk full, log deleted...: still a result the agent can discard
                result = unrecordable(entry, f"the server could not record this run: "
                                             f"{type(exc).__name__}: {exc}")
            entry.update(status="pending", result=result.model_dump())
            file_measurement(core, state, entry, result)
            wall = (outcome.report or {}).get("wall_seconds")
            cost.add_slot_time(state, wall if isinstance(wall, (int, float)) else entry["ended_at"] - entry["started_at"],
                               (outcome.report or {}).get("device"))
        core.notifier.recorded(core, result)
    finally:
        try:
            dispatch(core)  # the next queued run takes the slot before anyone hears of this one
        finally:
            core.mark_finished(run)
