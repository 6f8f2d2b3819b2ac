"""Repeated measurements: noise estimates, data orders, and the reruns a confirmation can reuse.

On the flops clock with local slots a rerun's val_bpb is a function of its code and data order,
so reruns are filed per code ("shelves" in the state) and a confirmation reuses the best's
measurements as controls. The noise estimate itself is noise.estimate's; this module keeps it.

Imports the core (runs) only.
"""
import contextlib
import hashlib
import json

from mcp_server.core import budget_settings, ledger, limits, noise
from mcp_server.core.models import NoiseEstimate, Refusal, RunResult
from mcp_server.phases.runs import IN_FLIGHT, LoopCore

BEGUN = "begun_pairs"  # the state's {_pair_key or "noise <blob>": data orders begun}: confirmation_orders, noise_orders
# the state's {_pair_key: {data order: [the best's val_bpb, the candidate's]}}: the pairs confirmations measured side
# by side, the only pairs where reruns do not repeat
PAIRS = "judged_pairs"
# the state's {"<_pair_key> <data order>": [_pair_key, data order, control's run, candidate's run, the control's value,
# the candidate's]}: a pair confirm started side by side (one call at a time per pair: _refuse_a_second_call), with
# its values as they are filed, judged (PAIRS) as soon as both are, not only once the call returns (review 68: its server killed while the next pair trained, a lost pair finished and filed was no
# pair on the wall clock, and was measured again on new luck)
SIDE_BY_SIDE = "pairs_started"
HELD_TO = "held_orders"  # the state's list: every data order a confirmation began (this research run's, carried)
# what a setup on the same harness carries into the new research run: measurements of code on a harness stand whichever
# run took them (review 66: a setup of a new tag mid-night forgot a lost pair and the held orders, and the data order
# counter began again at 1, so an idea that lost on order 3 was confirmed on order 1)
CARRIED = ("measured", "reruns", BEGUN, HELD_TO, PAIRS, "data_orders")
VALUES = ("measured", "reruns")  # of CARRIED, the values themselves: controls only on the prepared data they came from
# the state's {"<harness> <prepared data>": VALUES, and "<harness>": the rest of CARRIED, as the last research run on
# them left them}: review 68, a harness edit set up and undone, or the cache prepared again and back, dropped every lost
# pair and held order and began the counter at 1 again
SHELVED = "shelved_measurements"
# what setup records that values measured depend on beside the harness: the data, the environments runs and the
# evaluator import from, and the budget settings (a value measured at another clock, budget or evaluation size is no
# control)
MEASURED_WITH = ("cache_fingerprint", "input_pins", "environment_pin", "evaluator_pin", "startup_pin", "source_pin",
                 budget_settings.SETTINGS)


def carried(state: dict, fingerprint: str, setup: dict) -> dict:
    """What a setup on this harness and prepared data carries from the research runs before it: the values measured
    by the last one on both (a value measured on other data, its shelf keyed by the harness alone, would stand as a
    control against one measured on these: review 68), and the pairs judged, the orders begun and held and the
    counter of the last one on this harness, whatever its data (review 71: a newline appended to the cache's
    prepared.json made the same data another fingerprint, and a setup on it forgot a lost pair); the others shelved
    until a setup is on theirs again. `setup`: the new state's MEASURED_WITH."""
    shelved = dict(state.get(SHELVED) or {})
    if state.get("fingerprint"):
        shelved[_measured_with(state["fingerprint"], state)] = _of(state, VALUES)
        shelved[state["fingerprint"]] = _of(state, [k for k in CARRIED if k not in VALUES])
    values, rest = shelved.pop(_measured_with(fingerprint, setup), {}), shelved.pop(fingerprint, None)
    before = shelved.pop(f"{fingerprint} {setup.get('cache_fingerprint')}", None)  # stop 46's shelf: both parts
    if rest is None and before is not None:  # its pairs, orders and counter; not its values (measured with what?)
        rest = _of(before, [k for k in CARRIED if k not in VALUES])
    return _of(values, VALUES) | (rest or {}) | ({SHELVED: shelved} if shelved else {})


