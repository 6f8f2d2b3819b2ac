"""The harness's own evaluation of an exported model, in a process of its own.

    python -I -S -B trusted_import.py nanochat/evaluate_export.py --profile NAME --eval-tokens N
        --out-fd N --program-fd N --val-fd N --tokenizer-fd N --site-packages DIR [DIR ...]

The research-loop worker starts this with the run, from a pristine copy of the harness, with a
clean environment, in isolated mode without site processing (no PYTHONPATH, no .pth files, no
sitecustomize), reading and writing no bytecode, through the server's importer (trusted_import.py,
which streams the digest of every source it compiles to the worker or the server's pool): nothing
the training process does can reach it. Everything it evaluates with is the harness's: the shapes
are the profile's (nanochat/profiles.py), the size the server's, and the validation shard and the
tokenizer are the worker's private copies (the file descriptors), checked against their pinned content before the training started; it reads nothing
the run can write. It imports what it needs, then waits for a line on stdin: the worker sends it
once it has taken its own copy of the exported model (end of file: no export, nothing to do). It
loads that program (token ids -> logits), computes val_bpb from the logits, and checks on a few of
its batches, drawn, that the model is causal. The result is one JSON object, written to --out-fd: the
number the ledger gets.

    python -I -S -B trusted_import.py nanochat/evaluate_export.py --profile NAME --eval-tokens N --serve-fd N ...

The warm evaluator of a slot (mcp_server/scripts/harness_eval.py): started the same way by the server, it
imports once, then for each request on the socket --serve-fd (the descriptors above, passed by a
run's worker) forks a child that evaluates exactly as a cold one does and exits. The child is a
copy of a process that has imported and never evaluated: no evaluation sees another's state. The
device is chosen in the child (nanochat.platform), after the fork: CUDA cannot cross a fork.
"""
import argparse
import copy
import functools
import itertools
import json
import os
import secrets
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # relative: losses that must not change may differ by rounding only
# Batches the causality check reruns, each with its own cuts: each row tests one position for a peek
CHECKED_BATCHES = 4
NOT_FINITE = ("the model's loss is not finite at some position (NaN or infinite logits), counted or not: a model "
              "that scores no position as a number is no result")
CE_CHUNK_ROWS = 64  # token positions whose cross-entropy is computed together
REQUEST_FDS = ("out", "program", "val", "tokenizer", "log")  # a warm request's descriptors, in this order
MAX_REQUEST_BYTES = 4096
# OpenMP's threads sleep after a short spin at each barrier, as train.py's do (read when torch loads
# OpenMP, so set before the import). The default spins: on 2 cores, beside the slot's next interpreter
# importing torch, the evaluation's forward passes took 5x the CPU-seconds (bench/bench_evaluation.py).
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
# glibc's malloc keeps the evaluation's freed tensors for the next call (mallopt: M_MMAP_THRESHOLD,
# M_TRIM_THRESHOLD): by default each call's logits came in fresh pages from the kernel, then went back
# to it, about 3 GB of page faults per evaluation of the CPU profile, a CPU-second of the kernel's time
MALLOC_OPTIONS = {-3: 32 * 2**20, -1: 2**30}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", required=True, help="the prepared profile: the evaluation's shapes")
    p.add_argument("--eval-tokens", type=int, required=True)
    for name in ("out", "program", "val", "tokenizer"):
        p.add_argument(f"--{name}-fd", type=int)
    p.add_argument("--serve-fd", type=int, help="a warm evaluator: evaluate each request on this socket")
    p.add_argument("--site-packages", nargs="*", default=[])
    args = p.parse_args(argv)
    if args.serve_fd is None and None in (args.out_fd, args.program_fd, args.val_fd, args.tokenizer_fd):
        p.error("--out-fd, --program-fd, --val-fd and --tokenizer-fd are required (or --serve-fd)")
    return args


def perturbed_after_cuts(x, vocab_size: int):
    """x with every token after row r's cut replaced by a random one; one row, drawn, is left alone (it
    shows leaks between rows). The cuts and that row are drawn afresh for every evaluation: at fixed
    ones, a model that kept just those positions causal would peek everywhere else unseen (a model that
    peeked only in its call's first row passed when that row was always the one left alone). Returns
    (perturbed x, cuts)."""
    import torch
    batch_size, seq_len = x.shape
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    cuts = torch.randint(0, seq_len - 1, (batch_size,), generator=generator).tolist()
    cuts[secrets.randbelow(batch_size)] = seq_len - 1
    y = x.clone()
    for row, cut in enumerate(cuts):
        y[row, cut + 1:] = torch.randint(0, vocab_size, (seq_len - cut - 1,), generator=generator).to(x.device)
    return y, cuts


