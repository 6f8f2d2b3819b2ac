"""Run-to-run noise of val_bpb, and whether a change beats it.

Identical code gives slightly different val_bpb (kernels, timing-dependent step counts, and
the luck of the data). measure_noise repeats the last kept commit, each repeat on another
stretch of the training data (on the CPU profile's flops clock the code alone would repeat
to within a few 1e-5); the estimate is the sample standard deviation of those values. A gain
counts as real when it exceeds two standard deviations (and the observed spread): below that, a
keep is a coin flip.
"""
import statistics

from mcp_server.core.models import NoiseEstimate

SIGMAS = 2.0


def estimate(values: list[float]) -> NoiseEstimate:
    std = statistics.stdev(values)
    spread = max(values) - min(values)
    return NoiseEstimate(values=[round(v, 6) for v in values], std=round(std, 6),
                         spread=round(spread, 6), threshold=round(max(SIGMAS * std, spread), 6))


def for_device(state: dict, device: str | None) -> dict | None:
    """The noise estimate that applies to a result on `device`: that model's own once several
    are measured; the one estimate where none was recorded per model."""
    by_device = state.get("noise_by_device") or {}
    if device in by_device:
        return by_device[device]
    return None if by_device else state.get("noise")


def verdict(delta: float | None, noise: dict | None, device: str | None = None) -> str:
    """One short sentence on the delta against the best kept result (measured on `device`)."""
    if delta is None:
        return "no kept result yet: this is the baseline to keep"
    direction = "better" if delta < 0 else "worse" if delta > 0 else "equal"
    if not noise:
        where = f" on {device}" if device else ""
        return f"{direction} by {abs(delta):.6f}; noise not measured{where}: run measure_noise"
    threshold = noise["threshold"]
    beyond = abs(delta) > threshold
    return (f"{direction} by {abs(delta):.6f}, {'beyond' if beyond else 'within'} noise "
            f"(threshold {threshold:.6f})")
