"""Benchmark of parallel slots over stdio, against issue 11's targets, in one run:

    uv run python bench/bench_slots.py [--runs-per-slot 6] [--run-seconds 5]

For 1, 2 and 4 slots, an agent keeps every slot busy with fake-trainer runs of a fixed length
(submit with wait=False, wait(), discard, submit again) and we count experiments per hour. Per run:
submit to start (the run's own record: submitted_at -> started_at, runs that did not queue) and end
to result (the worker's end of the training -> the server's recorded result). With 4 runs in flight
and a 1,000-row ledger, the p95 of status, read_metrics and history.

Targets: N slots give >= 0.95 x N x one slot's experiments per hour; overhead < 1 s per run; tool
p95 < 100 ms with runs in flight.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import fill_ledger, make_workspace, p95, server_params, set_knobs, timed  # noqa: E402

SLOT_COUNTS = (1, 2, 4)
SCALING_TARGET = 0.95
OVERHEAD_TARGET_S = 1.0
P95_TARGET_MS = 100.0
LATENCY_CALLS = 30


async def keep_slots_busy(ws: Path, cache: Path, slots: int, runs: int, run_seconds: float) -> dict:
    params = server_params(ws, cache)
    params.args += ["--slots", str(slots)]
    async with Client(params) as client:
        await timed(client, "setup", {"tag": f"slots{slots}"})
        set_knobs(ws, val_bpb=1.0, steps=1)
        await timed(client, "run_experiment", {"description": "baseline"})
        await timed(client, "keep", {})
        submitted = done = 0
        started = time.perf_counter()
        while done < runs:
            while submitted < runs and submitted - done < slots:
                set_knobs(ws, val_bpb=1.1, sleep=run_seconds, steps=4)  # discard restored the kept train.py
                await timed(client, "run_experiment", {"description": f"run {submitted}", "wait": False})
                submitted += 1
            _, result = await timed(client, "wait", {})
            for r in result.structured_content["results"]:
                await timed(client, "discard", {"run": r["run"]})
                done += 1
        elapsed = time.perf_counter() - started
        latencies = await tool_latency_in_flight(client, ws, slots, run_seconds) if slots == max(SLOT_COUNTS) else {}
    records = [json.loads(p.read_text()) for p in sorted((ws / "runs").glob("*.json"))
               if not p.name.endswith(".report.json")]
    records = [r["run"] for r in records if r["result"]["description"].startswith("run ")]
    first = records[:slots]  # these never waited in the queue
    return {
        "slots": slots, "runs": runs, "seconds": round(elapsed, 2),
        "experiments_per_hour": round(3600 * runs / elapsed, 1),
        "submit_to_start_s": round(statistics.median(r["started_at"] - r["submitted_at"] for r in first), 3),
        "end_to_result_s": round(statistics.median(r["ended_at"] - (r["started_at"] + r["wall_seconds"])
                                                   for r in records), 3),
        "p95_ms_in_flight": latencies,
    }


async def tool_latency_in_flight(client, ws: Path, slots: int, run_seconds: float) -> dict:
    fill_ledger(ws, 1000)
    for i in range(slots):
        set_knobs(ws, val_bpb=1.1, sleep=max(run_seconds, 10), steps=20)
        await timed(client, "run_experiment", {"description": f"in flight {i}", "wait": False})
    samples = {"status": [], "read_metrics": [], "history": []}
    for _ in range(LATENCY_CALLS):
        for name in samples:
            samples[name].append((await timed(client, name, {}))[0])
    _, result = await timed(client, "wait", {"all": True})
    for r in result.structured_content["results"]:
        await timed(client, "discard", {"run": r["run"]})
    return {name: round(1000 * p95(s), 1) for name, s in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-per-slot", type=int, default=6)
    parser.add_argument("--run-seconds", type=float, default=5.0)
    args = parser.parse_args()
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-slots-") as tmp:
        for slots in SLOT_COUNTS:
            ws, cache = make_workspace(Path(tmp) / f"slots{slots}")
            rows.append(anyio.run(keep_slots_busy, ws, cache, slots, args.runs_per_slot * slots, args.run_seconds))
    one = rows[0]["experiments_per_hour"]
    print(f"{'slots':>5} {'runs':>5} {'seconds':>8} {'exp/hour':>9} {'x one slot':>10} {'submit->start s':>16} "
          f"{'end->result s':>14}")
    failures = []
    for row in rows:
        ratio = row["experiments_per_hour"] / one
        print(f"{row['slots']:>5} {row['runs']:>5} {row['seconds']:>8} {row['experiments_per_hour']:>9} "
              f"{ratio:>10.2f} {row['submit_to_start_s']:>16} {row['end_to_result_s']:>14}")
        if ratio < SCALING_TARGET * row["slots"]:
            failures.append(f"{row['slots']} slots give {ratio:.2f}x one slot (target {SCALING_TARGET * row['slots']:.2f}x)")
        if row["submit_to_start_s"] + row["end_to_result_s"] >= OVERHEAD_TARGET_S:
            failures.append(f"overhead {row['submit_to_start_s'] + row['end_to_result_s']:.3f} s at {row['slots']} slots")
    latencies = rows[-1]["p95_ms_in_flight"]
    print(f"tool p95 with {SLOT_COUNTS[-1]} runs in flight and a 1,000-row ledger (ms): {json.dumps(latencies)}")
    failures += [f"{name} p95 {ms} ms" for name, ms in latencies.items() if ms >= P95_TARGET_MS]
    print("targets: " + ("all met" if not failures else "MISSED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
