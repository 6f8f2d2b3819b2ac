"""The Ray executor against the local pool, with the fake trainer, side by side in one run:

    uv run python bench/bench_cluster.py [--runs-per-slot 4] [--run-seconds 10]

Both serve `python -m mcp_server` over stdio with 2 slots: the local pool (`--slots 2`) and a local
Ray head started here (127.0.0.1, 2 CPUs, 2 logical GPUs; `--executor ray --ray-address ...`). The
cluster is warm (the baseline has run on it) before anything is measured. An agent keeps both slots
busy (submit with wait=False, wait(), discard, submit again) with runs of a fixed length. Printed,
per engine: experiments per hour, and per run the overhead: submit to start (the run submitted ->
its worker starting the training, for runs that did not queue) and end to result (the training's
end -> the server's recorded result), all on this machine's clock. Beside them, Ray's own floor: an
empty job submitted through the bare Jobs API to the same head, from submit to its first line.

Targets (issue 14): Ray's overhead under 3 s per run on a warm cluster, its throughput within 10%
of the local pool's.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_server import make_workspace, server_params, set_knobs, timed  # noqa: E402
from cluster_support import RayHead  # noqa: E402

SLOTS = 2
OVERHEAD_TARGET_S = 3.0
THROUGHPUT_TARGET = 0.90


async def keep_slots_busy(ws: Path, cache: Path, engine_args: list[str], runs: int, run_seconds: float) -> dict:
    params = server_params(ws, cache)
    params.args += engine_args
    async with Client(params) as client:
        await timed(client, "setup", {"tag": "bench"})
        set_knobs(ws, val_bpb=1.0, steps=1)
        await timed(client, "run_experiment", {"description": "baseline"})  # also warms the cluster
        await timed(client, "keep", {})
        submitted = done = 0
        started = time.perf_counter()
        while done < runs:
            while submitted < runs and submitted - done < SLOTS:
                set_knobs(ws, val_bpb=1.1, sleep=run_seconds, steps=4)  # discard restored the kept train.py
                await timed(client, "run_experiment", {"description": f"run {submitted}", "wait": False})
                submitted += 1
            _, result = await timed(client, "wait", {})
            for r in result.structured_content["results"]:
                assert r["status"] == "ok", r
                await timed(client, "discard", {"run": r["run"]})
                done += 1
        elapsed = time.perf_counter() - started
    return {"runs": runs, "seconds": round(elapsed, 2), "experiments_per_hour": round(3600 * runs / elapsed, 1)} \
        | overheads(ws)


def overheads(ws: Path) -> dict:
    """Medians from the runs' records (the server's clock) and their workers' reports (the training's)."""
    rows = []
    for record_path in sorted((ws / "runs").glob("*.json")):
        if record_path.name.endswith(".report.json"):
            continue
        record = json.loads(record_path.read_text())
        if not record["result"]["description"].startswith("run "):
            continue
        report = json.loads(record_path.with_name(record_path.stem + ".report.json").read_text())
        rows.append((record["run"], report))
    first = rows[:SLOTS]  # these never waited in the queue
    return {
        "submit_to_start_s": round(statistics.median(rep["started_at"] - run["submitted_at"] for run, rep in first), 3),
        "end_to_result_s": round(statistics.median(run["ended_at"] - (rep["started_at"] + rep["wall_seconds"])
                                                   for run, rep in rows), 3),
    }


def ray_floor(address: str, jobs: int = 3) -> float:
    """Median seconds from submit_job to an empty job's first line (one GPU, no working_dir): what
    Ray itself spends starting a job (its supervisor actor, a Python process of its own)."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    client = JobSubmissionClient(address)
    delays = []
    for _ in range(jobs):
        submitted = time.time()
        job = client.submit_job(entrypoint="python3 -c 'import time; print(\"T\", time.time())'", entrypoint_num_gpus=1)
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            time.sleep(0.1)
        first = next(line for line in client.get_job_logs(job).splitlines() if line.startswith("T "))
        delays.append(float(first.split()[1]) - submitted)
    return round(statistics.median(delays), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-per-slot", type=int, default=4)
    parser.add_argument("--run-seconds", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    runs = args.runs_per_slot * SLOTS
    head = RayHead()
    try:
        head.wait_ready()
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            engines = {"local pool": ["--slots", str(SLOTS)], "ray": ["--executor", "ray", "--ray-address", head.address]}
            rows = {name: anyio.run(keep_slots_busy, *make_workspace(Path(tmp) / name.replace(" ", "-")), engine_args,
                                    runs, args.run_seconds)
                    for name, engine_args in engines.items()}
        floor = ray_floor(head.address)
    finally:
        left = head.stop()
    local, ray = rows["local pool"], rows["ray"]
    print(f"{SLOTS} slots, {runs} runs of {args.run_seconds:g} s of fake training each")
    print(f"{'engine':>10} {'seconds':>8} {'exp/hour':>9} {'x local':>8} {'submit->start s':>16} {'end->result s':>14}")
    for name, row in rows.items():
        print(f"{name:>10} {row['seconds']:>8} {row['experiments_per_hour']:>9} "
              f"{row['experiments_per_hour'] / local['experiments_per_hour']:>8.2f} {row['submit_to_start_s']:>16} "
              f"{row['end_to_result_s']:>14}")
    print(f"Ray's own floor, an empty job through the bare Jobs API (submit -> its first line): {floor} s")
    failures = []
    overhead = ray["submit_to_start_s"] + ray["end_to_result_s"]
    if overhead >= OVERHEAD_TARGET_S:
        failures.append(f"Ray overhead {overhead:.2f} s per run (target < {OVERHEAD_TARGET_S:g} s)")
    if ray["experiments_per_hour"] < THROUGHPUT_TARGET * local["experiments_per_hour"]:
        failures.append(f"Ray throughput {ray['experiments_per_hour'] / local['experiments_per_hour']:.2f}x the "
                        f"local pool's (target >= {THROUGHPUT_TARGET:.2f}x)")
    if left:
        failures.append(f"{len(left)} Ray processes were left after the head stopped")
    print("targets: " + ("all met" if not failures else "MISSED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
