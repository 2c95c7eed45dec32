"""Quantizers for saved activations: error bounds, exact byte counts, packing, dtypes, non-finite input."""
import math

import pytest
import torch

from slimfit_fx.config import QuantFormat, SlimFitConfig
from slimfit_fx.quant import Quantized, QuantMeta, dequantize, pack, quantize, unpack

INT8 = QuantFormat(bits=8, kind="fixed", step=1 / 16, signed=True)
UINT8 = QuantFormat(bits=8, kind="fixed", step=1 / 256, signed=False)
INT4 = QuantFormat(bits=4, kind="fixed", step=0.5, signed=True)
INT2 = QuantFormat(bits=2, kind="fixed", step=0.25, signed=True)

# (format, lowest, highest representable value)
FIXED = [
    (INT8, -8.0, 7.9375),
    (UINT8, 0.0, 255 / 256),
    (INT4, -4.0, 3.5),
    (INT2, -0.5, 0.25),
    (QuantFormat.fixed(4, 0.125, signed=False), 0.0, 15 / 8),
]
MINMAX = [
    QuantFormat(bits=8, kind="minmax", group_size=128),
    QuantFormat(bits=4, kind="minmax", group_size=32),
    QuantFormat(bits=2, kind="minmax", group_size=7),
]


def _formats(cfg):
    return [cfg.attn_qk_format, cfg.attn_v_format, cfg.attn_probs_format, cfg.gelu_input_format,
            cfg.ffn_out_input_format]


def _default_formats():
    return _formats(SlimFitConfig())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_default_formats_are_scale_adaptive_at_the_papers_bit_widths():
    assert [f.bits for f in _default_formats()] == [8, 8, 8, 4, 8]
    assert all(f.kind == "minmax" and f.group_size == 128 and not f.stochastic for f in _default_formats())
    assert _formats(SlimFitConfig.paper()) == [INT8, INT8, UINT8, INT4, INT8]


def test_format_constructors_validate():
    assert QuantFormat.minmax(4) == QuantFormat(bits=4)
    assert QuantFormat.fixed(8, 1 / 16) == INT8
    with pytest.raises(ValueError, match="applies to kind='fixed' only"):
        QuantFormat(bits=8, step=1 / 16)
    with pytest.raises(ValueError, match="power-of-two step"):
        QuantFormat(kind="fixed")


# ------------------------------------------------------------------------------------- fixed


@pytest.mark.parametrize("fmt,lo,hi", FIXED, ids=lambda v: str(v))
def test_fixed_round_trip_in_range(fmt, lo, hi):
    x = torch.empty(10_001).uniform_(lo, hi, generator=_gen())
    err = (dequantize(quantize(x, fmt)) - x).abs()
    assert err.max() <= fmt.step / 2
    # every representable value round-trips exactly
    grid = torch.arange(round(lo / fmt.step), round(hi / fmt.step) + 1) * fmt.step
    assert grid[0] == lo and grid[-1] == hi
    assert torch.equal(dequantize(quantize(grid, fmt)), grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt,lo,hi", FIXED, ids=lambda v: str(v))
def test_fixed_clamps_to_range_ends(fmt, lo, hi, dtype):
    x = torch.tensor([lo - fmt.step, lo - 100.0, -1e30, hi + fmt.step, hi + 100.0, 1e30]).to(dtype)
    y = dequantize(quantize(x, fmt))
    assert y.dtype == dtype
    assert y.float().tolist() == [lo, lo, lo, hi, hi, hi]


def test_fixed_rounds_to_nearest_ties_to_even():
    s = INT8.step
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 0.51]) * s
    assert (dequantize(quantize(x, INT8)) / s).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 1.0]


def test_fixed_stored_codes_are_offset_binary():
    q = quantize(torch.tensor([-8.0, 0.0, 7.9375]), INT8)
    assert q.codes.tolist() == [0, 128, 255]
    q = quantize(torch.tensor([0.0, 255 / 256]), UINT8)
    assert q.codes.tolist() == [0, 255]
    q = quantize(torch.tensor([-4.0, 3.5, 0.0]), INT4)  # codes 0, 15, 8 -> bytes 0xF0, 0x08
    assert q.codes.tolist() == [0xF0, 0x08]


