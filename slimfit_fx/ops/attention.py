"""Attention core that keeps Q, K, V and the softmax output quantized.

Forward: the output is ``scaled_dot_product_attention`` itself, called with
the model's arguments, so it is bit-identical to eager on every kernel and
draws the same dropout mask from the same RNG state.  For backward it keeps
Q and K (int8 in the paper), V (int8), the softmax output P (uint8, recomputed
once from Q and K) and the RNG state of the call; no N x N dropout mask.

Backward, with P_d = dropout(P) replayed from the RNG state:
  dV = P_d^T dO;  dP_d = dO V^T;  dP = dropout'(dP_d);
  dS = P * (dP - rowsum(dP * P));  dQ = dS K * scale;  dK = dS^T Q * scale.
Each tensor is kept only when a gradient that needs it is due: Q for dK, K for
dQ, V and P for any (the op table in analysis.py prices the same conditions).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _saved
from .dropout import replay_mask, rng_state


def _scores_softmax(q, k, mask, is_causal, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        n, m = s.shape[-2], s.shape[-1]
        causal = torch.ones(n, m, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    # Rows with every key masked give zeros, as SDPA's math kernel does.
    return torch.ops.aten._safe_softmax(s, -1)


def _repeat_kv(t, heads):
    return t if t.shape[-3] == heads else t.repeat_interleave(heads // t.shape[-3], dim=-3)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, qk_fmt, v_fmt, p_fmt):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        state = rng_state(q.device) if dropout_p > 0 else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        heads = q.shape[-3]
        acc = _accumulate_dtype(q.dtype)  # as the kernels do: softmax and its backward in fp32
        probs = _scores_softmax(q.to(acc), _repeat_kv(k, heads).to(acc), mask, is_causal, scale)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        ctx.dropout_p, ctx.scale, ctx.heads = dropout_p, scale, heads
        ctx.kv_heads = k.shape[-3]
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.probs_meta = (probs.shape, q.dtype, probs.device)
        qk, vf, pf = (_saved.fmt_from_args(a) for a in (qk_fmt, v_fmt, p_fmt))
        _saved.save(
            ctx,
            _saved.keep(q, qk) if need_k else None,
            _saved.keep(k, qk) if need_q else None,
            _saved.keep(v, vf) if (need_q or need_k) else None,
            _saved.keep(probs, pf),
            state,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs, state = _saved.load(ctx)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        acc = _accumulate_dtype(grad.dtype)
        grad, probs = grad.to(acc), probs.to(acc)
        # Quantized rows no longer sum to one; renormalised, the softmax gradient's rows sum to zero
        # again, so what softmax is blind to (a key bias) gets no spurious gradient.
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
        if ctx.dropout_p > 0:
            shape, dtype, device = ctx.probs_meta
            noise = replay_mask(state, shape, dtype, device, ctx.dropout_p).to(acc)
        else:
            noise = None
        dq = dk = dv = None
        if need_v:
            dropped = probs if noise is None else probs * noise
            dv = _sum_heads(dropped.transpose(-1, -2) @ grad, ctx.kv_heads).to(ctx.dtypes[2])
        if need_q or need_k:
            d_dropped = grad @ _repeat_kv(v.to(acc), ctx.heads).transpose(-1, -2)
            d_probs = d_dropped if noise is None else d_dropped * noise
            d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
            if need_q:
                dq = ((d_scores @ _repeat_kv(k.to(acc), ctx.heads)) * ctx.scale).to(ctx.dtypes[0])
            if need_k:
                dk = _sum_heads((d_scores.transpose(-1, -2) @ q.to(acc)) * ctx.scale, ctx.kv_heads).to(ctx.dtypes[1])
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _sum_heads(t, kv_heads):
    """Gradient of a GQA repeat: sum the query heads that shared each K/V head."""
    heads = t.shape[-3]
    if heads == kv_heads:
        return t
    return t.unflatten(-3, (kv_heads, heads // kv_heads)).sum(-3)


def attention_quantized(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                        qk_fmt=None, v_fmt=None, p_fmt=None):
    """``scaled_dot_product_attention`` keeping quantized Q, K, V and softmax output for backward."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None and attn_mask.requires_grad:
        raise NotImplementedError("attention_quantized: a trainable attention mask is not supported; "
                                  "turn attention quantization off (SlimFitConfig(attn_*_format=None))")
    return _Attention.apply(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, qk_fmt, v_fmt, p_fmt)
