"""evaluate_bpb against a hand computation on models with fixed logits."""
import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from conftest import TEST_EVAL_TOKENS
from nanochat.dataloader import make_dataloader
from nanochat.datasets import split_paths
from nanochat.evaluation import evaluate_bpb
from nanochat.tokenizer import Tokenizer

BATCH, SEQ_LEN, STEPS = 4, 64, 3


class Bigram(torch.nn.Module):
    """Fixed random logits per previous token: a model whose loss is known exactly."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, y, reduction="mean"):
        logits = self.logits[x].float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction).view_as(y)


class NoisyOnSpecialTargets(Bigram):
    """Same as Bigram, but a huge loss wherever the target is a special token."""

    def forward(self, x, y, reduction="mean"):
        loss = super().forward(x, y, reduction)
        return torch.where(y >= self.logits.size(0) - 4, 1e6, loss)


@pytest.fixture
def tokenizer(prepared_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", prepared_env["AUTORESEARCH_CACHE"])
    return Tokenizer.from_directory(Path(prepared_env["AUTORESEARCH_CACHE"]) / "tokenizer")


def hand_computed_bpb(model, tokenizer) -> float:
    """Cross-entropy from an explicit float64 log-softmax; bytes from decoding each target token."""
    special = {tokenizer.enc.encode_single_token(f"<|reserved_{i}|>") for i in range(4)}
    loader = make_dataloader(tokenizer, BATCH, SEQ_LEN, "val", device="cpu")
    nats = nbytes = 0.0
    for _ in range(STEPS):
        x, y, _ = next(loader)
        log_probs = model.logits.detach().double()[x].log_softmax(-1).flatten(0, 1)
        for position, target in enumerate(y.reshape(-1).tolist()):
            if target in special:
                continue
            nats -= log_probs[position, target].item()
            nbytes += len(tokenizer.enc.decode_single_token_bytes(target))
    return nats / (math.log(2) * nbytes)


def test_matches_the_hand_computation(tokenizer):
    model = Bigram(tokenizer.get_vocab_size())
    got = evaluate_bpb(model, tokenizer, BATCH, SEQ_LEN, STEPS * BATCH * SEQ_LEN)
    assert got == pytest.approx(hand_computed_bpb(model, tokenizer), rel=1e-6)


class NoFloat64OnTheDevice(torch.overrides.TorchFunctionMode):
    """MPS's rule, played on the CPU: every tensor is on "the device", where float64 does not exist,
    except what .cpu() brought to the host and what is computed from host tensors alone. An operation
    that makes a float64 tensor on the device raises, as MPS does."""

    def __init__(self):
        super().__init__()
        self.host = []  # kept alive, so that their ids stay theirs
        self.host_ids = set()

    def _to_host(self, result):
        for tensor in (t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)):
            self.host.append(tensor)
            self.host_ids.add(id(tensor))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func is torch.Tensor.cpu or (inputs and all(id(t) in self.host_ids for t in inputs)):
            self._to_host(result)
        elif any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(result)[0]):
            raise TypeError(f"{func.__name__}: MPS does not support float64 (played by the test)")
        return result


def test_the_evaluation_sums_without_float64_on_the_device(tokenizer):
    """MPS has no float64: the sums are the host's, and the number is the hand computation's."""
    model = Bigram(tokenizer.get_vocab_size())
    with NoFloat64OnTheDevice():
        got = evaluate_bpb(model, tokenizer, BATCH, SEQ_LEN, STEPS * BATCH * SEQ_LEN)
    assert got == pytest.approx(hand_computed_bpb(model, tokenizer), rel=1e-6)


def test_the_device_guard_catches_float64_on_the_device():
    with NoFloat64OnTheDevice(), pytest.raises(TypeError, match="float64"):
        torch.ones(3).double()
    with NoFloat64OnTheDevice():
        assert torch.ones(3).cpu().double().sum().item() == 3.0


def test_special_token_targets_count_in_neither_sum(tokenizer):
    _, y, _ = next(make_dataloader(tokenizer, BATCH, SEQ_LEN, "val", device="cpu"))
    assert (y == tokenizer.get_bos_token_id()).any()  # documents start inside rows: BOS is a target
    plain, noisy = Bigram(tokenizer.get_vocab_size()), NoisyOnSpecialTargets(tokenizer.get_vocab_size())
    tokens = STEPS * BATCH * SEQ_LEN
    assert evaluate_bpb(noisy, tokenizer, BATCH, SEQ_LEN, tokens) == pytest.approx(
        evaluate_bpb(plain, tokenizer, BATCH, SEQ_LEN, tokens), rel=1e-9)


def test_uniform_model_scores_log2_vocab_bits_per_token(tokenizer):
    model = Bigram(tokenizer.get_vocab_size())
    with torch.no_grad():
        model.logits.zero_()
    got = evaluate_bpb(model, tokenizer, BATCH, SEQ_LEN, STEPS * BATCH * SEQ_LEN)
    loader = make_dataloader(tokenizer, BATCH, SEQ_LEN, "val", device="cpu")
    targets = torch.cat([next(loader)[1].reshape(-1) for _ in range(STEPS)])
    counted = tokenizer.token_bytes[targets]
    expected = math.log2(tokenizer.get_vocab_size()) * int((counted > 0).sum()) / int(counted.sum())
    assert got == pytest.approx(expected, rel=1e-6)  # the model computes in float32


def test_extra_tokens_short_of_a_batch_are_not_evaluated(tokenizer):
    model = Bigram(tokenizer.get_vocab_size())
    tokens = STEPS * BATCH * SEQ_LEN
    assert evaluate_bpb(model, tokenizer, BATCH, SEQ_LEN, tokens + BATCH * SEQ_LEN - 1) == \
        evaluate_bpb(model, tokenizer, BATCH, SEQ_LEN, tokens)


def test_fewer_tokens_than_one_batch_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="fewer than one batch"):
        evaluate_bpb(Bigram(tokenizer.get_vocab_size()), tokenizer, BATCH, SEQ_LEN, BATCH * SEQ_LEN - 1)


def test_prepare_wrapper_uses_the_profile_constants(prepared_env, repo_root):
    """prepare.evaluate_bpb runs at MAX_SEQ_LEN over EVAL_TOKENS (here the test override)."""
    script = ("import prepare, torch\n"
              "from nanochat.evaluation import evaluate_bpb\n"
              "tok = prepare.Tokenizer.from_directory()\n"
              "table = torch.randn(tok.get_vocab_size(), tok.get_vocab_size())\n"
              "model = lambda x, y, reduction: torch.nn.functional.cross_entropy(\n"
              "    table[x].flatten(0, 1), y.flatten(), reduction=reduction)\n"
              f"print(prepare.evaluate_bpb(model, tok, 2) == evaluate_bpb(model, tok, 2, prepare.MAX_SEQ_LEN, {TEST_EVAL_TOKENS}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=prepared_env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_a_run_the_harness_cannot_score_says_why_it_has_no_number_where_the_validation_data_is_hidden(
        prepared_env, repo_root, tmp_path):
    """Where the run's sandbox hides the validation data (review 87), a model the harness cannot export has no
    number: prepare.evaluate_bpb says so, and why, instead of failing on the hidden shard."""
    script = ("import prepare, torch\n"
              "class Unexportable(torch.nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.w = torch.nn.Parameter(torch.zeros(1))\n"
              "    def forward(self, idx, targets=None, reduction='mean'):\n"
              "        raise ValueError('a model the tracer cannot follow')\n"
              "prepare.evaluate_bpb(Unexportable(), prepare.Tokenizer.from_directory(), 2)\n")
    env = dict(prepared_env, RESEARCH_LOOP_EXPORT=str(tmp_path / "model.pt2"), RESEARCH_LOOP_VAL_HIDDEN="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "export for the harness's evaluation failed (ValueError: a model the tracer cannot follow)" in done.stdout
    assert ("RuntimeError: the harness did not score this run (the model was not exported, as the log says above), "
            "and under the research loop a run cannot evaluate itself") in done.stderr, done.stderr


def evaluation_args(program: str, batch: int, tokens: int) -> argparse.Namespace:
    """The harness evaluation's options: the program, the validation shard, its size and shapes."""
    return argparse.Namespace(program=program, val=split_paths("val")[0], eval_tokens=tokens, batch_size=batch,
                              seq_len=SEQ_LEN)


