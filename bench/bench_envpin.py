"""What pinning and checking the training environment costs (mcp_server/core/envpin.py):

    uv run python bench/bench_envpin.py [--python PATH] [--repeat 5]

The interpreter's folders are probed once per server; setup takes the pin and every run is checked
against it (a stat walk of site-packages). Prints the probe, the first (cold) walk, and the median
of the take and check walks that follow, side by side. Target (issue 24): a check well under a
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
    cold, pin = timed(envpin.take, args.python)
    takes = [timed(envpin.take, args.python)[0] for _ in range(args.repeat)]
    checks = [timed(envpin.check, pin, args.python)[0] for _ in range(args.repeat)]
    print(f"{'entries':>8} {'probe s':>8} {'cold s':>8} {'take s':>8} {'check s':>8}")
    print(f"{len(pin):>8} {probe:>8.3f} {cold:>8.3f} {statistics.median(takes):>8.3f} {statistics.median(checks):>8.3f}")


if __name__ == "__main__":
    main()
