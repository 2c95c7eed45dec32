"""Quantizers for activations saved for backward: the formats layer's public face.

Only the copy saved for backward is quantized; the forward pass stays exact.
``quantize(x, fmt)`` returns a :class:`Quantized` whose tensors take exactly
``fmt.nbytes(x.numel())`` bytes (the memory analysis predicts saved bytes with
that formula); ``dequantize(q)`` gives back a tensor of ``x``'s shape and dtype.
Inputs: float32, bfloat16 or float16 of any shape and strides; anything else is a
``TypeError`` (the passes keep such tensors unquantized instead).

Formats (``QuantFormat.kind``):

``"minmax"`` (the default): per-group min/max scaling, computed by the
  ``torch.ops.slimfit`` kernels (``slimfit_fx.kernels``, whose ``reference`` module
  states the arithmetic): codes packed ``8 // bits`` per byte, an fp32 scale and
  offset per group, error at most half a group's step (one step with stochastic
  rounding), nothing clipped.

``"fixed"`` (the SlimFit paper's): ``c = clamp(round(x / step), qmin, qmax)``, value
  ``c * step``.  Signed ``b`` bits: ``qmin = -2**(b-1)``, ``qmax = 2**(b-1) - 1``;
  unsigned: ``0 .. 2**b - 1``.  Stored codes are offset binary (``c - qmin``), packed
  like the min/max codes.  Rounding to nearest, ties to even; NaN stores 0.0 and
  ``+-inf`` the range ends.

Stochastic rounding draws from ``generator`` (fixed: uniform noise on ``x``'s device;
minmax: a 62-bit seed for the kernel's own counter-based generator), never from the
global RNG, so dropout masks stay those of the unquantized model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .config import QuantFormat
from .kernels import library as _kernels
from .kernels.reference import pack_codes, unpack_codes

__all__ = ["Quantized", "QuantMeta", "quantize", "dequantize", "pack", "unpack", "accepts", "mask_nbytes"]

_RNG_STATE_BYTES = {"cuda": 16}  # a Philox seed and offset; the CPU's Mersenne state is read off torch


def mask_nbytes(numel: int, mode: str, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes a dropout mask of ``numel`` elements of ``dtype`` keeps in ``mode`` (``ops.dropout.keep_mask``):
    ``"bits"`` one bit each; ``"replay"`` the RNG state; ``"full"`` eager's mask (the CPU's float noise,
    CUDA's bool mask)."""
    if mode == "bits":
        return -(-numel // 8)
    if mode == "full":
        return numel * (dtype.itemsize if device.type == "cpu" else 1)
    if device.type in _RNG_STATE_BYTES:
        return _RNG_STATE_BYTES[device.type]
    state = torch.get_rng_state()
    return state.numel() * state.element_size()


def accepts(dtype: torch.dtype) -> bool:
    """Whether the formats take activations of this dtype (float32, bfloat16, float16)."""
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class QuantMeta:
    """The Python (non-tensor) part of a :class:`Quantized`: keep it on an autograd ctx."""

    shape: tuple
    dtype: torch.dtype
    fmt: QuantFormat

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ntensors(self) -> int:
        """How many tensors ``Quantized.tensors()`` returns for this format (1 or 3)."""
        return 3 if self.fmt.kind == "minmax" else 1

    def rebuild(self, tensors: Sequence[Tensor]) -> "Quantized":
        return Quantized.from_tensors(tensors, self)


@dataclass
class Quantized:
    """A quantized tensor: storage tensors plus Python metadata.

    ``codes``: uint8, 1-D, ``ceil(numel / (8 // bits))`` bytes (packed when ``bits < 8``).
    ``scale``, ``offset``: fp32, one per group, for ``kind="minmax"``; ``None`` for ``"fixed"``.
    In an autograd Function keep ``q.tensors()`` with ``save_for_backward`` and ``q.meta``
    on ctx; ``ctx.qmeta.rebuild(ctx.saved_tensors)`` gives it back.
    """

    codes: Tensor
    scale: Optional[Tensor]
    offset: Optional[Tensor]
    shape: tuple
    dtype: torch.dtype
    fmt: QuantFormat

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def meta(self) -> QuantMeta:
        return QuantMeta(tuple(self.shape), self.dtype, self.fmt)

    def tensors(self) -> tuple:
        """The storage tensors: ``(codes,)`` for fixed, ``(codes, scale, offset)`` for minmax."""
        if self.fmt.kind == "minmax":
            return (self.codes, self.scale, self.offset)
        return (self.codes,)

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], meta: QuantMeta) -> "Quantized":
        """Inverse of ``(q.tensors(), q.meta)``."""
        tensors = tuple(tensors)
        if len(tensors) != meta.ntensors:
            raise ValueError(f"a {meta.fmt.kind} Quantized has {meta.ntensors} tensors, got {len(tensors)}")
        codes, scale, offset = (tensors + (None, None))[:3]
        return cls(codes, scale, offset, tuple(meta.shape), meta.dtype, meta.fmt)

    def nbytes(self) -> int:
        """Total bytes of the storage tensors; equals ``fmt.nbytes(numel)``."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (each ``< 2**bits``) ``8 // bits`` per byte, first element in the low bits."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack expects uint8 codes, got {codes.dtype}")
    return pack_codes(codes, bits)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a 1-D uint8 tensor."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    return unpack_codes(packed, bits, numel)


def quantize(x: Tensor, fmt: QuantFormat, generator: Optional[torch.Generator] = None) -> Quantized:
    """Quantize ``x`` (float32/bfloat16/float16, any shape and strides, any device) in format ``fmt``."""
    if not isinstance(fmt, QuantFormat):
        raise TypeError(f"fmt must be a QuantFormat, got {fmt!r}")
    if not accepts(x.dtype):
        raise TypeError(f"slimfit_fx formats take float32, bfloat16 or float16 activations, got {x.dtype}")
    shape, dtype = tuple(x.shape), x.dtype
    if fmt.kind == "minmax":
        seed = _seed(generator) if fmt.stochastic else -1
        codes, scale, lo = torch.ops.slimfit.quantize_minmax(x.detach(), fmt.bits, fmt.group_size, seed)
        return Quantized(codes, scale, lo, shape, dtype, fmt)
    return Quantized(_quantize_fixed(x.detach(), fmt, generator), None, None, shape, dtype, fmt)


def dequantize(q: Quantized) -> Tensor:
    """The values ``q`` stands for, as a contiguous tensor of the original shape and dtype."""
    fmt = q.fmt
    if fmt.kind == "minmax":
        flat = torch.ops.slimfit.dequantize_minmax(q.codes, q.scale, q.offset, fmt.bits, fmt.group_size, q.numel,
                                                   q.dtype)
        return flat.view(q.shape)
    codes = unpack_codes(q.codes, fmt.bits, q.numel)
    out = codes.to(q.dtype)  # fresh; codes <= 255 and steps are powers of two: exact in fp16/bf16 too
    if fmt.signed:
        out.sub_(1 << (fmt.bits - 1))
    return out.mul_(fmt.step).view(q.shape)


def _seed(generator: Optional[torch.Generator]) -> int:
    # The kernels' counter-based generator needs a seed only: drawn on the host, no device sync.
    return int(torch.randint(0, 1 << 62, (1,), generator=generator))


def _quantize_fixed(x: Tensor, fmt: QuantFormat, generator) -> Tensor:
    levels = (1 << fmt.bits) - 1
    # power-of-two scaling and rounding to an integer <= 255 are exact in fp16/bf16 too
    cdtype = torch.float32 if fmt.stochastic else x.dtype
    t = torch.empty(x.shape, dtype=cdtype, device=x.device)  # contiguous, logical element order
    torch.mul(x, 1.0 / fmt.step, out=t)  # exact: the step is a power of two
    t = t.view(-1)
    if fmt.stochastic:
        t.add_(torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device)).floor_()
    else:
        t.round_()
    qmin = -(1 << (fmt.bits - 1)) if fmt.signed else 0
    t.clamp_(qmin, qmin + levels).nan_to_num_(nan=0.0)
    if qmin:
        t.sub_(qmin)  # offset binary: stored code = c - qmin
    return pack_codes(t.to(torch.uint8), fmt.bits)