class LogitsBigram(Bigram):
    """Bigram with train.py's calling convention: logits from token ids alone, or the loss."""

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is None:
            return self.logits[idx].float()
        return super().forward(idx, targets, reduction)


def test_the_exported_program_is_called_a_divisor_of_the_batch_at_a_time_and_scores_the_same(
        tokenizer, tmp_path, monkeypatch):
    """On the CPU the model is exported for a few rows per call (here 3 of a batch of 6), and the
    harness's evaluation splits each batch into such calls: the number is the in-process one."""
    from nanochat import evaluate_export, export
    model, batch, tokens = LogitsBigram(tokenizer.get_vocab_size()), 6, 2 * 6 * SEQ_LEN
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
    assert evaluate_export.rows_per_call(torch.export.load(program)) == 3
    with NoFloat64OnTheDevice():  # as on MPS
        result = evaluate_export.evaluate(evaluation_args(program, batch, tokens), tokenizer)
    assert result["causal"], result
    assert abs(result["val_bpb"] - evaluate_bpb(model, tokenizer, batch, SEQ_LEN, tokens)) < 1e-6


def test_a_program_the_harness_cannot_run_at_its_own_shapes_is_no_result(tokenizer, tmp_path, monkeypatch):
    """The evaluation's rows and their length are the profile's, whatever train.py exported for: a
    program for 16-token rows, one for a row count that does not divide the harness's batch, and a
    file that is no program are each refused with the reason."""
    from nanochat import evaluate_export, export
    model, batch = LogitsBigram(tokenizer.get_vocab_size()), 4
    args = {}
    for name, (rows, seq_len) in {"short rows": (batch, 16), "three rows": (3, SEQ_LEN)}.items():
        monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / f"{name}.pt2"))
        program = export.export_for_evaluation(model, rows, seq_len, rows)
        args[name] = evaluation_args(program, batch, 2 * batch * SEQ_LEN)
    (tmp_path / "empty.pt2").write_bytes(b"")
    args["empty"] = evaluation_args(str(tmp_path / "empty.pt2"), batch, 2 * batch * SEQ_LEN)
    problems = {name: evaluate_export.evaluate(a, tokenizer).get("problem") or "" for name, a in args.items()}
    assert "[4, 16] per call" in problems["short rows"] and "batches of 4 rows of 64 tokens" in problems["short rows"]
    assert "[3, 64] per call" in problems["three rows"], problems
    assert "could not be loaded" in problems["empty"], problems


