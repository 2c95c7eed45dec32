"""The decoder ops (RMSNorm, gated MLP, cross-entropy without logits, fused quantized attention)
against eager PyTorch, across dtypes, odd shapes and frozen states."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimfit_fx import QuantFormat
from slimfit_fx.ops.attention_eager import eager_attention_quantized
from slimfit_fx.ops.attention_fused import attention_fused_quantized
from slimfit_fx.ops.cross_entropy import linear_cross_entropy
from slimfit_fx.ops.glu import glu
from slimfit_fx.ops.rmsnorm import rms_norm
from slimfit_fx.ops.saved import fmt_to_args

INT8 = fmt_to_args(QuantFormat.minmax(8))
INT4 = fmt_to_args(QuantFormat.minmax(4))


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def llama_rms(x, w, eps):
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def gemma_rms(x, w, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + w.float())).type_as(x)


def _grads(out, inputs, g):
    inputs = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 33), (1, 1, 8), (2, 5, 2, 12)])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("state", ["trainable", "frozen", "frozen-unpruned", "exact"])
def test_rms_norm_matches_eager(dtype, shape, gemma, state):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[-1], dtype=dtype) * 0.1 + (0 if gemma else 1)
    w.requires_grad_(state in ("trainable", "exact"))
    ref = (gemma_rms if gemma else llama_rms)(x, w, 1e-6)
    xf = x.float()
    offset, w_dtype, y_dtype = (1.0, torch.float32, None) if gemma else (None, None, dtype)
    fmt = None if state == "exact" else INT8
    out = rms_norm(xf, w, 1e-6, offset, w_dtype, y_dtype, prune=state == "frozen", keep_ratio=0.1, fmt=fmt)
    out = out.type_as(x) if gemma else out
    assert torch.equal(out, ref), "the forward must be eager's, bit for bit"
    g = torch.randn_like(ref)
    got, want = _grads(out, [x, w], g), _grads(ref, [x, w], g)
    for a, b in zip(got, want):
        if state == "exact":
            bf16 = dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=2e-2 if bf16 else 1e-5, atol=1e-2 if bf16 else 1e-5)
        else:
            # pruned to the top 10%: 0.962 at worst here; quantized to 8 bits: 0.99997
            assert cosine(a, b) > (0.95 if state == "frozen" else 0.9995)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,approximate", [("silu", "none"), ("gelu", "tanh"), ("gelu", "none")])
@pytest.mark.parametrize("fmts", [(None, None), (INT4, INT8), (INT8, INT8)])
def test_glu_matches_eager(dtype, act, approximate, fmts):
    torch.manual_seed(0)
    gate = (torch.randn(3, 5, 67, dtype=dtype) * 2).requires_grad_()
    up = torch.randn(3, 5, 67, dtype=dtype, requires_grad=True)
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate=approximate)
    ref = a * up
    out = glu(gate, up, act, approximate, *fmts)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, [gate, up], g), _grads(ref, [gate, up], g)):
        if fmts == (None, None):
            torch.testing.assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
        else:
            assert cosine(got, want) > (0.99 if fmts[0] == INT4 else 0.9995)  # measured: 0.9931, 0.99995


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_cross_entropy_matches_eager(reduction, autocast, frozen_head, softcap, monkeypatch):
    import slimfit_fx.ops.cross_entropy as ce

    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 97 * 5)  # several backward chunks, the last one short
    torch.manual_seed(0)
    x = torch.randn(2, 11, 24, requires_grad=True)
    w = torch.randn(97, 24, requires_grad=not frozen_head)
    b = torch.randn(97, requires_grad=not frozen_head)
    target = torch.randint(97, (22,))
    target[3] = target[7] = -100
    dtype = torch.bfloat16 if autocast else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z = F.linear(x, w, b)
        z = z if softcap is None else torch.tanh(z / softcap) * softcap
        logits = z.float().view(-1, 97)
        ref = F.cross_entropy(logits, target, reduction=reduction)
        out = linear_cross_entropy(logits.detach(), x, w, b, target, reduction, -100, dtype, torch.float32, softcap)
    assert torch.equal(out, ref)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(out, [x, w, b], None), _grads(ref, [x, w, b], None)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["causal", "bool", "float", "none"])
def test_fused_attention_matches_eager(dtype, mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 37, 37) > 0.3
        m[..., 0] = True
    elif mask == "float":
        m = torch.randn(2, 1, 37, 37, dtype=dtype)
    causal = mask == "causal"
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
    g = torch.randn_like(ref)
    want = _grads(ref, [q, k, v], g)
    exact = attention_fused_quantized(q, k, v, m, causal, None, "flash_cpu")
    assert torch.equal(exact, ref)
    for a, b in zip(_grads(exact, [q, k, v], g), want):
        assert torch.equal(a, b), "no formats: the kernel's own backward"
    out = attention_fused_quantized(q, k, v, m, causal, None, "flash_cpu", INT8, INT8, INT8)
    assert torch.equal(out, ref)
    for a, b in zip(_grads(out, [q, k, v], g), want):
        assert cosine(a, b) > 0.999


def hf_eager_attention(q, k, v, mask, scaling, softcap):
    s = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fmts", ["exact", "quantized"])
def test_eager_attention_matches_eager(dtype, softcap, masked, fmts):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 19, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 1, 19, 19, dtype=dtype) if masked else None
    ref = hf_eager_attention(q, k, v, mask, 0.3, softcap)
    args = (None, None, None) if fmts == "exact" else (INT8, INT8, INT8)
    out = eager_attention_quantized(q, k, v, mask, 0.3, softcap, *args)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, [q, k, v], g), _grads(ref, [q, k, v], g)):
        assert a.dtype == b.dtype
        assert cosine(a, b) > (0.999 if fmts == "exact" and dtype == torch.float32 else 0.99)
