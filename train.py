"""
Pretrain a small GPT for a fixed wall-clock budget and report val_bpb: the one file the agent edits.

Top to bottom: hyperparameters, the model, the optimizer (Muon for matrices, AdamW for the rest),
the time-budgeted training loop, then evaluation and the summary block the tools read.
Run: uv run train.py   (needs `uv run prepare.py` once; runs on CUDA, Apple MPS or the CPU)
"""
import time

T_START = time.monotonic()  # start-up counts from here, imports included (monotonic: a clock step moves no duration)

import gc
import math
import os
import sys
from dataclasses import dataclass

# CPU threads spin only briefly at barriers, then sleep (set before torch loads OpenMP). Measured
# on 2 cores: spinning forever (the default) runs steps 2-3x slower when other work shares the
# cores; sleeping at once is 10-15% slower on an idle machine; 1000 spins is within 5% of the
# best of both.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch
import torch.nn as nn

from prepare import (BUDGET_CLOCK, MAX_SEQ_LEN, TIME_BUDGET, TRAIN_DEFAULTS, Tokenizer, budget_used,
                     evaluate_bpb, make_dataloader, training_clock)
from nanochat.attention import attention, describe as describe_attention
from nanochat.compile import Compiler
from nanochat.fused import relu_squared, rms_norm, rotary, softcap_cross_entropy
from nanochat.platform import (COMPUTE_DTYPE, DEVICE, autocast, describe_dtype, grad_scaler, peak_flops,
                               peak_memory_mb, release_memory, synchronize)

# ---------------------------------------------------------------------------------------------
# Hyperparameters: plain constants, edit freely. Profile-dependent starting points come from
# TRAIN_DEFAULTS (chosen at prepare time); any right-hand side may be replaced by a literal.

# Model size
DEPTH = TRAIN_DEFAULTS["depth"]  # number of transformer blocks: the one size knob
ASPECT_RATIO = 64  # model width = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # width of one attention head
WINDOW_PATTERN = TRAIN_DEFAULTS["window_pattern"]  # per layer, cycled: L = full context, S = half
# Batch
TOTAL_BATCH_SIZE = TRAIN_DEFAULTS["total_batch_size"]  # tokens per optimizer step
DEVICE_BATCH_SIZE = TRAIN_DEFAULTS["device_batch_size"]  # rows per forward/backward (memory knob)
# Optimizer
MATRIX_LR = 0.04  # Muon learning rate for the 2-D weight matrices
EMBEDDING_LR = 0.6  # AdamW learning rate for token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW learning rate for the output head
SCALAR_LR = 0.5  # AdamW learning rate for the per-layer residual and x0 scalars
WEIGHT_DECAY = 0.2  # cautious weight decay on the matrices, decayed linearly to 0 over training
ADAM_BETAS = (0.8, 0.95)  # AdamW (beta1, beta2)
MUON_BETA2 = 0.95  # Muon's second-moment decay for variance normalisation
NS_STEPS = 5  # Muon orthogonalisation iterations
# Schedules, as fractions of the time budget
WARMUP_RATIO = 0.0  # linear learning-rate warm-up
WARMDOWN_RATIO = 0.5  # linear decay to FINAL_LR_FRAC over the last part of training
FINAL_LR_FRAC = 0.0  # learning-rate multiplier at the end
# Model details
SOFTCAP = 15.0  # logits are squashed to (-SOFTCAP, SOFTCAP)
VE_GATE_CHANNELS = 32  # input channels that drive the value-embedding gate
ROPE_BASE = 10000.0  # rotary embedding base frequency
SEED = 42

# ---------------------------------------------------------------------------------------------
# Platform: torch.compile fuses the elementwise work between the matmuls, on the CPU as on a GPU.
# Step 0 compiles (eager: warms up the allocator), so it is not training time; CUDA leaves out
# steps 0-10 as upstream does, to compare with upstream. Compiled graphs are cached beside the data
# (nanochat/compile.py): a rerun, or an edit of constants only, starts warm, because schedule values
# reach the compiled optimizer as tensors, never as numbers baked into a graph.
# AUTORESEARCH_COMPILE=0 trains eager, with the hand-fused kernels of nanochat/fused.py.

compiler = Compiler()
UNTIMED_STEPS = 11 if DEVICE.type == "cuda" else 1
GC_EVERY = 5000  # steps: the collector is off during training (see step 0); a sweep now and then, as upstream
torch.manual_seed(SEED)

# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str


def norm(x):
    """RMSNorm without learnable weights."""
    return rms_norm(x)


