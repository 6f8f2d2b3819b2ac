"""Replay recorded runs through the early-stop rule: which would it have stopped, and what would
that have saved? No training: it reads each workspace's runs/*.json records and runs/*.log logs.

    uv run bench/bench_early_stop.py WORKSPACE [WORKSPACE ...] [--fixture LOG] [--threshold T]

Each run is judged against the run of its parent (the best it was measured on: the kept run that
measured that commit), with the workspace's noise estimate (state.json; --threshold overrides it),
at every progress line of its log in turn, as the server's watcher would at each poll. For each
run it prints its decision and val_bpb, where the rule would have stopped it (or not), and the
seconds saved (the rest of its training and its evaluation); then each kept run's verdict (the
rule must stop none), the totals, and the same totals for other settings of MIN_PROGRESS and
MARGIN_WIDTHS beside the built ones.
Noise repeats, controls and confirmations are the same code on other data: the watcher never
stops them, and here they show whether the rule would have mistaken the luck of the data for a lag
(each noise repeat judged with the other repeats' luck only: leave one out).
The fixture log (an upstream-format run from elsewhere) is parsed and judged against itself.
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mcp_server.core import logparse  # noqa: E402
from mcp_server.phases import early_stop  # noqa: E402

FIXTURE = Path("/work/shared/fixtures/upstream-format-cpu-run.log")
RERUNS = ("noise repeat", "control ", "confirmation ")
SETTINGS = [(p, w) for p in (10.0, 20.0, 30.0, 50.0) for w in (1.0, 3.0, 5.0)]


def runs_of(ws: Path) -> list[dict]:
    runs = []
    for path in sorted((ws / "runs").glob("[0-9][0-9][0-9][0-9]-*.json")):
        if path.name.endswith(".report.json"):
            continue
        record = json.loads(path.read_text())
        log = path.with_suffix(".log")
        if log.exists():
            runs.append(record | {"curve": early_stop.curve(logparse.read_text(log))})
    return runs


def threshold_of(ws: Path) -> float | None:
    try:
        return (json.loads((ws / ".research-loop" / "state.json").read_text()).get("noise") or {}).get("threshold")
    except (OSError, ValueError):
        return None


def first_stop(candidate, best, best_val_bpb, threshold, repeats, min_progress, widths) -> dict | None:
    for i in range(len(candidate)):
        stop = early_stop.verdict(candidate[:i + 1], best, best_val_bpb, threshold, repeats, min_progress, widths)
        if stop:
            return stop
    return None


def judged(ws: Path, threshold: float | None) -> list[dict]:
    """Each run with a best to compare with: (record, its best's record)."""
    runs = runs_of(ws)
    repeats = early_stop.repeats_of([r for r in runs if r.get("decision")], lambda r: r["curve"])
    kept = {r["result"]["commit"]: r for r in runs if (r.get("decision") or {}).get("status") == "keep"}
    pairs = []
    for record in runs:
        parent = (record["run"].get("parent") or "")[:7]
        best = kept.get(parent)
        if best is None or record["result"].get("status") != "ok" or not record["curve"]:
            continue
        # leave one out: a noise repeat is judged with the other repeats' luck, not its own
        others = [(c, b) for c, b in repeats if c is not record["curve"]]
        pairs.append({"ws": ws, "record": record, "best": best, "threshold": threshold, "repeats": others})
    return pairs


def saved_seconds(record: dict, stop: dict) -> float:
    result = record["result"]
    training = result.get("training_seconds") or 0.0
    return training * (100.0 - stop["progress"]) / 100.0 + (result.get("eval_seconds") or 0.0)


def spent_seconds(record: dict) -> float:
    result = record["result"]
    return (result.get("training_seconds") or 0.0) + (result.get("eval_seconds") or 0.0)


def totals(pairs: list[dict], min_progress: float, widths: float) -> dict:
    out = {"stopped": 0, "kept_stopped": 0, "ahead_stopped": 0, "reruns_stopped": 0, "saved": 0.0, "spent": 0.0}
    for pair in pairs:
        record, best = pair["record"], pair["best"]
        out["spent"] += spent_seconds(record)
        stop = first_stop(record["curve"], best["curve"], best["result"]["val_bpb"], pair["threshold"],
                          pair["repeats"], min_progress, widths)
        if stop is None:
            continue
        if record["result"]["description"].startswith(RERUNS):
            out["reruns_stopped"] += 1
            continue  # the watcher never stops a rerun: nothing saved
        out["stopped"] += 1
        out["saved"] += saved_seconds(record, stop)
        out["kept_stopped"] += (record.get("decision") or {}).get("status") == "keep"
        out["ahead_stopped"] += record["result"]["val_bpb"] < best["result"]["val_bpb"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspaces", nargs="+", type=Path)
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--threshold", type=float, help="noise threshold (val_bpb) instead of each state's")
    args = parser.parse_args()
    pairs, kept_in_all = [], 0
    for ws in args.workspaces:
        threshold = args.threshold if args.threshold is not None else threshold_of(ws)
        print(f"{ws}: noise threshold {threshold if threshold is not None else 'not measured (never stops)'}")
        pairs += judged(ws, threshold)
        kept_in_all += sum((r.get("decision") or {}).get("status") == "keep" for r in runs_of(ws))
    print(f"\nrule as built: from {early_stop.MIN_PROGRESS:.0f}% of the budget, {early_stop.MARGIN_WIDTHS:g} noise "
          f"thresholds (at least {early_stop.MIN_MARGIN} in loss), losses over the last {early_stop.WINDOW:.0f}%")
    print(f"{'run':>18} {'decision':>8} {'val_bpb':>9} {'best':>9} {'points':>6}  verdict")
    for pair in pairs:
        record, best = pair["record"], pair["best"]
        result = record["result"]
        stop = first_stop(record["curve"], best["curve"], best["result"]["val_bpb"], pair["threshold"],
                          pair["repeats"], early_stop.MIN_PROGRESS, early_stop.MARGIN_WIDTHS)
        rerun = result["description"].startswith(RERUNS)
        verdict = ("not stopped" if stop is None else
                   f"{'WOULD HAVE STOPPED (a rerun: the watcher skips it)' if rerun else 'stopped'} at "
                   f"{stop['progress']:.0f}%: loss {stop['loss']:.4f} vs {stop['best_loss']:.4f}, margin "
                   f"{stop['margin']:.4f}" + ("" if rerun else f", saves {saved_seconds(record, stop):.0f}s"))
        decision = (record.get("decision") or {}).get("status", "-")
        print(f"{pair['ws'].name + '/' + str(result['run']):>18} {decision:>8} "
              f"{result['val_bpb']:9.6f} {best['result']['val_bpb']:9.6f} {len(record['curve']):6d}  {verdict}"
              f"  | {result['description'][:50]}")
    built = totals(pairs, early_stop.MIN_PROGRESS, early_stop.MARGIN_WIDTHS)
    decisions = [(p["record"].get("decision") or {}).get("status") for p in pairs]
    reruns = sum(p["record"]["result"]["description"].startswith(RERUNS) for p in pairs)
    print(f"\njudged: {len(pairs)} runs with a best to compare with ({decisions.count('keep')} kept, "
          f"{decisions.count('discard') - reruns} discarded ideas, {reruns} reruns of the same code on other data)")
    ahead = sum(p["record"]["result"]["val_bpb"] < p["best"]["result"]["val_bpb"] for p in pairs
                if not p["record"]["result"]["description"].startswith(RERUNS))
    print(f"ideas that finished better than their best (kept or not): {ahead}, stopped: {built['ahead_stopped']}")
    kept_pairs = [p for p in pairs if (p["record"].get("decision") or {}).get("status") == "keep"]
    print(f"kept runs: {kept_in_all}, judged {len(kept_pairs)} (a baseline has no kept run before it to compare "
          "with)")
    for pair in kept_pairs:
        record, best = pair["record"], pair["best"]
        stop = first_stop(record["curve"], best["curve"], best["result"]["val_bpb"], pair["threshold"],
                          pair["repeats"], early_stop.MIN_PROGRESS, early_stop.MARGIN_WIDTHS)
        print(f"  kept {pair['ws'].name}/{record['result']['run']} ({record['result']['val_bpb']:.6f}, its best "
              f"{best['result']['val_bpb']:.6f}): " + ("not stopped" if stop is None else
              f"WOULD HAVE BEEN STOPPED at {stop['progress']:.0f}% ({early_stop.reason(stop)})"))
    target = ("no kept run to judge" if not decisions.count("keep") else
              "met" if built["kept_stopped"] == 0 else "NOT met")
    print(f"kept runs stopped: {built['kept_stopped']} (target 0: {target}); "
          f"ideas stopped: {built['stopped']}; reruns the rule would have hit: {built['reruns_stopped']}; "
          f"training and evaluation saved: {built['saved']:.0f} s of {built['spent']:.0f} s "
          f"({built['saved'] / built['spent'] if built['spent'] else 0:.1%})")
    print(f"\n{'min progress':>12} {'widths':>6} {'stopped':>7} {'kept stopped':>12} {'reruns hit':>10} "
          f"{'saved s':>8} {'of s':>8} {'share':>6}")
    for min_progress, widths in SETTINGS:
        t = totals(pairs, min_progress, widths)
        built = " <- as built" if (min_progress, widths) == (early_stop.MIN_PROGRESS, early_stop.MARGIN_WIDTHS) else ""
        print(f"{min_progress:11.0f}% {widths:6g} {t['stopped']:7d} {t['kept_stopped']:12d} {t['reruns_stopped']:10d} "
              f"{t['saved']:8.0f} {t['spent']:8.0f} {t['saved'] / t['spent'] if t['spent'] else 0:6.1%}{built}")
    if args.fixture.exists():
        points = early_stop.curve(logparse.read_text(args.fixture))
        summary = logparse.parse_summary(logparse.read_text(args.fixture))
        threshold = args.threshold if args.threshold is not None else 0.01
        stop = first_stop(points, points, summary.val_bpb, threshold, (), early_stop.MIN_PROGRESS,
                          early_stop.MARGIN_WIDTHS)
        scale = early_stop.loss_per_bpb(points, summary.val_bpb)
        print(f"\nfixture {args.fixture.name}: {len(points)} timed progress points, val_bpb {summary.val_bpb}; against "
              f"itself {'not stopped' if stop is None else 'STOPPED'}; with a noise threshold of {threshold} it would "
              f"stop a run lagging it by more than "
              f"{max(early_stop.MARGIN_WIDTHS * threshold * scale, early_stop.MIN_MARGIN):.4f} in training loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