def _measured_with(fingerprint: str, record: dict) -> str:
    """A values shelf's key: the harness, the prepared data's fingerprint and what setup pinned of the data's content
    and of the environments (review 73: the fingerprint holds the shards' names and sizes only, so a train shard
    rewritten at its size, or an installed module edited, each refusing every run until a setup, carried the best's
    values as controls onto the runs that read the new), not the data's stat, which a prepare run again moves."""
    pins = record.get("input_pins") or {}
    content = _of(record, MEASURED_WITH) | {"input_pins": {k: v for k, v in pins.items() if k != "data"}
                                            | {"data": (pins.get("data") or {}).get("sha256")}}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return f"{fingerprint} {digest}"


def _of(record: dict, keys) -> dict:
    return {k: record[k] for k in keys if k in record}


def judge_pairs(sides: list[tuple[int, list]], settled: dict[int, RunResult]) -> tuple[list[tuple[int, float, float]],
                                                                                       list[str]]:
    """(data order, the best's val_bpb, the candidate's) of each of confirm's pairs measured on both sides on one GPU
    model, and each pair whose sides ran on two models, named (review 62: the best rerun on an H100, the candidate on
    a faster model, made a result measured on another model than the best's a confirmed gain, kept unasked). A side
    is a filed measurement reused ({val_bpb, device}) or the run that measured it now."""
    done, across = [], []
    for order, pair in sides:
        (control, control_on), (candidate, candidate_on) = (
            (side["val_bpb"], side.get("device")) if isinstance(side, dict)
            else (rerun_value(settled[side]), settled[side].device) for side in pair)
        if control is None or candidate is None:
            continue
        if one_model(control_on, candidate_on):
            done.append((order, control, candidate))
        else:
            across.append(f"data order {order}: the best on {control_on}, the candidate on {candidate_on}")
    return done, across


def record_confirmation(core: LoopCore, candidate: dict, confirmation: dict, spent: int,
                        orders: list[int]) -> tuple[int, str | None]:
    """Stores the verdict on the candidate's entry, beside the pairs of its earlier confirmations: failed
    where its train.py lost a pair against the best's on another data order than this call's (confirming
    again until one pair is lucky undid the lost one, and keep called the gain confirmed), or where the
    candidate's or the control's code repeated its number on different data orders; returns the research
    run's extra runs so far and that reason (None when there is none). Refused, the reruns counted, where another
    call decided the run while its reruns trained (review 63: the answer said keep(run) or discard(run) of a run
    already logged). `candidate` is the run's entry as confirm planned it; the pairs in `confirmation` are recorded
    as judged whatever became of the run."""
    run, judged = candidate["run"], confirmation.pop("pairs")
    with core.state.transaction() as state:
        state.setdefault(PAIRS, {}).setdefault(_pair_key(core, candidate), {}).update(judged)
        for order in orders:  # judged here, or failed: no longer started (only this call's: review 70)
            (state.get(SIDE_BY_SIDE) or {}).pop(f"{_pair_key(core, candidate)} {order}", None)
        entry = (state.get("runs") or {}).get(str(run))
        reason = None
        if entry is not None:
            earlier = entry.get("confirmation") or {}
            lost = (_lost_pairs(core, state, entry, orders)  # its own earlier pairs too: a state from before shelves
                    or [d for d in earlier.get("paired_deltas") or [] if d >= 0])
            confirmation |= {key: (earlier.get(key) or []) + confirmation[key] for key in ("paired_deltas", "runs")}
            own = [(entry.get("data_order", 0), entry["result"]["val_bpb"])]
            reason = (_order_blind(core, state, entry["commit"], own, f"Run {run}'s train.py")
                      or _order_blind(core, state, entry["parent"], _kept_values(state, entry["parent"]),
                                      "The best's train.py")
                      or (f"Run {run}'s gain did not hold in an earlier confirmation (it lost by "
                          f"{', '.join(f'{d:+.6f}' for d in lost)}), and a pair won since does not undo a pair "
                          "lost." if lost else None))
            if reason:
                confirmation |= {"confirmed": False, "reason": reason}
            entry["confirmation"] = confirmation
            begun, key = state.setdefault(BEGUN, {}), _pair_key(core, entry)
            begun[key] = _unjudged(core, state, entry)  # a failed rerun's order is measured again, never a fresh one
            if not begun[key]:
                del begun[key]
        state["extra_runs"] = state.get("extra_runs", 0) + spent
        total = state["extra_runs"]
    if entry is None:
        decision = ((core.read_record(run) or {}).get("decision") or {}).get("status", "a")
        deltas = ", ".join(f"{d:+.6f}" for d in confirmation["paired_deltas"]) or "none finished"
        raise Refusal(f"Run {run} was decided by another call while confirm measured it ({decision} row in "
                      f"{ledger.LEDGER_NAME}), so this confirmation (paired deltas {deltas}) was not recorded and is "
                      f"nothing to keep or discard on; its reruns are logged as discard rows and counted ({total} extra "
                      "runs so far). status() says the next step.")
    return total, reason