def has_value_embedding(layer, n_layer):
    """Alternating layers, always including the last."""
    return layer % 2 == (n_layer - 1) % 2


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        has_ve = has_value_embedding(layer, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, window):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding, mixed in per head by an input-dependent gate in (0, 2)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(rotary(q, cos, sin)), norm(rotary(k, cos, sin))  # QK-norm
        y = attention(q, k, v, window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # scales the residual stream
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # mixes the embedding back in
        self.windows = self.window_sizes(config)
        cos, sin = self.rotary_tables(config)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def window_sizes(config):
        """Attention window (keys to the left) per layer; the last layer always sees everything."""
        sizes = {"L": config.sequence_len, "S": config.sequence_len // 2}
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= set(sizes), f"WINDOW_PATTERN uses only L and S, got {pattern!r}"
        windows = [sizes[pattern[i % len(pattern)]] for i in range(config.n_layer)]
        windows[-1] = sizes["L"]
        return windows

    @staticmethod
    def rotary_tables(config):
        head_dim = config.n_embd // config.n_head
        inv_freq = ROPE_BASE ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(config.sequence_len, dtype=torch.float32), inv_freq)
        # (1, T, 1, D/2), in the dtype q and k have under autocast, so rotation never upcasts
        return angles.cos()[None, :, None, :].to(COMPUTE_DTYPE), angles.sin()[None, :, None, :].to(COMPUTE_DTYPE)

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform bound with std 1/sqrt(width)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate starts at 1
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx).to(COMPUTE_DTYPE))  # residual stream in the compute dtype
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(COMPUTE_DTYPE) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i])
        logits = self.lm_head(norm(x))
        if targets is None:
            return SOFTCAP * torch.tanh(logits.float() / SOFTCAP)
        # = cross_entropy(SOFTCAP * tanh(logits / SOFTCAP), targets), in fp32, fused (nanochat/fused.py)
        return softcap_cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), SOFTCAP, reduction)

    def flops_per_token(self):
        """Training FLOPs per token, counted as upstream does so MFU figures compare: 6 per weight
        that multiplies (embedding lookups are free), plus 12 * width * window for attention
        (scores and values, forward and backward; causal masking not discounted)."""
        lookups = self.wte.weight.numel() + sum(e.weight.numel() for e in self.value_embeds.values())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        matmul_params = sum(p.numel() for p in self.parameters()) - lookups - scalars
        T = self.config.sequence_len
        attn = sum(12 * self.config.n_embd * min(window, T) for window in self.windows)
        return 6 * matmul_params + attn


# ---------------------------------------------------------------------------------------------
# Optimizer: Muon for the 2-D matrices inside the blocks, AdamW for everything else.

# Polar Express coefficients: 5 steps of an odd polynomial that drive singular values to ~1.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def hyper_tensors(state, values, like):
    """A group's hyperparameters as 0-d tensors, made once and filled in place each step: a compiled
    graph takes them as inputs (a new value never recompiles), and a fill on a GPU is queued like any
    kernel, where a new tensor from a Python number is a host-to-device copy the CPU waits for."""
    if "scalars" not in state:
        state["scalars"] = [torch.zeros((), dtype=torch.float32, device=like.device) for _ in values]
    for tensor, value in zip(state["scalars"], values):
        tensor.fill_(value)
    return state["scalars"]


def muon_update(params, grads, momentum_buf, second_buf, momentum, lr, wd, beta2, ns_steps: int):
    """One Muon step for a group of same-shape matrices, stacked (K, rows, cols); in place on `params`."""
    stacked = torch.stack(params)
    grads = torch.stack(grads)
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buf, momentum)  # Nesterov: look ahead along the momentum
    # Orthogonalise: normalise, then iterate X <- aX + (bA + cA^2)X with A = XX^T (on the short side).
    # In the compute dtype: bf16 where the hardware has it; a CPU without it emulates bf16 matmuls
    # at a fraction of the fp32 rate (on a 2-core Zen 3 they took 2/3 of every step)
    X = g.to(COMPUTE_DTYPE)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for a, b, c in POLAR_EXPRESS[:ns_steps]:
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    g = X.mT if tall else X
    # Variance normalisation: per-row (or column) second moment, keeping the update's total norm
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    n_red = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n_red).sqrt()
    second_buf.lerp_(v_mean, 1 - beta2)
    step = second_buf.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * n_red * step.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g.float() * (step * (v_norm / v_norm_new.clamp_min(1e-10)))
    # Cautious weight decay: decay only where the update and the weight agree in sign
    lr = lr * max(1.0, g.size(-2) / g.size(-1)) ** 0.5
    mask = (g * stacked) >= 0
    stacked = stacked - (lr * g + lr * wd * stacked * mask)
    for param, updated in zip(params, stacked.unbind(0)):
        param.copy_(updated)


