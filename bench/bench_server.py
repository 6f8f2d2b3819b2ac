"""Benchmark of the MCP server over stdio, against its targets.

    uv run python bench/bench_server.py             # latency, overhead, answer size, soak of 100
    uv run python bench/bench_server.py --soak 1000 # the full soak

Targets: start-up (spawn to tools/list answered) < 2 s; keep/discard/log_result/status/read_metrics p95 < 100 ms with a 1,000-row ledger;
run_experiment adds < 1 s to the training process's wall time; a successful run_experiment
answer < 1,500 bytes; a soak of fast experiments (keep and discard mixed, a few crashes and
timeouts) loses no ledger row, leaves no process behind, and keeps the server's memory and
open files flat. The training command is tests/fake_train.py in a temp git repository.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mcp_server.core.state import State  # noqa: E402

FAKE_TRAIN = REPO / "tests" / "fake_train.py"
LEDGER_ROWS = 1000
LATENCY_CALLS = 60
OVERHEAD_RUNS = 8
OVERHEAD_SLEEP_S = 1.0
P95_TARGET_MS = 100.0
OVERHEAD_TARGET_S = 1.0
ANSWER_TARGET_BYTES = 1500
CRASH_EVERY, TIMEOUT_EVERY = 37, 97  # a few of each in the soak
SOAK_TIMEOUT_S = 1.0
STARTUP_SAMPLES = 5
STARTUP_TARGET_S = 2.0


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout


def make_workspace(root: Path) -> tuple[Path, Path]:
    ws, cache = root / "ws", root / "cache"
    ws.mkdir(parents=True)
    cache.mkdir()
    (cache / "prepared.json").write_text(json.dumps({"profile": "cpu", "time_budget": 60}))
    (ws / "prepare.py").write_text("# harness stand-in\n")
    (ws / "train.py").write_text("VAL_BPB = 1.0\n")
    shutil.copy(FAKE_TRAIN, ws / "fake_train.py")
    git(ws, "init", "-q", "-b", "main")
    git(ws, "config", "user.email", "bench@example.com")
    git(ws, "config", "user.name", "bench")
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "initial")
    return ws, cache


def fill_ledger(ws: Path, rows: int) -> None:
    """A realistic 1,000-row history (commits need not exist to be read), in the server's records as
    a server would have written them while none runs: results.tsv follows at the next start (a
    ledger edited by hand is undone)."""
    with State(ws).transaction() as state:
        for i in range(rows):
            status = random.choice(["keep", "discard", "discard", "crash"])
            value = 0.0 if status == "crash" else round(1.0 - i * 1e-5, 6)
            memory = 0.0 if status == "crash" else 44.2
            state["rows"].append([f"{i:07x}", value, memory, status, f"synthetic history row {i}"])


def side_commits(ws: Path, count: int) -> list[str]:
    """Real commits (not on the branch) for log_result to point at."""
    tree = git(ws, "rev-parse", "HEAD^{tree}").strip()
    return [git(ws, "commit-tree", tree, "-m", f"external run {i}").strip() for i in range(count)]


def set_knobs(ws: Path, **knobs) -> None:
    (ws / "train.py").write_text("".join(f"{k.upper()} = {v}\n" for k, v in knobs.items()))


def server_params(ws: Path, cache: Path) -> StdioServerParameters:
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    env.pop("AUTORESEARCH_TIME_BUDGET", None)
    return StdioServerParameters(command=sys.executable, cwd=str(REPO), env=env,
                                 args=["-m", "mcp_server", "--workspace", str(ws),
                                       "--train-command", f"{sys.executable} fake_train.py"])


def server_pid(ws: Path) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mcp_server" in cmdline and str(ws).encode() in cmdline:
                return int(entry.name)
    raise RuntimeError("server process not found")


def rss_kb_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def leftover_training(ws: Path) -> list[int]:
    """Live processes still running in the workspace or its slots, other than the server."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if state != "Z" and (cwd == str(ws) or cwd.startswith(f"{ws}/")) and b"mcp_server" not in cmdline:
            found.append(int(entry.name))
    return found


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1] if len(samples) >= 2 else samples[0]


async def timed(client, name, args) -> tuple[float, object]:
    started = time.perf_counter()
    result = await client.call_tool(name, args)
    elapsed = time.perf_counter() - started
    if result.is_error:
        raise RuntimeError(f"{name} failed: {result.content[0].text}")
    return elapsed, result


