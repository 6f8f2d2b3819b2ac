"""A new clone's first compiled run, where another clone already prepared the shared cache, at two
commits side by side.

    uv run bench/bench_coldstart.py [--commits BEFORE,AFTER] [--budget-seconds 2]

For each commit: two clones at different paths, each with its own venv (`uv sync`), one cache
between them (as two checkouts of one user share ~/.cache/autoresearch). The first clone prepares
the cache; the second prepares it too (a prepared cache is kept: only what its own environment
lacks is built), then runs train.py compiled on the CPU once. Printed per commit: whether the second
prepare built the compiler's C++ headers, and that run's compile and start-up seconds (start-up:
total_seconds less training and evaluation). Until d316131 the headers were kept once per cache,
so the second clone's prepare found the first clone's, built nothing, and its first run built its
own (docs/benchmarks.md has the figures).

Defaults: --commits d316131~1,HEAD. Each commit takes a few minutes on 2 cores.
"""
import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREPARE = ["uv", "run", "--quiet", "prepare.py", "--profile", "cpu", "--dataset", "offline"]


def clone(commit: str, path: Path) -> Path:
    subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "checkout", "-q", commit], check=True)
    subprocess.run(["uv", "sync", "--quiet"], cwd=path, check=True, env=dict(os.environ, UV_LINK_MODE="hardlink"))
    return path


def run(command: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def summary_value(out: str, key: str) -> float:
    return float(re.search(rf"^{key}:\s*([0-9.]+)", out, re.M).group(1))


def measure(commit: str, budget: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "AUTORESEARCH_COMPILE")}
        env |= {"AUTORESEARCH_CACHE": str(root / "cache"), "AUTORESEARCH_TIME_BUDGET": budget}
        first = clone(commit, root / "first")
        run(PREPARE, first, env)
        second = clone(commit, root / "second")
        prepared = run(PREPARE, second, env)
        started = time.time()
        out = run(["uv", "run", "--quiet", "train.py"], second, env)
        total = summary_value(out, "total_seconds")
        return {"headers built by the second prepare": "compiler ready" in prepared,
                "first run: compile_seconds": summary_value(out, "compile_seconds"),
                "first run: start-up seconds": round(total - summary_value(out, "training_seconds")
                                                     - summary_value(out, "eval_seconds"), 1),
                "first run: wall seconds": round(time.time() - started, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commits", default="d316131~1,HEAD", help="two commits (or more), comma-separated")
    p.add_argument("--budget-seconds", default="2", help="train.py's training budget")
    args = p.parse_args()
    commits = args.commits.split(",")
    names = [subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", c], capture_output=True, text=True,
                            check=True).stdout.strip() for c in commits]
    results = [measure(name, args.budget_seconds) for name in names]
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (every row is skewed by other work)")
    print(f"{'':40s}" + "".join(f"{n:>12s}" for n in names))
    for key in results[0]:
        print(f"{key:40s}" + "".join(f"{str(r[key]):>12s}" for r in results))


if __name__ == "__main__":
    main()
