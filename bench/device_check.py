"""The first thing to run on a GPU machine: one command, no network, one table.

    uv run python bench/device_check.py [--cache DIR] [--budget 60] [--cpu]

On one H100 or H200 it finishes within about 10 minutes. Rows: the card, its driver, torch and its
CUDA, the attention train.py gets; the h100 profile's train.py at a 60 s budget (steps, MFU, peak
memory, compile time, recompiles, its own val_bpb); the harness's evaluation of the model that run
exported, in its own isolated process as the server runs it (time, peak memory, its val_bpb against
train.py's); an eager run of a few steps (AUTORESEARCH_COMPILE=0); two short experiments through
the MCP server (a baseline, kept, and an edit, discarded: status, val_bpb, verified).

The cache defaults to a fresh temp folder prepared offline for the profile (h100 where the card
has 70 GB or more, else the one prepare.py picks). --cpu is the same logic as a dry run on the
CPU with a tiny budget (the test suite runs it): the cpu profile, seconds instead of minutes.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
from mcp import Client

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_integrity import workspace  # noqa: E402

from mcp_server.core import integrity, logparse  # noqa: E402
from mcp_server.scripts import harness_eval  # noqa: E402

DEADLINE_S = 600  # the whole check, on a GPU
EAGER_BUDGET_S = {"gpu": 10, "cpu": 1}  # a few steps past the untimed ones
EXPERIMENT_BUDGET_S = {"gpu": 20, "cpu": 1}
EXPERIMENT_EVAL_TOKENS = {"gpu": 4 * 524288, "cpu": 2**12}  # the experiments show the loop works, not a number
DRY_RUN_EVAL_TOKENS = 2**12  # one batch of the cpu profile
MEMORY_POLL_S = 0.2
FACTS = """
import json, platform, subprocess, torch
from nanochat import attention
from nanochat.platform import DEVICE, COMPUTE_DTYPE, device_name
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30).stdout.split()[0]
except (OSError, IndexError, subprocess.TimeoutExpired):
    driver = "-"
if DEVICE.type == "cuda":
    used = "FlashAttention-3" if attention.FA3 is not None else "SDPA (FlashAttention-3 did not load)"
else:
    used = f"explicit scores up to T={attention.EXPLICIT_MAX_T}, SDPA beyond"
print(json.dumps({"card": device_name(), "device": DEVICE.type, "driver": driver, "torch": torch.__version__,
                  "cuda": torch.version.cuda or "-", "compute dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
                  "attention": used,
                  "capability": ".".join(map(str, torch.cuda.get_device_capability())) if DEVICE.type == "cuda" else "-"}))
