"""The harness's number, handed back to train.py.

Where the research-loop worker sets RESEARCH_LOOP_ANSWER, it evaluates the exported model
(nanochat/export.py) as soon as it appears and writes the harness's number there:
prepare.evaluate_bpb waits for it and returns it, so the validation set is evaluated once per run,
not twice. The training process could write that file too; it would change only what train.py
prints, never what the server records (that comes through the evaluator's own pipe).
"""
import json
import os
import time

ANSWER_ENV = "RESEARCH_LOOP_ANSWER"
# Set to 1, prepare.evaluate_bpb evaluates in-process too and returns that number (train.py prints
# it): to check on a new platform that the exported program scores what the model does.
CROSSCHECK_ENV = "AUTORESEARCH_EVAL_CROSSCHECK"
# Set by the worker where the run's sandbox hides the validation data: the harness's number is the only one
VAL_HIDDEN_ENV = "RESEARCH_LOOP_VAL_HIDDEN"
POLL_S = 0.05


def harness_answer() -> dict | None:
    """The worker's evaluation of the exported model ({"val_bpb": ...} or {"error": ...}), waited
    for; None where no worker answers (a plain run)."""
    path = os.environ.get(ANSWER_ENV)
    if not path:
        return None
    started = time.time()
    while not os.path.exists(path):  # the worker kills this process if it never comes
        time.sleep(POLL_S)
    with open(path) as f:
        answer = json.load(f)
    print(f"harness evaluation: {json.dumps(answer)} (waited {time.time() - started:.1f}s)", flush=True)
    return answer