def adamw_update(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps=1e-10):
    """AdamW without weight decay (embeddings, head and scalars are not decayed), over a group."""
    step_size = lr / (1 - beta1**step)
    bias2_sqrt = (1 - beta2**step).sqrt()
    for param, grad, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        m.lerp_(grad, 1 - beta1)
        v.lerp_(grad.square(), 1 - beta2)
        param.sub_(step_size * m / (v.sqrt() / bias2_sqrt + eps))


@compiler
def update_all(adamw_args, muon_args, ns_steps: int):
    """Every group's update in one compiled graph: one compilation, one call per step."""
    for args in adamw_args:
        adamw_update(*args)
    for args in muon_args:
        muon_update(*args, ns_steps)


class MuonAdamW:
    """One optimizer over two kinds of groups: "muon" groups hold same-shape matrices, updated as one
    stacked batch; "adamw" groups hold everything else. Plain class: torch.optim's machinery costs
    seconds of import at start-up and buys nothing here."""

    def __init__(self, param_groups):
        self.param_groups = param_groups
        self.state = [{} for _ in param_groups]
        for group in param_groups:
            group["initial_lr"] = group["lr"]

    @torch.no_grad()
    def step(self):
        adamw_args, muon_args = [], []
        for group, state in zip(self.param_groups, self.state):
            params = group["params"]
            grads = [p.grad for p in params]
            if group["kind"] == "adamw":
                if not state:
                    state.update(step=0, exp_avg=[torch.zeros_like(p) for p in params],
                                 exp_avg_sq=[torch.zeros_like(p) for p in params])
                state["step"] += 1
                hyper = hyper_tensors(state, (state["step"], group["lr"], *group["betas"]), params[0])
                adamw_args.append((params, grads, state["exp_avg"], state["exp_avg_sq"], *hyper))
                continue
            if not state:
                (rows, cols), n = params[0].shape, len(params)
                state["momentum"] = params[0].new_zeros(n, rows, cols)
                state["second"] = params[0].new_zeros(n, rows, 1) if rows >= cols else params[0].new_zeros(n, 1, cols)
            hyper = hyper_tensors(state, (group["momentum"], group["lr"], group["weight_decay"], MUON_BETA2), params[0])
            muon_args.append((params, grads, state["momentum"], state["second"], *hyper))
        update_all(adamw_args, muon_args, NS_STEPS)

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def build_optimizer(model):
    """AdamW for embeddings, head and scalars, Muon for the block matrices; LRs scale as 1/sqrt(width)."""
    scale = (model.config.n_embd / 768) ** -0.5
    embeddings = [model.wte.weight] + [e.weight for e in model.value_embeds.values()]
    groups = [
        dict(kind="adamw", params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale, betas=ADAM_BETAS),
        dict(kind="adamw", params=embeddings, lr=EMBEDDING_LR * scale, betas=ADAM_BETAS),
        dict(kind="adamw", params=[model.resid_lambdas], lr=SCALAR_LR * 0.01, betas=ADAM_BETAS),
        dict(kind="adamw", params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    matrices = list(model.blocks.parameters())
    for shape in sorted({p.shape for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=MATRIX_LR,
                           momentum=0.95, weight_decay=WEIGHT_DECAY))
    return MuonAdamW(groups)


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    return FINAL_LR_FRAC + (1.0 - FINAL_LR_FRAC) * (1.0 - progress) / WARMDOWN_RATIO


def muon_momentum(step):
    frac = min(step / 300, 1.0)  # 0.85 -> 0.95 over the first 300 steps
    return 0.85 + 0.10 * frac


# ---------------------------------------------------------------------------------------------
# Setup

tokenizer = Tokenizer.from_directory()
width = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=DEPTH,
                   n_head=width // HEAD_DIM, n_kv_head=width // HEAD_DIM, n_embd=width,
                   window_pattern=WINDOW_PATTERN)
model = GPT(config).to(DEVICE)
model.init_weights()
num_params = sum(p.numel() for p in model.parameters())
flops_per_token = model.flops_per_token()
flops_per_step = flops_per_token * TOTAL_BATCH_SIZE
optimizer = build_optimizer(model)
scaler = grad_scaler()  # fp16 (GPUs before bf16) scales the loss; bf16 and fp32 pass through
train_model = compiler(model, dynamic=False)

tokens_per_micro_batch = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
assert TOTAL_BATCH_SIZE % tokens_per_micro_batch == 0, \
    f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN ({tokens_per_micro_batch})"
grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_batch
train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")
x, y, epoch = next(train_loader)
peak = peak_flops()

print(f"device: {DEVICE} | dtype: {describe_dtype()} | params: {num_params / 1e6:.1f}M | width: {width} | "
      f"depth: {DEPTH} | windows: {model.windows} | grad accum: {grad_accum_steps} | budget: {TIME_BUDGET}s "
      f"({BUDGET_CLOCK} clock) | compile: {'on' if compiler.enabled else compiler.cache_state()}", flush=True)

# ---------------------------------------------------------------------------------------------
# Training loop: runs until the timed steps have spent TIME_BUDGET on the harness's budget clock

step = 0
training_time = 0.0  # budget spent: wall or CPU seconds, or on the flops clock FLOPs at the prepared rate
timed_seconds = 0.0  # the timed steps' seconds on the training clock: throughput and MFU
smooth_loss = 0.0
clock = training_clock()
while True:
    synchronize()
    t0 = clock()
    for _ in range(grad_accum_steps):
        with autocast():
            loss = train_model(x, y)
        train_loss = loss.detach()
        scaler.scale(loss / grad_accum_steps).backward()
        x, y, epoch = next(train_loader)  # on a GPU this overlaps the queued backward
    progress = min(training_time / TIME_BUDGET, 1.0)
    lrm = lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step)
            group["weight_decay"] = WEIGHT_DECAY * (1.0 - progress)
    scaler.step(optimizer)  # skipped where fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad()
    loss_value = train_loss.item()
    if not math.isfinite(loss_value) or loss_value > 100:
        print(f"\nFAIL: training loss {loss_value} at step {step} (NaN or exploding)", flush=True)
        print("FAIL")
        sys.exit(1)
    synchronize()
    dt = clock() - t0
    if step >= UNTIMED_STEPS:
        training_time += budget_used(dt, flops_per_step)
        timed_seconds += dt

    smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
    debiased = smooth_loss / (1 - 0.9 ** (step + 1))
    mfu = 100 * flops_per_step / dt / peak
    remaining = max(0.0, TIME_BUDGET - training_time)
    print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
          f"dt: {dt * 1000:.0f}ms | tok/sec: {int(TOTAL_BATCH_SIZE / dt):,} | mfu: {mfu:.1f}% | "
          f"epoch: {epoch} | remaining: {remaining:.0f}s    ", end="", flush=True)

    if step == 0:  # everything long-lived exists now: stop the collector from rescanning it
        gc.collect()
        gc.freeze()
        gc.disable()
    elif (step + 1) % GC_EVERY == 0:
        gc.collect()
    if step == UNTIMED_STEPS - 1:
        compiler.mark_warm()
    step += 1
    if step > UNTIMED_STEPS and training_time >= TIME_BUDGET:
        break