def _lost_pairs(core: LoopCore, state: dict, entry: dict, orders: list[int]) -> list[float]:
    """The pairs the run's train.py lost so far against its best's, outside `orders`: every data order both
    codes were rerun on, whichever run or call made them (review 54: a lost pair kept on the run's entry was gone
    with it, so the same train.py submitted again with rerun=true was confirmed on fresh luck and kept)."""
    paired = _filed_pairs(core, state, entry)
    return [round(cand - ctrl, 6) for o, (ctrl, cand) in sorted(paired.items(), key=lambda item: int(item[0]))
            if int(o) not in orders and cand >= ctrl]


def _filed(core: LoopCore, state: dict, commit: str) -> dict[str, dict]:
    """{data order: {val_bpb, run, device}} of every rerun of the commit's train.py the harness verified, on any
    clock."""
    shelf = _measurement_shelf(core, state, commit)
    return {order: m for kind in ("measured", "reruns") for order, m in ((state.get(kind) or {}).get(shelf) or {}).items()}


def _filed_pairs(core: LoopCore, state: dict, entry: dict) -> dict[str, tuple[float, float]]:
    """{data order: (the best's val_bpb, the run's)} of the pairs of the two codes: those a confirmation measured side
    by side and, where reruns repeat, every order both codes were rerun on on one GPU model (a pair across two models
    compares the machines as much as the codes: review 62). Where they do not repeat, two values filed at different
    times are no pair (review 66: on the wall clock each later confirmation reran the best on a held order and filed
    its value in place of the one the idea had lost against; once a control came out unlucky, the lost pair read as
    won, was skipped as judged, and the same train.py was confirmed on one fresh order). Only values that repeat
    (the flops clock's) make a pair, and a pair recorded stands over them (review 69: the wall clock's values, filed
    at different times, made a pair once the server was started again on the flops clock, and a later unlucky control
    turned a recorded lost pair into a won one)."""
    recorded = {o: tuple(p) for o, p in ((state.get(PAIRS) or {}).get(_pair_key(core, entry)) or {}).items()
                if len(p) == 2}
    control, candidate = (_measurements_of(core, state, commit) for commit in (entry["parent"], entry["commit"]))
    return {str(o): (control[o]["val_bpb"], candidate[o]["val_bpb"]) for o in control.keys() & candidate.keys()
            if one_model(control[o].get("device"), candidate[o].get("device"))} | recorded


def one_model(*devices: str | None) -> bool:
    """Whether these measurements were taken on one GPU model, as far as they say (an old record names none)."""
    return len({d for d in devices if d}) <= 1


