"""Early stop, opt-in at setup: a run whose training loss, at the same share of its time budget,
is behind its best's run by more than a margin calibrated on the measured noise is stopped and
logged, so a hopeless idea does not spend the whole budget of a slot.

The rule (`verdict`) is shared with bench/bench_early_stop.py, which replays recorded runs through
it: on the demo's runs no kept run would have been stopped (docs/benchmarks.md).
- Matched progress: the progress lines' percent of the budget (the budget's own clock: wall, CPU
  or flops), so runs that train at different speeds are compared at the same share of their
  budget. Steps at 0% (untimed warm-up and compilation) are left out.
- Never before MIN_PROGRESS of the budget: early losses say little about the end. Replayed (docs/
  benchmarks.md), the same code on another stretch of data lagged its best's run by 0.32 in
  training loss at 10% of the budget and 0.17 at 30% (twice the margin the val_bpb noise gives),
  then crossed ahead by the end; from half the budget on, its lag stayed within 0.06. Stopping at
  50% instead of 30% saved 49% of the stopped ideas' time instead of 55%.
- Smoothed: the candidate's losses over the last WINDOW of the budget, against the best's curve
  interpolated at the same points (one step's loss jitters by several hundredths).
- Margin: MARGIN_WIDTHS noise thresholds (val_bpb), turned into training-loss units by the best's
  own ratio of final training loss to val_bpb, and at least as far as any noise repeat's training
  loss strayed from its best's at the same progress (the same code on other data: on the demo's
  CPU runs 0.3 early, crossing to -0.1 by the end, far more than the val_bpb noise says; a
  candidate that trains at another speed meets other batches at the same progress, so it has the
  same luck to beat). No noise estimate, no stop: without it the server cannot tell a lag from
  luck, and setup says so.
Reruns (noise repeats, controls, confirmations) are never stopped: they are measurements.
A finished run's log is believed only while its bytes are those the server digested when it
recorded the run (core/history.py): an edited reference is no reference, and is told.
"""
import logging
import threading
import time

from mcp_server.core import history, limits, logparse
from mcp_server.core.models import Refusal

MIN_PROGRESS = 50.0  # percent of the budget before which no run is stopped
WINDOW = 10.0  # percent of the budget whose losses are averaged
MARGIN_WIDTHS = 3.0  # noise thresholds (in training-loss units) a run must be behind to be stopped
# and never less than this, in training loss: a measured noise of ~0 (the flops clock repeats a run to
# 1e-5) says nothing about how far apart two codes' curves may be mid-run and still cross
MIN_MARGIN = 0.05
POLL_SECONDS = 2.0
TAIL_BYTES = 256 * 1024  # of a running log: its last WINDOW of progress lines fits easily

log = logging.getLogger(__name__)


def curve(text: str) -> list[tuple[float, float]]:
    """(percent of the budget, training loss) of each timed step, oldest first."""
    return [(p.percent, p.loss) for p in logparse.all_progress(text) if p.percent > 0 and p.loss == p.loss]


def _at(points: list[tuple[float, float]], percent: float) -> float | None:
    """The loss on a curve at `percent`, linearly between its points; None outside it."""
    for (p0, l0), (p1, l1) in zip(points, points[1:]):
        if p0 <= percent <= p1:
            return l0 if p1 == p0 else l0 + (l1 - l0) * (percent - p0) / (p1 - p0)
    return points[-1][1] if points and points[-1][0] == percent else None


def loss_per_bpb(best: list[tuple[float, float]], best_val_bpb: float) -> float | None:
    """Training loss per unit of val_bpb, from the best's run: its last WINDOW's mean loss over its
    val_bpb (nats per token against bits per byte: about ln 2 times the bytes per token)."""
    if not best or not best_val_bpb:
        return None
    end = [loss for percent, loss in best if percent > best[-1][0] - WINDOW]
    return sum(end) / len(end) / best_val_bpb


def _lag(candidate: list[tuple[float, float]], best: list[tuple[float, float]],
         now: float) -> tuple[float, float] | None:
    """(candidate's mean loss, the best's at the same points) over the WINDOW that ends at `now`."""
    pairs = [(loss, _at(best, percent)) for percent, loss in candidate if now - WINDOW < percent <= now]
    pairs = [(loss, ref) for loss, ref in pairs if ref is not None]
    if not pairs:
        return None
    return sum(c for c, _ in pairs) / len(pairs), sum(r for _, r in pairs) / len(pairs)


def data_luck(repeats: list[tuple[list, list]], now: float) -> float:
    """How far the noise repeats' training loss strayed from their best's at this progress, either
    way: the same code on another stretch of data (on the demo's CPU runs 0.3 early, 0.1 at the end)."""
    lags = [_lag(repeat, best, now) for repeat, best in repeats]
    return max((abs(c - r) for c, r in filter(None, lags)), default=0.0)


def verdict(candidate: list[tuple[float, float]], best: list[tuple[float, float]], best_val_bpb: float,
            threshold: float | None, repeats: list[tuple[list, list]] = (), min_progress: float = MIN_PROGRESS,
            widths: float = MARGIN_WIDTHS) -> dict | None:
    """{progress, loss, best_loss, margin} when the candidate is behind the best by more than the
    margin at its latest progress; None when it is not, or cannot be judged yet. repeats: the noise
    repeats' curves, each with its best's, whose lags widen the margin (data_luck). min_progress
    and widths: other settings, for the replay's comparison (bench/bench_early_stop.py)."""
    if not candidate or not best or threshold is None or candidate[-1][0] < min_progress:
        return None
    now = candidate[-1][0]
    lag = _lag(candidate, best, now)
    scale = loss_per_bpb(best, best_val_bpb)
    if lag is None or scale is None:
        return None
    margin = max(widths * threshold * scale, MIN_MARGIN, data_luck(repeats, now))
    if lag[0] - lag[1] <= margin:
        return None
    return {"progress": round(now, 1), "loss": round(lag[0], 4), "best_loss": round(lag[1], 4),
            "margin": round(margin, 4)}


