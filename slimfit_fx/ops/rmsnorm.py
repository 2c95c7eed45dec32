"""RMSNorm that keeps a pruned or quantized normalized input instead of the input.

Takes ``x``, the weight and the form: ``y = x * rsqrt(mean(x^2) + eps)`` per row, then
``w * y.to(y_dtype)`` (LLaMA, Qwen, Mistral, Phi3) or ``y * (w.to(w_dtype) + offset)`` (Gemma's
``1 + w``); gives what those very ops give.  Keeps, read when it runs, 1/rms per row while ``x``
needs grad and: ``y`` in ``fmt`` while the weight trains (it serves both gradients); with a frozen
weight and ``prune``, the top ``keep_ratio`` of ``|y|`` per row (values and column indices), since
grad_x = r * (g_y - y * mean(g_y * y)) needs ``y`` only in that last term; else ``y`` in ``fmt``.
"""
from __future__ import annotations

import torch

from ..quant import keep_count, pruned_index_dtype
from . import saved


def _normalize(x, eps):
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


def _scale(y, weight, offset, w_dtype, y_dtype):
    if offset is None:
        return weight * y.to(y_dtype)
    return y * (weight.to(w_dtype) + offset)


def _top(y: torch.Tensor, keep_ratio: float):
    row = y.shape[-1]
    rows = y.reshape(-1, row)
    index = rows.abs().topk(keep_count(row, keep_ratio), dim=-1, sorted=False).indices
    values = rows.gather(-1, index)
    return values, index.to(pruned_index_dtype(row))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, w_dtype, y_dtype, prune, keep_ratio, fmt):
        y, rstd = _normalize(x, eps)
        out = _scale(y, weight, offset, w_dtype, y_dtype)
        ctx.offset, ctx.w_dtype, ctx.y_dtype = offset, w_dtype, y_dtype
        ctx.x_shape, ctx.y_dtype_saved = x.shape, y.dtype
        ctx.pruned = not weight.requires_grad and prune
        kept_rstd = rstd if x.requires_grad else None
        if ctx.pruned:
            values, index = _top(y, keep_ratio)
            saved.save(ctx, None, values, index, kept_rstd, weight)
        else:
            saved.save(ctx, saved.keep(y, saved.fmt_from_args(fmt)), None, None, kept_rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, values, index, rstd, weight = saved.load(ctx)
        need_x, need_w = ctx.needs_input_grad[:2]
        gw = None
        if need_w:
            gw = _weight_grad(grad, y, weight, ctx)
        if not need_x:
            return None, gw, None, None, None, None, None, None, None
        if ctx.offset is None:
            gy = (grad * weight).to(ctx.y_dtype_saved)
        else:
            gy = grad * (weight.to(ctx.w_dtype) + ctx.offset)
        gy = gy.reshape(-1, gy.shape[-1])
        rstd = rstd.reshape(-1, 1)
        if ctx.pruned:
            values = values.to(gy.dtype)
            c = (gy.gather(-1, index.long()) * values).sum(-1, keepdim=True).div_(gy.shape[-1])
            gx = gy.mul(rstd)
            gx.scatter_add_(-1, index.long(), values.mul_(rstd * c).neg_())
        else:
            y = y.reshape(gy.shape).to(gy.dtype)
            gx = (gy - y * (gy * y).mean(-1, keepdim=True)).mul_(rstd)
        return gx.reshape(ctx.x_shape), gw, None, None, None, None, None, None, None


def _weight_grad(grad, y, weight, ctx):
    if ctx.offset is None:
        g = grad * y.to(ctx.y_dtype)
    else:
        g = grad * y.to(grad.dtype)
    return g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)


def rms_norm(x, weight, eps, offset=None, w_dtype=None, y_dtype=None, prune=True, keep_ratio=0.1, fmt=None):
    """The RMSNorm above; ``fmt`` is a ``QuantFormat`` as a tuple (``ops.saved.fmt_to_args``)."""
    y_dtype = y_dtype or x.dtype
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _scale(_normalize(x, eps)[0], weight, offset, w_dtype, y_dtype)
    return _RMSNorm.apply(x, weight, eps, offset, w_dtype, y_dtype, prune, keep_ratio, fmt)

