"""Kernels of the saved-activation formats.

``reference`` holds the plain-torch implementations (the ground truth, and the CPU
kernels); ``triton_minmax`` the fused Triton kernels for CUDA; ``library`` registers
both as ``torch.ops.slimfit.*`` custom ops with fake implementations.  The runtime ops
in ``slimfit_fx.ops`` call them through ``slimfit_fx.quant``.
"""
from . import library, reference
from .library import triton_kernels

__all__ = ["library", "reference", "triton_kernels"]
