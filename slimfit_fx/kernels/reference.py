"""Reference implementations of the saved-activation formats, in plain torch ops.

The ground truth every other implementation is tested against, and the CPU
kernels.  Any device, any floating input dtype but float64.

Per-group min/max (``quantize_minmax``): the flattened input is cut into groups of
``group_size`` consecutive elements (the last may be shorter).  Per group, in fp32:
``lo = min``, ``scale = (max - lo) / (2**bits - 1)``, and each element's code is
``floor((x - lo) / scale + r)`` clamped to ``[0, 2**bits - 1]``, with ``r = 0.5``
(round half up) or, for stochastic rounding, ``r ~ U[0, 1)``; a group whose
elements are all equal has ``scale = 0`` and codes 0.  It dequantizes to
``code * scale + lo``.  A group holding NaN or an infinity dequantizes to
non-finite values (the forward pass, which is exact, has already carried them
into the loss).  Codes are packed ``8 // bits`` per byte, the first element in
the lowest bits; a trailing partial byte is zero-filled.

Bit masks (``pack_bits``): element ``i`` of a boolean mask is bit ``i % 8`` of byte
``i // 8``.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["quantize_minmax", "dequantize_minmax", "pack_codes", "unpack_codes", "pack_bits", "unpack_bits",
           "dequantize_gelu_backward"]

_LITTLE = sys.byteorder == "little"


def _check_dtype(x: Tensor) -> None:
    if not x.dtype.is_floating_point or x.dtype == torch.float64:
        raise TypeError(f"slimfit_fx formats take float32, bfloat16 or float16 activations, got {x.dtype}; "
                        "float64 and integer tensors are kept unquantized")


def _codes(rows: Tensor, levels: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (uint8, rows' shape), scale and lo (fp32, one per row) of a [groups, width] fp32 block."""
    lo, hi = rows.amin(1), rows.amax(1)  # two reductions beat one aminmax over short rows (10x on the CPU)
    scale = (hi - lo).div_(levels)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = (rows - lo[:, None]).div_(safe[:, None])  # in [0, levels]
    if seed < 0:
        v.add_(0.5)  # then truncation is floor(v + 0.5)
    else:
        generator = torch.Generator(device=rows.device).manual_seed(seed)
        v.add_(torch.rand(rows.shape, generator=generator, device=rows.device)).clamp_(0, levels)
    # float -> int16 -> uint8 is several times faster on the CPU than float -> uint8
    return v.to(torch.int16).to(torch.uint8), scale, lo


def quantize_minmax(x: Tensor, bits: int, group_size: int, seed: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes, scale, lo)``: packed uint8 codes, fp32 scale and offset per group (module docstring).
    ``seed < 0``: round half up; else stochastic rounding from a generator seeded with ``seed``."""
    _check_dtype(x)
    flat = x.reshape(-1).to(torch.float32)
    n, levels = flat.numel(), (1 << bits) - 1
    full = n - n % group_size
    parts = []
    if full:
        parts.append(_codes(flat[:full].view(-1, group_size), levels, seed))
    if n > full:
        parts.append(_codes(flat[full:].view(1, -1), levels, -1 if seed < 0 else seed + 1))
    if not parts:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return torch.empty(0, dtype=torch.uint8, device=x.device), empty, empty.clone()
    codes = torch.cat([c.reshape(-1) for c, _, _ in parts]) if len(parts) > 1 else parts[0][0].reshape(-1)
    scale = torch.cat([s for _, s, _ in parts]) if len(parts) > 1 else parts[0][1]
    lo = torch.cat([m for _, _, m in parts]) if len(parts) > 1 else parts[0][2]
    return pack_codes(codes, bits), scale, lo


def dequantize_minmax(codes: Tensor, scale: Tensor, lo: Tensor, bits: int, group_size: int, numel: int,
                      dtype: torch.dtype) -> Tensor:
    """The flat tensor of ``numel`` values in ``dtype`` that ``quantize_minmax`` stored."""
    values = unpack_codes(codes, bits, numel).to(torch.float32)
    full = numel - numel % group_size
    if full:
        body = values[:full].view(-1, group_size)
        body.mul_(scale[: full // group_size, None]).add_(lo[: full // group_size, None])
    if numel > full:
        values[full:].mul_(scale[-1]).add_(lo[-1])
    return values.to(dtype)


def dequantize_gelu_backward(grad: Tensor, codes: Tensor, scale: Tensor, lo: Tensor, bits: int, group_size: int,
                             approximate: str) -> Tensor:
    """GELU's input gradient at the dequantized input: ``gelu_backward(grad, x_hat)``."""
    x = dequantize_minmax(codes, scale, lo, bits, group_size, grad.numel(), grad.dtype).view(grad.shape)
    return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)


# ----------------------------------------------------------------------------------- packing

def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (each ``< 2**bits``) ``8 // bits`` per byte, first element in the low bits."""
    codes = codes.reshape(-1)
    if bits == 8:
        return codes
    per = 8 // bits
    n = codes.numel()
    if n % per:
        codes = torch.cat([codes, codes.new_zeros(per - n % per)])
    if _LITTLE and codes.is_contiguous():
        # A word holds ``per`` codes in its bytes, first one lowest: move each to its bit field.
        word = codes.view(torch.int16 if per == 2 else torch.int32)
        packed = word & (1 << bits) - 1
        for j in range(1, per):
            packed |= (word >> (8 * j - bits * j)) & (((1 << bits) - 1) << (bits * j))
        return packed.to(torch.uint8)
    groups = codes.view(-1, per)
    packed = groups[:, 0].clone()
    for j in range(1, per):
        packed |= groups[:, j] << (bits * j)
    return packed


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of ``pack_codes``: the first ``numel`` codes, uint8."""
    packed = packed.reshape(-1)
    per = 8 // bits
    if packed.numel() != -(-numel // per):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} {bits}-bit codes")
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    fields = [packed & mask] + [(packed >> (bits * j)) & mask for j in range(1, per)]
    return torch.stack(fields, dim=1).view(-1)[:numel]


_GATHER = 0x0102040810204080  # multiplies bytes of 0/1 in a word into one byte of bits (no carries)
_SPREAD = 0x0101010101010101  # copies a byte into every byte of a word
_SELECT = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as int64: bit k of byte k


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean (or 0/1) tensor as ``ceil(numel / 8)`` bytes, element ``i`` in bit ``i % 8`` of byte ``i // 8``."""
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat.to(torch.bool)  # nonzero -> True; faster than != 0
    n = flat.numel()
    if n % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - n % 8)])
    if _LITTLE and flat.is_contiguous():
        words = flat.view(torch.uint8).view(torch.int64)
        return ((words * _GATHER) >> 56).to(torch.uint8)
    bytes_ = flat.view(-1, 8).to(torch.uint8)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=flat.device)
    return (bytes_ * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of ``pack_bits``: a flat boolean tensor of ``numel`` elements."""
    packed = packed.reshape(-1)
    if packed.numel() != -(-numel // 8):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {numel} bits")
    if _LITTLE:
        words = (packed.to(torch.int64) * _SPREAD) & _SELECT
        return words.view(torch.uint8).view(-1)[:numel] != 0
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).view(-1)[:numel] != 0
