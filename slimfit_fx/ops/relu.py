"""ReLU that keeps one bit per element (where the output is positive) instead of its output.

The forward is ``torch.relu``; the backward is ``grad * (out > 0)``, exactly eager's.
"""
from __future__ import annotations

import torch

from ..kernels import library  # noqa: F401  (registers torch.ops.slimfit.pack_bits)
from . import saved


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.shape = out.shape
        saved.save(ctx, torch.ops.slimfit.pack_bits(out > 0))
        return out

    @staticmethod
    def backward(ctx, grad):
        (bits,) = saved.load(ctx)
        positive = torch.ops.slimfit.unpack_bits(bits, grad.numel()).view(ctx.shape)
        return grad * positive


def relu_bits(x):
    """``torch.relu(x)`` keeping its sign bits for backward."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu(x)
    return _ReLU.apply(x)


relu_bits.ffn_hidden = "relu"  # an FFN's hidden activation: the down-projection's input