# The causality check of the harness's evaluation, on stand-in models: per_token_loss(x, y) gives a
# loss per position that depends on the tokens the model reads.
CHECK_BATCH, CHECK_LEN, CHECK_VOCAB, ALPHABET = 16, 256, 4096, 16  # a small alphabet of tokens in x
OLD_CUTS = {int(r * (CHECK_LEN - 1) / (CHECK_BATCH - 1)) for r in range(1, CHECK_BATCH)}  # the check's former cuts


def causal_loss(x):
    before = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return ((x * 7 + before) % 13).float()  # the token and the one before it


def peeker(positions):
    """A model that also reads the next token at the given positions (a boolean per position)."""
    def per_token_loss(x, y):
        following = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
        return (causal_loss(x) + torch.where(positions, following.float(), 0.0)).reshape(-1)
    return per_token_loss


def causality_problem(per_token_loss):
    from nanochat.evaluate_export import causality_problem
    x = torch.randint(0, ALPHABET, (CHECK_BATCH, CHECK_LEN), generator=torch.Generator().manual_seed(1))
    return causality_problem(per_token_loss, x, x, per_token_loss(x, x), CHECK_VOCAB)


def test_the_causality_check_passes_a_causal_model():
    assert causality_problem(lambda x, y: causal_loss(x).reshape(-1)) is None