def causality_problem(per_token_loss, x, targets, before, vocab_size: int) -> str | None:
    """One more forward pass, on a validation batch (x, targets, its losses `before`) with
    the tokens after each row's cut replaced: the loss of the original targets at every position up
    to the cut must not move. A model that peeks at a later token (or at another row) to predict
    the next one fails: what it sees changed, so its probability of the original target does."""
    import torch
    perturbed, cuts = perturbed_after_cuts(x, vocab_size)
    before = before.view(x.shape)
    after = per_token_loss(perturbed, targets).view(x.shape)
    if not torch.isfinite(after).all():
        return NOT_FINITE
    # the typical loss, which a few positions (the uncounted ones before a document's start) cannot move
    scale = before.abs().median().clamp_min(1.0)
    for row, cut in enumerate(cuts):
        moved = (after[row, :cut + 1] - before[row, :cut + 1]).abs().max() / scale
        if not moved <= TOLERANCE:  # a NaN moved it too (every comparison with NaN is false)
            # which row, where and by how much are the program's to choose from what it reads: not named (error_shown)
            what = "other rows" if cut == x.size(1) - 1 else "the tokens after a position"
            return f"not causal: changing {what} moved the loss at or before it; the model sees what it must predict"
    return None


def error_shown(exc: Exception, per_token_loss, args, vocab_size: int, device) -> str:
    """What the reason says of an error the program raised on validation batches. Its message can name a value
    computed from them (an index out of bounds: review 88), and the reason reaches every place the agent's answers
    are kept (review 92 hid the ones it knew), so the message shown is the one the program raises on a batch of random
    tokens, called on a copy no validation batch has reached (review 95); where it raises none there, only the error's
    type is named."""
    import torch
    x, y = (torch.randint(0, vocab_size, (args.batch_size, args.seq_len), device=device) for _ in range(2))
    try:
        per_token_loss(x, y)
    except Exception as again:  # noqa: BLE001  (the same program on data that holds nothing to tell)
        return f"{type(again).__name__}: {str(again)[:200]}"
    return (f"{type(exc).__name__} on the validation batches and none on random tokens; its message is not shown, as "
            "it can name values computed from the validation data: run the exported model on training batches to "
            "see it")


def causality_problems(per_token_loss, checked: list, vocab_size: int) -> str | None:
    """The first checked batch (x, targets, losses) whose rerun finds the model not causal, or None."""
    return next(filter(None, (causality_problem(per_token_loss, *batch, vocab_size) for batch in checked)), None)


def fd_path(fd: int) -> str:
    """A path that opens the worker's private copy behind an inherited file descriptor."""
    return f"/dev/fd/{fd}"


def shape_problem(shape: tuple, batch_size: int, seq_len: int) -> str | None:
    """The program must take (rows, seq_len) token ids, rows a divisor of the harness's batch: the
    harness evaluates at its own shapes, whatever train.py exported for."""
    if len(shape) == 2 and shape[1] == seq_len and shape[0] >= 1 and batch_size % shape[0] == 0:
        return None
    return (f"the exported model takes token ids of shape {list(shape)} per call, but the harness evaluates "
            f"batches of {batch_size} rows of {seq_len} tokens (the prepared profile's): a model exported at other "
            "shapes cannot be scored (was MAX_SEQ_LEN or the evaluation's batch changed?)")


