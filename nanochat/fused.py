"""Hand-fused forward/backward for the elementwise hot spots of eager (uncompiled) training.

On the CPU, without torch.compile, autograd runs every elementwise op as its own pass over
memory, and a handful of them (the soft-capped cross-entropy over the vocabulary above all) cost
more than the model's matmuls. Each function here computes exactly what its plain formula in the
docstring computes, with fewer passes; under torch.compile the plain formula is used, because
the compiler fuses it better still.
"""
import torch

CE_CHUNK_ROWS = 64  # rows of logits processed together, so a chunk's passes run from cache
_ONE = torch.ones(())
_ZERO = torch.zeros(())


def _compiling() -> bool:
    # an exported graph (the harness's evaluation) runs op by op, as eager does: it gets the fused forms
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


class _ReluSquared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        # 2 r grad in one pass; relu's own gradient is implied: r is 0 where x < 0
        return torch.addcmul(_ZERO.to(grad.dtype), grad, r, value=2)


def relu_squared(x):
    """relu(x) ** 2"""
    return torch.relu(x).square() if _compiling() else _ReluSquared.apply(x)


def rms_norm(x, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) over the last dim, no weights. Written out because on the CPU
    it is ~5x faster than F.rms_norm, which upcasts bf16 through several copies."""
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def _rotate(x, cos, sin):
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def _swap_halves(x):
    half = x.size(-1) // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


class _Rotary(torch.autograd.Function):
    """The rotation as x * [cos, cos] + swap(x) * [sin, -sin]: every product runs over contiguous
    memory (the plain form multiplies strided half-tensors, ~10x slower on the CPU)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        full_cos, signed_sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)
        ctx.save_for_backward(full_cos, signed_sin)
        return torch.addcmul(x * full_cos, _swap_halves(x), signed_sin)

    @staticmethod
    def backward(ctx, grad):
        full_cos, signed_sin = ctx.saved_tensors
        # a rotation's gradient is the inverse rotation: the same with sin negated
        return torch.addcmul(grad * full_cos, _swap_halves(grad), signed_sin, value=-1), None, None


def rotary(x, cos, sin):
    """Rotary embedding of x (..., D): halves (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)."""
    return _rotate(x, cos, sin) if _compiling() else _Rotary.apply(x, cos, sin)


def _plain_softcap_ce(logits, targets, softcap, reduction):
    capped = softcap * torch.tanh(logits.float() / softcap)
    return torch.nn.functional.cross_entropy(capped, targets, ignore_index=-1, reduction=reduction)


class _SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row loss of softcap * tanh(logits / softcap) against targets; the gradient is computed
    during the forward pass, chunk by chunk while the chunk is in cache, and only scaled later."""

    @staticmethod
    def forward(ctx, logits, targets, softcap, with_grad):
        losses = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if with_grad else None
        valid = targets != -1
        safe_targets = targets.clamp_min(0)[:, None]
        for start in range(0, logits.size(0), CE_CHUNK_ROWS):
            rows = slice(start, start + CE_CHUNK_ROWS)
            z = logits[rows].to(torch.float32, copy=True).div_(softcap).tanh_()  # never alters the input
            s = z * softcap  # the capped logits
            target_logit = s.gather(1, safe_targets[rows])
            # |s| <= softcap, so exp cannot overflow: no max subtraction, and the exponentials are
            # computed once for both the loss and the softmax
            e = s.exp_()
            sum_exp = e.sum(dim=-1, keepdim=True)
            losses[rows] = (sum_exp.log() - target_logit).squeeze(1)
            if with_grad:  # d loss / d logits = (softmax(s) - onehot(target)) * (1 - z^2)
                p = e.div_(sum_exp)
                p.scatter_add_(1, safe_targets[rows], -valid[rows, None].float())
                grad[rows] = p.mul_(torch.addcmul(_ONE, z, z, value=-1))
        ignored = ~valid
        if ignored.any():  # training rows are packed without padding: this pass is usually skipped
            losses.masked_fill_(ignored, 0.0)
            if with_grad:
                grad.masked_fill_(ignored[:, None], 0)
        if with_grad:
            ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None


def softcap_cross_entropy(logits, targets, softcap, reduction="mean"):
    """cross_entropy(softcap * tanh(logits / softcap), targets, ignore_index=-1, reduction) for
    logits (N, V) and targets (N,), computed in fp32 whatever the logits' dtype."""
    if _compiling() or softcap > 80:  # the fused path relies on exp(softcap) fitting in fp32
        return _plain_softcap_ce(logits, targets, softcap, reduction)
    losses = _SoftcapCrossEntropy.apply(logits, targets, softcap, logits.requires_grad and torch.is_grad_enabled())
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != -1).sum()