def repeats_of(records: list[dict], curve_of) -> list[tuple[list, list]]:
    """(noise repeat's curve, its best's curve) for every noise repeat among the decided runs'
    records; curve_of(record) reads a record's log. A repeat reruns the kept code on its parent; it is
    known by the fields the server set when it queued it, never by its description (the agent's)."""
    by_commit = {r["result"]["commit"]: r for r in records if (r.get("decision") or {}).get("status") == "keep"}
    found = []
    for record in records:
        best = by_commit.get(str((record.get("run") or {}).get("parent"))[:7])
        if best is not None and history.rerun_kind(record) == "noise repeat" and record["result"].get("status") == "ok":
            found.append((curve_of(record), curve_of(best)))
    return [(repeat, best) for repeat, best in found if repeat and best]


def reason(stop: dict) -> str:
    return (f"training loss {stop['loss']:.4f} at {stop['progress']:.0f}% of the budget, the best's run "
            f"{stop['best_loss']:.4f}, behind by more than the margin {stop['margin']:.4f}")


def describe(state: dict) -> str | None:
    """setup's answer about the rule, or None where it is off."""
    if not state.get("early_stop"):
        return None
    rule = (f"on: from {MIN_PROGRESS:.0f}% of the budget, a run whose training loss (over the last {WINDOW:.0f}%) "
            f"is behind its best's run at the same progress by more than {MARGIN_WIDTHS:g} noise thresholds is "
            "stopped and logged as a crash row marked 'stopped early'")
    if not state.get("noise"):
        rule += "; no noise estimate yet, so no run is stopped until measure_noise() has measured it"
    return rule


class Watcher:
    """A server thread that follows the running runs' logs and stops the hopeless ones through
    the loop's cancel path (the worker kills the run's whole process tree)."""

    def __init__(self, loop):
        self.loop = loop
        self._curves: dict[str, tuple[int, list]] = {}  # a finished run's log: (mtime_ns, curve)
        self._refused: set[str] = set()  # logs told as changed
        self._luck: tuple[int, list] | None = None  # (decided records, their noise repeats' curves)
        self._thread = threading.Thread(target=self._watch, name="early-stop", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self.loop.closing:
            time.sleep(POLL_SECONDS)
            try:
                self.check()
            except Exception:  # a missing log, a state mid-write: the next poll tries again
                log.exception("early stop check failed")

    def check(self) -> list[int]:
        """Stops the running runs the rule finds hopeless; returns their numbers."""
        loop = self.loop
        if loop.closing or not loop.state.owned:
            return []
        # the server's own copy, read as it is: State.load would set right (and report) a changed
        # state.json from this thread, between an agent's calls
        state = limits.recorded_state(loop.root)
        if not state.get("early_stop") or not state.get("noise"):
            return []
        stopped = []
        for entry in loop.runs_of(state, "running"):
            if history.is_rerun(entry):
                continue
            stop = self._judge(state, entry)
            if stop is None:
                continue
            try:
                loop.cancel(entry["run"], stopped=stop)
            except Refusal:
                continue  # it finished or was decided meanwhile
            stopped.append(entry["run"])
        return stopped

    def _judge(self, state: dict, entry: dict) -> dict | None:
        best_row = self.loop.kept_row(entry["parent"])
        # the best's curve: the log the server kept it from (in its state), else the log a record the
        # server vouches for names: never a path in a record changed by hand
        best_log = state.get("kept_log") if entry["parent"] == state.get("kept_commit") else \
            (self.loop.record_of(entry["parent"], state).get("result") or {}).get("log")
        path = self.loop.root / entry["log"]
        if best_row is None or not best_log or not path.exists():
            return None
        candidate = curve(logparse.read_tail_bytes(path, TAIL_BYTES))
        return verdict(candidate, self._best_curve(best_log, state), best_row.val_bpb,
                       state["noise"]["threshold"], self._repeats(state))

    def _repeats(self, state: dict) -> list[tuple[list, list]]:
        records = self.loop.records(state)
        if self._luck is None or self._luck[0] != len(records):
            logged = lambda r: self._best_curve(r["result"]["log"], state)  # noqa: E731
            self._luck = (len(records), repeats_of(records, logged))
        return self._luck[1]

    def _best_curve(self, name: str, state: dict) -> list[tuple[float, float]]:
        """A finished run's curve from its log, if the log is what the server digested; else none."""
        try:
            mtime = (self.loop.root / name).stat().st_mtime_ns
        except OSError:
            mtime = None
        cached = self._curves.get(name)
        if cached is None or cached[0] != mtime:
            text = history.checked_log(self.loop.root, state, name)
            if text is None and name not in self._refused:
                self._refused.add(name)
                self.loop.state.tell(f"the run log {name} was changed outside the server (edited, deleted or "
                                     "replaced): the early stop does not read it")
            cached = self._curves[name] = (mtime, curve(text or ""))
        return cached[1]
