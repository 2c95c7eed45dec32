"""Dropout that keeps no mask: it keeps the RNG state and replays it in backward.

Forward calls the very op eager PyTorch calls (``torch.dropout``), so results
are identical under the same seed; backward restores the RNG state of that
moment, draws the same mask again from ``dropout(ones)`` and puts the state
back.  Kept: one RNG state per call (5,056 bytes on CPU; a seed and offset on
CUDA) instead of a mask of the input's size.
"""
from __future__ import annotations

import torch

from . import _saved


def rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def rng_state_nbytes(device: torch.device) -> int:
    """Bytes of the state ``rng_state`` returns (what the analysis predicts)."""
    state = rng_state(device)
    return state.numel() * state.element_size()


def replay_mask(state: torch.Tensor, shape, dtype, device, p: float) -> torch.Tensor:
    """The scaled dropout mask that ``torch.dropout`` drew when the RNG was in ``state``."""
    if device.type == "cuda":
        current = torch.cuda.get_rng_state(device)
        torch.cuda.set_rng_state(state, device)
        try:
            return torch.dropout(torch.ones(shape, dtype=dtype, device=device), p, True)
        finally:
            torch.cuda.set_rng_state(current, device)
    current = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        return torch.dropout(torch.ones(shape, dtype=dtype, device=device), p, True)
    finally:
        torch.set_rng_state(current)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        state = rng_state(x.device)
        out = torch.dropout(x, p, True)
        ctx.p, ctx.shape, ctx.dtype, ctx.device = p, x.shape, x.dtype, x.device
        _saved.save(ctx, state)
        return out

    @staticmethod
    def backward(ctx, grad):
        (state,) = _saved.load(ctx)
        return grad * replay_mask(state, ctx.shape, ctx.dtype, ctx.device, ctx.p), None


def dropout_regenerated(x: torch.Tensor, p: float = 0.5, train: bool = True) -> torch.Tensor:
    """``aten.dropout(x, p, train)`` with the mask regenerated in backward instead of kept."""
    if not train or p == 0:
        return x
    if p == 1:
        return torch.dropout(x, p, train)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.dropout(x, p, train)
    return _Dropout.apply(x, p)
