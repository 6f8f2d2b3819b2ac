"""The metric: validation bits per byte, comparable across vocabularies and model changes.

bpb = (sum of per-token cross-entropy in nats) / (ln 2 * sum of the targets' UTF-8 byte lengths).
Targets that are special tokens (byte length 0) count in neither sum. Every configuration sees
the same validation rows at the same sequence length, so results compare fairly.
"""
import math

import torch

from nanochat.dataloader import make_dataloader
from nanochat.platform import DEVICE


def _model_device(model) -> torch.device | None:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else None


def evaluation_steps(eval_tokens: int, batch_size: int, seq_len: int) -> int:
    """How many (batch_size, seq_len) batches evaluate_bpb evaluates: the whole ones that fit."""
    return eval_tokens // (batch_size * seq_len)


@torch.inference_mode()
def evaluate_bpb(model, tokenizer, batch_size: int, seq_len: int, eval_tokens: int, device=None,
                 val_paths=None) -> float:
    """Bits per byte over eval_tokens validation tokens, in eval_tokens // (batch_size * seq_len) steps.

    model(x, y, reduction='none') must return the per-token loss in nats. Autocast, if any, is
    the caller's (train.py wraps this call in its own context, as upstream does). val_paths: the
    validation shard to read instead of the cache's (the harness's evaluation has its own copy).
    """
    steps = evaluation_steps(eval_tokens, batch_size, seq_len)
    if steps < 1:
        raise ValueError(f"eval_tokens={eval_tokens} is fewer than one batch of {batch_size} x {seq_len}; "
                         f"lower the batch size or raise AUTORESEARCH_EVAL_TOKENS")
    device = device or _model_device(model) or DEVICE
    loader = make_dataloader(tokenizer, batch_size, seq_len, "val", device=device, paths=val_paths)
    token_bytes = tokenizer.token_bytes.to(device)
    total_nats, total_bytes = 0.0, 0
    for _ in range(steps):
        x, y, _ = next(loader)
        loss = model(x, y, reduction="none").reshape(-1)
        nbytes = token_bytes[y.reshape(-1)]
        # summed on the CPU, in float64: MPS has none, and a float32 sum of a batch's 2^18 losses
        # keeps only about 5 digits (upstream sums each batch in float32, then in Python)
        loss, nbytes = loss.cpu(), nbytes.cpu()
        total_nats += torch.where(nbytes > 0, loss.double(), 0.0).sum().item()
        total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes)
