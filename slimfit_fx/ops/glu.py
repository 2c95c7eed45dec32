"""Gated MLP core ``act(gate) * up`` (SwiGLU, GeGLU) that keeps both inputs quantized.

The forward runs eager PyTorch's two ops (``act`` then the product), so its result is bit for bit
the same.  Kept for backward: ``gate`` in ``gate_fmt`` whenever either input needs grad (both
gradients need ``act(gate)`` or its derivative, evaluated at the dequantized gate) and ``up`` in
``up_fmt`` while ``gate`` needs grad.  A format of None keeps that input as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import saved


def _act(x, act, approximate):
    return F.silu(x) if act == "silu" else F.gelu(x, approximate=approximate)


def _act_grad(x, act, approximate):
    """d act / dx at x, in float32."""
    x = x.float()
    if act == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    return torch.ops.aten.gelu_backward(torch.ones_like(x), x, approximate=approximate)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, approximate, gate_fmt, up_fmt):
        ctx.act, ctx.approximate = act, approximate
        out = _act(gate, act, approximate) * up
        kept_up = saved.keep(up, saved.fmt_from_args(up_fmt)) if gate.requires_grad else None
        saved.save(ctx, saved.keep(gate, saved.fmt_from_args(gate_fmt)), kept_up)
        ctx.dtypes = (gate.dtype, up.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up = saved.load(ctx)
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = (grad * _act(gate.to(ctx.dtypes[0]), ctx.act, ctx.approximate)).to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            g_gate = (grad.float() * up.float() * _act_grad(gate, ctx.act, ctx.approximate)).to(ctx.dtypes[0])
        return g_gate, g_up, None, None, None, None


def glu(gate, up, act="silu", approximate="none", gate_fmt=None, up_fmt=None):
    """``act(gate) * up``; formats are ``QuantFormat`` tuples (``ops.saved.fmt_to_args``)."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return _act(gate, act, approximate) * up
    return _GLU.apply(gate, up, act, approximate, gate_fmt, up_fmt)


glu.ffn_hidden = "glu"  # its output is an FFN's hidden activation: the down-projection's input
