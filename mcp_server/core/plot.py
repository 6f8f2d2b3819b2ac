"""progress.png: every run's val_bpb, the running best of kept runs, labels on kept runs, and the
reruns (noise repeats, confirmations, controls) drawn apart from the ideas.

matplotlib is imported here, lazily, so the server starts fast and never pays for it
unless a chart is asked for.
"""
import io
from pathlib import Path

from mcp_server.core import ledger, limits
from mcp_server.core.models import Row
from mcp_server.scripts import sandbox

PLOT_NAME = "progress.png"
LABEL_CHARS = 40
RERUN_COLOUR = "#3b6fb6"
UNMEASURED = (limits.UNVERIFIED, limits.LOGGED_BY_HAND)  # a chart's labels keep these whole
EVERY_MARKER = (sandbox.MARKER, *UNMEASURED)  # a headline's: the order a row's description holds them in


def plot_rows(rows: list[Row], path: Path, reruns: set[str] | None = None) -> tuple[int, int, int, int, int]:
    """Writes the chart; returns (runs plotted, kept runs, crashes left out, reruns drawn apart, kept runs whose number
    the harness did not measure, drawn hollow). `reruns`: the commits of rows that re-measured code
    (morning.rerun_commits), drawn with a marker of their own."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [(i, r) for i, r in enumerate(rows, 1) if r.status != "crash"]
    kept = [(i, r) for i, r in runs if r.status == "keep"]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    reruns = reruns or {}
    discarded = [(i, r) for i, r in runs if r.status == "discard" and r.commit not in reruns]
    ax.scatter([i for i, _ in discarded], [r.val_bpb for _, r in discarded], s=14, color="#bbbbbb",
               label="discarded idea", zorder=2)
    # a rerun is a measurement, not an idea that failed: its own marker, so the night's ideas read apart
    repeated = [(i, r) for i, r in runs if r.status == "discard" and r.commit in reruns]
    if repeated:
        ax.scatter([i for i, _ in repeated], [r.val_bpb for _, r in repeated], s=22, marker="D",
                   facecolors="none", edgecolors=RERUN_COLOUR, linewidths=1.2,
                   label="rerun (noise repeat, confirmation, control)", zorder=2)
    # review 72: a keep logged by hand (or train.py's own number) was a green point like any, its label cut before
    # its marker: a chart of the agent's 0.05 read as a measured gain
    unmeasured = [(i, r) for i, r in kept if not limits.measured(r.description)]
    measured = [(i, r) for i, r in kept if limits.measured(r.description)]
    ax.scatter([i for i, _ in measured], [r.val_bpb for _, r in measured], s=28, color="#2a9d47",
               label="kept", zorder=3)
    if unmeasured:
        ax.scatter([i for i, _ in unmeasured], [r.val_bpb for _, r in unmeasured], s=28, facecolors="none",
                   edgecolors="#2a9d47", linewidths=1.2, label="kept, its number not measured by the harness", zorder=3)
    xs, best = best_line(kept, len(rows))
    if xs:
        ax.step(xs, best, where="post", color="#2a9d47", linewidth=1.5, label="best kept", zorder=1)
    for i, r in kept:
        ax.annotate(label(r), (i, r.val_bpb), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    rotation=20, color="#1d6e32")
    crashes = len(rows) - len(runs)
    ax.set_title(f"research-loop: {len(rows)} runs, {len(kept)} kept"
                 + (f", {len(repeated)} reruns" if repeated else "")
                 + (f", {crashes} crashes not shown" if crashes else "")
                 + (f", {len(unmeasured)} kept not measured by the harness" if unmeasured else ""))
    ax.set_xlabel("run (ledger order)")
    ax.set_ylabel("val_bpb (lower is better)")
    # room on the right for the last kept run's label, which starts at its point
    ax.set_xlim(0.5, len(rows) + 0.5 + max(1.0, 0.2 * len(rows)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks([x for x in ax.get_xticks() if 1 <= x <= len(rows)])  # no ticks for runs not yet made
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    # never opened where it lies (review 63: a FIFO the agent put at progress.png hung plot_progress, the report and the
    # overnight runner's summary, which then never exited or pinged)
    ledger.replace_bytes(path, png.getvalue())
    return len(runs), len(kept), crashes, len(repeated), len(unmeasured)


def label(row: Row, chars: int = LABEL_CHARS, markers: tuple[str, ...] = UNMEASURED) -> str:
    """A kept run's label: its description cut to fit, the markers it holds (of a number the harness did not
    measure; the dashboard's headline: of a run without a sandbox too) kept whole, after it."""
    text, kept = row.description, ""
    for marker in filter(row.description.__contains__, markers):
        text, kept = text.replace(marker, "", 1), kept + marker
    return ledger.fit_description(text, kept, chars + len(ledger.ELLIPSIS))


def best_line(kept, last_index):
    """The best the branch held from each measured keep on: that keep's value, a worse one too (as status() and the
    report's summary say), never the lowest keep row ever, which the branch may no longer hold. A keep whose number
    the harness did not measure (logged by hand, train.py's own) moves it nowhere (review 75: the line stepped down
    to the agent's number); its point is drawn hollow. No measured keep: no line ([], [])."""
    xs, best = [], []
    for i, r in kept:
        if limits.measured(r.description):
            xs.append(i)
            best.append(r.val_bpb)
    return (xs + [last_index], best + [best[-1]]) if xs else ([], [])
