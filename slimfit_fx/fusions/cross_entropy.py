"""Pattern: ``cross_entropy(linear(x, W, b))`` keeps ``x``, not the log-probabilities.

Matches ``aten.cross_entropy_loss(logits, target)`` (no class weights, no label smoothing, mean or
sum) whose logits are, through views and dtype casts (and a soft cap ``tanh(z / c) * c``), an
``aten.linear`` output with a parameter
weight: a language-model head.  Emits ``ops.cross_entropy.linear_cross_entropy``, which computes
the same loss from the same logits and recomputes them in chunks in backward.  The Linear stays
(its output may be returned), so what it keeps while its weight trains is unchanged.
"""
from __future__ import annotations

import torch

from slimfit_fx.extend import Fusion, register_pattern
from slimfit_fx.nodes import arg, cast_source, is_op, numel, size, value
from slimfit_fx.op_table import Save
from slimfit_fx.ops.cross_entropy import chunk_rows, linear_cross_entropy

from .walk import through_views

_REDUCTIONS = {1: "mean", 2: "sum"}


def _softcap(node):
    """``(logits, cap)`` when ``node`` is ``tanh(logits / cap) * cap`` (Gemma2's final soft cap)."""
    if not (is_op(node, "aten.mul") and isinstance(node.args[1], (int, float)) and is_op(node.args[0], "aten.tanh")):
        return None
    div = node.args[0].args[0]
    if is_op(div, "aten.div") and div.args[1] == node.args[1]:
        return div.args[0], float(node.args[1])
    return None


def match(node, ctx):
    """The fusion of an LM head's cross-entropy ending at ``node``, or None."""
    if not (ctx.config.fuse_cross_entropy and is_op(node, "aten.cross_entropy_loss")):
        return None
    logits, target = node.args[0], node.args[1]
    reduction = _REDUCTIONS.get(arg(node, 3, "reduction", 1))
    if arg(node, 2, "weight") is not None or arg(node, 5, "label_smoothing", 0.0) != 0.0 or reduction is None:
        return None
    linear, softcap = through_views(logits), None
    capped = _softcap(linear)
    if capped is not None:
        linear, softcap = through_views(capped[0]), capped[1]
    if not is_op(linear, "aten.linear") or value(logits).dim() != 2:
        return None
    weight = arg(linear, 1, "weight")
    if not ctx.is_param(weight):
        return None
    dtype = value(weight).dtype if cast_source(weight) is not None else None
    weight = cast_source(weight) or weight
    bias = arg(linear, 2, "bias")
    if bias is not None and cast_source(bias) is not None:
        bias = cast_source(bias)
    args = (logits, linear.args[0], weight, bias, target)
    kwargs = dict(reduction=reduction, ignore_index=arg(node, 4, "ignore_index", -100), dtype=dtype,
                  logits_dtype=value(logits).dtype, softcap=softcap)
    rows, vocab = size(logits, 0), size(logits, 1)
    x_bytes = numel(linear.args[0]) * value(linear.args[0]).dtype.itemsize
    if rows * vocab * value(logits).dtype.itemsize <= x_bytes + rows * 4:
        return None  # a narrow head (a classifier): its log-probabilities are cheaper to keep

    def saves(ctx):
        out = [Save("arg", 1, (1, 2, 3), "lm_head_input"),
               Save("new", 0, (1, 2, 3), "logsumexp", copy_bytes=rows * 4, share="lse"),
               Save("arg", 4, (1, 2, 3), "target")]
        if reduction == "mean":
            out.append(Save("new", 0, (1, 2, 3), "other", copy_bytes=4, share="count"))
        return out

    logits_bytes = rows * vocab * value(logits).dtype.itemsize
    chunk = min(rows, chunk_rows(vocab)) * vocab * 4
    copies = 1 + (value(logits).dtype != torch.float32) + 2 * (softcap is not None)
    # forward: the logits and one rows x vocab temporary (log-softmax, then exp for the log-sum-exp);
    # backward: a chunk's probabilities (a float copy for low-precision logits, the soft cap's two
    # temporaries), the input's gradient and one chunk of it
    return Fusion(node, (), linear_cross_entropy, args, saves, kwargs, note="cross-entropy keeps no logits",
                  forward_bytes=2 * logits_bytes, backward_bytes=copies * chunk + 2 * x_bytes)


register_pattern("cross_entropy", match)
