"""GELU that keeps a quantized copy of its input (4-bit in the paper's format).

The forward is ``torch.nn.functional.gelu`` itself (exact); backward applies
the exact GELU derivative (ATen's ``gelu_backward``) at the dequantized input.
"""
from __future__ import annotations

import torch

from . import _saved


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate, fmt_args):
        ctx.approximate = approximate
        _saved.save(ctx, _saved.keep(x, _saved.fmt_from_args(fmt_args)))
        return torch.nn.functional.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        (x,) = _saved.load(ctx)
        return torch.ops.aten.gelu_backward(grad, x.to(grad.dtype), approximate=ctx.approximate), None, None


def gelu_quantized(x: torch.Tensor, approximate: str = "none", fmt_args: tuple | None = None) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.gelu(x, approximate=approximate)
    return _Gelu.apply(x, approximate, fmt_args)
