"""Repeated measurements: noise estimates, data orders, and the reruns a confirmation can reuse.

On the flops clock with local slots a rerun's val_bpb is a function of its code and data order,
so reruns are filed per code ("shelves" in the state) and a confirmation reuses the best's
measurements as controls. The noise estimate itself is noise.estimate's; this module keeps it.

Imports the core (runs) only.
"""
from mcp_server import noise
from mcp_server.models import NoiseEstimate, RunResult
from mcp_server.runs import LoopCore
from mcp_server.workspace import budget_clock


def record_confirmation(core: LoopCore, run: int, confirmation: dict, spent: int) -> int:
    """Stores the verdict on the candidate's entry; returns the research run's extra runs so far."""
    with core.state.transaction() as state:
        entry = (state.get("runs") or {}).get(str(run))
        if entry is not None:
            entry["confirmation"] = confirmation
        state["extra_runs"] = state.get("extra_runs", 0) + spent
        return state["extra_runs"]


def _repeatable(core: LoopCore) -> bool:
    """Whether a run's val_bpb depends only on its code and data order, not on when it ran or
    what ran beside it: the flops clock on local slots (a cluster node's speed and data order are
    its own). There, a rerun of the best already measured on a data order stands in for a control."""
    return core.make_executor is None and budget_clock() == "flops"


def _measurement_shelf(core: LoopCore, state: dict, commit: str) -> str:
    """Where reruns of a commit's train.py are filed: its code, the harness and the slot count
    (slots sharing the CPU train with fewer threads, which changes the arithmetic)."""
    return f"{core.ws.train_blob(commit)} {state.get('fingerprint', '')} {core.slots}"


def file_measurement(core: LoopCore, state: dict, entry: dict, result: RunResult) -> None:
    """Files a rerun on another data order (noise repeats, controls, confirmations) for the
    confirmations that need the same code on the same data again."""
    order = entry.get("data_order", 0)
    if not order or result.status != "ok" or result.budget_clock != "flops" or not _repeatable(core):
        return
    shelf = state.setdefault("measured", {}).setdefault(_measurement_shelf(core, state, entry["commit"]), {})
    shelf[str(order)] = {"val_bpb": result.val_bpb, "run": entry["run"]}


def _measurements_of(core: LoopCore, state: dict, commit: str) -> dict[int, dict]:
    """{data order: {val_bpb, run}} of the reruns of this commit's code, where the clock makes
    them repeatable; {} elsewhere."""
    if not _repeatable(core):
        return {}
    shelf = (state.get("measured") or {}).get(_measurement_shelf(core, state, commit)) or {}
    return {int(order): m for order, m in shelf.items()}


def confirmation_orders(core: LoopCore, entry: dict, pairs: int) -> list[tuple[int, dict | None, dict | None]]:
    """(data order, the best's measurement on it, the candidate's) per pair: first the orders
    the best was already measured on, whose values stand as controls (one run instead of two),
    then fresh ones."""
    state = core.state.load()
    control = _measurements_of(core, state, entry["parent"])
    candidate = _measurements_of(core, state, entry["commit"])
    orders = sorted(control, reverse=True)[:pairs]
    orders += [fresh_data_order(core) for _ in range(pairs - len(orders))]
    return [(order, control.get(order), candidate.get(order)) for order in orders]


def fresh_data_order(core: LoopCore) -> int:
    """A data order no rerun of this research run has used: each rerun sees new luck."""
    with core.state.transaction() as state:
        state["data_orders"] = state.get("data_orders", 0) + 1
        return state["data_orders"]


def noise_values_from_kept(core: LoopCore) -> list[float]:
    """The kept commit's own value and, where the clock makes reruns repeatable, its reruns on
    other data orders so far (earlier noise repeats, its confirmation as a candidate)."""
    state = core.state.load()
    kept = state.get("kept_commit", "")
    own = [r.val_bpb for r in core.rows() if r.commit == kept[:7] and r.status == "keep"]
    reruns = _measurements_of(core, state, kept) if kept else {}
    return own + [m["val_bpb"] for _, m in sorted(reruns.items())]


def store_noise(core: LoopCore, values: list[float], spent: int, device: str | None = None) -> NoiseEstimate:
    """The estimate, also kept per GPU model: a result is judged against its own model's noise."""
    estimate = noise.estimate(values)
    with core.state.transaction() as state:
        state["noise"] = estimate.model_dump()
        state["extra_runs"] = state.get("extra_runs", 0) + spent
        if device:
            state.setdefault("noise_by_device", {})[device] = estimate.model_dump()
    return estimate
