"""A sweep's space: each train.py constant's range (low/high, optionally on a log scale) or choices, checked
against the kept train.py before anything runs, as the dimensions Optuna samples (mcp_server/phases/sweep.py)."""
import ast
import math
from dataclasses import dataclass

import pydantic

from mcp_server.core.history import find_constants
from mcp_server.core.models import Refusal, SweepRange

EXAMPLE = ('e.g. {"MATRIX_LR": {"low": 0.01, "high": 0.1, "log": true}, "DEPTH": {"low": 2, "high": 6}, '
           '"WINDOW_PATTERN": {"choices": ["L", "SSSL"]}}')
UNKNOWN = object()  # a constant whose value is not a literal (e.g. TRAIN_DEFAULTS["depth"])


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str  # float, int or choices
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        if self.kind == "choices":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(self.low, self.high, log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def spec(self) -> dict:
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high, "log": self.log,
                "choices": list(self.choices)}


def literal(node: ast.Assign):
    try:
        return ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return UNKNOWN


def parse_space(space, source: str) -> list[Dimension]:
    """The space as dimensions, sorted by name; every problem with it in one refusal."""
    if not isinstance(space, dict) or not space:
        raise Refusal(f"space is empty: give each train.py constant to search a range or choices, {EXAMPLE}.")
    constants = find_constants(source)
    problems, dims = [], []
    for name, given in sorted(space.items()):
        try:
            rng = given if isinstance(given, SweepRange) else SweepRange.model_validate(given)
        except pydantic.ValidationError as exc:
            problems.append(f"{name}: {exc.errors()[0]['msg']} (a range is low/high/log, or choices)")
            continue
        if name not in constants:
            problems.append(f"{name}: train.py has no module-level constant {name} (it has: "
                            f"{', '.join(n for n in sorted(constants) if constants[n])})")
            continue
        if constants[name] is None:
            problems.append(f"{name} is assigned more than once at module level in train.py: keep one assignment")
            continue
        dim = dimension(name, rng, literal(constants[name]), problems)
        if dim:
            dims.append(dim)
    if problems:
        raise Refusal("The sweep's space does not fit train.py: " + "; ".join(problems) +
                      f". Nothing ran. A space maps constants to ranges or choices, {EXAMPLE}.")
    return dims


def dimension(name: str, rng: SweepRange, current, problems: list) -> Dimension | None:
    if rng.choices is not None:
        return choices_dimension(name, rng, current, problems)
    if rng.low is None or rng.high is None:
        problems.append(f"{name}: give both low and high, or choices")
        return None
    if isinstance(current, (str, bool, tuple, list, type(None))):
        problems.append(f"{name} is {current!r}, not a number: give choices instead of low/high")
        return None
    integer = isinstance(current, int) or (current is UNKNOWN and all(isinstance(v, int) for v in (rng.low, rng.high)))
    if integer and not all(float(v).is_integer() for v in (rng.low, rng.high)):
        problems.append(f"{name} is an integer ({current if current is not UNKNOWN else 'by its range'}): "
                        "low and high must be whole numbers")
        return None
    if not all(math.isfinite(v) for v in (rng.low, rng.high)) or rng.low >= rng.high:
        problems.append(f"{name}: low ({rng.low}) must be below high ({rng.high}), both finite")
        return None
    if rng.log and rng.low <= 0:
        problems.append(f"{name}: a log range needs low above 0 (got {rng.low})")
        return None
    if integer:
        return Dimension(name, "int", int(rng.low), int(rng.high), rng.log)
    return Dimension(name, "float", float(rng.low), float(rng.high), rng.log)


def choices_dimension(name: str, rng: SweepRange, current, problems: list) -> Dimension | None:
    if rng.low is not None or rng.high is not None or rng.log:
        problems.append(f"{name}: give either choices or low/high, not both")
        return None
    values = list(rng.choices)
    if not values or len(set(map(repr, values))) != len(values):
        problems.append(f"{name}: choices must be a non-empty list without repeats")
        return None
    if isinstance(current, float):
        wrong = [v for v in values if isinstance(v, (str, bool))]
        values = [float(v) for v in values if v not in wrong]
    elif current is UNKNOWN:
        wrong = [v for v in values if type(v) is not type(values[0])]
    elif isinstance(current, (int, str, bool)):
        wrong = [v for v in values if type(v) is not type(current)]
    else:
        problems.append(f"{name} is {current!r}: a sweep sets numbers, text or booleans; edit the code for it")
        return None
    if wrong:
        like = f"{type(current).__name__}, like its value {current!r}" if current is not UNKNOWN else "of one type"
        problems.append(f"{name}'s choices must all be {like}: not {', '.join(map(repr, wrong))}")
        return None
    return Dimension(name, "choices", choices=tuple(values))
