"""The formats' kernels: Triton against the torch reference (under TRITON_INTERPRET=1 on the CPU),
and the torch.library registration (schemas, fake implementations)."""
import math
import os

import pytest
import torch

import slimfit_fx.kernels  # noqa: F401 - registers torch.ops.slimfit
from slimfit_fx.kernels import reference

SIZES = [1, 7, 127, 128, 4099, 3 * 1000]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def interpreted():
    """The Triton kernels on CPU tensors, through triton's interpreter (conftest.py sets
    TRITON_INTERPRET=1 before triton is imported when there is no GPU)."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be checked")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: tools/gpu_check.py runs the Triton kernels against the reference there")
    from slimfit_fx.kernels import triton_minmax

    return triton_minmax


def _x(n, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x[:: max(1, n // 5)] *= 40  # outliers: nothing may clip
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", SIZES)
def test_triton_quantize_equals_reference(interpreted, n, bits, dtype):
    group = 32 if bits == 2 else 128
    x = _x(n, dtype)
    got = interpreted.quantize(x, bits, group, -1)
    want = reference.quantize_minmax(x, bits, group, -1)
    for g, w, name in zip(got, want, ("codes", "scale", "lo")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", SIZES)
def test_triton_dequantize_equals_reference(interpreted, n, bits, dtype):
    codes, scale, lo = reference.quantize_minmax(_x(n, dtype), bits, 128, -1)
    got = interpreted.dequantize(codes, scale, lo, bits, 128, n, dtype)
    want = reference.dequantize_minmax(codes, scale, lo, bits, 128, n, dtype)
    assert got.dtype == dtype
    # The fp32 values are equal; the interpreter may round the final cast to bf16/fp16 the other way.
    ulp = 0 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=ulp, atol=0)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [7, 4099])
def test_triton_fused_gelu_backward_matches_reference(interpreted, n, dtype, approximate):
    codes, scale, lo = reference.quantize_minmax(_x(n, dtype, scale=1.5), 4, 128, -1)
    grad = _x(n, dtype, seed=1, scale=1.0)
    got = interpreted.dequantize_gelu_backward(grad, codes, scale, lo, 4, 128, approximate)
    want = reference.dequantize_gelu_backward(grad, codes, scale, lo, 4, 128, approximate)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", [4, 8])
def test_triton_stochastic_rounding_is_unbiased_and_within_one_step(interpreted, bits):
    x = torch.rand(64 * 128) * 2 - 1
    codes, scale, lo = interpreted.quantize(x, bits, 128, 1234)
    y = reference.dequantize_minmax(codes, scale, lo, bits, 128, x.numel(), torch.float32)
    step = scale.repeat_interleave(128)
    assert ((y - x).abs() <= step * (1 + 1e-5)).all()
    bias = ((y - x) / step).mean().item()
    assert abs(bias) < 0.02, bias  # round-half-up would sit near 0 too, but never beyond half a step
    nearest = reference.dequantize_minmax(*reference.quantize_minmax(x, bits, 128, -1), bits, 128, x.numel(),
                                          torch.float32)
    assert not torch.equal(y, nearest)  # it did round stochastically


def test_triton_kernels_lay_out_groups_in_powers_of_two(interpreted):
    assert interpreted.supports(4, 128) and interpreted.supports(8, 64)
    assert not interpreted.supports(4, 7) and not interpreted.supports(8, 96)


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", SIZES)
def test_reference_error_at_most_half_a_step(n, bits, dtype):
    x = _x(n, dtype)
    codes, scale, lo = reference.quantize_minmax(x, bits, 128, -1)
    assert codes.numel() == math.ceil(n * bits / 8) and scale.numel() == math.ceil(n / 128)
    y = reference.dequantize_minmax(codes, scale, lo, bits, 128, n, torch.float32)
    step = scale.repeat_interleave(128)[:n]
    assert ((y - x.float()).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 127, 4099])
def test_bit_masks_round_trip_and_layout(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.9
    packed = reference.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(reference.unpack_bits(packed, n), mask)
    for i in range(min(n, 16)):
        assert bool((packed[i // 8] >> (i % 8)) & 1) == bool(mask[i])
    floats = mask.float().view(-1, 1).expand(n, 2)[:, 0]  # a strided 0/1 float view packs the same
    assert torch.equal(reference.pack_bits(floats), packed)


def test_non_finite_groups_dequantize_non_finite_and_leave_others_alone():
    x = torch.randn(3 * 128)
    x[5] = float("nan")
    x[130] = float("inf")
    y = reference.dequantize_minmax(*reference.quantize_minmax(x, 8, 128, -1), 8, 128, x.numel(), torch.float32)
    assert not torch.isfinite(y[:128]).any() and not torch.isfinite(y[128:256]).all()
    assert torch.isfinite(y[256:]).all()


def test_reference_refuses_float64_and_integers():
    for t in (torch.randn(8, dtype=torch.float64), torch.arange(8)):
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            reference.quantize_minmax(t, 8, 128, -1)


# --------------------------------------------------------------------------- torch.library registration


def test_custom_ops_pass_opcheck():
    x = _x(300, torch.float32).view(3, 100)
    codes, scale, lo = torch.ops.slimfit.quantize_minmax(x, 4, 128, -1)
    cases = [
        (torch.ops.slimfit.quantize_minmax.default, (x, 4, 128, -1)),
        (torch.ops.slimfit.dequantize_minmax.default, (codes, scale, lo, 4, 128, 300, torch.bfloat16)),
        (torch.ops.slimfit.dequantize_gelu_backward.default, (torch.randn(3, 100), codes, scale, lo, 4, 128, "none")),
        (torch.ops.slimfit.pack_bits.default, (torch.rand(37) < 0.5,)),
        (torch.ops.slimfit.unpack_bits.default, (torch.tensor([5, 255], dtype=torch.uint8), 13)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_fake_implementations_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(5, 99, dtype=torch.bfloat16)
    real = torch.ops.slimfit.quantize_minmax(x, 4, 128, -1)
    with FakeTensorMode() as mode:
        fake = torch.ops.slimfit.quantize_minmax(mode.from_tensor(x), 4, 128, -1)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