def test_a_model_causal_only_where_the_check_used_to_look_is_caught():
    """The cuts were fixed positions that train.py could read: a model that peeked everywhere else
    passed. They are drawn for each evaluation now."""
    not_checked_before = ~torch.isin(torch.arange(CHECK_LEN), torch.tensor(sorted(OLD_CUTS)))
    problem = causality_problem(peeker(not_checked_before))
    assert problem and problem.startswith("not causal"), problem


class CausalOnTheFirstBatch(LogitsBigram):
    """Knows the first validation batch by its rows' starts (the check leaves one row alone; the program
    takes the whole batch per call) and is causal there; on every other batch it raises the logit
    of the token that follows (it sees what it must predict)."""

    def __init__(self, vocab_size: int, first_batch):
        super().__init__(vocab_size)
        self.register_buffer("known", first_batch[:, :8].clone())

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is not None:
            return super().forward(idx, targets, reduction)
        logits = self.logits[idx].float()
        following = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        peek = F.one_hot(following, logits.size(-1)).float() * 10
        return logits + torch.where((idx[:, :8] == self.known).all(-1).any(), 0.0, peek)


def test_a_model_causal_on_the_first_batch_alone_is_caught(tokenizer, tmp_path, monkeypatch):
    """The check used to rerun the first batch, which is the same every time; it reruns one drawn
    for each evaluation now. Here the draw is pinned: on the first batch the model passes, on the
    second it is caught."""
    from nanochat import evaluate_export, export
    batch, tokens = 4, 4 * 4 * SEQ_LEN
    first, _, _ = next(make_dataloader(tokenizer, batch, SEQ_LEN, "val"))
    model = CausalOnTheFirstBatch(tokenizer.get_vocab_size(), first)
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
    assert evaluate_export.rows_per_call(torch.export.load(program)) == batch
    args = evaluation_args(program, batch, tokens)
    results = {}
    for draw in (0, 1):
        monkeypatch.setattr(evaluate_export, "checked_batches", lambda steps, draw=draw: {draw})
        results[draw] = evaluate_export.evaluate(args, tokenizer)
    assert results[0]["causal"] and results[0]["val_bpb"] < evaluate_bpb(model, tokenizer, batch, SEQ_LEN, tokens)
    assert not results[1]["causal"] and "not causal" in results[1]["problem"], results[1]


class PeeksInItsFirstRow(LogitsBigram):
    """Raises the logit of the token that follows (it sees what it must predict) in the first row of
    each call only, and takes the whole batch per call: the check left that row alone (review 42)."""

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is not None:
            return super().forward(idx, targets, reduction)
        logits = self.logits[idx].float()
        following = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        first_row = (torch.arange(idx.size(0)) == 0)[:, None, None]
        return logits + torch.where(first_row, F.one_hot(following, logits.size(-1)).float() * 30, 0.0)


def test_a_peek_in_the_row_the_check_leaves_alone_is_caught(tokenizer, tmp_path, monkeypatch):
    """The row the check leaves whole is drawn: a program that peeked in its call's first row only was
    verified at 2.45 (honest 3.20; a quarter of the positions here, one in 16 on the CPU profile). Here
    every draw is pinned to its last choice (the last row left alone); with the draw, a checked batch
    leaves the first row alone with probability 1/4 here, all four of them 1/256."""
    import secrets
    from types import SimpleNamespace

    from nanochat import evaluate_export, export
    batch, tokens = 4, 8 * 4 * SEQ_LEN
    model = PeeksInItsFirstRow(tokenizer.get_vocab_size())
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
    assert evaluate_export.rows_per_call(torch.export.load(program)) == batch
    monkeypatch.setattr(evaluate_export, "secrets", SimpleNamespace(randbits=secrets.randbits, SystemRandom=secrets.SystemRandom,
                                                                     randbelow=lambda n: n - 1))
    result = evaluate_export.evaluate(evaluation_args(program, batch, tokens), tokenizer)
    assert "val_bpb" not in result and "not causal" in result["problem"], result
    monkeypatch.undo()
    whole = {evaluate_export.perturbed_after_cuts(torch.zeros(batch, SEQ_LEN, dtype=torch.long), 9)[1].index(
        SEQ_LEN - 1) for _ in range(100)}
    assert whole == set(range(batch))