def _repeatable(core: LoopCore, state: dict) -> bool:
    """Whether a run's val_bpb depends only on its code and data order, not on when it ran or
    what ran beside it: the flops clock on local slots (a cluster node's speed and data order are
    its own). There, a rerun of the best already measured on a data order stands in for a control."""
    return core.make_executor is None and budget_settings.clock_of(state) == "flops"  # the research run's


def _measurement_shelf(core: LoopCore, state: dict, commit: str) -> str:
    """Where reruns of a commit's train.py are filed: its code, the harness and the slot count
    (slots sharing the CPU train with fewer threads, which changes the arithmetic)."""
    return f"{core.ws.train_blob(commit)} {state.get('fingerprint', '')} {core.slots}"


def rerun_value(result: RunResult) -> float | None:
    """A rerun's val_bpb as a measurement (a noise repeat, a control, a confirmation): None where it failed, or
    where the harness evaluates exports and did not evaluate this one (review 52: a train.py that exported only on
    the usual data order, which a rerun is told, confirmed its gain with the numbers it printed on its reruns)."""
    return result.val_bpb if result.status == "ok" and result.verified is not False else None


def file_measurement(core: LoopCore, state: dict, entry: dict, result: RunResult) -> None:
    """Files a rerun on another data order (noise repeats, controls, confirmations) for the
    confirmations that need the same code on the same data again; where reruns do not repeat, for
    the noise estimates alone (each of them counts every rerun of the kept code, not only its own
    call's: calling measure_noise until two values agreed stored a threshold of 0)."""
    order = entry.get("data_order", 0)
    if not order or rerun_value(result) is None:
        return
    repeatable = result.budget_clock == "flops" and _repeatable(core, state)
    shelves = state.setdefault("measured" if repeatable else "reruns", {})
    shelf = shelves.setdefault(_measurement_shelf(core, state, entry["commit"]), {})
    measured, before = {"val_bpb": result.val_bpb, "run": entry["run"], "device": result.device}, shelf.get(str(order))
    # where reruns do not repeat, another value on the order, not a correction (review 71: each confirmation reruns the
    # best on the held orders, and the noise counted the latest rerun per order only, so the agent chose which made it)
    another = before and not repeatable and before["run"] != entry["run"]
    earlier = _every(before) if another else (before or {}).get("earlier")
    shelf[str(order)] = measured | ({"earlier": earlier} if earlier else {})
    _judge_started(state, entry["run"], measured)


def note_pair(core: LoopCore, entry: dict, order: int, control: int, candidate: int) -> None:
    """Notes the two reruns confirm started side by side on a data order (SIDE_BY_SIDE), before either can end."""
    with core.state.transaction() as state:
        filed = {m["run"]: m for kind in ("measured", "reruns") for shelf in (state.get(kind) or {}).values()
                 for latest in shelf.values() for m in _every(latest)}  # a reused control's value is filed already
        key = _pair_key(core, entry)  # review 70: keyed by the control's run, another pair reusing it replaced this
        state.setdefault(SIDE_BY_SIDE, {})[f"{key} {order}"] = [key, order, control, candidate, filed.get(control),
                                                               filed.get(candidate)]
        _judge_started(state)


def _judge_started(state: dict, run: int | None = None, measured: dict | None = None) -> None:
    """Gives each started pair the value of its rerun `run` as it is filed, and records each pair with both values, on
    one GPU model, as judged (PAIRS). A pair keeps its own values: a confirmation beside it that reruns the best on
    the same order files its value in place of the pair's control (review 69)."""
    started = state.get(SIDE_BY_SIDE) or {}
    for name, noted in list(started.items()):
        if len(noted) == 5:  # noted by stop 46's server: {the control's run: [key, order, candidate, its two values]}
            del started[name]
            noted, name = [noted[0], noted[1], int(name), *noted[2:]], f"{noted[0]} {noted[1]}"
        key, order, control, candidate, *values = noted
        sides = [measured if side == run else value for side, value in zip((control, candidate), values)]
        started[name] = [key, order, control, candidate, *sides]
        if None not in sides:
            del started[name]
            if one_model(*(side.get("device") for side in sides)):
                state.setdefault(PAIRS, {}).setdefault(key, {})[str(order)] = [side["val_bpb"] for side in sides]


