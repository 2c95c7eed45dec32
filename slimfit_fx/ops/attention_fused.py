"""Attention on PyTorch's fused kernels that keeps Q, K, V and the output quantized.

Takes SDPA's arguments without dropout, the kernel to drive (``attention_kernels.kernel_for``:
flash-for-CPU on the CPU, flash or memory-efficient on CUDA) and the formats; gives that kernel's
output, bit for bit eager's.  Keeps Q, K, V and the output in their formats, the per-row
log-sum-exp (and on CUDA the kernel's RNG state) and the mask as given; its backward is the same
kernel's, on the dequantized tensors.  Never keeps an ``S x S`` tensor; never takes dropout or a
mask that trains (``op_table.attention_choice`` sends those elsewhere).  Only the CPU branch has
run (tests/test_decoder_ops.py); the CUDA ones follow what SDPA hands those kernels.
"""
from __future__ import annotations

import math

import torch

from . import saved

aten = torch.ops.aten


def _float_mask(mask, dtype):
    """The additive mask SDPA hands its kernels: a boolean mask becomes 0 / -inf in ``dtype``."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _efficient_bias(mask, q, k):
    """The bias SDPA hands the memory-efficient kernel (as ``preprocess_mask`` does): additive, its
    rows padded to a multiple of 16 elements (the kernel reads them aligned) and sliced back, expanded
    to batch x heads x queries x keys."""
    bias = _float_mask(mask, q.dtype)
    if bias is None:
        return None
    n = bias.shape[-1]
    if n % 16 or bias.stride(-2) % 16:
        bias = torch.nn.functional.pad(bias, (0, (-n) % 16))[..., :n]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _forward(backend, q, k, v, mask, is_causal, scale):
    """``(out, logsumexp, extras)`` of the kernel ``backend``."""
    if backend == "flash_cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=_float_mask(mask, q.dtype), scale=scale)
        return out, lse, ()
    if backend == "flash":
        out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=scale)
        return out, lse, (cq, ck, mq, mk, seed, offset)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, _efficient_bias(mask, q, k), True, 0.0, is_causal, scale=scale)
    return out, lse, (seed, offset)


def _backward(backend, grad, q, k, v, out, lse, extras, mask, is_causal, scale):
    if backend == "flash_cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, is_causal, attn_mask=_float_mask(mask, q.dtype), scale=scale)
    if backend == "flash":
        cq, ck, mq, mk, seed, offset = extras
        return aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0, is_causal, seed, offset, scale=scale)
    seed, offset = extras
    bias = _efficient_bias(mask, q, k)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], is_causal, scale=scale)
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale, backend, qk_fmt, v_fmt, o_fmt):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out, lse, extras = _forward(backend, q, k, v, mask, is_causal, scale)
        tensors = [t for t in extras if isinstance(t, torch.Tensor)]
        # Non-tensor extras (CUDA flash's max sequence lengths) stay on ctx; tensors go through save.
        ctx.args = (backend, is_causal, scale, [(isinstance(t, torch.Tensor), t) for t in extras])
        ctx.args = ctx.args[:3] + ([(is_t, None if is_t else t) for is_t, t in ctx.args[3]],)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, out.dtype)
        qk, vf, of = (saved.fmt_from_args(a) for a in (qk_fmt, v_fmt, o_fmt))
        saved.save(ctx, saved.keep(q, qk), saved.keep(k, qk), saved.keep(v, vf), saved.keep(out, of), lse,
                    mask, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, mask, *tensors = saved.load(ctx)
        backend, is_causal, scale, extras = ctx.args
        it = iter(tensors)
        extras = [next(it) if is_tensor else value for is_tensor, value in extras]
        q, k, v, out = (t.to(d) for t, d in zip((q, k, v, out), ctx.dtypes))
        dq, dk, dv = _backward(backend, grad.contiguous(), q, k, v, out, lse, extras, mask, is_causal, scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def attention_fused_quantized(q, k, v, attn_mask=None, is_causal=False, scale=None, backend="flash_cpu",
                              qk_fmt=None, v_fmt=None, o_fmt=None):
    """``scaled_dot_product_attention`` on ``backend`` keeping quantized Q, K, V and output."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                                scale=scale)
    return _FusedAttention.apply(q, k, v, attn_mask, is_causal, scale, backend, qk_fmt, v_fmt, o_fmt)
