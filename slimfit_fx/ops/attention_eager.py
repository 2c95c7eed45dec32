"""Attention written out in ops (HF's eager attention, Gemma2's soft-capped scores) keeping Q, K, V
and the softmax output quantized.

Forward: the very ops HF's ``eager_attention_forward`` runs, ``softmax(cap * tanh(q k^T * scaling /
cap) + mask) v``, so its output is bit for bit eager's.  Kept for backward: Q and K in ``qk_fmt``,
V in ``v_fmt`` and the softmax output in ``p_fmt`` while Q or K needs grad (V's gradient needs only
the softmax output).  The soft cap's derivative ``1 - tanh^2`` is recomputed in backward from the
dequantized Q and K: eager keeps that ``S x S`` tanh; this op never does.  No dropout, no mask
gradient (the pattern matches neither).
"""
from __future__ import annotations

import torch

from . import saved


def _scores(q, k, scaling, softcap):
    s = torch.matmul(q, k.transpose(-2, -1)) * scaling
    return s if softcap is None else torch.tanh(s / softcap) * softcap


class _EagerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, softcap, qk_fmt, v_fmt, p_fmt):
        s = _scores(q, k, scaling, softcap)
        probs = torch.softmax(s if mask is None else s + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)
        qk, vf, pf = (saved.fmt_from_args(a) for a in (qk_fmt, v_fmt, p_fmt))
        scores_grad = q.requires_grad or k.requires_grad
        ctx.scaling, ctx.softcap, ctx.dtypes = scaling, softcap, (q.dtype, k.dtype, v.dtype)
        saved.save(ctx, saved.keep(q, qk) if scores_grad else None, saved.keep(k, qk) if scores_grad else None,
                    saved.keep(v, vf) if scores_grad else None, saved.keep(probs, pf))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = saved.load(ctx)
        grad, probs = grad.float(), probs.float()
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        dv = dq = dk = None
        if ctx.needs_input_grad[2]:
            dv = (probs.transpose(-2, -1) @ grad).to(ctx.dtypes[2])
        if q is not None:
            q, k = q.float(), k.float()
            d_scores = torch._softmax_backward_data(grad @ v.float().transpose(-2, -1), probs, -1, torch.float32)
            if ctx.softcap is not None:
                t = torch.tanh(torch.matmul(q, k.transpose(-2, -1)) * ctx.scaling / ctx.softcap)
                d_scores = d_scores * (1 - t * t)
            d_scores = d_scores * ctx.scaling
            if ctx.needs_input_grad[0]:
                dq = (d_scores @ k).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                dk = (d_scores.transpose(-2, -1) @ q).to(ctx.dtypes[1])
        return dq, dk, dv, None, None, None, None, None, None


def eager_attention_quantized(q, k, v, mask=None, scaling=1.0, softcap=None, qk_fmt=None, v_fmt=None, p_fmt=None):
    """HF's eager attention (optionally soft-capped) keeping quantized Q, K, V and probabilities."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        s = _scores(q, k, scaling, softcap)
        return torch.matmul(torch.softmax(s if mask is None else s + mask, -1, dtype=torch.float32).to(q.dtype), v)
    return _EagerAttention.apply(q, k, v, mask, scaling, softcap, qk_fmt, v_fmt, p_fmt)