class AttendsPastItsKeys(LogitsBigram):
    """Attention whose key is one row and whose values are 64: the CPU's kernel reads the keys as far as
    the values go, into the evaluator's heap (review 42: with 4M rows of values the evaluator crashed,
    SIGSEGV; with 64, a key read from the heap picked a value); or the fused CPU entry point, whose query
    has fewer heads than its keys (the evaluator died of a division by zero, SIGFPE)."""

    def __init__(self, vocab_size: int, how: str):
        super().__init__(vocab_size)
        self.how = how

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is not None:
            return super().forward(idx, targets, reduction)
        if self.how == "fused":
            q, k = torch.ones(1, 1, 1, 16), torch.ones(1, 2, 1, 16)
            read = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False)[0]
        else:
            q, k, v = torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.eye(16).repeat(4, 1)[None, None]
            read = F.scaled_dot_product_attention(q, k, v)
        return self.logits[idx].float() + read.sum() * 0


@pytest.mark.parametrize("how", ["keys shorter than values", "fused"])
def test_attention_that_would_read_past_its_tensors_is_no_result(tokenizer, tmp_path, monkeypatch, how):
    from nanochat import evaluate_export, export, program_check
    batch = 4
    model = AttendsPastItsKeys(tokenizer.get_vocab_size(), how)
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
    if how == "fused":  # not run at all, so not run here either: the check names it
        with pytest.raises(ValueError, match="which the harness does not run"):
            program_check.load_program(program)
        return
    result = evaluate_export.evaluate(evaluation_args(program, batch, 2 * batch * SEQ_LEN), tokenizer)
    assert "val_bpb" not in result and "would read past their ends" in result["problem"], result
    # an honest model's attention (grouped heads, a window's mask, causal) passes the check
    q, kv = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    assert program_check.attention_problem(q, kv, kv, torch.ones(8, 8, dtype=torch.bool).tril()) is None
    assert program_check.attention_problem(q, kv[:, :, :2], kv, None)


class PeeksThroughIndexSelect(LogitsBigram):
    """Raises the logit of the token that follows (not causal), its logits looked up with index_select and
    multiplied: the flops floor read index_select's dimension as its ids and raised AttributeError outside
    the evaluation's guard, so the evaluator died without its refusal, and the run was unverified, scored
    by train.py's own number (review 42)."""

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is not None:
            return super().forward(idx, targets, reduction)
        rows = torch.index_select(self.logits, 0, idx.flatten()).view(*idx.shape, -1)
        logits = rows @ torch.eye(rows.size(-1))
        following = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        return logits + F.one_hot(following, logits.size(-1)).float() * 30


def test_a_program_whose_flops_floor_fails_is_still_refused(tokenizer, tmp_path, monkeypatch):
    from nanochat import evaluate_export, export
    batch = 4
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(PeeksThroughIndexSelect(tokenizer.get_vocab_size()), batch, SEQ_LEN, batch)
    result = evaluate_export.evaluate(evaluation_args(program, batch, 2 * batch * SEQ_LEN), tokenizer)
    assert "val_bpb" not in result and "not causal" in result["problem"], result


class PeeksAndHidesItFromTheCheck(LogitsBigram):
    """Raises the logit of the token that follows (it sees what it must predict), and where that token
    is BOS (0 bytes: left out of the score) makes the loss NaN or about 1e9 nats: the check's scale was
    the largest loss, so NaN or a huge one turned its tolerance off (review 41)."""

    def __init__(self, vocab_size: int, bos: int, how: str):
        super().__init__(vocab_size)
        self.bos, self.how = bos, how

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is not None:
            return super().forward(idx, targets, reduction)
        logits = self.logits[idx].float()
        following = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        logits = logits + F.one_hot(following, logits.size(-1)).float() * 30
        # before a BOS in the row, and at its first position so that every batch has one (short test rows
        # hold few documents' starts)
        at_bos = (((following == self.bos) & (torch.arange(idx.size(1)) < idx.size(1) - 1))
                  | (torch.arange(idx.size(1)) == 0))[..., None]
        if self.how == "NaN":
            return torch.where(at_bos, float("nan"), logits)
        return logits + torch.where(at_bos, F.one_hot(following, logits.size(-1)).float() * -1e9, 0.0)


