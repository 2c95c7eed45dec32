"""Cross-entropy of a Linear's logits that keeps no logits: the backward recomputes them in chunks.

Takes the logits as computed (the forward is eager PyTorch's ``cross_entropy`` on them, bit for
bit) and, for the backward, the Linear's input, weight and bias.  Keeps the input (which the
Linear itself keeps while its weight trains), the per-row log-sum-exp and the targets; never the
``rows x vocab`` log-probabilities eager cross-entropy keeps.  Backward, ``chunk_rows`` rows at a
time: logits again, ``softmax - onehot``, then the gradients of the input, weight and bias.  The
gradient reaches them only through this op, so the Linear's own output must not be
differentiated elsewhere (the pattern checks the logits feed nothing else that needs grad).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import saved
from .saved import cast as _cast

CHUNK_ELEMENTS = 1 << 22  # logits recomputed per backward chunk: 16 MiB in fp32


def chunk_rows(vocab: int) -> int:
    """Rows per backward chunk (the peak model prices the same)."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, x, weight, bias, target, reduction, ignore_index, dtype, logits_dtype, softcap):
        loss, lse = _loss_and_lse(logits, target, reduction, ignore_index)
        ctx.ignore_index, ctx.dtype, ctx.logits_dtype, ctx.softcap = ignore_index, dtype, logits_dtype, softcap
        ctx.x_shape, ctx.dtypes = x.shape, (weight.dtype, None if bias is None else bias.dtype)
        # The mean's divisor as a tensor: reading it on the host would synchronise a GPU every step.
        count = (target != ignore_index).sum().clamp_(min=1).float() if reduction == "mean" else None
        saved.save(ctx, x, weight, bias, lse, target, count)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, lse, target, count = saved.load(ctx)
        w, b = _cast(weight, ctx.dtype), _cast(bias, ctx.dtype)
        rows = _cast(x.reshape(-1, x.shape[-1]), ctx.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        gx = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if need_x else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        gb = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b and b is not None else None
        scale = grad.to(torch.float32) if count is None else grad.to(torch.float32) / count
        step = chunk_rows(w.shape[0])
        for start in range(0, rows.shape[0], step):
            xc, tc = rows[start:start + step], target[start:start + step]
            z = F.linear(xc, w, b)
            t = None if ctx.softcap is None else torch.tanh(z / ctx.softcap)
            logits = (z if t is None else t * ctx.softcap).to(ctx.logits_dtype)
            g = logits.float().sub_(lse[start:start + step, None]).exp_()
            valid = (tc != ctx.ignore_index).unsqueeze(1)
            g.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), valid.float().neg())
            g.mul_(valid).mul_(scale)
            g = g.to(logits.dtype).to(z.dtype)
            if t is not None:  # d(c * tanh(z / c)) / dz
                g = g * (1 - t * t)
            g = g.to(w.dtype)
            if gx is not None:
                gx[start:start + step] = g @ w
            if gw is not None:
                gw.addmm_(g.t().float(), xc.float())
            if gb is not None:
                gb.add_(g.float().sum(0))
        gx = None if gx is None else gx.reshape(ctx.x_shape)
        gw = None if gw is None else gw.to(ctx.dtypes[0])
        gb = None if gb is None else gb.to(ctx.dtypes[1])
        return None, gx, gw, gb, None, None, None, None, None, None


def _loss_and_lse(logits, target, reduction, ignore_index):
    loss = F.cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index)
    return loss, torch.logsumexp(logits.detach().float(), dim=-1)


def linear_cross_entropy(logits, x, weight, bias, target, reduction="mean", ignore_index=-100, dtype=None,
                         logits_dtype=None, softcap=None):
    """``F.cross_entropy(logits, target)`` where ``logits = linear(x, weight, bias)`` (all three cast
    to ``dtype`` first under autocast, soft-capped as ``tanh(z / softcap) * softcap`` when given, the
    result cast to ``logits_dtype``), keeping only ``x``."""
    needs = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs:
        return F.cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index)
    return _LinearCrossEntropy.apply(logits, x, weight, bias, target, reduction, ignore_index, dtype,
                                     logits_dtype or logits.dtype, softcap)
