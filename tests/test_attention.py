"""The SDPA attention path equals a naive masked softmax attention, sliding windows and GQA included."""
import math

import pytest
import torch

from nanochat.attention import attention, explicit_attention, sdpa_attention


def naive_attention(q, k, v, left):
    """Textbook attention over (B, T, H, D): query i attends keys j with i-left <= j <= i."""
    B, T, H, D = q.shape
    groups = H // k.size(2)
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i = torch.arange(T)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= left)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


def random_qkv(T, n_head, n_kv_head, D=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, n_head, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, n_kv_head, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, n_kv_head, D, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("left", [0, 1, 5, 16, 31, 100])  # 31 and 100 are the full causal window for T=32
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_naive(left, n_head, n_kv_head):
    q, k, v = random_qkv(32, n_head, n_kv_head)
    expected = naive_attention(q, k, v, left)
    torch.testing.assert_close(sdpa_attention(q, k, v, left), expected)
    torch.testing.assert_close(explicit_attention(q, k, v, left), expected)
    torch.testing.assert_close(attention(q, k, v, left), expected)  # whichever path the dispatcher picks


def test_explicit_path_gradients_match_sdpa():
    q, k, v = (t.requires_grad_(True) for t in random_qkv(40, 4, 2))
    grads = []
    for fn in (sdpa_attention, explicit_attention):
        (fn(q, k, v, 9) * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_window_really_limits_what_a_query_sees():
    """Changing a key outside the window leaves the output unchanged; inside the window it does not."""
    T, left = 24, 4
    q, k, v = random_qkv(T, 2, 2)
    base = sdpa_attention(q, k, v, left)
    far, near = k.clone(), k.clone()
    far[:, T - 1 - left - 1] += 10.0  # just outside the last query's window
    near[:, T - 1 - left] += 10.0  # the oldest key the last query still sees
    torch.testing.assert_close(sdpa_attention(q, far, v, left)[:, -1], base[:, -1])
    assert not torch.allclose(sdpa_attention(q, near, v, left)[:, -1], base[:, -1])


def test_bf16_inputs_close_to_fp32():
    q, k, v = random_qkv(64, 2, 2, D=32)
    ref = naive_attention(q, k, v, 16)
    for fn in (sdpa_attention, explicit_attention):
        out = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), 16).double()
        torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