@pytest.mark.parametrize("how", ["NaN", "huge"])
def test_a_peek_hidden_behind_uncounted_positions_losses_is_caught(tokenizer, tmp_path, monkeypatch, how):
    from nanochat import evaluate_export, export
    batch, tokens = 4, 4 * 4 * SEQ_LEN
    model = PeeksAndHidesItFromTheCheck(tokenizer.get_vocab_size(), tokenizer.get_bos_token_id(), how)
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
    result = evaluate_export.evaluate(evaluation_args(program, batch, tokens), tokenizer)
    assert "val_bpb" not in result and ("not finite" if how == "NaN" else "not causal") in result["problem"], result


def test_the_check_reruns_several_batches(tokenizer, tmp_path, monkeypatch):
    """One batch's 15 cuts test 15 positions: a program that peeked at a few per cent of them passed
    often enough to retry until it did (review 41). CHECKED_BATCHES are drawn; here the draw holds the
    batch the model is causal on, and one it is not: every batch drawn is rerun."""
    from nanochat import evaluate_export, export
    batch, tokens = 4, 4 * 4 * SEQ_LEN
    first, _, _ = next(make_dataloader(tokenizer, batch, SEQ_LEN, "val"))
    model = CausalOnTheFirstBatch(tokenizer.get_vocab_size(), first)
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
    monkeypatch.setattr(evaluate_export, "checked_batches", lambda steps: {0, 1})
    result = evaluate_export.evaluate(evaluation_args(program, batch, tokens), tokenizer)
    assert evaluate_export.CHECKED_BATCHES == 4 and "not causal" in result.get("problem", ""), result


def test_the_checked_batches_are_drawn_for_each_evaluation():
    """CHECKED_BATCHES different batches each time (a draw that repeated one reran fewer), all of them
    when there are fewer."""
    from nanochat.evaluate_export import CHECKED_BATCHES, checked_batches
    draws = [checked_batches(16) for _ in range(200)]
    assert all(len(draw) == CHECKED_BATCHES and draw <= set(range(16)) for draw in draws)
    assert len(set().union(*draws)) == 16 and len({frozenset(draw) for draw in draws}) > 100
    assert checked_batches(2) == {0, 1} and checked_batches(0) == set()


class RemembersWhatItSaw(LogitsBigram):
    """Raises the logit of the token that follows, and keeps every batch it is called with in a
    buffer: asked again about a batch (known by its first row), it
    peeks at the tokens it remembers, so changing them changes nothing."""

    def __init__(self, vocab_size: int, batches: int, batch: int):
        super().__init__(vocab_size)
        self.register_buffer("memory", torch.full((batches, batch, SEQ_LEN), -1))
        self.register_buffer("calls", torch.zeros((1,), dtype=torch.long))

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is not None:
            return super().forward(idx, targets, reduction)
        logits = self.logits[idx].float()
        seen = (self.memory[:, 0] == idx[0]).all(-1)
        # the remembered batch, picked without an index sized by the data (the loader refuses varying sizes)
        remembered = (self.memory * F.one_hot(seen.int().argmax(), self.memory.size(0))[:, None, None]).sum(0)
        source = torch.where(seen.any(), remembered, idx)
        self.memory.index_copy_(0, self.calls % self.memory.size(0), idx[None])
        self.calls.add_(1)
        following = torch.cat([source[:, 1:], source[:, -1:]], dim=1)
        return logits + F.one_hot(following, logits.size(-1)).float() * 10


