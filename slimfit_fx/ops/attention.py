"""Attention core that keeps Q, K, V and the softmax output quantized.

Takes SDPA's arguments (a mask may be boolean or additive, and may train) and the formats; gives
SDPA's output bit for bit (without dropout SDPA itself; with dropout the math kernel written out,
which is what CPU eager runs).  Keeps, each only while a gradient that needs it is due, Q (for dK),
K (for dQ), V and the softmax output P in their formats, and a dropout mask as bits or RNG state
(``ops.dropout.keep_mask``).  Softmax and its backward run in fp32 for bf16/fp16 inputs, as the
kernels do.  Never keeps a mask that trains: its gradient is the scores' (``op_table``'s SDPA rule
prices all this).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import saved
from .dropout import keep_mask, mask_from


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _repeat_kv(t, heads):
    return t if t.shape[-3] == heads else t.repeat_interleave(heads // t.shape[-3], dim=-3)


def _additive(mask, is_causal, n, m, dtype, device):
    """The float mask the math kernel adds to the scores (built in the query's own dtype)."""
    if is_causal:
        mask = torch.ones(n, m, dtype=torch.bool, device=device).tril()
    if mask is not None and mask.dtype == torch.bool:
        minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
        mask = torch.where(mask, torch.tensor(0.0, dtype=dtype, device=device), minus_inf)
    return mask


def _scores(q, k, mask, is_causal, scale, dtype):
    """Scaled scores plus mask, as the math kernel forms them (sqrt(scale) on each side)."""
    acc = _accumulate_dtype(dtype)
    mask = _additive(mask, is_causal, q.shape[-2], k.shape[-2], dtype, q.device)
    factor = math.sqrt(scale)
    scores = (q.to(acc) * factor) @ (k.to(acc).transpose(-2, -1) * factor)
    return scores if mask is None else scores + mask


def _math_attention(q, k, v, mask, p, is_causal, scale, mode, p_fmt):
    """(output, P as kept, kept mask) of SDPA's math kernel with dropout ``p``.  P is quantized
    before the dropout mask exists, so the quantizer's temporaries never meet it."""
    heads = q.shape[-3]
    probs = torch.ops.aten._safe_softmax(_scores(q, _repeat_kv(k, heads), mask, is_causal, scale, q.dtype), -1)
    kept_probs = saved.keep(probs, p_fmt)
    dropped, kept = keep_mask(probs, p, mode)
    out = dropped @ _repeat_kv(v, heads).to(probs.dtype)
    return out.to(q.dtype), kept_probs, kept


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, qk_fmt, v_fmt, p_fmt, mask_mode):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        heads = q.shape[-3]
        qk, vf, pf = (saved.fmt_from_args(a) for a in (qk_fmt, v_fmt, p_fmt))
        if dropout_p > 0:
            out, kept_probs, kept = _math_attention(q, k, v, mask, dropout_p, is_causal, scale, mask_mode, pf)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
            kept_probs = saved.keep(torch.ops.aten._safe_softmax(
                _scores(q, _repeat_kv(k, heads), mask, is_causal, scale, q.dtype), -1), pf)
            kept = None
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        ctx.mask_shape = None if mask is None else (mask.shape, mask.dtype)
        ctx.dropout_p, ctx.scale, ctx.heads, ctx.mask_mode = dropout_p, scale, heads, mask_mode
        ctx.kv_heads = k.shape[-3]
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        acc = _accumulate_dtype(q.dtype)
        ctx.probs_meta = ((*q.shape[:-1], k.shape[-2]), acc, q.device)
        saved.save(
            ctx,
            saved.keep(q, qk) if need_k else None,
            saved.keep(k, qk) if need_q else None,
            saved.keep(v, vf) if (need_q or need_k or need_mask) else None,
            kept_probs,
            kept,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        # With P_d = dropout(P): dV = P_d^T dO; dP_d = dO V^T; dP = dropout'(dP_d);
        # dS = P * (dP - rowsum(dP * P)); dQ = dS K * scale; dK = dS^T Q * scale.  P's rows are
        # renormalised first (quantized rows do not sum to one) so that dS's rows sum to zero, as
        # softmax's gradient must: what softmax is blind to (a key bias) gets no spurious gradient.
        q, k, v, probs, kept = saved.load(ctx)
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        shape, acc, device = ctx.probs_meta
        grad, probs = grad.to(acc), probs.to(acc)
        probs.div_(probs.sum(-1, keepdim=True).clamp_min_(torch.finfo(acc).tiny))  # fresh: dequantized
        mask = None
        if kept is not None:  # the 0/1 mask; its 1 / (1 - p) scale goes on the smaller dO-sized tensors
            mask = mask_from(kept, ctx.mask_mode, shape, acc, device, ctx.dropout_p, scaled=False)
            grad = grad * (1.0 / (1 - ctx.dropout_p))
        dq = dk = dv = dmask = None
        if need_v:
            dropped = probs if mask is None else probs * mask
            dv = _sum_heads(dropped.transpose(-1, -2) @ grad, ctx.kv_heads).to(ctx.dtypes[2])
            del dropped
        if need_q or need_k or need_mask:
            d_probs = grad @ _repeat_kv(v.to(acc), ctx.heads).transpose(-1, -2)
            if mask is not None:
                d_probs.mul_(mask)
            d_scores = torch._softmax_backward_data(d_probs, probs, -1, acc)
            del d_probs
            if need_q:
                dq = ((d_scores @ _repeat_kv(k.to(acc), ctx.heads)) * ctx.scale).to(ctx.dtypes[0])
            if need_k:
                dk = _sum_heads((d_scores.transpose(-1, -2) @ q.to(acc)) * ctx.scale, ctx.kv_heads)
                dk = dk.to(ctx.dtypes[1])
            if need_mask:  # an additive bias that trains (T5's, Swin's): its gradient is the scores'
                shape, dtype = ctx.mask_shape
                dmask = _sum_to(d_scores, shape).to(dtype)
        return dq, dk, dv, dmask, None, None, None, None, None, None, None, None


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` summed over the dimensions a tensor of ``shape`` was broadcast along to reach it."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1]
    return (t.sum(dims, keepdim=True) if dims else t).reshape(shape)


def _sum_heads(t, kv_heads):
    """Gradient of a GQA repeat: sum the query heads that shared each K/V head."""
    heads = t.shape[-3]
    if heads == kv_heads:
        return t
    return t.unflatten(-3, (kv_heads, heads // kv_heads)).sum(-3)


def attention_quantized(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                        qk_fmt=None, v_fmt=None, p_fmt=None, mask_mode="replay"):
    """``scaled_dot_product_attention`` keeping quantized Q, K, V and softmax output for backward;
    a dropout mask is kept as bits or replayed (``mask_mode``, see ``ops.dropout``)."""
    if not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if not any(t.requires_grad for t in (q, k, v)) and not (attn_mask is not None and attn_mask.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return _Attention.apply(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, qk_fmt, v_fmt, p_fmt,
                            mask_mode)