def evaluate(args, tokenizer) -> dict:
    """args: program and val (paths), eval_tokens, batch_size and seq_len (the harness's)."""
    import torch

    from nanochat.evaluation import evaluate_bpb, evaluation_steps
    from nanochat.flops_floor import flops_per_token
    from nanochat.program_check import checked_module, load_program
    from nanochat.platform import DEVICE, autocast

    started, cpu_started, faults_started = time.time(), time.process_time(), minor_faults()
    tally = {}  # each product's multiply-adds, as the program runs them: the flops floor
    try:
        exported = load_program(args.program)
        program = checked_module(exported, tally)
        shape = tuple(input_shape(exported))
    except Exception as exc:  # noqa: BLE001  (whatever the file holds, it is no program to score)
        return {"problem": f"the exported model could not be loaded ({type(exc).__name__}: {str(exc)[:200]})"}
    problem = shape_problem(shape, args.batch_size, args.seq_len)
    if problem:
        return {"problem": problem}
    # the check's own copy, untouched by the evaluation's calls: a program that keeps state (buffers
    # it writes) cannot remember the batch it is asked again, and answer as it did then
    pristine = copy.deepcopy(program)
    loaded = time.time()
    steps = evaluation_steps(args.eval_tokens, args.batch_size, args.seq_len)
    check_at = checked_batches(steps)
    # one flag per batch, read at the end: reading each batch's would wait for the GPU at every batch
    checked, calls, finite = [], itertools.count(), []
    rows = rows_per_call(exported)

    def call_loss(module, x, y):
        # the program gets its own copy of the input: the loader's x and y are halves of one buffer
        logits = module(x.clone()).float()
        logits, y = logits.view(-1, logits.size(-1)), y.reshape(-1)
        if logits.device.type != "cpu":  # one launch per call: a GPU's chunks would be ~10^5 tiny kernels
            return torch.nn.functional.cross_entropy(logits, y, reduction="none")
        # on the CPU in chunks of positions, so that each chunk's passes over the vocabulary run from cache
        return torch.cat([torch.nn.functional.cross_entropy(chunk, target, reduction="none")
                          for chunk, target in zip(logits.split(CE_CHUNK_ROWS), y.split(CE_CHUNK_ROWS))])

    def per_token_loss(module, x, y):
        return torch.cat([call_loss(module, *part) for part in zip(x.split(rows), y.split(rows))])

    def loss(x, y, reduction="none"):
        losses = per_token_loss(program, x, y)
        finite.append(torch.isfinite(losses).all())
        if next(calls) in check_at:
            checked.append((x, y, losses))
        return losses

    try:
        with torch.inference_mode(), autocast():
            val_bpb = evaluate_bpb(loss_model(loss), tokenizer, args.batch_size, args.seq_len, args.eval_tokens,
                                   DEVICE, val_paths=[args.val])
            evaluated = time.time()
            # before the check's reruns, which share the counting (the evaluation's tokens, no others)
            floor = flops_per_token(tally, steps * args.batch_size * args.seq_len)
            problem = (state_change(program, pristine) or (None if bool(torch.stack(finite).all()) else NOT_FINITE)
                       or causality_problems(functools.partial(per_token_loss, pristine), checked,
                                             tokenizer.get_vocab_size()))
    except Exception as exc:  # noqa: BLE001  (a program the harness cannot run is no result, not an unverified one)
        # on the program loaded again: the causality check's reruns wrote into the copy it kept (a buffer the graph
        # writes), and a program that kept a value of a validation batch there named it on the random tokens
        program = pristine = None  # their memory, for the copy loaded again (a GPU's)
        with torch.inference_mode(), autocast():
            error = error_shown(exc, lambda x, y: per_token_loss(checked_module(load_program(args.program)), x, y),
                                args, tokenizer.get_vocab_size(), DEVICE)
        return {"problem": f"the harness could not evaluate the exported model ({error}): a model the harness "
                           "cannot score is no result"}
    result = {"eval_tokens": args.eval_tokens, "matmul_flops_per_token": floor,
              "load_seconds": round(loaded - started, 2), "eval_seconds": round(evaluated - loaded, 2),
              "causality_seconds": round(time.time() - evaluated, 2),
              # all its threads' CPU time: on a shared machine, the cost that the wall times above hide
              "cpu_seconds": round(time.process_time() - cpu_started, 2),
              "page_faults": minor_faults() - faults_started}
    if problem:
        result["causal"], result["problem"] = False, problem
    else:
        result["causal"], result["val_bpb"] = True, val_bpb
    return result


def minor_faults() -> int:
    """Pages the kernel handed this process so far (memory it had not touched, or had given back)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def held_tensors(module) -> dict:
    """Every tensor the program's graph reads besides its input: parameters, buffers, constants."""
    import operator
    return {node.target: operator.attrgetter(node.target)(module)
            for node in module.graph.nodes if node.op == "get_attr"}


def state_change(program, pristine) -> str | None:
    """A program that wrote its own tensors while it was evaluated could remember what it was asked
    (a batch asked again, a document that repeats) and answer from memory: no result."""
    import torch
    before = held_tensors(pristine)
    changed = [name for name, tensor in held_tensors(program).items()
               if name not in before or not torch.equal(tensor, before[name])]
    if changed:  # which of its tensors is the program's to choose from what it reads: not named (error_shown)
        return ("the exported model changed its own state (a tensor it holds) while it was evaluated: a model that "
                "can remember what it was asked is no result")
    return None


