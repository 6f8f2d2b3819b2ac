"""Comparable results on a machine whose speed changes: every answer carries its steps and MFU beside
the best's run, and a throughput gap is flagged; the CPU profile spends its budget on a clock that
a busy neighbour cannot shrink."""
import os
import re
import subprocess
import sys

import pytest

from server_support import answer, set_knobs


def test_a_result_that_trained_much_slower_than_the_best_is_flagged(lab):
    answer(lab.call("setup", tag="speed"))
    set_knobs(lab.ws, VAL_BPB=1.0, MFU=40.0, STEPS=10)
    base = answer(lab.call("run_experiment", description="baseline"))
    assert base["comparable"] is None  # nothing to compare with yet
    answer(lab.call("keep"))

    set_knobs(lab.ws, VAL_BPB=1.02, MFU=26.0, STEPS=6)  # the machine got busy: fewer steps, a worse number
    slow = answer(lab.call("run_experiment", description="same idea, busy machine"))
    assert slow["comparable"] is False and (slow["num_steps"], slow["best_num_steps"]) == (6, 10)
    assert slow["mfu_percent"] == 26.0 and slow["best_mfu_percent"] == 40.0
    warning = next(w for w in slow["warnings"] if w.startswith("not comparable"))
    assert "35% lower MFU than the best's (26.00% vs 40.00%, 6 vs 10 steps)" in warning
    answer(lab.call("discard", reason="not comparable"))

    set_knobs(lab.ws, VAL_BPB=0.99, MFU=38.0, STEPS=10)
    close = answer(lab.call("run_experiment", description="within the tolerance"))
    assert close["comparable"] is True and not any("not comparable" in w for w in close.get("warnings") or [])


BUSY = "while True: pass"
# train.py with one block (width 128) instead of the profile's four (width 256): a sixth of the FLOPs per step, so
# on the flops clock a 3 s budget holds 1.8x the steps of the profile's model in 10 s, at a fraction of the CPU time
# (2 s held 36 steps on a 2-core Xeon, but 11 on a 2-core EPYC, too few for the 12 the test needs)
ONE_BLOCK = ('\nDEPTH = TRAIN_DEFAULTS["depth"]', "\nDEPTH = 1")


def steps_of(prepared_env, repo_root, train, busy: bool) -> tuple[int, str]:
    """num_steps and the output of a 3 s run of `train` (its folder's train.py); busy: beside a spinning process,
    on one CPU (one thread)."""
    # the evaluation over 16384 tokens, as when the 5e-3 below was set from what was seen (fewer would spread it)
    env = dict(prepared_env, AUTORESEARCH_TIME_BUDGET="3", AUTORESEARCH_EVAL_TOKENS="16384",
               PYTHONPATH=str(repo_root))  # it imports the harness
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    one_cpu = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if busy else None
    try:
        done = subprocess.run([sys.executable, "train.py"], cwd=train, env=env, capture_output=True, text=True,
                              timeout=300, preexec_fn=one_cpu)
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return int(re.search(r"^num_steps:\s+(\d+)", done.stdout, re.M).group(1)), done.stdout


def test_the_flops_clock_keeps_the_step_count_beside_a_busy_process(prepared_env, repo_root, tmp_path):
    """Beside a busy process, and held to one CPU (so one thread instead of all), each step costs about
    twice the seconds on the wall clock and on the CPU-seconds clock alike: either would cut the
    run's 14-36 steps by a third or more, a gap no partial regression slips through; on the CPU
    profile's flops clock the same code gets the same steps however busy the machine is."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: a run held to one CPU is no slower than a run alone")
    source = (repo_root / "train.py").read_text()
    assert source.count(ONE_BLOCK[0]) == 1
    (tmp_path / "train.py").write_text(source.replace(*ONE_BLOCK))
    seconds = re.compile(r"^timed_seconds:\s+(\S+)", re.M)
    alone, out = steps_of(prepared_env, repo_root, tmp_path, busy=False)
    assert "budget_clock:     flops" in out and "(flops clock)" in out and "depth: 1 " in out
    beside, out_beside = steps_of(prepared_env, repo_root, tmp_path, busy=True)
    # the premise: a step really costs much more time beside the neighbour (on the CPU-seconds clock)
    per_step = [float(seconds.search(o).group(1)) / n for o, n in ((out, alone), (out_beside, beside))]
    assert per_step[1] > 1.5 * per_step[0], per_step
    assert alone >= 12 and beside == alone
    # and about the same number: one thread sums in bf16 in another order than two, which moves val_bpb by
    # 3e-4 to 9e-3 (seen; the steps above are what a regression changes), while a rerun with the same threads
    # repeats it to ~1e-5, which is why a rerun of the best on the same data can stand as a control
    val_bpb = re.compile(r"^val_bpb:\s+(\S+)", re.M)
    assert abs(float(val_bpb.search(out_beside).group(1)) - float(val_bpb.search(out).group(1))) < 2e-2


def test_the_flops_clocks_rate_calibrated_beside_a_busy_process_is_about_the_rate_alone(prepared_env, repo_root):
    """prepare.py calibrates the clock once, and every later run on the cache trains at that rate: a
    machine busy at that moment must not record a much lower one. Model-shaped work measured on both
    threads came out 2-4x low beside a busy process (threads that wait on each other spin, and that
    CPU time counts), and scaled by a large matmul's speed-up from one thread to two, 20-30% low;
    measured on one thread and multiplied by the threads, it stays within a few percent."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no threads to wait on each other")
    # one process calibrates alone, then beside the busy process it starts (one import of torch, not two)
    calibrate = ("import subprocess, sys, prepare\nfrom nanochat.profiles import PROFILES\n"
                 "alone = prepare.calibrate_flops_clock(PROFILES['cpu'])\n"
                 f"neighbour = subprocess.Popen([sys.executable, '-c', {BUSY!r}])\n"
                 "try:\n    beside = prepare.calibrate_flops_clock(PROFILES['cpu'])\n"
                 "finally:\n    neighbour.kill()\n    neighbour.wait()\nprint(alone, beside)\n")
    done = subprocess.run([sys.executable, "-c", calibrate], cwd=repo_root, env=prepared_env, capture_output=True,
                          text=True, timeout=300, check=True)
    alone, beside = map(float, done.stdout.split()[-2:])
    assert beside > 0.85 * alone, (alone, beside)