print()
T_TRAIN_END = time.monotonic()
recompiles = compiler.late_graphs()  # graphs compiled during timed training: each a guard that failed

# ---------------------------------------------------------------------------------------------
# Evaluation and summary

# what only training needed goes (the optimizer's state, the next batch), and the memory it held
# goes back to the device: the harness's evaluation runs beside this process
del optimizer, train_loader, x, y, loss, train_loss
release_memory()
model.eval()
with torch.no_grad(), autocast():
    # on the CPU eager: over its profile's 2^16 tokens, compiling the evaluation graph costs more than it saves
    val_bpb = evaluate_bpb(train_model if DEVICE.type == "cuda" else model, tokenizer, DEVICE_BATCH_SIZE)
t_end = time.monotonic()
timed_steps = step - UNTIMED_STEPS
mfu_percent = 100 * flops_per_step * timed_steps / timed_seconds / peak if timed_seconds > 0 else 0.0

print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {training_time:.1f}")
print(f"total_seconds:    {t_end - T_START:.1f}")
print(f"peak_vram_mb:     {peak_memory_mb():.1f}")
print(f"mfu_percent:      {mfu_percent:.2f}")
print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.6g}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {num_params / 1e6:.1f}")
print(f"depth:            {DEPTH}")
print(f"eval_seconds:     {t_end - T_TRAIN_END:.1f}")
print(f"compile_seconds:  {compiler.seconds():.1f}")
print(f"compile_cache:    {compiler.cache_state()}")
print(f"recompiles:       {recompiles}")
print(f"budget_clock:     {BUDGET_CLOCK}")
print(f"timed_seconds:    {timed_seconds:.1f}")
print(f"flops_per_token:  {flops_per_token:.4g}")
print(f"attention:        {describe_attention(DEVICE.type, MAX_SEQ_LEN, min(model.windows) < MAX_SEQ_LEN - 1)}")
if "AUTORESEARCH_TIME_BUDGET" in os.environ:
    print(f"budget_note:      time budget shortened to {TIME_BUDGET}s by AUTORESEARCH_TIME_BUDGET")