@pytest.mark.parametrize("fmt", [INT8, INT4, QuantFormat.fixed(2, 0.25, signed=False)], ids=str)
def test_fixed_stochastic_rounding_unbiased_within_one_step(fmt):
    sfmt = QuantFormat(bits=fmt.bits, kind="fixed", step=fmt.step, signed=fmt.signed, stochastic=True)
    s = fmt.step
    x = torch.full((200_000,), 0.3 * s)  # in range for every format here
    y = dequantize(quantize(x, sfmt, generator=_gen(1)))
    assert set(torch.unique(y).tolist()) == {0.0, s}  # one of the two neighbours
    assert (y - x).abs().max() < s
    assert abs((y - x).mean().item()) < 0.01 * s  # round to nearest would be off by 0.3 * s
    # seeded: reproducible; a different seed gives different draws
    assert torch.equal(y, dequantize(quantize(x, sfmt, generator=_gen(1))))
    assert not torch.equal(y, dequantize(quantize(x, sfmt, generator=_gen(2))))
    # still clamps
    assert dequantize(quantize(torch.tensor([1e6, -1e6]), sfmt, generator=_gen())).tolist() == \
        dequantize(quantize(torch.tensor([1e6, -1e6]), fmt)).tolist()


# ------------------------------------------------------------------------------------ minmax


def _group_bound(x, fmt):
    """Per-element scale / 2 of the group it falls in (computed independently of quant.py)."""
    flat = x.reshape(-1).double()
    n, g = flat.numel(), fmt.group_size
    pad = torch.cat([flat, flat[-1:].expand((-n) % g)]).view(-1, g)
    scale = (pad.amax(1) - pad.amin(1)) / (2 ** fmt.bits - 1)
    return scale.repeat_interleave(g)[:n] / 2


@pytest.mark.parametrize("fmt", MINMAX, ids=str)
@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_minmax_error_at_most_half_scale(fmt, n):
    x = torch.randn(n, generator=_gen()) * 3 + 1
    q = quantize(x, fmt)
    err = (dequantize(q).double() - x.double()).abs()
    bound = _group_bound(x, fmt)
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-6)
    assert torch.allclose(q.scale.double(), _group_bound(x, fmt)[:: fmt.group_size] * 2, rtol=1e-6)


@pytest.mark.parametrize("fmt", MINMAX, ids=str)
def test_minmax_does_not_clip_outliers(fmt):
    x = torch.randn(1000, generator=_gen()) * 0.1
    x[123] = 1000.0
    x[777] = -250.0
    y = dequantize(quantize(x, fmt))
    bound = _group_bound(x, fmt)
    assert abs(y[123].item() - 1000.0) <= bound[123].item() * (1 + 1e-5)
    assert abs(y[777].item() + 250.0) <= bound[777].item() * (1 + 1e-5)
    assert torch.all((y - x).abs() <= bound * (1 + 1e-5) + 1e-6)  # the other groups keep their precision


def test_minmax_constant_group_is_exact():
    fmt = QuantFormat(bits=4, kind="minmax", group_size=4)
    x = torch.tensor([1.7, 1.7, 1.7, 1.7, -3.1, -3.1, 0.0])
    q = quantize(x, fmt)
    assert q.scale[0].item() == 0.0
    assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("bits", [2, 8])
def test_minmax_stochastic_rounding_unbiased_within_one_step(bits):
    fmt = QuantFormat(bits=bits, kind="minmax", group_size=64, stochastic=True)
    levels = 2 ** bits - 1
    # every group holds 0 and 1 (so scale = 1 / levels) and otherwise a value 0.3 of a step above 0
    x = torch.full((64 * 2000,), 0.3 / levels)
    x[0::64] = 0.0
    x[1::64] = 1.0
    q = quantize(x, fmt, generator=_gen(3))
    assert torch.allclose(q.scale, torch.full_like(q.scale, 1 / levels))
    err = dequantize(q) - x
    assert err.abs().max() < 1 / levels
    assert abs(err.mean().item()) < 0.01 / levels
    deterministic = dequantize(quantize(x, QuantFormat(bits=bits, kind="minmax", group_size=64)))
    assert abs((deterministic - x).mean().item()) > 0.2 / levels  # the test can tell the two apart


# ------------------------------------------------------------------------------------ nbytes


@pytest.mark.parametrize("fmt", _default_formats()[2:4] + [INT8, INT2] + MINMAX
                         + [QuantFormat(bits=4, kind="minmax", group_size=5, stochastic=True)], ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 127, 128, 129, 1000])
