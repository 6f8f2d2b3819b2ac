"""A research run's budget settings: its budget clock, time budget (seconds) and evaluation tokens.

setup records them as the server's environment and the prepared record give them then
(AUTORESEARCH_BUDGET_CLOCK, AUTORESEARCH_TIME_BUDGET and AUTORESEARCH_EVAL_TOKENS over prepared.json); for the life
of that research run they govern every run it trains (submit, dispatch, reruns, confirmations, noise repeats) and
the harness's evaluation, whatever a server started later finds in its environment (reviews 71 and 73: a server
started again on another clock or budget trained queued runs, and reused measurements, at it). That server keeps
the research run's values and says so: on its log, in status, and in the answer of the next call that trains;
setup(tag) begins a new research run with the environment's. A state written before these were recorded takes
the environment's at the first start of a server that records them, and says so.

The training process gets the research run's values from the harness (the three variables where they differ from
the prepared record's own, none where they do not): the server's own variables never reach it.
"""
import logging
import math
import os
from pathlib import Path

from mcp_server.core.integrity import eval_tokens
from mcp_server.core.models import Refusal
from mcp_server.core.workspace import budget_clock, budget_of

SETTINGS = "budget_settings"  # the state's {"budget_clock", "time_budget", "eval_tokens"}, recorded at setup
CHANGED = "settings_changed"  # the state's note: they differ from the research run's before (change_note)
ENV = {"budget_clock": "AUTORESEARCH_BUDGET_CLOCK", "time_budget": "AUTORESEARCH_TIME_BUDGET",
       "eval_tokens": "AUTORESEARCH_EVAL_TOKENS"}
NAMES = {"budget_clock": "budget clock", "time_budget": "time budget", "eval_tokens": "evaluation tokens"}
CLOCKS = ("wall", "cpu", "flops")  # prepare.py's BUDGET_CLOCKS

log = logging.getLogger(__name__)


def of_environment(root: Path, record: dict, environ=os.environ) -> dict:
    """The settings a setup now would record: the environment's overrides over the prepared record (environ={}: the
    record's own)."""
    return {"budget_clock": budget_clock(record, environ), "time_budget": budget_of(root, record, environ),
            "eval_tokens": eval_tokens(record, environ)}


def checked_environment(root: Path, record: dict) -> dict:
    """of_environment for a setup: a Refusal naming the variable where a value is not one a run can train at (prepare.py
    would stop every run of the research run on it)."""
    settings = _now(root, record)
    # prepare.py reads the variable's budget as whole seconds: 0.5 from it is 0, which stops every run
    truncated = os.environ.get(ENV["time_budget"]) and recorded({SETTINGS: settings}) and settings["time_budget"] < 1
    if recorded({SETTINGS: settings}) is None or truncated:
        shown = ", ".join(f"{name}={os.environ[name]!r}" for name in ENV.values() if name in os.environ)
        raise Refusal(f"The budget settings this server's environment gives are not ones a run can train at "
                      f"({shown or 'the prepared record'}): the clock is one of {', '.join(CLOCKS)}, the budget and "
                      "the evaluation's tokens positive numbers (the variable's budget at least 1 s: prepare.py "
                      "reads it in whole seconds). Set them right where the server is started (or unset "
                      "them for the prepared record's), then call again: nothing was set up or run.")
    return settings


def _now(root: Path, record: dict) -> dict:
    """of_environment, a value that is no number as its text (the variable's, else the record's), which no check
    passes. The record is the agent's to edit: one of another type (an evaluation size of 1e999, a list) made status
    and every call of a server starting fail with an internal error, where runs are refused as changed since setup."""
    found = {}
    for key, take in (("budget_clock", lambda: budget_clock(record)), ("time_budget", lambda: budget_of(root, record)),
                      ("eval_tokens", lambda: eval_tokens(record))):
        try:
            found[key] = take()
        except (ValueError, TypeError, OverflowError):
            found[key] = os.environ.get(ENV[key]) or str(record.get(key))
    return found