def test_a_model_that_remembers_the_batch_it_is_asked_again_is_caught(tokenizer, tmp_path, monkeypatch):
    """The check reruns one batch: a program that stored it could answer from memory. The loader
    refuses a program that writes into a tensor at all; behind it, the state check and the causality
    check (on a copy of the program taken before the evaluation called it) each catch it too."""
    from nanochat import evaluate_export, export, program_check
    batch, batches = 4, 4
    model = RemembersWhatItSaw(tokenizer.get_vocab_size(), batches, batch)
    monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
    assert evaluate_export.rows_per_call(torch.export.load(program)) == batch
    monkeypatch.setattr(evaluate_export, "checked_batches", lambda steps: {2})
    result = evaluate_export.evaluate(evaluation_args(program, batch, batches * batch * SEQ_LEN), tokenizer)
    assert "val_bpb" not in result and "which the harness does not run" in result["problem"], result
    # without the loader's refusal, the state check catches it
    monkeypatch.setattr(program_check, "operator_problem", lambda target: None)
    result = evaluate_export.evaluate(evaluation_args(program, batch, batches * batch * SEQ_LEN), tokenizer)
    assert not result["causal"] and "changed its own state" in result["problem"], result
    # without the state check, the causality check still catches it on the batch it reruns
    monkeypatch.setattr(evaluate_export, "state_change", lambda program, pristine: None)
    result = evaluate_export.evaluate(evaluation_args(program, batch, batches * batch * SEQ_LEN), tokenizer)
    assert not result["causal"] and "not causal" in result["problem"], result


class CountsItsCalls(LogitsBigram):
    """An honest bigram that writes a counter into its own buffer at every call: the smallest
    program that keeps state (one that remembers documents that repeat would look the same)."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size)
        self.register_buffer("calls", torch.zeros((1,), dtype=torch.long))

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is None:
            self.calls.add_(1)
        return super().forward(idx, targets, reduction)


class WrongVocabulary(LogitsBigram):
    """Logits over fewer tokens than the vocabulary: the harness's cross-entropy cannot run on them."""

    def forward(self, idx, targets=None, reduction="mean"):
        return super().forward(idx, targets, reduction)[..., :7] if targets is None else \
            super().forward(idx, targets, reduction)


def test_a_program_that_writes_its_state_or_that_the_harness_cannot_run_is_no_result(
        tokenizer, tmp_path, monkeypatch):
    """Neither is an unverified run (whose number would be train.py's): each is a problem, so a crash."""
    from nanochat import evaluate_export, export
    batch = 4
    for name, model in {"counter": CountsItsCalls(tokenizer.get_vocab_size()),
                        "vocabulary": WrongVocabulary(tokenizer.get_vocab_size())}.items():
        monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / f"{name}.pt2"))
        program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
        result = evaluate_export.evaluate(evaluation_args(program, batch, 2 * batch * SEQ_LEN), tokenizer)
        assert "val_bpb" not in result and result.get("problem"), (name, result)
        assert ("which the harness does not run" if name == "counter" else "could not evaluate") in result["problem"]



class NamesAValidationToken(LogitsBigram):
    """Looks up a row out of bounds by the first token it is asked plus the vocabulary's size (review 88's attack):
    torch's error names that index, so its message names a value of the validation data."""

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is None:
            return torch.gather(self.logits, 0, (idx[:1, :1] + self.logits.size(0)).expand(1, self.logits.size(1)))
        return super().forward(idx, targets, reduction)


class FailsOnValidationOnly(LogitsBigram):
    """Out of bounds only where the batch's first token is one the validation data begins with."""

    def __init__(self, vocab_size: int, first: int):
        super().__init__(vocab_size)
        self.first = first

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is None:
            index = idx[:1, :1] + torch.where(idx[:1, :1] == self.first, self.logits.size(0), 0)
            return torch.gather(self.logits, 0, index.expand(1, self.logits.size(1)))[:, None].expand(
                *idx.shape, -1).float()
        return super().forward(idx, targets, reduction)


def test_an_error_the_program_raises_on_validation_batches_names_no_value_of_them(tokenizer, tmp_path, monkeypatch):
    """The reason reaches the agent's answers and wherever they are kept (review 92 hid the places it knew): the
    message shown is the one the program raises on random tokens, or none, the error's type named."""
    from nanochat import evaluate_export, export
    batch, vocab = 4, tokenizer.get_vocab_size()
    first = int(next(make_dataloader(tokenizer, batch, SEQ_LEN, "val", device="cpu"))[0][0, 0])
    for name, model in {"names": NamesAValidationToken(vocab), "only": FailsOnValidationOnly(vocab, first)}.items():
        monkeypatch.setenv(export.EXPORT_ENV, str(tmp_path / f"{name}.pt2"))
        program = export.export_for_evaluation(model, batch, SEQ_LEN, batch)
        problem = evaluate_export.evaluate(evaluation_args(program, batch, 2 * batch * SEQ_LEN), tokenizer)["problem"]
        assert f"index {first + vocab} " not in problem, (name, problem)
        assert "could not evaluate the exported model" in problem, (name, problem)
        if name == "names":  # the same error on random tokens: its message is shown, as the agent needs it
            assert "is out of bounds for dimension 0" in problem, problem
        else:
            assert "RuntimeError on the validation batches and none on random tokens" in problem, problem