"""


def python() -> list[str]:
    return [sys.executable]


def facts(env: dict) -> dict:
    """What this machine is, from a process of its own (this one never touches the GPU)."""
    done = subprocess.run([*python(), "-c", FACTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        sys.exit(f"torch cannot start here:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def prepared_cache(requested: str | None, profile: str, env: dict) -> Path:
    if requested:
        return Path(requested)
    cache = Path(tempfile.mkdtemp(prefix="device-check-"))
    command = [*python(), "prepare.py", "--dataset", "offline"] + (["--profile", profile] if profile else [])
    done = subprocess.run(command, cwd=REPO, env=dict(env, AUTORESEARCH_CACHE=str(cache)), capture_output=True,
                          text=True, timeout=DEADLINE_S)
    if done.returncode != 0:
        sys.exit(f"prepare.py failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return cache


class PeakMemory:
    """The peak memory of a process while it runs, polled: on a GPU what nvidia-smi reports it uses,
    on the CPU its peak resident set (VmHWM)."""

    def __init__(self, pid: int, gpu: bool):
        self.pid, self.gpu, self.peak_mb = pid, gpu, 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _now_mb(self) -> float:
        if self.gpu:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return sum(float(line.split(",")[1]) for line in out.splitlines()
                       if line.split(",")[0].strip() == str(self.pid))
        status = Path(f"/proc/{self.pid}/status").read_text()
        return float(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    def _poll(self):
        while not self.done.wait(MEMORY_POLL_S):
            try:
                self.peak_mb = max(self.peak_mb, self._now_mb())
            except (OSError, ValueError, AttributeError, IndexError, subprocess.TimeoutExpired):
                pass  # gone, or between states

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak_mb


def train(env: dict, budget: float, **extra) -> dict:
    """One train.py run: its summary, wall time and output."""
    t0 = time.time()
    done = subprocess.run([*python(), "train.py"], cwd=REPO, env=dict(env, AUTORESEARCH_TIME_BUDGET=str(budget), **extra),
                          capture_output=True, timeout=DEADLINE_S)
    out = done.stdout.decode(errors="replace")
    summary = logparse.parse_summary(out)
    if done.returncode != 0 or summary is None:
        sys.exit(f"train.py failed (exit {done.returncode}):\n{out[-3000:]}\n{done.stderr.decode()[-3000:]}")
    return {"summary": summary, "wall": time.time() - t0, "out": out}


def eager_run(env: dict, kind: str, budget: float, eval_tokens: int, main_run: dict) -> dict:
    """A few steps with AUTORESEARCH_COMPILE=0. Where the main run already trained so (a dry run in an environment
    that trains eager, as the test suite's), at the same budget on the same tokens, it is that run: another would
    repeat it step for step."""
    tokens = EXPERIMENT_EVAL_TOKENS[kind]
    if env.get("AUTORESEARCH_COMPILE") == "0" and budget == EAGER_BUDGET_S[kind] and eval_tokens == tokens:
        print("eager: the main run trained eager already", flush=True)
        return main_run
    print("eager, a few steps ...", flush=True)
    return train(dict(env, AUTORESEARCH_EVAL_TOKENS=str(tokens)), EAGER_BUDGET_S[kind], AUTORESEARCH_COMPILE="0")


def harness_evaluation(program: Path, eval_tokens: int, env: dict, gpu: bool) -> dict:
    """nanochat/evaluate_export.py on the exported program, isolated as the worker starts it: the
    server's spec (shapes from the prepared profile, inputs checked by content), and the worker's
    private copies of the program and the inputs handed over as open files."""
    saved = {k: os.environ.get(k) for k in ("AUTORESEARCH_CACHE", "AUTORESEARCH_EVAL_TOKENS")}
    os.environ.update(AUTORESEARCH_CACHE=env["AUTORESEARCH_CACHE"], AUTORESEARCH_EVAL_TOKENS=str(eval_tokens))
    try:
        spec = integrity.evaluation_spec(REPO, None, timeout=DEADLINE_S)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    inputs = harness_eval.private_copies(spec["inputs"])
    copy = tempfile.TemporaryFile()
    harness_eval.copy_regular_file(program, copy)
    read_end, write_end = os.pipe()
    fds = {"--program-fd": copy.fileno(), **{f"--{name}-fd": f.fileno() for name, f in inputs.items()},
           "--out-fd": write_end}
    argv = [*spec["argv"], *(a for k, fd in fds.items() for a in (k, str(fd)))]
    keep = set(spec["env"]) | {"CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "AUTORESEARCH_DEVICE"}
    t0 = time.time()
    proc = subprocess.Popen(argv, env={k: v for k, v in env.items() if k in keep}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=tuple(fds.values()))
    os.close(write_end)
    for f in (copy, *inputs.values()):
        f.close()
    memory = PeakMemory(proc.pid, gpu)
    out, _ = proc.communicate(b"go\n", timeout=DEADLINE_S)
    peak = memory.stop()
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read()
    if not text:
        sys.exit(f"the harness's evaluation gave no result (exit {proc.returncode}):\n{out.decode()[-3000:]}")
    return dict(json.loads(text), wall=time.time() - t0, peak_mb=peak)


def experiments(env: dict, folder: Path, budget: float, eval_tokens: int) -> list[dict]:
    """A baseline (kept) and an edit (discarded) through the real server, in this process with the
    check's environment, as an agent runs them."""
    from mcp_server.loop import ResearchLoop
    from mcp_server.server import build_server
    server_env = dict(env, AUTORESEARCH_TIME_BUDGET=str(budget), AUTORESEARCH_EVAL_TOKENS=str(eval_tokens))
    saved = {k: os.environ.get(k) for k in server_env}
    os.environ.update(server_env)
    ws = workspace(folder)
    loop = ResearchLoop(ws, [sys.executable, "train.py"], slots=1)
    source = (ws / "train.py").read_text()

    async def go():
        async with Client(build_server(loop)) as client:
            await client.call_tool("setup", {"tag": "device-check"})
            found = []
            for description, text in (("baseline", source), ("matrix lr 0.05", source.replace(
                    "MATRIX_LR = 0.04", "MATRIX_LR = 0.05"))):
                (ws / "train.py").write_text(text)
                t0 = time.time()
                result = (await client.call_tool("run_experiment", {"description": description,
                                                                    "timeout_seconds": DEADLINE_S})).structured_content
                found.append(dict(result, wall=time.time() - t0, description=description))
                decide = "keep" if description == "baseline" else "discard"
                await client.call_tool(decide, {"run": result["run"]})
            return found
    try:
        return anyio.run(go)
    finally:
        loop.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def figure(value, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def rows(machine: dict, main: dict, evaluation: dict, eager: dict, runs: list[dict], budget: float) -> list:
    s, e = main["summary"], eager["summary"]
    own, harness = s.val_bpb, evaluation.get("val_bpb")
    gap = f"{harness - own:+.2e} ({(harness - own) / own:+.2e} relative)" if harness is not None and own else "-"
    found = [
        ("card", f"{machine['card']} ({machine['device']}, capability {machine['capability']})"),
        ("driver", machine["driver"]),
        ("torch / CUDA", f"{machine['torch']} / {machine['cuda']}"),
        ("compute dtype", machine["compute dtype"]),
        ("attention", machine["attention"]),
        (f"train.py, {budget:g} s budget", f"{s.num_steps} steps, MFU {figure(s.mfu_percent, '.1f')}%, peak "
                                           f"{figure(s.peak_vram_mb, '.0f')} MiB, {main['wall']:.0f} s wall"),
        ("  compile", f"{figure(s.compile_seconds, '.1f')} s, cache {s.compile_cache}, recompiles {s.recompiles}"),
        ("  val_bpb (train.py's own)", figure(own, ".6f")),
        ("harness evaluation", f"{evaluation['wall']:.1f} s (load {evaluation.get('load_seconds')} s, evaluation "
                               f"{evaluation.get('eval_seconds')} s, causality {evaluation.get('causality_seconds')} s), "
                               f"peak {evaluation['peak_mb']:.0f} MiB"),
        ("  val_bpb (harness's)", f"{figure(harness, '.6f')}, against train.py's {gap}"
                                  + ("" if evaluation.get("causal") else f"; {evaluation.get('problem')}")),
        ("eager (AUTORESEARCH_COMPILE=0)", f"{e.num_steps} steps, MFU {figure(e.mfu_percent, '.1f')}%, peak "
                                           f"{figure(e.peak_vram_mb, '.0f')} MiB, val_bpb {figure(e.val_bpb, '.6f')}"),
    ]
    for run in runs:
        found.append((f"server: {run['description']}", f"{run.get('status')}, val_bpb {figure(run.get('val_bpb'), '.6f')}, "
                                                        f"verified {run.get('verified')}, {run['wall']:.0f} s"))
    return found


def table(found: list) -> str:
    width = max(len(name) for name, _ in found)
    return "\n".join(f"| {name:<{width}} | {value} |" for name, value in found)


def check(found: dict) -> list[str]:
    """What must hold for the device to be called working."""
    problems = []
    evaluation, own = found["evaluation"], found["main"]["summary"].val_bpb
    if "val_bpb" not in evaluation:
        problems.append(f"the harness's evaluation gave no val_bpb: {evaluation}")
    elif own and abs(evaluation["val_bpb"] - own) > 0.01 * own:
        problems.append(f"the harness's val_bpb {evaluation['val_bpb']:.6f} is over 1% from train.py's {own:.6f}")
    problems += [f"server run '{r['description']}' ended {r.get('status')}" for r in found["runs"] if r.get("status") != "ok"]
    if found["machine"]["device"] != ("cpu" if found["cpu"] else "cuda"):
        problems.append(f"trained on {found['machine']['device']}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="a prepared cache (default: a fresh temp one, prepared offline)")
    parser.add_argument("--budget", type=float, help="seconds of training of the main run (default 60; --cpu 2)")
    parser.add_argument("--cpu", action="store_true", help="a dry run of the same logic on the CPU, tiny budget")
    args = parser.parse_args(argv)
    started = time.time()
    kind = "cpu" if args.cpu else "gpu"
    env = {k: v for k, v in os.environ.items() if k not in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS")}
    if args.cpu:
        env.update(AUTORESEARCH_DEVICE="cpu", AUTORESEARCH_EVAL_TOKENS=str(DRY_RUN_EVAL_TOKENS))
    budget = args.budget or (2 if args.cpu else 60)
    machine = facts(env)
    print(f"{machine['card']}: preparing ...", flush=True)
    cache = prepared_cache(args.cache, "cpu" if args.cpu else None, env)
    env["AUTORESEARCH_CACHE"] = str(cache)
    folder = Path(tempfile.mkdtemp(prefix="device-check-runs-"))
    try:
        program = folder / "export" / "model.pt2"
        program.parent.mkdir()
        print(f"train.py at a {budget:g} s budget ...", flush=True)
        main_run = train(env, budget, RESEARCH_LOOP_EXPORT=str(program))
        print("the harness's evaluation of its export ...", flush=True)
        eval_tokens = int(env.get("AUTORESEARCH_EVAL_TOKENS") or json.loads((cache / "prepared.json").read_text())["eval_tokens"])
        evaluation = harness_evaluation(program, eval_tokens, env, gpu=machine["device"] == "cuda")
        eager = eager_run(env, kind, budget, eval_tokens, main_run)
        print("two experiments through the MCP server ...", flush=True)
        runs = experiments(env, folder / "lab", EXPERIMENT_BUDGET_S[kind], EXPERIMENT_EVAL_TOKENS[kind])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    found = rows(machine, main_run, evaluation, eager, runs, budget)
    found.append(("device check", f"{time.time() - started:.0f} s in all"))
    print(table(found), flush=True)
    problems = check(dict(machine=machine, main=main_run, evaluation=evaluation, runs=runs, cpu=args.cpu))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
