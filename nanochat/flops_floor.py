"""The flops floor: the multiply-adds the exported program's products run, counted as it runs them.

On the flops budget clock train.py charges each token the FLOPs it says its model takes; the harness
checks that charge against this floor (mcp_server/core/integrity.flops_problem). Each product the
program calls counts what it multiplies, from the tensors it gets: a weight applied twice, to each
chunk of the width, looked up per token or made by an earlier product and then applied in several
places counts each time. A floor read from the graph's weights could not see these (review 45: a
block's weights passed through `w @ eye` once, then applied in all four places of train.py's GPT,
claimed 14.2M FLOPs per token against a floor of 11.8M, computing as much as four blocks, 26.0M).

What a product provably skips is not charged: the positions a -inf bias or an attention mask leaves
out (a sliding window, the causal half), and the zeros of its first operand (the masked
probabilities), but only where they are skipped in every call of the evaluation and every matrix of
its batch: a window's pattern is, an activation's zeros (a ReLU's) vary with the text and are charged
(review 47: counted call by call, `relu(x) @ w` charged half of what training it cost). train.py
charges attention 12 * width * window, never less than that.
"""
import math

import torch

# aten's operators that multiply, each allowed by program_check.DENSE_OPERATORS (a test keeps the two in step)
PRODUCTS = {"linear", "mm", "bmm", "matmul", "addmm", "baddbmm", "_addmm_activation", "einsum",
            "scaled_dot_product_attention", "conv1d", "conv2d", "convolution", "_convolution"}
TRAINING_FLOPS_PER_MAC = 6  # a multiply and an add, forward and twice backward


def counted(name: str, op, tally: dict):
    """op (aten's operator `name`, or the harness's wrapper of it), adding each call's multiply-adds to
    tally[call site]: [the calls' dense count, the patterns of what they could skip, each OR-ed over calls]."""
    def call(*args, **kwargs):
        out = op(*args, **kwargs)
        macs, needed = product_macs(name, args, kwargs, out)
        entry = tally.setdefault(call, [0, None])
        entry[0] += macs
        if needed:  # a position any call needed is needed (the shapes are the program's, the same each call)
            entry[1] = needed if entry[1] is None else [a | b for a, b in zip(entry[1], needed)]
        return out
    call.__name__ = call.__qualname__ = f"counted_{name}"
    return call


def product_macs(name: str, args: tuple, kwargs: dict, out) -> tuple:
    """(the call's multiply-adds, dense, and the patterns of the positions it needs, each a bool tensor over
    one matrix of its batch: a position is needed if any matrix of the batch needs it), on the call's
    device, so that counting never waits for a GPU."""
    if name == "scaled_dot_product_attention":
        return attention_macs(*args, **kwargs)
    if name == "einsum":
        return out.numel() * contracted(args[0], args[1]), []
    if name in ("conv1d", "conv2d", "convolution", "_convolution"):
        transposed = name in ("convolution", "_convolution") and bool(args[6])
        return (args[0] if transposed else out).numel() * args[1][0].numel(), []
    biased = name in ("addmm", "baddbmm", "_addmm_activation")
    first = args[1] if biased else args[0]
    macs = out.numel() * first.size(-1)
    if name == "linear":
        return macs, []
    needed = [over_batch(first != 0)]
    if biased and kwargs.get("beta", 1) != 0:  # beta 0 ignores the bias, -inf or not
        needed.append(over_batch(args[0].isfinite().expand_as(out)))
    return macs, needed


def over_batch(mask: torch.Tensor) -> torch.Tensor:
    """A (..., M, K) pattern reduced to one matrix: a position is needed if any matrix of the batch needs it."""
    return mask.reshape(-1, *mask.shape[-2:]).any(0) if mask.dim() > 2 else mask


def attention_macs(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
    """Scores and values for each query and the keys its mask keeps (a bool mask's True, a float mask's
    finite entries, the causal triangle)."""
    length, keys = query.size(-2), key.size(-2)
    macs = query.numel() // query.size(-1) * keys * (query.size(-1) + value.size(-1))
    if is_causal:
        return macs, [torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()]
    if attn_mask is None:
        return macs, []
    kept = attn_mask if attn_mask.dtype == torch.bool else attn_mask.isfinite()
    return macs, [over_batch(kept.expand(*query.shape[:-2], length, keys))]


def contracted(equation: str, operands) -> int:
    """The product of the sizes of an einsum's summed letters (those its output drops)."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    specs = inputs.split(",")
    letters = "".join(specs).replace(".", "")
    if not _:
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    sizes = {}
    for spec, operand in zip(specs, operands):
        before, _dots, after = spec.partition("...")
        dims = list(operand.shape[:len(before)]) + (list(operand.shape[operand.dim() - len(after):]) if after else [])
        for letter, size in zip(before + after, dims):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(size for letter, size in sizes.items() if letter not in output)


def flops_per_token(tally: dict, tokens: int) -> int:
    """The floor over the calls counted in tally, which ran on `tokens` tokens: each call site's dense count
    times the smallest share of positions its patterns needed (read here, once, on a GPU)."""
    macs = 0.0
    for dense, needed in tally.values():
        shares = [pattern.float().mean() for pattern in needed or []]
        macs += dense * (torch.stack(shares).min().item() if shares else 1.0)
    return round(TRAINING_FLOPS_PER_MAC * macs / tokens)
