"""Quantizers for activations saved for backward (shared/design/SLIMFIT.md section 5).

Only the copy saved for backward is quantized; the forward pass stays exact.
``quantize(x, fmt)`` returns a :class:`Quantized` whose tensors take exactly
``fmt.nbytes(x.numel())`` bytes of storage (the memory analysis predicts saved
bytes with that formula); ``dequantize(q)`` gives back a tensor of ``x``'s shape
and dtype.

Formats (``QuantFormat.kind``):

``"fixed"`` (the paper's): ``c = clamp(round(x / step), qmin, qmax)``, value = ``c * step``.
  Signed ``b`` bits: ``qmin = -2**(b-1)``, ``qmax = 2**(b-1) - 1``; unsigned: ``0 .. 2**b - 1``.
  Stored codes are offset binary: ``code = c + 2**(b-1)`` for signed formats, ``code = c``
  for unsigned ones, so every stored code is in ``0 .. 2**b - 1``.  Values outside the
  range are clamped to its ends (``+-inf`` included).

``"minmax"`` (ours, as in ActNN/GACT): per group of ``group_size`` consecutive elements of
  the flattened tensor (the last group may be shorter; no padding is stored) an fp32
  ``scale = (max - min) / (2**b - 1)`` and an fp32 ``offset = min``;
  ``code = clamp(round((x - min) / scale), 0, 2**b - 1)``, value = ``code * scale + min``.
  Nothing is clipped: the error is at most ``scale / 2`` (one ``scale`` with stochastic
  rounding) whatever the magnitudes.  A group whose values are all equal has ``scale = 0``,
  all codes 0, and dequantizes to ``min`` exactly.

Rounding: round to nearest with ties to even (``torch.round``); with ``fmt.stochastic``,
``floor(v + u)`` with ``u ~ U[0, 1)`` drawn from ``generator`` (the global RNG of the
tensor's device when ``None``: note that this advances it, so pass a generator where the
RNG stream must stay the one of the unquantized model).  Stochastic rounding is unbiased
for values inside the range and never off by one step or more.

Packing: for ``bits < 8`` the codes are packed ``8 // bits`` per byte, the first element in
the lowest bits (``pack`` / ``unpack``); a trailing partial byte is zero-filled.

Non-finite input (documented behaviour, no error, no host sync):
  * fixed: NaN is stored as the code of 0.0 and dequantizes to 0.0; ``+inf`` / ``-inf``
    are clamped to the largest / smallest representable value.
  * minmax: NaN is replaced by 0.0 and ``+-inf`` (and finite values beyond it) by
    ``+-float32_max / 2`` before the group min/max are taken, so a group holding an
    infinity dequantizes to huge (~1.7e38) but finite values in that group, and NaN to
    a value within ``scale / 2`` of 0.0.
  The forward pass is exact, so a non-finite activation still shows up in the loss.

Computation is vectorized and device generic (CPU and CUDA); the temporaries are one
full-size copy of the input (in the input's floating dtype for deterministic fixed-point,
fp32 otherwise) plus the uint8 codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .config import QuantFormat

__all__ = ["Quantized", "QuantMeta", "quantize", "dequantize", "pack", "unpack"]

# minmax: non-finite and huge inputs are clamped to +-_BIG so that max - min stays finite.
_BIG = torch.finfo(torch.float32).max / 2


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

    In an autograd Function::

        q = quantize(x, fmt)
        ctx.save_for_backward(*q.tensors())
        ctx.qmeta = q.meta
        ...
        x_hat = dequantize(ctx.qmeta.rebuild(ctx.saved_tensors))
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


# ---------------------------------------------------------------------------------------------
# packing


def _shifts(bits: int):
    return [bits * i for i in range(8 // bits)]


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (each ``< 2**bits``) ``8 // bits`` per byte, first element in the low bits.

    Returns a fresh 1-D uint8 tensor of ``ceil(n / (8 // bits))`` bytes; for ``bits == 8``
    the flattened codes themselves, without a copy when ``codes`` is contiguous (so then it
    shares ``codes``' storage).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    codes = codes.reshape(-1)
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack expects uint8 codes, got {codes.dtype}")
    if bits == 8:
        return codes  # reshape(-1) above: a view when contiguous, else a contiguous copy
    per = 8 // bits
    n = codes.numel()
    full = n // per
    out = torch.empty(-(-n // per), dtype=torch.uint8, device=codes.device)
    if full:
        body = codes[: full * per].view(full, per)
        dst = out[:full]
        dst.copy_(body[:, 0])
        for i, s in enumerate(_shifts(bits)[1:], start=1):
            dst.bitwise_or_(body[:, i] << s)
    rest = n - full * per
    if rest:
        tail = torch.zeros(per, dtype=torch.uint8, device=codes.device)
        tail[:rest] = codes[full * per:]
        out[full:] = pack(tail, bits)
    return out


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a 1-D uint8 tensor."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    packed = packed.reshape(-1)
    per = 8 // bits
    if packed.numel() != -(-numel // per):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} {bits}-bit codes")
    if bits == 8:
        return packed
    shifts = torch.tensor(_shifts(bits), dtype=torch.uint8, device=packed.device)
    out = (packed.unsqueeze(1) >> shifts).bitwise_and_((1 << bits) - 1)
    return out.view(-1)[:numel]


# ---------------------------------------------------------------------------------------------
# quantize / dequantize


def _round_(t: Tensor, stochastic: bool, generator) -> Tensor:
    """Round ``t`` to integers in place: nearest (ties to even) or stochastic."""
    if stochastic:
        noise = torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device)
        return t.add_(noise).floor_()
    return t.round_()


def _group_views(flat: Tensor, group_size: int):
    """2-D views ``[groups, width]`` covering ``flat``: the full groups, then the short last one."""
    n = flat.numel()
    full = n // group_size
    views = []
    if full:
        views.append(flat[: full * group_size].view(full, group_size))
    if n > full * group_size:
        views.append(flat[full * group_size:].view(1, -1))
    return views


def _per_group_(views, vecs, op):
    """Apply ``op(view, vec[:, None])`` in place to each group view, ``vecs`` holding one value per group."""
    start = 0
    for v in views:
        rows = v.shape[0]
        op(v, *(vec[start:start + rows].unsqueeze(1) for vec in vecs))
        start += rows


def _fresh_copy(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of ``x`` in ``dtype`` (logical element order), flattened."""
    t = torch.empty(x.shape, dtype=dtype, device=x.device)
    t.copy_(x)
    return t.view(-1)


