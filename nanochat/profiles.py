"""Hardware profiles: the harness constants and the starting train.py hyperparameters per machine.

A profile is chosen once, when data is prepared (auto-detected or named), and recorded in the
cache, so every run on a branch uses the same constants and results stay comparable.
"""

# budget_clock: what TIME_BUDGET is spent on (prepare.training_clock, prepare.budget_used). "wall" on
# GPUs, as upstream. "flops" on the CPU, where the machine is likely shared or throttles: each step
# spends its FLOPs at a rate calibrated once at prepare time, so the same code gets the same steps
# and val_bpb alone or beside a busy process, now or an hour later (`uv run bench/bench_clock.py`);
# "cpu" (CPU seconds per thread, the CPU profile's clock before) still let contention for caches and
# memory move the step count by ~6% and val_bpb by ~0.03 on a 2-core Zen3.

PROFILES = {
    # Upstream autoresearch on one H100: results comparable with upstream.
    "h100": dict(
        max_seq_len=2048, time_budget=300, budget_clock="wall", eval_tokens=40 * 524288, vocab_size=8192,
        train_defaults=dict(depth=8, window_pattern="SSSL", total_batch_size=2**19, device_batch_size=128),
    ),
    # A smaller CUDA GPU (consumer cards, < 40 GB).
    "gpu": dict(
        max_seq_len=1024, time_budget=300, budget_clock="wall", eval_tokens=10 * 524288, vocab_size=8192,
        train_defaults=dict(depth=4, window_pattern="L", total_batch_size=2**16, device_batch_size=32),
    ),
    "mps": dict(
        max_seq_len=512, time_budget=300, budget_clock="wall", eval_tokens=2 * 524288, vocab_size=8192,
        train_defaults=dict(depth=4, window_pattern="L", total_batch_size=2**14, device_batch_size=16),
    ),
    # Laptop / CI CPU: short context, small vocabulary, short budget and evaluation, sized so that on
    # 2 cores a run is a real small GPT (depth 4, 7M parameters) and evaluation stays short (2^16
    # tokens: ~5 s on a Zen4, ~10 s on a Zen3 in fp32). One micro-batch of 4k tokens per step: with
    # 60 s of training, more steps beat larger ones (2-core Zen3, compiled, side by side under the
    # same load: 2^12 tokens per step, 18-30 steps, val_bpb 2.25-2.43; 2^13, 11-16 steps,
    # 2.33-2.46; 2^11 in micro-batches of 8 rows, 32-36 steps, 2.41-2.45). `uv run bench/bench_train.py`.
    "cpu": dict(
        max_seq_len=256, time_budget=60, budget_clock="flops", eval_tokens=2**16, vocab_size=4096,
        train_defaults=dict(depth=4, window_pattern="L", total_batch_size=2**12, device_batch_size=16),
    ),
}


def evaluation_shape(profile: str) -> tuple[int, int]:
    """(rows per batch, sequence length) of the harness's evaluation for a profile: the profile's,
    never train.py's, so every run is scored on the same rows however it trains."""
    chosen = PROFILES[profile]
    return chosen["train_defaults"]["device_batch_size"], chosen["max_seq_len"]