async def latency_and_overhead(ws: Path, cache: Path, report: dict) -> None:
    latencies = {name: [] for name in ("keep", "discard", "log_result", "status", "read_metrics")}
    commits = side_commits(ws, LATENCY_CALLS)
    async with Client(server_params(ws, cache)) as client:
        await timed(client, "setup", {"tag": "bench"})
    fill_ledger(ws, LEDGER_ROWS)
    async with Client(server_params(ws, cache)) as client:
        answer_sizes = []
        for i in range(LATENCY_CALLS):
            set_knobs(ws, val_bpb=round(1.0 - random.random() * 0.01, 6))
            _, result = await timed(client, "run_experiment", {"description": f"bench run {i}"})
            answer_sizes.append(len(result.content[0].text.encode()))
            decision = "keep" if i % 2 == 0 else "discard"
            latencies[decision].append((await timed(client, decision, {}))[0])
            latencies["status"].append((await timed(client, "status", {}))[0])
            latencies["read_metrics"].append((await timed(client, "read_metrics", {}))[0])
            latencies["log_result"].append((await timed(client, "log_result", {
                "commit": commits[i], "val_bpb": 1.0, "memory_gb": 1.0, "status": "discard",
                "description": f"external {i}"}))[0])
        report["answer_bytes_max"] = max(answer_sizes)
        report["p95_ms"] = {name: round(1000 * p95(s), 1) for name, s in latencies.items()}

        direct, served = [], []
        for i in range(OVERHEAD_RUNS):
            set_knobs(ws, sleep=OVERHEAD_SLEEP_S, val_bpb=0.9)  # discard resets train.py each time
            started = time.perf_counter()
            subprocess.run([sys.executable, "fake_train.py"], cwd=ws, check=True, capture_output=True)
            direct.append(time.perf_counter() - started)
            served.append((await timed(client, "run_experiment", {"description": f"overhead {i}"}))[0])
            await timed(client, "discard", {})
        report["train_wall_s_median"] = round(statistics.median(direct), 3)
        report["run_experiment_s_median"] = round(statistics.median(served), 3)
        report["overhead_s"] = round(statistics.median(served) - statistics.median(direct), 3)


async def startup(ws: Path, cache: Path, report: dict) -> None:
    """Spawn to first answered tools/list, over stdio."""
    samples = []
    for _ in range(STARTUP_SAMPLES):
        started = time.perf_counter()
        async with Client(server_params(ws, cache)) as client:
            await client.list_tools()
            samples.append(time.perf_counter() - started)
    report["startup_s_median"] = round(statistics.median(samples), 3)


async def soak(ws: Path, cache: Path, runs: int, report: dict) -> None:
    samples, expected_rows = [], 0
    async with Client(server_params(ws, cache)) as client:
        await timed(client, "setup", {"tag": "soak"})
        pid = server_pid(ws)
        started = time.perf_counter()
        for i in range(1, runs + 1):
            args = {"description": f"soak run {i}"}
            if i % TIMEOUT_EVERY == 0:
                set_knobs(ws, sleep=30, steps=30)
                args["timeout_seconds"] = SOAK_TIMEOUT_S
            elif i % CRASH_EVERY == 0:
                set_knobs(ws, crash=1)
            else:
                set_knobs(ws, val_bpb=round(1.0 - random.random() * 0.01, 6))
            _, result = await timed(client, "run_experiment", args)
            status = result.structured_content["status"]
            report.setdefault("soak_status_counts", {}).setdefault(status, 0)
            report["soak_status_counts"][status] += 1
            decision = "keep" if status == "ok" and random.random() < 0.3 else "discard"
            await timed(client, decision, {})
            expected_rows += 1
            if i == min(100, max(1, runs // 10)) or i == runs:  # after warm-up, and at the end
                samples.append((i, *rss_kb_and_fds(pid)))
        report["soak_runs"] = runs
        report["soak_seconds"] = round(time.perf_counter() - started, 1)
    lines = (ws / "results.tsv").read_text().splitlines()[1:]
    malformed = [line for line in lines if len(line.split("\t")) != 5]
    report["soak_rows"] = len(lines)
    report["soak_rows_expected"] = expected_rows
    report["soak_malformed_rows"] = len(malformed)
    time.sleep(1)
    report["soak_leftover_processes"] = leftover_training(ws)
    report["soak_rss_kb_fds"] = samples


def check(report: dict) -> list[str]:
    failures = [f"{name} p95 {ms} ms" for name, ms in report["p95_ms"].items() if ms >= P95_TARGET_MS]
    if report["startup_s_median"] >= STARTUP_TARGET_S:
        failures.append(f"start-up {report['startup_s_median']} s")
    if report["overhead_s"] >= OVERHEAD_TARGET_S:
        failures.append(f"overhead {report['overhead_s']} s")
    if report["answer_bytes_max"] >= ANSWER_TARGET_BYTES:
        failures.append(f"answer {report['answer_bytes_max']} bytes")
    if report["soak_rows"] != report["soak_rows_expected"] or report["soak_malformed_rows"]:
        failures.append("ledger rows lost or malformed")
    if report["soak_leftover_processes"]:
        failures.append("processes left behind")
    (_, rss0, fd0), (_, rss1, fd1) = report["soak_rss_kb_fds"][0], report["soak_rss_kb_fds"][-1]
    if fd1 > fd0 or rss1 > rss0 * 1.2 + 4096:
        failures.append(f"server grew: rss {rss0}->{rss1} kB, fds {fd0}->{fd1}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak", type=int, default=100, help="fast experiments in the soak (1000 for the full one)")
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        ws, cache = make_workspace(Path(tmp) / "latency")
        anyio.run(startup, ws, cache, report)
        anyio.run(latency_and_overhead, ws, cache, report)
        ws, cache = make_workspace(Path(tmp) / "soak")
        anyio.run(soak, ws, cache, args.soak, report)
    print(json.dumps(report, indent=1))
    failures = check(report)
    print("targets: " + ("all met" if not failures else "MISSED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
