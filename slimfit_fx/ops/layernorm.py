"""LayerNorm that keeps a pruned copy of its normalized input while its weight is frozen.

Takes ``aten.layer_norm``'s arguments, a keep ratio and, under autocast, a dtype; gives
``native_layer_norm``'s output.  Keeps, read when it runs: with a trainable weight what eager keeps
(input, per-row mean and 1/sigma, ATen's backward); with a frozen weight and an input that needs
grad, the top ``keep_ratio`` of |x_hat| per row (values and ``quant.pruned_index_dtype`` column
indices, ``quant.keep_count`` of them) plus 1/sigma; with neither, nothing (the bias gets sum(g)).
"""
from __future__ import annotations

import math

import torch

from ..quant import keep_count, pruned_index_dtype
from . import saved
from .saved import cast as _cast


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
            saved.save(ctx)  # the bias gradient is sum(g): nothing to keep
        elif ctx.mode == "pruned":
            row = math.prod(normalized_shape)
            rows, mean = x.reshape(-1, row), mean.reshape(-1, 1)
            # 1/sigma > 0 per row: the top |x - mean| are the top |x_hat|, and x_hat is made for those only
            index = (rows - mean).abs_().topk(keep_count(row, keep_ratio), dim=-1, sorted=False).indices
            values = ((rows.gather(-1, index) - mean) * rstd.reshape(-1, 1)).to(x.dtype)
            index = index.to(pruned_index_dtype(row))
            saved.save(ctx, values, index, rstd, weight)
        else:
            saved.save(ctx, x, mean, rstd, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        gb = grad.reshape(-1, ctx.row).sum(0).reshape(ctx.normalized_shape) if ctx.needs_input_grad[2] else None
        gb = _cast(gb, ctx.dtypes[1])
        if ctx.mode == "bias_only":
            return None, None, gb, None, None, None, None
        if ctx.mode == "full":
            x, mean, rstd, weight, bias = saved.load(ctx)
            mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad, x, ctx.normalized_shape, mean, rstd, _cast(weight, ctx.dtype), _cast(bias, ctx.dtype), mask)
            return gx, _cast(gw, ctx.dtypes[0]), _cast(gb, ctx.dtypes[1]), None, None, None, None
        # Frozen weight: grad_x = (1/sigma) * (g*w - mean(g*w) - x_hat * mean(g*w*x_hat)), x_hat zero off
        # the kept entries, so the last term is a scatter of k values per row.  The kept set was chosen
        # on |x - mean| (the same order as |x_hat|, one pass fewer); ties break as torch.topk breaks them.
        values, index, rstd, weight = saved.load(ctx)
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
