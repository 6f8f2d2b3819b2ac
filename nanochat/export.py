"""The trained model, handed to the harness's own evaluation as data.

When the research-loop worker runs train.py it sets RESEARCH_LOOP_EXPORT to a file path. At the
end of training, prepare.evaluate_bpb exports the model there with torch.export, before any
validation data is read, as a program from token ids to logits: the model never sees a target.
The server evaluates that program in a separate, isolated process (nanochat/evaluate_export.py).
The first export wins (the file is created exclusively), so a later call cannot swap the model.
Without the variable (a plain `uv run train.py`) nothing is exported.

The worker evaluates the program as soon as it appears, and hands the number back (nanochat/answer.py).
"""
import json
import os
import time

import torch

from nanochat import attention

EXPORT_ENV = "RESEARCH_LOOP_EXPORT"
# Rows per call of the exported program on the CPU, at most: the evaluation runs it op by op, and
# at 4 rows (1,024 positions) each op's output (the logits above all) stays in cache; 15% faster
# than 16 rows on a Zen 4. A GPU gets as much of the batch per call as its free memory holds.
CPU_ROWS_PER_CALL = 4
# On a GPU, the evaluation's logits may take this share of the memory free at export (the training
# process has released its reserve; the rest is the evaluation's copy of the model and its activations)
GPU_LOGITS_MEMORY_SHARE = 0.5
# Bytes per logit alive at once in one call of the program: the head's bf16 output, and two fp32
# tensors of the softcap (the graph runs op by op, each freed after its last use)
LOGIT_BYTES = 2 + 4 + 4


class LogitsOnly(torch.nn.Module):
    """model(idx) -> logits: the only call the evaluation makes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


def meta_path(path: str) -> str:
    return path + ".json"


def rows_per_call(batch_size: int, eval_batch_size: int, device_type: str) -> int:
    """Rows of token ids per call of the program: a divisor of the harness's evaluation batch, at
    most train.py's batch (what fits in its memory) and on the CPU at most CPU_ROWS_PER_CALL."""
    most = min(batch_size, CPU_ROWS_PER_CALL) if device_type == "cpu" else batch_size
    return max(r for r in range(1, max(most, 1) + 1) if eval_batch_size % r == 0)


def gpu_rows_per_call(batch_size: int, seq_len: int, vocab_size: int, free_bytes: int) -> int:
    """Rows per call on a GPU: the largest divisor of the batch whose logits fit in the share of the
    free memory they may take (one row at least: a row that does not fit is an out-of-memory to see)."""
    fits = free_bytes * GPU_LOGITS_MEMORY_SHARE // (seq_len * vocab_size * LOGIT_BYTES)
    return max(r for r in range(1, batch_size + 1) if batch_size % r == 0 and (r <= fits or r == 1))


def export_for_evaluation(model, batch_size: int, seq_len: int, eval_batch_size: int,
                          vocab_size: int | None = None) -> str | None:
    """Writes the program for RESEARCH_LOOP_EXPORT, if set; returns its path, or None. A model that
    cannot be exported is reported in the log: the run then has no number where its sandbox hides the
    validation data (the worker's), else train.py's own, unverified. The harness
    evaluates batches of eval_batch_size rows of seq_len tokens (nanochat/profiles.py): a program
    exported for other shapes is no result. vocab_size sizes a GPU's calls to its free memory."""
    path = os.environ.get(EXPORT_ENV)
    if not path:
        return None
    if os.path.exists(path):
        print(f"export: {path} exists already (the first export stands)", flush=True)
        return None
    module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: export the module itself
    device = next(module.parameters()).device
    rows = rows_per_call(batch_size, eval_batch_size, device.type)
    if device.type == "cuda" and vocab_size:  # a divisor of a divisor of the harness's batch
        rows = gpu_rows_per_call(rows, seq_len, vocab_size, torch.cuda.mem_get_info(device)[0])
    example = torch.zeros((rows, seq_len), dtype=torch.long, device=device)  # no validation data needed
    was_training = module.training
    started = time.time()
    try:
        module.eval()
        # fp32 graph: the evaluation applies the platform's autocast itself, as training did
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False), attention.portable():
            program = torch.export.export(LogitsOnly(module), (example,), strict=False)
        tmp = f"{path}.{os.getpid()}.tmp.pt2"  # torch wants the .pt2 suffix
        torch.export.save(program, tmp)
        with open(meta_path(tmp), "w") as f:
            # only its time: the harness reads the program's shapes from the program, never from here
            json.dump({"export_seconds": round(time.time() - started, 2)}, f)
        os.link(tmp, path)  # exclusive: a second export of the same run fails here
        os.replace(meta_path(tmp), meta_path(path))
        os.unlink(tmp)
    except Exception as exc:  # an unusual custom kernel, a shape that cannot be traced...
        print(f"export for the harness's evaluation failed ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
        return None
    finally:
        module.train(was_training)
    print(f"export: model exported for the harness's evaluation in {time.time() - started:.1f}s", flush=True)
    return path
