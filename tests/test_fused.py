"""The hand-fused ops equal their plain formulas, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from nanochat.fused import relu_squared, rms_norm, rotary, softcap_cross_entropy


def values_and_grad(fn, x, *args):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out.double() * weights).sum().backward()
    return out.detach(), x.grad


def test_relu_squared():
    x = torch.randn(64, 48, dtype=torch.float64)
    for a, b in zip(values_and_grad(relu_squared, x), values_and_grad(lambda t: F.relu(t) ** 2, x)):
        torch.testing.assert_close(a, b)


def test_rms_norm_matches_torch():
    x = torch.randn(16, 8, 64, dtype=torch.float64) * 3
    for a, b in zip(values_and_grad(rms_norm, x), values_and_grad(lambda t: F.rms_norm(t, (64,), eps=1e-6), x)):
        torch.testing.assert_close(a, b)


def test_rotary():
    x = torch.randn(2, 10, 3, 16, dtype=torch.float64)
    angles = torch.outer(torch.arange(10.0), 1 / 100 ** (torch.arange(8.0) / 8)).double()
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def plain(t):
        t1, t2 = t[..., :8], t[..., 8:]
        return torch.cat([t1 * cos + t2 * sin, t2 * cos - t1 * sin], dim=-1)

    for a, b in zip(values_and_grad(rotary, x, cos, sin), values_and_grad(plain, x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_softcap_cross_entropy(reduction, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(100, 37, generator=g) * 20).to(dtype)  # beyond the cap: tanh saturates
    targets = torch.randint(0, 37, (100,), generator=g)
    targets[::7] = -1  # ignored positions

    def plain(t):
        capped = 15 * torch.tanh(t.double() / 15)
        return F.cross_entropy(capped, targets, ignore_index=-1, reduction=reduction)

    fused_out, fused_grad = values_and_grad(lambda t: softcap_cross_entropy(t, targets, 15.0, reduction), logits)
    plain_out, plain_grad = values_and_grad(plain, logits)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float64 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fused_out.double(), plain_out, **tol)
    torch.testing.assert_close(fused_grad.double(), plain_grad.double(), **tol)
    if reduction == "none":
        assert (fused_out[::7] == 0).all()


def test_softcap_cross_entropy_without_grad():
    logits = torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    with torch.no_grad():
        out = softcap_cross_entropy(logits, targets, 15.0, "none")
    expected = F.cross_entropy(15 * torch.tanh(logits / 15), targets, reduction="none")
    torch.testing.assert_close(out, expected)
