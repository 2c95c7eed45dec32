"""GELU that keeps a quantized copy of its input (4 bits by default).

Takes the input, the approximation and a format; gives ``torch.nn.functional.gelu`` itself.
Backward applies GELU's derivative at the dequantized input: one fused kernel for the min/max
format (``torch.ops.slimfit.dequantize_gelu_backward``), ATen's ``gelu_backward`` otherwise.  The
tanh GELU spelled out in ops (GPT-2's ``gelu_new``) runs those very ops forward.
"""
from __future__ import annotations

import torch

from ..quant import Quantized, dequantize
from . import saved


def _gelu_backward(grad, q, approximate: str):
    """Gradient of GELU's input at the saved (maybe quantized) input ``q``."""
    if isinstance(q, Quantized) and q.fmt.kind == "minmax" and q.dtype == grad.dtype:
        return torch.ops.slimfit.dequantize_gelu_backward(grad, q.codes, q.scale, q.offset, q.fmt.bits,
                                                          q.fmt.group_size, approximate)
    x = dequantize(q) if isinstance(q, Quantized) else q
    return torch.ops.aten.gelu_backward(grad, x.to(grad.dtype), approximate=approximate)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate, fmt_args):
        ctx.approximate = approximate
        saved.save(ctx, saved.keep(x, saved.fmt_from_args(fmt_args)))
        return torch.nn.functional.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        (q,) = saved.load(ctx, dequantized=False)
        return _gelu_backward(grad, q, ctx.approximate), None, None


def gelu_quantized(x: torch.Tensor, approximate: str = "none", fmt_args: tuple | None = None) -> torch.Tensor:
    """``gelu(x, approximate)`` keeping its input in the format ``fmt_args`` (``saved.fmt_to_args``)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.gelu(x, approximate=approximate)
    return _Gelu.apply(x, approximate, fmt_args)


class _TanhGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c_half, c_cubic, c_sqrt, fmt_args):
        saved.save(ctx, saved.keep(x, saved.fmt_from_args(fmt_args)))
        return _tanh_gelu_ops(x, c_half, c_cubic, c_sqrt)

    @staticmethod
    def backward(ctx, grad):
        (q,) = saved.load(ctx, dequantized=False)
        return _gelu_backward(grad, q, "tanh"), None, None, None, None


def _tanh_gelu_ops(x, c_half, c_cubic, c_sqrt):
    # The very ops (and constants) the model's graph ran, so results are bit-identical.
    return (x * c_half) * (torch.tanh((x + torch.pow(x, 3.0) * c_cubic) * c_sqrt) + 1.0)


def tanh_gelu_quantized(x: torch.Tensor, c_half: float, c_cubic: float, c_sqrt: float,
                        fmt_args: tuple | None = None) -> torch.Tensor:
    """A tanh-approximated GELU written out in ops (GPT-2's ``gelu_new``), fused: the same
    forward, one quantized input kept, and ATen's tanh-GELU derivative in backward
    instead of the four full-width tensors the spelled-out ops keep."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _tanh_gelu_ops(x, c_half, c_cubic, c_sqrt)
    return _TanhGelu.apply(x, c_half, c_cubic, c_sqrt, fmt_args)