def checked_batches(steps: int) -> set[int]:
    """Which of the evaluation's batches the causality check reruns: CHECKED_BATCHES different ones (all,
    if it has fewer), drawn for each evaluation. The first batch is the same every time, so a model
    could know it and be causal on it alone."""
    return set(secrets.SystemRandom().sample(range(steps), min(CHECKED_BATCHES, steps)))


def input_shape(exported):
    """The shape of the token ids the program takes per call: it was exported for that."""
    name = exported.graph_signature.user_inputs[0]
    return next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"].shape


def rows_per_call(exported) -> int:
    """The rows of token ids the program takes per call."""
    return input_shape(exported)[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(HARNESS), *args.site_packages]  # -I -S left both out on purpose
    for name, value in OPENMP_ENV.items():
        os.environ.setdefault(name, value)
    keep_freed_memory()
    # everything but the validation data and the program, while the training runs
    import torch._export.serde.serialize  # noqa: F401  (torch, and what torch.export.load needs)

    import nanochat.datasets  # noqa: F401  (the evaluation's data reading, without the device)
    import nanochat.program_check  # noqa: F401  (the checks of the program, before it comes)
    import nanochat.flops_floor  # noqa: F401  (its count, likewise)
    from nanochat.profiles import evaluation_shape
    args.batch_size, args.seq_len = evaluation_shape(args.profile)
    if args.serve_fd is not None:
        return serve(args)
    import nanochat.evaluation  # noqa: F401
    from nanochat.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_merges_file(fd_path(args.tokenizer_fd))
    if not sys.stdin.readline():  # end of file: the run exported nothing
        return 0
    answer(args, tokenizer)
    return 0


def keep_freed_memory() -> bool:
    """MALLOC_OPTIONS, where the C library is glibc (elsewhere its own defaults). True if applied."""
    import ctypes
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in MALLOC_OPTIONS.items())


def answer(args, tokenizer) -> None:
    """Evaluates the program behind --program-fd and writes the result to --out-fd."""
    args.program, args.val = fd_path(args.program_fd), fd_path(args.val_fd)
    started = time.time()
    result = evaluate(args, tokenizer)
    result["seconds"] = round(time.time() - started, 2)
    with os.fdopen(args.out_fd, "w") as out:
        out.write(json.dumps(result))
    print(f"harness evaluation: {json.dumps(result)}", flush=True)


def serve(args) -> int:
    """The warm evaluator's loop: one forked child per request, until the socket's other end (the
    server's pool) is closed. A request is {"id", "timeout"} with REQUEST_FDS' descriptors; the
    reply {"id", "pid"} names the child, which the run's worker kills at its deadline."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    with socket.socket(fileno=args.serve_fd) as server:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(server, MAX_REQUEST_BYTES, len(REQUEST_FDS))
            except InterruptedError:
                continue
            if not message:
                return 0
            try:
                request = json.loads(message)
                if len(fds) != len(REQUEST_FDS):
                    raise ValueError(f"{len(fds)} descriptors, not {len(REQUEST_FDS)}")
                pid = os.fork()
                if pid == 0:
                    server.close()
                    evaluate_forked(args, dict(zip(REQUEST_FDS, fds)), float(request["timeout"]))
                reply = {"id": request.get("id"), "pid": pid}
            except (ValueError, KeyError, TypeError, OSError) as exc:
                reply = {"id": None, "error": f"the warm evaluator refused a request: {exc}"}
            finally:
                for fd in fds:
                    os.close(fd)
            server.send(json.dumps(reply).encode())


def evaluate_forked(args, fds: dict, timeout: float) -> None:
    """In the forked child: the cold evaluator's work from the tokenizer on, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)  # its own group: the worker ends it, and whatever it started, at once
        signal.alarm(int(timeout) + 1)  # where no worker is left to end it
        os.dup2(fds["log"], 1)
        os.dup2(fds["log"], 2)
        import nanochat.evaluation  # noqa: F401  (nanochat.platform: the device, chosen after the fork)
        from nanochat.tokenizer import Tokenizer
        args.out_fd, args.program_fd, args.val_fd = fds["out"], fds["program"], fds["val"]
        answer(args, Tokenizer.from_merges_file(fd_path(fds["tokenizer"])))
        code = 0
    except BaseException:  # noqa: BLE001  (said in the run's log; the worker finds no result)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def loss_model(loss):
    """evaluate_bpb calls model(x, y, reduction='none'); here the loss is the harness's, from logits."""
    class Loss:
        __call__ = staticmethod(loss)
    return Loss()


if __name__ == "__main__":
    sys.exit(main())