def recorded(state: dict) -> dict | None:
    """The research run's settings as setup recorded them, or None (a state from before them, or not well formed)."""
    found = state.get(SETTINGS)
    if not isinstance(found, dict):
        return None
    clock, budget, tokens = (found.get(k) for k in ENV)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                  for v in (budget, tokens))
    return {k: found[k] for k in ENV} if clock in CLOCKS and numbers else None


def governing(state: dict, root: Path, record: dict) -> dict:
    """The settings a run of this research run trains and is evaluated at: the recorded ones, else the
    environment's (no research run yet)."""
    return recorded(state) or checked_environment(root, record)


def clock_of(state: dict) -> str:
    """The budget clock of the research run's runs (the environment's where none is recorded)."""
    return (recorded(state) or {}).get("budget_clock") or budget_clock()


def adopt(state: dict, root: Path, record: dict) -> str | None:
    """At a server's first start on a research run set up before its settings were recorded: the environment's,
    recorded now; returns what is told (the log, the next answer), or None where nothing was missing."""
    if not state.get("branch") or recorded(state) is not None:
        return None
    try:
        state[SETTINGS] = checked_environment(root, record)
    except Refusal as exc:  # the server starts all the same: each run is refused, saying why
        log.warning(str(exc))
        return None
    note = (f"research run {state['branch']} was set up before its budget settings were recorded: they are recorded "
            f"now, as this server's environment gives them ({describe(state[SETTINGS])}), and govern its runs from "
            "here on")
    log.warning(note)
    return note


def differences(state: dict, root: Path, record: dict) -> str | None:
    """What the server's environment would set otherwise than the research run recorded, said plainly, or None (also
    where there is no prepared record: review 80, upstream's default budget was said to be the missing record's)."""
    pinned = recorded(state)
    if pinned is None or not record:
        return None
    now = _now(root, record)
    differ = [f"{_source(k)} gives {_shown(k, now[k])}, the research run recorded {_shown(k, pinned[k])}"
              for k in ENV if now[k] != pinned[k]]
    if not differ:
        return None
    return (f"this server's environment differs from the budget settings of research run {state.get('branch')}: "
            f"{'; '.join(differ)}. Its runs (submits, reruns, confirmations, noise repeats) train and are evaluated "
            f"at the recorded settings ({describe(pinned)}); setup(tag) begins a new research run with the new "
            "settings, and carries no measured value across")


def change_note(state: dict, settings: dict) -> str | None:
    """What setup's answer, status and the report say for the whole research run when its settings differ from those
    the research run before it recorded (`state`: that run's; settings: the new ones): a prepared record edited to a
    budget ten times the user's, then setup(tag), began a research run at it that nothing said differed. Carried while
    the settings stay the ones the note named, as the harness's note is (submit.harness_change)."""
    before = recorded(state)
    if not state.get("branch") or before is None:
        return None
    if before == settings:
        return state.get(CHANGED)
    differ = "; ".join(f"{NAMES[k]} {_shown(k, settings[k])}, {_shown(k, before[k])} there" for k in ENV
                       if before[k] != settings[k])
    return (f"the budget settings differ from those {state['branch']} was measured at ({differ}): this research "
            "run's numbers are not comparable with that run's")


def _source(key: str) -> str:
    """Where a setup now would take the value from: the variable where it is set, else the prepared record."""
    return ENV[key] if os.environ.get(ENV[key]) else f"the prepared record ({ENV[key]} unset)"


def describe(settings: dict) -> str:
    return ", ".join(f"{NAMES[k]} {_shown(k, settings[k])}" for k in ENV)


def _shown(key: str, value) -> str:
    return f"{value:g} s" if key == "time_budget" and not isinstance(value, str) else str(value)


def run_env(settings: dict, root: Path, record: dict) -> dict:
    """The variables a run's training process gets: the research run's settings where they differ from the
    prepared record's own (prepare.py reads those variables over the record), none where they do not (the executors
    leave the server's own out: ENV)."""
    own = of_environment(root, record, {})
    return {ENV[k]: _text(k, settings[k]) for k in ENV if settings.get(k) is not None and settings[k] != own[k]}


def _text(key: str, value) -> str:
    return f"{value:g}" if key == "time_budget" else str(int(value) if key == "eval_tokens" else value)
