"""What the demo prints at the end: the ledger as a table, the best result and its diff against
the baseline, and the per-experiment timing split."""
import re
import subprocess
from pathlib import Path

from mcp_server.core import ledger

COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


def read_ledger(workspace: Path) -> list[dict]:
    """results.tsv rows as dicts, parsed by the server's own reader: an absent ledger is empty, a
    malformed line (a hand edit) is left out (the server's status() counts such lines)."""
    rows, _ = ledger.read_rows(Path(workspace) / ledger.LEDGER_NAME)
    return [row.model_dump() for row in rows]


def best_kept(rows: list[dict]) -> dict | None:
    kept = [row for row in rows if row["status"] == "keep"]
    return min(kept, key=lambda row: row["val_bpb"]) if kept else None


def ledger_table(rows: list[dict]) -> str:
    """The ledger aligned in columns, the best kept row marked with '*'."""
    best = best_kept(rows)
    header = ("#", "commit", "val_bpb", "memory_gb", "status", "description")
    lines = [header] + [
        (f"{i}{'*' if row is best else ''}", row["commit"], f"{row['val_bpb']:.6f}", f"{row['memory_gb']:.1f}",
         row["status"], row["description"])
        for i, row in enumerate(rows)
    ]
    widths = [max(len(line[col]) for line in lines) for col in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]
                     for line in lines)


def diff_against_baseline(workspace: Path, baseline: str, best: str) -> str:
    """`git diff` of train.py from the baseline commit to the best one."""
    if not (COMMIT.match(baseline) and COMMIT.match(best)):
        raise ValueError(f"not commit ids: {baseline!r}, {best!r}")
    proc = subprocess.run(["git", "diff", "--no-color", baseline, best, "--", "train.py"],
                          cwd=workspace, capture_output=True, text=True, check=True)
    return proc.stdout.strip() or "(no difference: the baseline is the best)"


def timing_table(timings: list[dict]) -> str:
    """Per-experiment wall time split into training, evaluation, start-up and tool overhead."""
    columns = ("experiment", "wall_s", "training_s", "eval_s", "startup_s", "overhead_s")
    mean = {"experiment": "mean"} | {c: average([t.get(c) for t in timings]) for c in columns[1:]}
    lines = [columns] + [tuple(format_seconds(t.get(c)) if c != "experiment" else t[c] for c in columns)
                         for t in timings + ([mean] if len(timings) > 1 else [])]
    widths = [max(len(line[col]) for line in lines) for col in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def average(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def format_seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"