def test_nbytes_exact(fmt, n):
    x = torch.randn(n, generator=_gen())
    q = quantize(x, fmt, generator=_gen())
    expected = fmt.nbytes(n)
    assert q.nbytes() == expected
    # no hidden larger storages (e.g. a slice of a padded buffer)
    assert sum(t.untyped_storage().nbytes() for t in q.tensors()) == expected
    assert len({t.untyped_storage().data_ptr() for t in q.tensors() if t.numel()}) == \
        sum(1 for t in q.tensors() if t.numel())
    assert all(t.is_contiguous() for t in q.tensors())
    assert q.codes.dtype == torch.uint8
    if fmt.kind == "minmax":
        assert q.scale.dtype == q.offset.dtype == torch.float32
        assert q.scale.numel() == q.offset.numel() == -(-n // fmt.group_size)
    y = dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype


# ----------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), generator=_gen(n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / (8 // bits))
    assert packed.untyped_storage().nbytes() == packed.numel()
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_layout_first_element_in_low_bits():
    assert pack(torch.tensor([0x1, 0x2, 0x3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b11]


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)


# ------------------------------------------------------------------------- dtypes and layouts


@pytest.mark.parametrize("fmt", [INT8, MINMAX[0]], ids=str)
def test_float64_and_integers_are_refused(fmt):
    for x in (torch.randn(5, dtype=torch.float64), torch.arange(5)):
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            quantize(x, fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [INT8, UINT8, INT4, MINMAX[0], MINMAX[1]], ids=str)
def test_dtypes_round_trip(dtype, fmt):
    x32 = torch.randn(3, 5, 7, generator=_gen())
    x = x32.to(dtype)
    y = dequantize(quantize(x, fmt))
    assert y.dtype == dtype and y.shape == x.shape
    ref = dequantize(quantize(x.float(), fmt))  # same input values quantized in fp32
    if fmt.kind == "fixed":
        assert torch.equal(y, ref.to(dtype))  # fixed-point values are exact in every dtype
    else:
        assert torch.allclose(y.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt", [INT8, INT4, MINMAX[1], QuantFormat(bits=4, kind="minmax", group_size=3)], ids=str)
def test_non_contiguous_input(fmt):
    base = torch.randn(6, 10, 9, generator=_gen()) * 2
    for x in (base.transpose(0, 2), base[:, ::3, 1:], base.permute(1, 2, 0)[2:, :, ::2]):
        assert not x.is_contiguous()
        q = quantize(x, fmt)
        assert q.nbytes() == fmt.nbytes(x.numel())
        y = dequantize(q)
        assert y.shape == x.shape
        assert torch.equal(y, dequantize(quantize(x.contiguous(), fmt)))


def test_scalar_shape():
    for fmt in (INT4, MINMAX[2]):
        x = torch.tensor(1.5)
        y = dequantize(quantize(x, fmt))
        assert y.shape == () and y.item() == 1.5


# ------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,lo,hi", FIXED[:3], ids=lambda v: str(v))
def test_fixed_non_finite(fmt, lo, hi, dtype):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5], dtype=dtype)
    y = dequantize(quantize(x, fmt)).float()
    assert y.tolist() == [0.0, hi, lo, 0.5]  # NaN -> 0.0, +-inf clamped to the range ends
    sfmt = QuantFormat.fixed(fmt.bits, fmt.step, signed=fmt.signed, stochastic=True)
    ys = dequantize(quantize(x[:3], sfmt, generator=_gen())).float()
    assert ys.tolist() == [0.0, hi, lo]


def test_minmax_non_finite():
    # The forward pass is exact and carries a non-finite value into the loss; the saved copy of its
    # group is non-finite too, and the other groups are untouched.
    fmt = QuantFormat(bits=8, kind="minmax", group_size=4)
    x = torch.tensor([float("nan"), 1.0, -1.0, 0.5,
                      float("inf"), 2.0, 3.0, 4.0,
                      0.1, 0.2, 0.3, 0.4])
    y = dequantize(quantize(x, fmt))
    assert not torch.isfinite(y[:4]).any() and not torch.isfinite(y[4:8]).all()
    assert torch.allclose(y[8:], x[8:], atol=0.3 / 255 / 2 + 1e-7)


# -------------------------------------------------------------------- tensors / autograd ctx


class _QuantSave(torch.autograd.Function):
    """Identity forward; backward returns grad * dequantized saved input (so the save is observable)."""

    @staticmethod
    def forward(ctx, x, fmt):
        q = quantize(x, fmt)
        ctx.save_for_backward(*q.tensors())
        ctx.qmeta = q.meta
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * dequantize(ctx.qmeta.rebuild(ctx.saved_tensors)), None


@pytest.mark.parametrize("fmt", [INT4, MINMAX[1]], ids=str)
def test_tensors_and_meta_through_autograd(fmt):
    x = (torch.randn(4, 9, generator=_gen())).requires_grad_()
    y = _QuantSave.apply(x, fmt)
    assert torch.equal(y, x)  # forward exact
    y.sum().backward()
    assert torch.equal(x.grad, dequantize(quantize(x.detach(), fmt)))


def test_from_tensors_round_trip_and_checks():
    q = quantize(torch.randn(2, 3, 5), MINMAX[2])
    assert isinstance(q.meta, QuantMeta) and q.meta.ntensors == 3 and q.meta.numel == 30
    r = Quantized.from_tensors(q.tensors(), q.meta)
    assert torch.equal(dequantize(r), dequantize(q))
    with pytest.raises(ValueError):
        Quantized.from_tensors(q.tensors()[:1], q.meta)
    assert quantize(torch.randn(3), INT8).meta.ntensors == 1