def quantize(x: Tensor, fmt: QuantFormat, generator: Optional[torch.Generator] = None) -> Quantized:
    """Quantize ``x`` (any shape, strides, floating dtype, device) in format ``fmt``.

    ``generator`` feeds stochastic rounding (``fmt.stochastic``) and must live on ``x``'s device.
    """
    if not isinstance(fmt, QuantFormat):
        raise TypeError(f"fmt must be a QuantFormat, got {fmt!r}")
    shape, dtype = tuple(x.shape), x.dtype
    levels = (1 << fmt.bits) - 1
    if fmt.kind == "fixed":
        if fmt.stochastic or not x.dtype.is_floating_point:
            cdtype = torch.promote_types(x.dtype, torch.float32) if x.dtype.is_floating_point else torch.float32
        else:
            # power-of-two scaling and rounding to an integer <= 255 are exact in fp16/bf16 too
            cdtype = x.dtype
        t = torch.empty(x.shape, dtype=cdtype, device=x.device)  # contiguous, logical element order
        torch.mul(x, 1.0 / fmt.step, out=t)  # exact: the step is a power of two
        t = t.view(-1)
        _round_(t, fmt.stochastic, generator)
        qmin = -(1 << (fmt.bits - 1)) if fmt.signed else 0
        t.clamp_(qmin, qmin + levels).nan_to_num_(nan=0.0)
        if qmin:
            t.sub_(qmin)  # offset binary: stored code = c - qmin
        codes = t.to(torch.uint8)
        del t
        return Quantized(pack(codes, fmt.bits), None, None, shape, dtype, fmt)

    # minmax
    t = _fresh_copy(x, torch.float32)
    t.nan_to_num_(nan=0.0).clamp_(-_BIG, _BIG)
    views = _group_views(t, fmt.group_size)
    if views:
        lo = torch.cat([v.amin(dim=1) for v in views]) if len(views) > 1 else views[0].amin(dim=1)
        hi = torch.cat([v.amax(dim=1) for v in views]) if len(views) > 1 else views[0].amax(dim=1)
    else:
        lo = torch.empty(0, dtype=torch.float32, device=x.device)
        hi = torch.empty(0, dtype=torch.float32, device=x.device)
    scale = hi.sub_(lo).div_(levels)  # fresh, exactly one fp32 per group
    # divide (not multiply by 1/scale: that overflows for subnormal scales); scale 0 -> all codes 0
    div = torch.where(scale > 0, scale, torch.ones_like(scale))
    _per_group_(views, (lo, div), lambda v, m, d: v.sub_(m).div_(d))
    _round_(t, fmt.stochastic, generator)
    t.clamp_(0, levels)
    codes = t.to(torch.uint8)
    del t, views
    return Quantized(pack(codes, fmt.bits), scale, lo, shape, dtype, fmt)


def dequantize(q: Quantized) -> Tensor:
    """The values ``q`` stands for, as a contiguous tensor of the original shape and dtype."""
    fmt, n = q.fmt, q.numel
    codes = unpack(q.codes, fmt.bits, n)
    if fmt.kind == "fixed":
        cdtype = q.dtype if q.dtype.is_floating_point else torch.float32
        out = codes.to(cdtype)  # fresh
        if fmt.signed:
            out.sub_(1 << (fmt.bits - 1))
        out.mul_(fmt.step)
    else:
        out = codes.to(torch.float32)
        views = _group_views(out, fmt.group_size)
        _per_group_(views, (q.scale, q.offset), lambda v, s, m: v.mul_(s).add_(m))
    return out.to(q.dtype).view(q.shape)