def test_on_the_flops_clock_a_step_over_the_budget_is_counted_in_budget_seconds():
    """CI of stop 50: the real train.py on the flops clock stops after the step that crosses the budget, and its
    first step is untimed; three timed steps of 1.47 budget seconds charged 4.4 s on a 3 s budget. Its last step's
    wall time (1.16 s, a quicker machine than the clock's calibration) was taken for a step, so it was "over the
    budget": a crash. The wall clock keeps its one step over."""
    from mcp_server.core.integrity import time_problem
    from mcp_server.core.models import Summary
    run = Summary(val_bpb=3.3, training_seconds=4.4, timed_seconds=3.7, total_seconds=11.6, num_steps=4)
    report = {"wall_seconds": 12.0}
    assert time_problem(run, report, 3.0, 1.158, clock="flops") is None
    assert "over the 3s budget" in time_problem(run, report, 3.0, 1.158, clock="wall")
    greedy = run.model_copy(update={"training_seconds": 8.0})  # more than one step over and one untimed
    assert "trained for 8.0s, over the 3s budget" in time_problem(greedy, report, 3.0, 1.158, clock="flops")


def test_what_a_run_charges_the_flops_clock_is_checked_by_the_harness():
    """The FLOPs per token train.py charges against the floor the harness counts in its exported
    model, and the tokens it trained at that charge against the prepared budget."""
    from mcp_server.core.integrity import flops_problem
    from mcp_server.core.models import Summary
    rate, budget = 1e9, 10.0  # 1e10 FLOPs to spend
    honest = Summary(val_bpb=2.0, budget_clock="flops", flops_per_token=1e6, total_tokens_M=0.011, num_steps=11)
    assert flops_problem(honest, {"matmul_flops_per_token": 9e5}, rate, budget, "flops") is None
    assert "alone take 1.1e+06" in flops_problem(honest, {"matmul_flops_per_token": 1.1e6}, rate, budget, "flops")
    greedy = honest.model_copy(update={"total_tokens_M": 0.02, "num_steps": 20})  # 2e10 FLOPs trained
    assert "over the budget's 1e+10" in flops_problem(greedy, {"matmul_flops_per_token": 9e5}, rate, budget, "flops")
    silent = honest.model_copy(update={"flops_per_token": None})
    assert "lacks flops_per_token" in flops_problem(silent, {}, rate, budget, "flops")
    for field in ("flops_per_token", "total_tokens_M"):  # review 83: nan passed the floor and the budget, unequal to all
        unsaid = greedy.model_copy(update={field: float("nan")})
        assert "lacks flops_per_token" in flops_problem(unsaid, {"matmul_flops_per_token": 9e5}, rate, budget, "flops")
    for field in ("total_tokens_M", "num_steps"):  # a count below zero made the tokens trained "under" any budget
        negative = greedy.model_copy(update={field: -greedy.model_dump()[field]})
        assert "no positive number" in flops_problem(negative, {"matmul_flops_per_token": 9e5}, rate, budget, "flops")
    assert flops_problem(honest, {}, None, budget, "wall") is None
    # the clock is the harness's: a train.py that says it spent on the wall clock is checked all the same
    said_wall = greedy.model_copy(update={"budget_clock": "wall"})
    assert "over the budget's" in flops_problem(said_wall, {"matmul_flops_per_token": 9e5}, rate, budget, "flops")


def test_a_gain_measured_at_another_speed_needs_confirming_even_without_noise(lab):
    lab.baseline()
    set_knobs(lab.ws, VAL_BPB=0.9, MFU=20.0)
    answer(lab.call("run_experiment", description="big gain, half the speed"))
    refused = lab.call("keep")
    assert refused.is_error and "different speed" in refused.content[0].text
    confirmation = answer(lab.call("confirm"))
    assert confirmation["confirmed"] and answer(lab.call("keep"))["evidence"].startswith("confirmed")
