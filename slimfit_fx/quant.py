"""The saved-activation formats: quantizers, and the byte counts both the prediction and the ops use.

Takes float32, bfloat16 or float16 tensors of any shape and strides (anything else is a
``TypeError``: the passes keep such tensors unquantized) and a ``QuantFormat``.  Gives
``quantize(x, fmt)``, a :class:`Quantized` of exactly ``fmt.nbytes(x.numel())`` bytes, and
``dequantize(q)``, a tensor of ``x``'s shape and dtype; and the byte formulas of what the runtime
ops keep (``mask_nbytes``, ``keep_count``, ``pruned_layernorm_bytes``), so prediction and run agree.

``"minmax"`` (default): per-group min/max codes, the ``torch.ops.slimfit`` kernels
(``kernels.reference`` states the arithmetic); error at most half a group's step, nothing clipped.
``"fixed"`` (the SlimFit paper's): ``c = clamp(round(x / step), qmin, qmax)`` stands for
``c * step``, signed ``b`` bits ``-2**(b-1) .. 2**(b-1) - 1`` or unsigned ``0 .. 2**b - 1``, stored
offset binary (``c - qmin``) and packed like the min/max codes; ties to even, NaN stores 0.0 and
``+-inf`` the range ends.  Never quantizes the forward's own values, and never draws stochastic
rounding from the global RNG (``generator`` only), so dropout masks stay those of the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .config import QuantFormat
from .kernels.reference import pack_codes, unpack_codes

__all__ = ["Quantized", "QuantMeta", "quantize", "dequantize", "pack", "unpack", "accepts", "mask_nbytes",
           "keep_count", "pruned_index_dtype", "pruned_layernorm_bytes"]

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


def keep_count(row: int, keep_ratio: float) -> int:
    """Values a pruned norm keeps per row of ``row`` elements (``ops.layernorm``, ``ops.rmsnorm``)."""
    return max(1, math.ceil(keep_ratio * row))


def pruned_index_dtype(row: int) -> torch.dtype:
    """Dtype of a pruned norm's column indices: int16, int32 past 32,767 columns."""
    return torch.int16 if row <= torch.iinfo(torch.int16).max else torch.int32


def pruned_layernorm_bytes(rows: int, row: int, dtype: torch.dtype, keep_ratio: float) -> int:
    """Bytes of a pruned LayerNorm (or RMSNorm) save: top-k values and their column indices per row."""
    return rows * keep_count(row, keep_ratio) * (dtype.itemsize + pruned_index_dtype(row).itemsize)


class _Shaped:
    """``numel`` of a class with a ``shape``: the quantized tensor's element count."""

    @property
    def numel(self) -> int:
        """Elements of the tensor that was quantized."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class QuantMeta(_Shaped):
    """The Python (non-tensor) part of a :class:`Quantized`: keep it on an autograd ctx."""

    shape: tuple
    dtype: torch.dtype
    fmt: QuantFormat

    @property
    def ntensors(self) -> int:
        """How many tensors ``Quantized.tensors()`` returns for this format (1 or 3)."""
        return 3 if self.fmt.kind == "minmax" else 1

    def rebuild(self, tensors: Sequence[Tensor]) -> "Quantized":
        """The ``Quantized`` these are the meta of, from its ``tensors()``."""
        return Quantized.from_tensors(tensors, self)


@dataclass
class Quantized(_Shaped):
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
    def meta(self) -> QuantMeta:
        """The Python part: keep it on ctx, the ``tensors()`` with ``save_for_backward``."""
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
