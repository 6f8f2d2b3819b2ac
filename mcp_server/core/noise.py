"""Run-to-run noise of val_bpb, and whether a change beats it.

Identical code gives slightly different val_bpb (kernels, timing-dependent step counts, and
the luck of the data). measure_noise repeats the last kept commit, each repeat on another
stretch of the training data (on the CPU profile's flops clock the code alone would repeat
to within a few 1e-5); the estimate is the sample standard deviation of those values. A gain
counts as real when it exceeds two standard deviations (and the observed spread): below that, a
keep is a coin flip.

A train.py that does not train on the data order it is given (one that drops
AUTORESEARCH_DATA_ORDER before nanochat/dataloader.py reads it) repeats its number on every order
there, so its noise would be 0 and every pair of a confirmation the same luck: values on different
data orders that agree within ORDER_TOLERANCE are believed to be that, not noise.
"""
import statistics

from mcp_server.core.models import NoiseEstimate

SIGMAS = 2.0
# Runs of the same code on the same data on the flops clock repeat to ~1e-6 in a session and differ by
# up to ~3e-5 across sessions (docs/harness.md: 2.146262 and 2.146232); another stretch of the data
# moves val_bpb by a few 1e-3 (three offline seeds, orders 0 and 1 of train.py: 0.0027 to 0.0045 apart,
# docs/trust.md), so two honest values fall within 1e-4 of each other about once in 50 pairs, three
# about once in 2,500: a one-pair confirmation is refused that often, and a second pair settles it.
ORDER_TOLERANCE = 1e-4


def estimate(values: list[float]) -> NoiseEstimate:
    std = statistics.stdev(values)
    spread = max(values) - min(values)
    return NoiseEstimate(values=[round(v, 6) for v in values], std=round(std, 6),
                         spread=round(spread, 6), threshold=round(max(SIGMAS * std, spread), 6))


def ignores_data_order(measured: list[tuple[int, float]]) -> bool:
    """Whether values of one code, each (data order, val_bpb), span two or more orders yet agree
    within ORDER_TOLERANCE: the code trained on the same tokens each time."""
    values = [v for _, v in measured]
    return len({order for order, _ in measured}) >= 2 and max(values) - min(values) <= ORDER_TOLERANCE


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
