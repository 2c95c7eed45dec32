"""Dropout that keeps its mask as bits, or no mask at all.

Takes ``aten.dropout``'s arguments and a mode (``SlimFitConfig.dropout_mode``); draws the very
mask eager draws (same RNG calls, same ops), so results are eager's under the same seed.  Keeps,
by mode: ``"bits"`` the mask one bit per element (CPU dropout, ``empty_like(x).bernoulli_(1 - p)``,
replicated and drawn once); ``"replay"`` the RNG state, from which backward draws the mask again
(``quant.mask_nbytes`` prices both).  ``keep_mask``/``mask_from`` serve the attention core too.
Never moves the global random stream away from eager's (a replay restores it).
"""
from __future__ import annotations

import torch

from . import saved


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout draws from on ``device``: what ``replay_mask`` restores."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


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


def keep_mask(x: torch.Tensor, p: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x, p), what to keep)``: packed mask bits (``"bits"``), the RNG state (``"replay"``)
    or eager's own mask (``"full"``: the CPU's scaled float noise, CUDA's boolean mask)."""
    if mode in ("bits", "full") and x.device.type == "cpu":
        noise = torch.empty_like(x, memory_format=torch.contiguous_format).bernoulli_(1 - p)
        if mode == "full":
            noise.div_(1 - p)
            return x * noise, noise
        bits = torch.ops.slimfit.pack_bits(noise)
        return x * noise.div_(1 - p), bits
    if mode == "bits":
        raise ValueError("dropout_masks='bits' replicates the CPU's dropout; on this device use 'replay' or 'auto'")
    if mode == "full":
        out, mask = torch.native_dropout(x, p, True)
        return out, mask
    state = rng_state(x.device)
    return torch.dropout(x, p, True), state


def mask_from(kept: torch.Tensor, mode: str, shape, dtype, device, p: float, scaled: bool = True) -> torch.Tensor:
    """The mask ``keep_mask`` applied, in ``dtype``: scaled (``mask / (1 - p)``, bit for bit what eager
    multiplies by) or, with ``scaled=False``, the 0/1 mask itself."""
    if mode == "bits":
        mask = torch.ops.slimfit.unpack_bits(kept, _numel(shape)).view(shape)
        # bool -> float converts slowly on the CPU; its bytes as uint8 convert fast
        mask = mask.view(torch.uint8).to(dtype)
        return mask.div_(1 - p) if scaled else mask
    if mode == "full":
        if kept.dtype == torch.bool:  # CUDA's native_dropout mask
            mask = kept.to(dtype)
            return mask * (1.0 / (1 - p)) if scaled else mask
        return kept.to(dtype) if scaled else (kept != 0).to(dtype)
    mask = replay_mask(kept, shape, dtype, device, p)
    return mask if scaled else (mask != 0).to(dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, mode):
        out, kept = keep_mask(x, p, mode)
        ctx.p, ctx.mode, ctx.shape, ctx.dtype, ctx.device = p, mode, x.shape, x.dtype, x.device
        saved.save(ctx, kept)
        return out

    @staticmethod
    def backward(ctx, grad):
        (kept,) = saved.load(ctx)
        return grad * mask_from(kept, ctx.mode, ctx.shape, ctx.dtype, ctx.device, ctx.p), None, None


def dropout_compact(x: torch.Tensor, p: float = 0.5, train: bool = True, mode: str = "replay") -> torch.Tensor:
    """``aten.dropout(x, p, train)`` keeping mask bits (``mode="bits"``) or the RNG state (``"replay"``)."""
    if not train or p == 0:
        return x
    if p == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return torch.dropout(x, p, train)
    return _Dropout.apply(x, p, mode)