def _every(latest: dict) -> list[dict]:
    """Each rerun filed on a data order of a shelf: the earlier ones where reruns do not repeat, then the latest."""
    return [{k: v for k, v in m.items() if k != "earlier"} for m in [*latest.get("earlier", []), latest]]


def _measurements_of(core: LoopCore, state: dict, commit: str) -> dict[int, dict]:
    """{data order: {val_bpb, run}} of the reruns of this commit's code, where the clock makes
    them repeatable; {} elsewhere."""
    if not _repeatable(core, state):
        return {}
    shelf = (state.get("measured") or {}).get(_measurement_shelf(core, state, commit)) or {}
    return {int(order): m for order, m in shelf.items()}


def confirmation_orders(core: LoopCore, entry: dict, pairs: int) -> tuple[list[tuple[int, dict | None, dict | None]],
                                                                          list[int], list[int]]:
    """(data order, the best's measurement on it, the candidate's) per pair, the orders resumed and the orders held
    to: first the orders an earlier confirmation of the same two codes began and never judged, then every order
    any confirmation of the research run began (review 56 left it open: the same train.py with a comment edited was
    new code, so drawing fresh orders until a pair was lucky confirmed it; the best's own with a comment edited and
    kept as an equal result was a new best), then the orders the best was already measured on, lowest first, whose
    values stand as controls (one run instead of two), with those a noise repeat of it began and never filed (review
    66: the agent killed the server while the best's repeat on an order went well for the best, and that order was
    left out of every confirmation), then fresh ones. The orders are noted as begun before any run starts (review
    56: a server killed while the candidate's rerun trained left its pair unjudged, and the next confirm drew new
    luck)."""
    with core.state.transaction() as state:
        key = _pair_key(core, entry)
        _refuse_a_second_call(core, state, key, f"A confirmation of run {entry['run']}'s train.py against this best")
        unjudged = _unjudged(core, state, entry)
        beside = _in_flight(core, state, {entry["parent"], entry["commit"]})  # a call beside this one measures them
        resumed = [order for order in unjudged if order not in beside]
        held_to = state.setdefault(HELD_TO, [])
        judged = _judged(core, state, entry)  # the same two codes' pairs stand (_lost_pairs), measured or not again
        earlier = [o for o in held_to if o not in resumed and o not in judged]
        control = _measurements_of(core, state, entry["parent"])
        candidate = _measurements_of(core, state, entry["commit"])
        orders = resumed + earlier
        # left to the call beside while it trains there: this plan is fixed before that rerun's curve is seen
        unfiled = [o for o in _unfiled(core, state, entry["parent"]) if o not in beside] \
            if _repeatable(core, state) else []
        orders += [o for o in sorted(set(control) | set(unfiled))
                   if o not in orders and o not in judged][:max(0, pairs - len(orders))]
        for _ in range(pairs - len(orders)):
            state["data_orders"] = state.get("data_orders", 0) + 1
            orders.append(state["data_orders"])
        state.setdefault(BEGUN, {})[key] = sorted(set(unjudged) | set(orders))
        held_to[:] = sorted(set(held_to) | set(orders))
    return [(order, control.get(order), candidate.get(order)) for order in orders], resumed, earlier


