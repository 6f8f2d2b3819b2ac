"""What pinning and checking the training environment costs (mcp_server/core/envpin.py):

    uv run python bench/bench_envpin.py [--python PATH] [--repeat 5]

The interpreter's folders are probed once per server; setup takes the pins and every run is checked
against them (a stat walk of site-packages; the start-up files and standard library; the contents of
every Python source). Prints the probe, then per pin the first (cold) walk and the median of the take
and check walks that follow, side by side, what the three checks cost one after the other, and what a
run's check costs (the three sharing one walk, envpin.Walk, as submit's check does). Target (issue 24): a check well under a
second on an environment with torch (this project's own .venv by default).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcp_server.core import envpin  # noqa: E402


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    probe, _ = timed(envpin.folders, args.python)
    pythons = [args.python]
    pins = {"packages (stat walk)": (lambda: envpin.take(args.python), lambda pin: envpin.check(pin, args.python)),
            "start-up and stdlib": (lambda: envpin.take_startup(pythons), lambda pin: envpin.check_startup(pin, pythons)),
            "sources (contents)": (lambda: envpin.take_sources(pythons), lambda pin: envpin.check_sources(pin, pythons))}
    print(f"probe (once per server): {probe:.3f} s")
    print(f"{'pin':<22} {'entries':>8} {'cold s':>8} {'take s':>8} {'check s':>8}")
    total = 0.0
    for name, (take, check) in pins.items():
        cold, pin = timed(take)
        takes = [timed(take)[0] for _ in range(args.repeat)]
        checks = [timed(check, pin)[0] for _ in range(args.repeat)]
        total += statistics.median(checks)
        print(f"{name:<22} {len(pin):>8} {cold:>8.3f} {statistics.median(takes):>8.3f} {statistics.median(checks):>8.3f}")
    print(f"{'all, each its own walk':<22} {'':>8} {'':>8} {'':>8} {total:>8.3f}")
    taken = {name: take() for name, (take, _) in pins.items()}

    def shared() -> None:
        walk = envpin.Walk()
        envpin.check(taken["packages (stat walk)"], args.python, walk=walk)
        envpin.check_startup(taken["start-up and stdlib"], pythons, walk)
        envpin.check_sources(taken["sources (contents)"], pythons, walk)
    one = statistics.median(timed(shared)[0] for _ in range(args.repeat))
    print(f"{'all, one walk: per run':<22} {'':>8} {'':>8} {'':>8} {one:>8.3f}")


if __name__ == "__main__":
    main()
