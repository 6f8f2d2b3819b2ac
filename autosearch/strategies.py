"""Search strategies: which constants to change next, given the best configuration so far.

Both are stateless between calls: they read the history (the configuration of every ledger
row, oldest first, taken from the train.py of its commit; the kept baseline among them), so a
resumed search continues where it stopped and never repeats a configuration. A proposal is a
dict {constant: new value} applied to the last kept train.py; None means nothing is left to try.
"""
import random

from autosearch.space import batch_fits

MAX_DRAWS = 500  # random draws before concluding that the neighbourhood is exhausted
TWO_CHANGE_PROBABILITY = 0.3  # random search sometimes moves two constants at once


def config_key(config: dict, names) -> tuple:
    """A hashable identity for a configuration over the searched names."""
    return tuple((name, freeze(config.get(name))) for name in sorted(names))


def freeze(value):
    return tuple(freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


class RandomSearch:
    """Random moves around the best configuration: one or two constants, values drawn from the
    space. Seeded per experiment number, so a run and its resumption draw the same sequence."""

    def __init__(self, space, seed: int, harness: dict):
        self.space, self.seed, self.harness = space, seed, harness

    def propose(self, current: dict, history: list[dict]) -> dict | None:
        rng = random.Random(f"{self.seed}:{len(history)}")
        names = [dim.name for dim in self.space]
        tried = {config_key(config, names) for config in history}
        for _ in range(MAX_DRAWS):
            count = 2 if len(self.space) > 1 and rng.random() < TWO_CHANGE_PROBABILITY else 1
            change = {}
            for dim in rng.sample(self.space, count):
                options = dim.candidates(current[dim.name])
                if options:
                    change[dim.name] = rng.choice(options)
            config = current | change
            if change and config_key(config, names) not in tried and batch_fits(config, self.harness):
                return change
        return None


class GreedyCoordinateSearch:
    """Coordinate descent: one constant at a time, in the space's order, over a grid fixed around
    the baseline's values, always from the best configuration so far. When every single-constant
    move from the best has been tried, the search is over."""

    def __init__(self, space, harness: dict):
        self.space, self.harness = space, harness

    def propose(self, current: dict, history: list[dict]) -> dict | None:
        names = [dim.name for dim in self.space]
        tried = {config_key(config, names) for config in history}
        baseline = history[0] if history else current
        for dim in self.space:
            grid = dim.candidates(baseline[dim.name]) + [baseline[dim.name]]
            for value in (v for v in grid if v != current[dim.name]):
                config = current | {dim.name: value}
                if config_key(config, names) not in tried and batch_fits(config, self.harness):
                    return {dim.name: value}
        return None


SWEEPS = ("tpe", "cmaes")  # Optuna's samplers, through the server's sweep tool (mcp_server/phases/sweep.py)
STRATEGIES = ("random", "greedy") + SWEEPS


def make_strategy(name: str, space, seed: int, harness: dict):
    """Greedy search is deterministic; only random search uses the seed. A sweep has no strategy
    here: the server's Optuna study proposes."""
    if name == "random":
        return RandomSearch(space, seed, harness)
    if name == "greedy":
        return GreedyCoordinateSearch(space, harness)
    if name in SWEEPS:
        return None
    raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")


def describe(change: dict) -> str:
    """A ledger description: the constants set, e.g. 'MATRIX_LR=0.056 DEPTH=5'."""
    return " ".join(f"{name}={value!r}" for name, value in change.items())
