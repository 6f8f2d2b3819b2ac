"""The harness's own evaluation of an exported model, in a process of its own.

    python -I -S -X pycache_prefix=DIR nanochat/evaluate_export.py --program FILE --out FILE
        --eval-tokens N --site-packages DIR [DIR ...]

The research-loop worker runs this after training, from a pristine copy of the harness, with a
clean environment, in isolated mode without site processing (no PYTHONPATH, no .pth files, no
sitecustomize) and a fresh bytecode folder: nothing the training process did can reach it. It
loads the program (token ids -> logits), checks that it is causal, and computes val_bpb from the
logits on the pinned validation shard. The result is one JSON file: the number the ledger gets.
"""
import argparse
import json
import sys
import time
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # relative: logits that must not change may differ by rounding only


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--program", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-tokens", type=int, required=True)
    p.add_argument("--site-packages", nargs="*", default=[])
    return p.parse_args(argv)


def causality_problem(program, vocab_size: int, batch_size: int, seq_len: int, device) -> str | None:
    """Two forward passes on random tokens. In the second, row r > 0 has every token after its
    own cut replaced, the cuts spread over all positions, and row 0 is left alone: logits up to
    each cut, and all of row 0's, must not move. A model that peeks at a later token, or at another
    row, fails."""
    import torch
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    y = x.clone()
    cuts = [seq_len - 1] + [int(r * (seq_len - 1) / max(batch_size - 1, 1)) for r in range(1, batch_size)]
    for row, cut in enumerate(cuts[1:], 1):
        y[row, cut + 1:] = torch.randint(0, vocab_size, (seq_len - cut - 1,), generator=generator).to(device)
    with torch.no_grad():
        before, after = program(x).float(), program(y).float()
    scale = before.abs().max().clamp_min(1e-6)
    for row, cut in enumerate(cuts):
        moved = (after[row, :cut + 1] - before[row, :cut + 1]).abs().max() / scale
        if moved > TOLERANCE:
            what = "other rows" if row == 0 else f"tokens after position {cut}"
            return (f"not causal: changing {what} moved the logits at or before position {cut} of row {row} "
                    f"(by {moved.item():.2e} of their scale); the model sees what it must predict")
    return None


def changed_validation_shard(path: Path, sha256) -> str | None:
    """The validation shard must be the one prepare pinned, byte for byte."""
    from nanochat.cache import prepared_record_path
    try:
        pinned = json.loads(prepared_record_path().read_text()).get("val_shard")
    except (OSError, ValueError):
        return "the prepared record is missing or unreadable"
    if pinned and (path.name != pinned.get("name") or sha256(path) != pinned.get("sha256")):
        return f"the validation shard {path.name} is not the one prepare pinned ({pinned.get('name')}, by content)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(HARNESS), *args.site_packages]  # -I -S left both out on purpose
    import torch
    from nanochat.datasets import file_sha256, split_paths
    from nanochat.evaluation import evaluate_bpb
    from nanochat.platform import DEVICE, autocast
    from nanochat.tokenizer import Tokenizer

    started = time.time()
    problem = changed_validation_shard(split_paths("val")[0], file_sha256)
    if problem:
        Path(args.out).write_text(json.dumps({"problem": problem}))
        return 0
    meta = json.loads(Path(args.program + ".json").read_text())
    program = torch.export.load(args.program).module()
    tokenizer = Tokenizer.from_directory()
    batch_size, seq_len = meta["batch_size"], meta["seq_len"]
    result = {"eval_tokens": args.eval_tokens, "export_seconds": meta.get("export_seconds")}
    with autocast():
        problem = causality_problem(program, tokenizer.get_vocab_size(), batch_size, seq_len, DEVICE)
    if problem:
        result["causal"], result["problem"] = False, problem
    else:
        def loss(x, y, reduction="none"):
            logits = program(x).float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                     reduction=reduction)
        with torch.no_grad(), autocast():
            result["val_bpb"] = evaluate_bpb(loss_model(loss), tokenizer, batch_size, seq_len, args.eval_tokens, DEVICE)
        result["causal"] = True
    result["seconds"] = round(time.time() - started, 2)
    Path(args.out).write_text(json.dumps(result))
    print(f"harness evaluation: {json.dumps(result)}", flush=True)
    return 0


def loss_model(loss):
    """evaluate_bpb calls model(x, y, reduction='none'); here the loss is the harness's, from logits."""
    class Loss:
        __call__ = staticmethod(loss)
    return Loss()


if __name__ == "__main__":
    sys.exit(main())
