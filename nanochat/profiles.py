"""Hardware profiles: the harness constants and the starting train.py hyperparameters per machine.

A profile is chosen once, when data is prepared (auto-detected or named), and recorded in the
cache, so every run on a branch uses the same constants and results stay comparable.
"""

PROFILES = {
    # Upstream autoresearch on one H100: results comparable with upstream.
    "h100": dict(
        max_seq_len=2048, time_budget=300, eval_tokens=40 * 524288, vocab_size=8192,
        train_defaults=dict(depth=8, window_pattern="SSSL", total_batch_size=2**19, device_batch_size=128),
    ),
    # A smaller CUDA GPU (consumer cards, < 40 GB).
    "gpu": dict(
        max_seq_len=1024, time_budget=300, eval_tokens=10 * 524288, vocab_size=8192,
        train_defaults=dict(depth=4, window_pattern="L", total_batch_size=2**16, device_batch_size=32),
    ),
    "mps": dict(
        max_seq_len=512, time_budget=300, eval_tokens=2 * 524288, vocab_size=8192,
        train_defaults=dict(depth=4, window_pattern="L", total_batch_size=2**14, device_batch_size=16),
    ),
    # Laptop / CI CPU: short context, small vocabulary, short budget and evaluation.
    "cpu": dict(
        max_seq_len=256, time_budget=60, eval_tokens=2**17, vocab_size=4096,
        train_defaults=dict(depth=4, window_pattern="L", total_batch_size=2**13, device_batch_size=16),
    ),
}
