"""Triton kernels of the per-group min/max format (CUDA; the CPU runs them under TRITON_INTERPRET=1 in tests).

Same format, arithmetic and packing as ``reference.py``, one pass each way:

* ``quantize``: per block of ``ROWS`` groups, the min and max, then scale, rounding
  (half up, or Philox-uniform stochastic with ``tl.rand(seed, index)``) and packing,
  written as packed bytes, one fp32 scale and one fp32 offset per group;
* ``dequantize``: unpacking and scaling, written in the consumer's dtype;
* ``dequantize_gelu_backward``: dequantizing GELU's input fused with its derivative
  and the incoming gradient (exact or tanh GELU), so the input is never materialised.

Imported only where triton is installed; ``library.py`` routes CUDA tensors here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize", "dequantize", "dequantize_gelu_backward"]

_ROWS = 8
_BLOCK = 1024


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scale_ptr, lo_ptr, n, seed, G: tl.constexpr, BITS: tl.constexpr,
                     ROWS: tl.constexpr, STOCHASTIC: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    W: tl.constexpr = G // PER
    LEVELS: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, W)
    base = rows[:, None] * G + cols[None, :] * PER
    lo = tl.full((ROWS,), float("inf"), tl.float32)
    hi = tl.full((ROWS,), float("-inf"), tl.float32)
    for j in tl.static_range(PER):
        off = base + j
        v = tl.load(x_ptr + off, mask=off < n, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(off < n, v, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(off < n, v, float("-inf")), axis=1))
    scale = (hi - lo) / LEVELS
    safe = tl.where(scale > 0, scale, 1.0)
    packed = tl.zeros((ROWS, W), tl.int32)
    for j in tl.static_range(PER):
        off = base + j
        v = tl.load(x_ptr + off, mask=off < n, other=0.0).to(tl.float32)
        if STOCHASTIC:
            r = tl.rand(seed, off)
        else:
            r = 0.5
        c = tl.floor((v - lo[:, None]) / safe[:, None] + r)
        c = tl.minimum(tl.maximum(c, 0.0), LEVELS).to(tl.int32)
        c = tl.where(off < n, c, 0)
        packed = packed | (c << (j * BITS))
    byte = rows[:, None] * W + cols[None, :]
    tl.store(codes_ptr + byte, packed.to(tl.uint8), mask=byte < (n + PER - 1) // PER)
    valid = rows * G < n
    tl.store(scale_ptr + rows, scale, mask=valid)
    tl.store(lo_ptr + rows, lo, mask=valid)


@triton.jit
def _dequantized(codes_ptr, scale_ptr, lo_ptr, i, valid, G: tl.constexpr, BITS: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    byte = tl.load(codes_ptr + i // PER, mask=valid, other=0).to(tl.int32)
    code = (byte >> ((i % PER) * BITS)) & ((1 << BITS) - 1)
    group = i // G
    scale = tl.load(scale_ptr + group, mask=valid, other=0.0)
    lo = tl.load(lo_ptr + group, mask=valid, other=0.0)
    return code.to(tl.float32) * scale + lo


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, lo_ptr, out_ptr, n, G: tl.constexpr, BITS: tl.constexpr,
                       BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    x = _dequantized(codes_ptr, scale_ptr, lo_ptr, i, valid, G, BITS)
    tl.store(out_ptr + i, x.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _tanh(y):
    y = tl.minimum(tl.maximum(y, -20.0), 20.0)  # saturated in fp32 long before; keeps exp finite
    return 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)


@triton.jit
def _gelu_backward_kernel(grad_ptr, codes_ptr, scale_ptr, lo_ptr, out_ptr, n, G: tl.constexpr, BITS: tl.constexpr,
                          TANH: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    x = _dequantized(codes_ptr, scale_ptr, lo_ptr, i, valid, G, BITS)
    g = tl.load(grad_ptr + i, mask=valid, other=0.0).to(tl.float32)
    if TANH:
        beta = 0.7978845608028654  # sqrt(2 / pi)
        kappa = 0.044715
        inner = beta * (x + kappa * x * x * x)
        t = _tanh(inner)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * beta * (1.0 + 3.0 * kappa * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        d = cdf + x * pdf
    tl.store(out_ptr + i, (g * d).to(out_ptr.dtype.element_ty), mask=valid)


def _empty_meta(n: int, bits: int, group_size: int, device) -> tuple:
    per = 8 // bits
    groups = -(-n // group_size)
    return (torch.empty(-(-n // per), dtype=torch.uint8, device=device),
            torch.empty(groups, dtype=torch.float32, device=device),
            torch.empty(groups, dtype=torch.float32, device=device))


def supports(bits: int, group_size: int) -> bool:
    """The quantize kernel lays a group out as ``group_size / (8 // bits)`` bytes: a power of two."""
    per = 8 // bits
    width = group_size // per
    return group_size % per == 0 and width > 0 and width & (width - 1) == 0


def quantize(x: torch.Tensor, bits: int, group_size: int, seed: int) -> tuple:
    """``library.quantize_minmax`` on CUDA: one kernel launch."""
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    codes, scale, lo = _empty_meta(n, bits, group_size, x.device)
    if n:
        grid = (triton.cdiv(scale.numel(), _ROWS),)
        _quantize_kernel[grid](flat, codes, scale, lo, n, max(seed, 0), G=group_size, BITS=bits, ROWS=_ROWS,
                               STOCHASTIC=seed >= 0)
    return codes, scale, lo


def dequantize(codes, scale, lo, bits: int, group_size: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``library.dequantize_minmax`` on CUDA: one kernel launch."""
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel:
        _dequantize_kernel[(triton.cdiv(numel, _BLOCK),)](codes, scale, lo, out, numel, G=group_size, BITS=bits,
                                                          BLOCK=_BLOCK)
    return out


def dequantize_gelu_backward(grad, codes, scale, lo, bits: int, group_size: int, approximate: str) -> torch.Tensor:
    """``library.dequantize_gelu_backward`` on CUDA: one kernel launch, the input never materialised."""
    flat = grad.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        _gelu_backward_kernel[(triton.cdiv(n, _BLOCK),)](flat, codes, scale, lo, out, n, G=group_size, BITS=bits,
                                                         TANH=approximate == "tanh", BLOCK=_BLOCK)
    return out.view(grad.shape)
