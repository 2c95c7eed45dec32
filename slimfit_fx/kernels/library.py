"""The formats' kernels as ``torch.library`` custom ops (namespace ``slimfit``).

Each op has a fake implementation (shapes and dtypes only), so ``torch.compile``
and ``torch.export`` see one opaque op; the CPU (and any device without a
dedicated kernel) runs ``reference.py``; CUDA runs the Triton kernels of
``triton_minmax.py`` when triton is installed and the group layout suits them.

* ``slimfit::quantize_minmax(x, bits, group_size, seed) -> (codes, scale, lo)``
* ``slimfit::dequantize_minmax(codes, scale, lo, bits, group_size, numel, dtype) -> flat``
* ``slimfit::dequantize_gelu_backward(grad, codes, scale, lo, bits, group_size, approximate) -> grad_in``
* ``slimfit::pack_bits(mask) -> bytes`` and ``slimfit::unpack_bits(bytes, numel) -> bool``
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference

__all__ = ["triton_kernels", "quantize_minmax", "dequantize_minmax", "dequantize_gelu_backward", "pack_bits",
           "unpack_bits"]


def triton_kernels():
    """The Triton module, or None where triton is not installed."""
    try:
        from . import triton_minmax
    except ImportError:
        return None
    return triton_minmax


@torch.library.custom_op("slimfit::quantize_minmax", mutates_args=())
def quantize_minmax(x: Tensor, bits: int, group_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes, scale, lo)`` of ``x`` in per-group min/max ``bits``-bit codes (``seed`` < 0: round to nearest)."""
    return reference.quantize_minmax(x, bits, group_size, seed)


@quantize_minmax.register_fake
def _(x, bits, group_size, seed):
    n = x.numel()
    groups = -(-n // group_size)
    return (x.new_empty(-(-n // (8 // bits)), dtype=torch.uint8), x.new_empty(groups, dtype=torch.float32),
            x.new_empty(groups, dtype=torch.float32))


@torch.library.custom_op("slimfit::dequantize_minmax", mutates_args=())
def dequantize_minmax(codes: Tensor, scale: Tensor, lo: Tensor, bits: int, group_size: int, numel: int,
                      dtype: torch.dtype) -> Tensor:
    """The ``numel`` values ``quantize_minmax`` coded, flat, in ``dtype``."""
    return reference.dequantize_minmax(codes, scale, lo, bits, group_size, numel, dtype)


@dequantize_minmax.register_fake
def _(codes, scale, lo, bits, group_size, numel, dtype):
    return codes.new_empty(numel, dtype=dtype)


@torch.library.custom_op("slimfit::dequantize_gelu_backward", mutates_args=())
def dequantize_gelu_backward(grad: Tensor, codes: Tensor, scale: Tensor, lo: Tensor, bits: int, group_size: int,
                             approximate: str) -> Tensor:
    """GELU's input gradient at the coded input: ``grad * gelu'(dequantized x)``."""
    return reference.dequantize_gelu_backward(grad, codes, scale, lo, bits, group_size, approximate)


@dequantize_gelu_backward.register_fake
def _(grad, codes, scale, lo, bits, group_size, approximate):
    return torch.empty_like(grad)


@torch.library.custom_op("slimfit::pack_bits", mutates_args=())
def pack_bits(mask: Tensor) -> Tensor:
    """A boolean (or 0/1) mask packed eight elements a byte."""
    return reference.pack_bits(mask)


@pack_bits.register_fake
def _(mask):
    return mask.new_empty(-(-mask.numel() // 8), dtype=torch.uint8)


@torch.library.custom_op("slimfit::unpack_bits", mutates_args=())
def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` elements of a ``pack_bits`` mask, as a flat boolean tensor."""
    return reference.unpack_bits(packed, numel)


@unpack_bits.register_fake
def _(packed, numel):
    return packed.new_empty(numel, dtype=torch.bool)


def _register_triton() -> None:
    kernels = triton_kernels()
    if kernels is None:
        return

    @quantize_minmax.register_kernel("cuda")
    def _(x, bits, group_size, seed):
        if not kernels.supports(bits, group_size):
            return reference.quantize_minmax(x, bits, group_size, seed)
        return kernels.quantize(x, bits, group_size, seed)

    @dequantize_minmax.register_kernel("cuda")
    def _(codes, scale, lo, bits, group_size, numel, dtype):
        return kernels.dequantize(codes, scale, lo, bits, group_size, numel, dtype)

    @dequantize_gelu_backward.register_kernel("cuda")
    def _(grad, codes, scale, lo, bits, group_size, approximate):
        return kernels.dequantize_gelu_backward(grad, codes, scale, lo, bits, group_size, approximate)


_register_triton()
