"""Search spaces over train.py's constants, checked against train.py before anything runs.

A dimension proposes new values for one constant from its current value: `scale` multiplies a
number, `shift` adds to an integer, `choices` offers fixed values. The default space follows the
research protocol's order of ideas: learning rates, depth, warm-down, window pattern, batch,
weight decay.
"""
import json
from dataclasses import dataclass
from pathlib import Path

KINDS = ("scale", "shift", "choices")
SIGNIFICANT_DIGITS = 4  # scaled floats are rounded so train.py reads 0.056, not 0.05599999999


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str
    steps: tuple  # factors (scale), offsets (shift) or values (choices), nearest first

    def candidates(self, current) -> list:
        """New values to try from `current`, in order, without repeats or the current value."""
        if self.kind == "scale":
            values = [scaled(current, factor) for factor in self.steps]
        elif self.kind == "shift":
            values = [current + offset for offset in self.steps]
        else:
            values = [normalised(value, current) for value in self.steps]
        out = []
        for value in values:
            if value != current and value not in out and (self.kind == "choices" or value > 0):
                out.append(value)
        return out


DEFAULT_SPACE = (
    Dimension("MATRIX_LR", "scale", (1.4, 0.7, 2.0, 0.5)),
    Dimension("EMBEDDING_LR", "scale", (1.4, 0.7, 2.0, 0.5)),
    Dimension("DEPTH", "shift", (1, -1, 2)),
    Dimension("WARMDOWN_RATIO", "choices", (0.3, 0.5, 0.7, 0.9)),
    Dimension("WINDOW_PATTERN", "choices", ("L", "SSLL", "SSSL")),
    Dimension("TOTAL_BATCH_SIZE", "scale", (0.5, 2)),
    Dimension("WEIGHT_DECAY", "choices", (0.0, 0.1, 0.2, 0.4)),
    Dimension("UNEMBEDDING_LR", "scale", (2.0, 0.5)),
)


class SpaceError(ValueError):
    """A search space that does not fit train.py: said before anything runs."""


def scaled(value, factor):
    if isinstance(value, int):
        return int(round(value * factor))
    return float(f"{value * factor:.{SIGNIFICANT_DIGITS}g}")


def load_space(path: Path) -> tuple[Dimension, ...]:
    """A space from JSON: {"NAME": [values...]} or {"NAME": {"scale"|"shift"|"choices": [...]}}."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpaceError(f"cannot read search space {path}: {exc}") from exc
    if not isinstance(spec, dict) or not spec:
        raise SpaceError(f'{path}: expected a JSON object such as {{"MATRIX_LR": [0.02, 0.08]}}')
    dims = []
    for name, rule in spec.items():
        if isinstance(rule, list):
            rule = {"choices": rule}
        if not (isinstance(rule, dict) and len(rule) == 1 and next(iter(rule)) in KINDS
                and isinstance(next(iter(rule.values())), list) and next(iter(rule.values()))):
            raise SpaceError(f"{path}: {name} must be a non-empty list of values, or "
                             f'{{"scale": [factors]}}, {{"shift": [offsets]}} or {{"choices": [values]}}')
        kind, steps = next(iter(rule.items()))
        dims.append(Dimension(name, kind, tuple(tuple(s) if isinstance(s, list) else s for s in steps)))
    return tuple(dims)


def applicable(space, constant_names) -> tuple[Dimension, ...]:
    """The default space's dimensions that this train.py has (a fork may lack some)."""
    return tuple(dim for dim in space if dim.name in constant_names)


def validate_space(space, current: dict) -> None:
    """Every dimension names a constant of train.py and offers values of its type; else one clear error."""
    problems = []
    for dim in space:
        if dim.name not in current:
            problems.append(f"{dim.name}: train.py has no such constant (it has: {', '.join(sorted(current))})")
            continue
        value = current[dim.name]
        if dim.kind == "scale" and not (is_number(value) and all(is_number(s) and s > 0 for s in dim.steps)):
            problems.append(f"{dim.name} = {value!r}: scale needs a numeric constant and positive factors")
        elif dim.kind == "shift" and not (is_int(value) and all(is_int(s) for s in dim.steps)):
            problems.append(f"{dim.name} = {value!r}: shift needs an integer constant and integer offsets")
        elif dim.kind == "choices":
            wrong = [v for v in dim.steps if not same_type(v, value)]
            if wrong:
                problems.append(f"{dim.name} is {type(value).__name__} ({value!r}) but the space offers "
                                f"{', '.join(repr(v) for v in wrong)}")
    if problems:
        raise SpaceError("the search space does not fit train.py:\n  " + "\n  ".join(problems))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def same_type(candidate, current) -> bool:
    """An int may stand in for a float (0 for 0.0); tuples match element by element."""
    if isinstance(current, float):
        return is_number(candidate)
    if isinstance(current, (tuple, list)):
        return (isinstance(candidate, (tuple, list)) and len(candidate) == len(current)
                and all(same_type(c, v) for c, v in zip(candidate, current)))
    return type(candidate) is type(current)


def normalised(value, current):
    """The candidate in the constant's own type (0 -> 0.0 for a float constant)."""
    if isinstance(current, float):
        return float(value)
    if isinstance(current, (tuple, list)):
        return type(current)(normalised(c, v) for c, v in zip(value, current))
    return value


def batch_fits(config: dict, harness: dict) -> bool:
    """Gradient accumulation needs the total batch to be a whole number of device batches."""
    total, device = config.get("TOTAL_BATCH_SIZE"), config.get("DEVICE_BATCH_SIZE")
    seq_len = harness.get("MAX_SEQ_LEN")
    if not all(is_int(v) for v in (total, device, seq_len)):
        return True
    return total % (device * seq_len) == 0


def sweep_space(space, baseline: dict, harness: dict) -> dict:
    """The space as the sweep tool's ranges, fixed around the baseline's values (so every sweep of
    a search is one Optuna study): a scaled float becomes a log range over its factors, a shifted
    integer a range over its offsets, and a scaled integer (a batch size, which must divide evenly)
    or a list the choices the grid offers, the baseline's value among them."""
    ranges = {}
    for dim in space:
        value = baseline[dim.name]
        options = [v for v in dim.candidates(value) if batch_fits(baseline | {dim.name: v}, harness)] + [value]
        if dim.kind == "scale" and isinstance(value, float):
            ranges[dim.name] = {"low": min(options), "high": max(options), "log": True}
        elif dim.kind == "shift":
            ranges[dim.name] = {"low": min(options), "high": max(options)}
        elif all(isinstance(v, (int, float, str, bool)) for v in options):
            ranges[dim.name] = {"choices": sorted(options, key=repr)}
        else:
            raise SpaceError(f"{dim.name}: the sweep sets numbers, text or booleans, not {value!r}; "
                             "leave it out of the space for --strategy tpe or cmaes")
    return ranges