@contextlib.contextmanager
def one_call(core: LoopCore, codes: tuple, what: str):
    """Holds `codes` (the candidate's and the best's train.py sources, or the kept one's alone for its noise) as
    measured by this call of the server from before its plan to its answer, and yields the list the call puts its
    reruns in: the reruns in flight (_refuse_a_second_call) show a call only once it has queued one, so two calls at
    once both planned first (review 71: two confirms of one run at once measured one data order twice, and the pair
    recorded later replaced the lost one). Entered on the event loop, where nothing runs between the look and the
    claim."""
    if codes in core.measuring:
        busy = ", ".join(str(n) for n in core.measuring[codes] if (core.entry(n) or {}).get("status") in IN_FLIGHT)
        raise Refusal(f"{what} is being measured now ({f'rerun(s) {busy}' if busy else 'by another call'}): wait for "
                      "that call's answer, then call again if you still need to.")
    core.measuring[codes] = runs = []
    try:
        yield runs
    finally:
        del core.measuring[codes]


def _refuse_a_second_call(core: LoopCore, state: dict, key: str, what: str) -> None:
    """One call at a time measures a pair (or a code's noise): of two at once, the one that ended first judged
    without the other's reruns still running, and its answer could be kept on before the other's lost pair was
    recorded (review 60)."""
    runs = state.get("runs") or {}
    records = None

    def measures(e: dict) -> str | None:
        nonlocal records
        if e.get("rerun_of") is not None:
            # the candidate's record where it was decided meanwhile (review 62: discarded while its confirmation
            # trained, the same train.py run again was confirmed beside it on an order of its own)
            if str(e["rerun_of"]) not in runs and records is None:
                records = {r["run"].get("run"): r["run"] for r in core.records(state, decided=False)}
            candidate = runs.get(str(e["rerun_of"])) or (records or {}).get(e["rerun_of"])
            return _pair_key(core, candidate) if candidate else None
        return f"noise {core.ws.train_blob(e['commit'])}" if e.get("data_order") else None
    busy = [e["run"] for e in core.runs_of(state, *IN_FLIGHT) if measures(e) == key]
    if busy:
        raise Refusal(f"{what} is being measured now (rerun(s) {', '.join(map(str, busy))}): wait for that call's "
                      "answer (where that call was cancelled, for its reruns to end: wait(all=true)), then call again "
                      "if you still need to.")


def _pair_key(core: LoopCore, entry: dict) -> str:
    """A confirmation's two codes, the candidate's train.py and the best's: whichever run holds them."""
    return f"{core.ws.train_blob(entry['commit'])} {core.ws.train_blob(entry['parent'])}"


def _judged(core: LoopCore, state: dict, entry: dict) -> set[int]:
    """The data orders both the run's train.py and its best's have a verified rerun on, on one GPU model: pairs
    judged."""
    return {int(order) for order in _filed_pairs(core, state, entry)}


def _unjudged(core: LoopCore, state: dict, entry: dict) -> list[int]:
    """The data orders a confirmation of the run's code against its best began and never judged: a rerun of the
    pair never ended (its server was killed, stop(now=True) cancelled it), failed, ran on two GPU models, or trains
    now. An order with both codes' values filed on one model is a pair judged (_lost_pairs counts it) whether or not
    its call lived to compare them."""
    begun, judged = (state.get(BEGUN) or {}).get(_pair_key(core, entry)) or [], _judged(core, state, entry)
    return [order for order in begun if order not in judged]


def _in_flight(core: LoopCore, state: dict, codes: set[str]) -> set[int]:
    """The data orders of the reruns of these commits' train.py queued or running: a call beside this one measures
    them still. Only the same code's (review 60: another candidate's confirmation, reusing the best's value on an
    order this pair left unjudged, ran there, and the order was skipped for a fresh one the agent liked better)."""
    blobs = {core.ws.train_blob(commit) for commit in codes}
    return {entry.get("data_order") for entry in core.runs_of(state, *IN_FLIGHT)
            if core.ws.train_blob(entry["commit"]) in blobs}