def test_a_gpus_calls_are_sized_to_its_free_memory():
    """The h100 profile's batch (128 x 2048, vocabulary 8192): 160 MiB of logits per row."""
    from nanochat.export import GPU_LOGITS_MEMORY_SHARE, LOGIT_BYTES, gpu_rows_per_call
    row = 2048 * 8192 * LOGIT_BYTES
    assert gpu_rows_per_call(128, 2048, 8192, 75 * 2**30) == 128  # an 80 GB card after training released it
    assert gpu_rows_per_call(128, 2048, 8192, 15 * 2**30) == 32  # 48 rows fit: the largest divisor below
    assert gpu_rows_per_call(128, 2048, 8192, int(64 * row / GPU_LOGITS_MEMORY_SHARE)) == 64  # exactly
    assert gpu_rows_per_call(128, 2048, 8192, int(64 * row / GPU_LOGITS_MEMORY_SHARE) - 1) == 32
    assert gpu_rows_per_call(96, 2048, 8192, 2**30) == 3  # a divisor of the batch, not a power of two
    assert gpu_rows_per_call(128, 2048, 8192, 0) == 1  # nothing free: one row, and an out-of-memory to see


class RemembersThenNames(LogitsBigram):
    """Causal bigram logits. The first call holding a token that text never holds (`unheard`: the causality check's
    random tails) keeps its first row's second token in a buffer (the first is BOS; the second is a validation token
    unless that row's cut is its first position), and every later call looks a row up out of bounds by it."""

    def __init__(self, vocab_size: int, unheard):
        super().__init__(vocab_size)
        self.register_buffer("unheard", unheard)
        self.register_buffer("kept", torch.zeros(1, 1, dtype=torch.long))

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is None:
            vocab = self.logits.size(0)
            index = torch.where(self.kept > 0, self.kept - 1 + vocab, 0)
            probe = torch.gather(self.logits, 0, index.expand(1, vocab)).sum() * 0
            random_tail = self.unheard[idx].any()
            self.kept.copy_(torch.where(random_tail & (self.kept == 0), idx[:1, 1:2] + 1, self.kept))
            return self.logits[idx].float() + probe
        return super().forward(idx, targets, reduction)


def test_an_error_raised_after_the_check_reruns_names_no_value_they_were_asked(tokenizer, tmp_path):
    """The message shown is the one the program raises on random tokens (stop 55), but those ran on the copy the
    causality check had just called with validation batches: a program that kept a value of them named it there."""
    from nanochat import evaluate_export, export
    batch, vocab, steps = 4, tokenizer.get_vocab_size(), 8
    batches = [b[0] for b, _ in zip(make_dataloader(tokenizer, batch, SEQ_LEN, "val", device="cpu"), range(steps))]
    # the tokens these batches never hold (an agent would take those its training text never holds)
    unheard = torch.bincount(torch.cat(batches).flatten(), minlength=vocab) == 0
    program = str(tmp_path / "model.pt2")
    model, example = export.LogitsOnly(RemembersThenNames(vocab, unheard)), torch.zeros_like(batches[0])
    with torch.no_grad():  # functional: the buffer's write is an output of the graph, applied after it runs
        exported = torch.export.export(model, (example,), strict=False).run_decompositions({})
    torch.export.save(exported, program)
    problem = evaluate_export.evaluate(evaluation_args(program, batch, steps * batch * SEQ_LEN), tokenizer)["problem"]
    named = {int(x[0, 1]) + vocab for x in batches}
    assert not any(f"index {value} " in problem for value in named), problem
    assert "could not evaluate the exported model (RuntimeError" in problem, problem
