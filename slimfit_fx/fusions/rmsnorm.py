"""Pattern: RMSNorm keeps a quantized (or, frozen and asked to, pruned) normalized input.

Matches the RMSNorm HF models write out in ops, ``y = x * rsqrt(mean(x^2, -1) + eps)`` followed by
``w * y.to(dtype)`` (LLaMA, Qwen, Mistral, Phi3; Qwen3's per-head q/k norms) or by
``y * (w.to(dtype) + offset)`` (Gemma's ``1 + w``), with ``w`` a parameter.  Emits
``ops.rmsnorm.rms_norm``, keeping ``y`` in ``norm_input_format``; with
``SlimFitConfig.prune_rmsnorm``, pruned to the top ``layernorm_keep_ratio`` while frozen.
"""
from __future__ import annotations

from slimfit_fx.extend import Fusion, register_pattern
from slimfit_fx.nodes import arg, cast_source, is_op, numel, size, value
from slimfit_fx.op_table import Save, format_for
from slimfit_fx.ops.rmsnorm import rms_norm
from slimfit_fx.ops.saved import fmt_to_args
from slimfit_fx.quant import pruned_layernorm_bytes


def _normalized(y):
    """``(x, eps, inner nodes)`` when ``y`` is ``x * rsqrt(mean(x^2, [-1], keepdim) + eps)``."""
    if not is_op(y, "aten.mul") or len(y.args) != 2:
        return None
    for x, r in (y.args, y.args[::-1]):
        if not (is_op(r, "aten.rsqrt") and is_op(r.args[0], "aten.add")):
            continue
        add = r.args[0]
        mean, eps = add.args[0], add.args[1] if len(add.args) > 1 else None
        if not (is_op(mean, "aten.mean") and isinstance(eps, float)):
            continue
        dims, keep = arg(mean, 1, "dim"), arg(mean, 2, "keepdim", False)
        pow_ = mean.args[0]
        if list(dims or []) not in ([-1], [value(x).dim() - 1]) or not keep:
            continue
        if not (is_op(pow_, "aten.pow") and pow_.args[0] is x and pow_.args[1] == 2):
            continue
        return x, eps, (pow_, mean, add, r)
    return None


def _scaled(out, ctx):
    """``(y, weight, offset, w_dtype, y_dtype, inner)`` for ``w * y.to(d)`` or ``y * (w.to(d) + c)``."""
    if not is_op(out, "aten.mul") or len(out.args) != 2:
        return None
    for w, y in (out.args, out.args[::-1]):
        if ctx.is_param(w) and cast_source(w) is None and value(w).dim() == 1:
            if cast_source(y) is not None:  # LLaMA's y.to(input_dtype)
                return cast_source(y), w, None, None, value(y).dtype, (y,)
            return y, w, None, None, value(y).dtype, ()
        if is_op(w, "aten.add") and isinstance(w.args[1], (int, float)) and cast_source(w.args[0]) is not None:
            param = cast_source(w.args[0])
            if ctx.is_param(param) and value(param).dim() == 1:
                return y, param, float(w.args[1]), value(w.args[0]).dtype, None, (w.args[0], w)
    return None


def match(node, ctx):
    """The fusion of a written-out RMSNorm ending at ``node`` (its scaling by the weight), or None."""
    config = ctx.config
    if not config.fuse_rmsnorm:
        return None
    scaled = _scaled(node, ctx)
    if scaled is None:
        return None
    y, weight, offset, w_dtype, y_dtype, scale_inner = scaled
    normalized = _normalized(y)
    if normalized is None:
        return None
    x, eps, norm_inner = normalized
    if value(weight).shape[0] != value(x).shape[-1]:
        return None
    fmt = format_for(config.norm_input_format, y)
    prune, keep_ratio = config.prune_rmsnorm, config.layernorm_keep_ratio
    row = size(x, -1)
    rows = numel(x) // max(row, 1)

    def saves(ctx):
        kept = fmt.nbytes(rows * row) if fmt is not None else rows * row * value(y).dtype.itemsize
        # "arg" 0 with a copy: y is a new tensor of x's shape (the peak model dequantizes it at that size)
        out = [Save("arg", 0, (0, 1), "norm_input", copy_bytes=kept, share="y", fmt="norm_q",
                    variant=None if not prune else (1, True)),
               Save("new", 0, (0,), "norm_stats", copy_bytes=rows * value(x).dtype.itemsize, share="rstd")]
        if prune:
            out.append(Save("new", 0, (0,), "norm_pruned", share="topk", fmt="norm_pruned", variant=(1, False),
                            copy_bytes=pruned_layernorm_bytes(rows, row, value(y).dtype, keep_ratio)))
        return out

    args = (x, weight, eps, offset, w_dtype, y_dtype, prune, keep_ratio, fmt_to_args(fmt))
    return Fusion(node, norm_inner + (y,) + scale_inner, rms_norm, args, saves,
                  note="RMSNorm: normalized input pruned while frozen, quantized while trainable")


register_pattern("rmsnorm", match)