def noise_orders(core: LoopCore, kept: str, repeats: int) -> list[int]:
    """The data orders of measure_noise's repeats: first every order an earlier call began and never filed a value
    on (its server killed while the repeat trained, the repeat cancelled or failed), then fresh ones, noted as
    begun before any repeat starts (review 56: a repeat whose curve strayed from the kept value was cut out of the
    estimate by killing the server, and the next call drew new luck in its place)."""
    with core.state.transaction() as state:
        _refuse_a_second_call(core, state, f"noise {core.ws.train_blob(kept)}", f"The noise of {kept[:7]}")
        unfiled = _unfiled(core, state, kept)
        orders = [order for order in unfiled if order not in _in_flight(core, state, {kept})]
        for _ in range(repeats - len(orders)):
            state["data_orders"] = state.get("data_orders", 0) + 1
            orders.append(state["data_orders"])
        state.setdefault(BEGUN, {})[f"noise {core.ws.train_blob(kept)}"] = sorted(set(unfiled) | set(orders))
        return orders  # a call beside this one's too


def _unfiled(core: LoopCore, state: dict, kept: str) -> list[int]:
    """The data orders measure_noise began on the kept code and filed no value on."""
    filed = _filed(core, state, kept)
    return [order for order in (state.get(BEGUN) or {}).get(f"noise {core.ws.train_blob(kept)}") or []
            if str(order) not in filed]


def _kept_values(state: dict, commit: str) -> list[tuple[int, float]]:
    """(0, val_bpb) of each keep row of a commit the harness measured: its own runs trained on the usual data
    order (a number logged by hand, or train.py's own, is no measurement: review 58)."""
    return [(0, r.val_bpb) for r in ledger.rows_of(state)
            if r.commit == commit[:7] and r.status == "keep" and limits.measured(r.description)]


