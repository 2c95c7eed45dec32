"""LayerNorm that keeps a pruned copy of its normalized input while its weight is frozen.

Trainable weight: the forward and the kept tensors are eager PyTorch's
(input, per-row mean and 1/sigma), and the backward is ATen's.
Frozen weight, input needing grad: keep per row the top ``keep_ratio`` of |x_hat| (values and int16
column indices, int32 past 32,767 columns) plus 1/sigma, where
x_hat = (x - mean) / sigma.  The kept set is chosen on |x - mean| (the same order, one pass fewer)
and x_hat is formed at the kept entries only; ties at the k-th value are broken as ``torch.topk``
breaks them.  Backward uses
grad_x = (1/sigma) * (g*w - mean(g*w) - x_hat * mean(g*w*x_hat)) with x_hat zero off the kept
entries, so the last term is a scatter of k values per row; the bias, which always trains, gets sum(g).  Frozen weight and an input that
needs no grad (e.g. above frozen embeddings): keep nothing, only sum(g) is due.
The choice is read at run time, so the frozen set can change every step.
"""
from __future__ import annotations

import math

import torch

from . import _saved
from ._saved import cast as _cast


def keep_count(row: int, keep_ratio: float) -> int:
    """Values kept per row; the analysis prices the same count."""
    return max(1, math.ceil(keep_ratio * row))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, keep_ratio, dtype):
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, _cast(weight, dtype), _cast(bias, dtype), eps)
        ctx.normalized_shape, ctx.eps, ctx.dtype = normalized_shape, eps, dtype
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        weight_frozen = weight is not None and not weight.requires_grad
        ctx.mode = "full" if not weight_frozen else ("pruned" if x.requires_grad else "bias_only")
        ctx.x_shape, ctx.row = x.shape, math.prod(normalized_shape)
        if ctx.mode == "bias_only":
            _saved.save(ctx)  # the bias gradient is sum(g): nothing to keep
        elif ctx.mode == "pruned":
            row = math.prod(normalized_shape)
            rows, mean = x.reshape(-1, row), mean.reshape(-1, 1)
            # 1/sigma > 0 per row: the top |x - mean| are the top |x_hat|, and x_hat is made for those only
            index = (rows - mean).abs_().topk(keep_count(row, keep_ratio), dim=-1, sorted=False).indices
            values = ((rows.gather(-1, index) - mean) * rstd.reshape(-1, 1)).to(x.dtype)
            index = index.to(torch.int16 if row <= torch.iinfo(torch.int16).max else torch.int32)
            _saved.save(ctx, values, index, rstd, weight)
        else:
            _saved.save(ctx, x, mean, rstd, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        gb = grad.reshape(-1, ctx.row).sum(0).reshape(ctx.normalized_shape) if ctx.needs_input_grad[2] else None
        gb = _cast(gb, ctx.dtypes[1])
        if ctx.mode == "bias_only":
            return None, None, gb, None, None, None, None
        if ctx.mode == "full":
            x, mean, rstd, weight, bias = _saved.load(ctx)
            mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad, x, ctx.normalized_shape, mean, rstd, _cast(weight, ctx.dtype), _cast(bias, ctx.dtype), mask)
            return gx, _cast(gw, ctx.dtypes[0]), _cast(gb, ctx.dtypes[1]), None, None, None, None
        values, index, rstd, weight = _saved.load(ctx)
        acc = torch.promote_types(grad.dtype, torch.float32)
        g = grad.reshape(-1, ctx.row).to(acc)
        gw = g * _cast(weight, ctx.dtype).reshape(1, -1).to(acc) if weight is not None else g.clone()
        index, values, rstd = index.long(), values.to(acc), rstd.reshape(-1, 1).to(acc)
        # grad_x = rstd * (gw - mean(gw) - x_hat * mean(gw * x_hat)); x_hat is zero but at the kept entries
        c = (gw.gather(-1, index) * values).sum(-1, keepdim=True).div_(ctx.row)
        gx = gw.sub_(gw.mean(-1, keepdim=True)).mul_(rstd)
        gx.scatter_add_(-1, index, values.mul_(rstd * c).neg_())
        return gx.to(grad.dtype).reshape(ctx.x_shape), None, gb, None, None, None, None


def layer_norm_pruned(x, normalized_shape, weight=None, bias=None, eps=1e-5, keep_ratio=0.1, dtype=None):
    """``aten.layer_norm`` whose saved input is pruned while ``weight`` is frozen; with ``dtype``
    (autocast's), weight and bias are cast to it inside."""
    normalized_shape = tuple(int(s) for s in normalized_shape)
    needs = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs:
        return torch.layer_norm(x, normalized_shape, _cast(weight, dtype), _cast(bias, dtype), eps)
    return _LayerNorm.apply(x, weight, bias, normalized_shape, eps, keep_ratio, dtype)