def _by_order(core: LoopCore, state: dict, commit: str, own: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(data order, val_bpb) of a commit's code: its own runs' and, where the clock makes reruns
    repeatable, its reruns on other data orders (noise repeats, controls, confirmations)."""
    return own + [(order, m["val_bpb"]) for order, m in sorted(_measurements_of(core, state, commit).items())]


def noise_values(core: LoopCore, state: dict, device: str | None = None) -> tuple[list[float], str | None]:
    """(the values of the kept code measured on `device` (default: the kept value's GPU model), the kept value's
    model): its own value where it was measured there and its reruns on other data orders so far (where they do not
    repeat, every one on that model, several on one order too)."""
    kept = state.get("kept_commit", "")
    if not kept:
        return [], None
    kept_device = core.device_of(kept, state)
    own = _kept_on(state, kept, device, kept_device)
    reruns = (state.get("reruns") or {}).get(_measurement_shelf(core, state, kept)) or {}
    return ([v for _, v in _by_order(core, state, kept, own)]
            + [m["val_bpb"] for _, latest in sorted(reruns.items(), key=lambda item: int(item[0]))
               for m in _every(latest) if m.get("device") == (device or kept_device)]), kept_device


def _kept_on(state: dict, kept: str, device: str | None, kept_device: str | None) -> list[tuple[int, float]]:
    """The kept commit's own values where they were measured on `device` (none where another model measured them)."""
    return [] if device and kept_device and device != kept_device else _kept_values(state, kept)


def _unrepeated(core: LoopCore, state: dict, commit: str, device: str | None) -> list[tuple[int, float]]:
    """(data order, val_bpb) of every rerun of a commit's code on `device` where reruns do not repeat (the wall clock):
    the noise is no noise where they agree across orders there too (stop 48: a train.py that trains a fixed number of
    steps and ignores its data order repeats its number on the wall clock as well, so measure_noise stored a threshold
    of 0, and every later gain, an edit's fresh luck included, was called beyond the noise and kept unconfirmed). One
    model's values only: another's land elsewhere for the same code, and passed one number's repeats as noise."""
    reruns = (state.get("reruns") or {}).get(_measurement_shelf(core, state, commit)) or {}
    return [(int(order), m["val_bpb"]) for order, latest in reruns.items() for m in _every(latest)
            if m.get("device") == device]


def _order_blind(core: LoopCore, state: dict, commit: str, own: list[tuple[int, float]], whose: str) -> str | None:
    """Why a code's values cannot be noise: on different data orders they repeat one number; None
    when they do not."""
    measured = _by_order(core, state, commit, own)
    if not noise.ignores_data_order(measured):
        return None
    seen = ", ".join(f"{v:.6f} on order {order}" for order, v in measured)
    return (f"{whose} does not train on the data order the harness gives it: its val_bpb repeats within "
            f"{noise.ORDER_TOLERANCE:g} on different stretches of the training data ({seen}), which other tokens "
            "cannot do (a train.py that reads the order lands two values this close about once in 50 by chance: "
            "a rerun on one more order tells, confirm with pairs=2 or measure_noise with more repeats). The server "
            "sets AUTORESEARCH_DATA_ORDER for each rerun and nanochat/dataloader reads it: restore train.py's data "
            "loading (leave that variable and the dataloader alone).")


def store_measured_noise(core: LoopCore, spent: int, ok: int, device: str | None, measured: str) -> NoiseEstimate:
    """The estimate of every value on the shelf as measure_noise ends, read and stored in one transaction (review
    56: each call read the shelf as it began, so of two calls at once the last to end stored the kept value and its
    own repeats only); refused where fewer than two values are there, or where another call kept a result while
    the repeats of `measured` trained (review 63: the estimate was the new best's values, without the repeats)."""
    with core.state.transaction() as state:
        now = str(state.get("kept_commit") or "")
        values, kept_device = noise_values(core, state, device) if now == measured else ([], None)
        if len(values) >= 2:
            return store_noise(core, values, spent, device)  # its transaction nests in this one
        state["extra_runs"] = state.get("extra_runs", 0) + spent  # the repeats ran, stored or not
        again = _unfiled(core, state, now)
    if now != measured:
        raise Refusal(f"The best changed while measure_noise reran {measured[:7]} (now {now[:7]}, kept by another "
                      "call): no estimate was stored. The repeats are logged as discard rows and count in any later "
                      f"estimate of {measured[:7]}'s code; measure_noise() again measures the new best.")
    where = f" on {device} (the kept value is from {kept_device})" if device and kept_device != device else ""
    # review 60: the next call reruns these orders first, so repeats=2 after two failed repeats drew no fresh order
    fresh = (f" The next call measures data order(s) {', '.join(map(str, again))} again before any fresh one: "
             f"repeats={len(again) + 1} or more also draws a fresh order.") if again else ""
    raise Refusal(f"Too few successful repeats ({ok}){where}: fix any crash or unverified repeat (see read_metrics) "
                  f"and measure again with repeats=2 or more.{fresh}")


def store_noise(core: LoopCore, values: list[float], spent: int, device: str | None = None) -> NoiseEstimate:
    """The estimate, also kept per GPU model: a result is judged against its own model's noise.
    Refused (the repeats counted as extra runs, their rows kept) where the kept code's values repeat
    on different data orders: that is no noise, and 0 would make every later gain beyond it."""
    estimate = noise.estimate(values)
    with core.state.transaction() as state:
        state["extra_runs"] = state.get("extra_runs", 0) + spent
        kept = state.get("kept_commit", "")
        kept_device = core.device_of(kept, state)
        here = _kept_on(state, kept, device, kept_device) + _unrepeated(core, state, kept, device or kept_device)
        blind = _order_blind(core, state, kept, here, "The kept commit's train.py")
        if not blind:
            state["noise"] = estimate.model_dump()
            if device:
                state.setdefault("noise_by_device", {})[device] = estimate.model_dump()
    if blind:
        raise Refusal(f"{blind} Run and keep that, then measure_noise() again. No noise estimate was stored; "
                      "the repeats stay in the ledger as discard rows.")
    return estimate
