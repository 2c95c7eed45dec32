"""Tests of slimfit_fx.optim_state: optimizer state of frozen layers off the device.

Every check compares against a real reference run: plain PyTorch with the same
frozen sets (frozen weights have requires_grad False and grad None, so AdamW
neither moves them nor touches their state) and ``mode="keep"``.

The model throughout (fp32, CPU):

    Linear(64, 128) -> Tanh -> Linear(128, 128) -> Tanh -> Linear(128, 8)

Inputs have their first 8 features set to 0, so 8 columns of the first weight
get exactly zero gradients: 1024 exact zeros in its exp_avg and exp_avg_sq.
Only the three weights are ever frozen (biases always train, as in SlimFit).
"""
import io
import math

import pytest
import torch
from torch import nn

from slimfit_fx import measure as M
from slimfit_fx import optim_state as O

F32 = 4
W_NUMEL = (128 * 64, 128 * 128, 8 * 128)

# Compression error bounds, set a little above the figures measured on this
# model after 10 AdamW steps (largest over its six parameters):
#   exp_avg        norm-wise relative error 0.77%  (int8 absmax, 256 per block)
#   exp_avg_sq     norm-wise relative error 0.55%, elementwise 1.18% (8-bit log code)
EXP_AVG_NORM_ERR = 0.01
EXP_AVG_SQ_NORM_ERR = 0.008
EXP_AVG_SQ_ELEM_ERR = 0.015


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: intra-op threads only cost, and on a busy
    machine their spinning makes a 12-step run take seconds instead of 60 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 8))


def batch(i):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(32, 64, generator=g)
    x[:, :8] = 0
    return x, torch.randn(32, 8, generator=g)


def adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kw)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)


def rotating(i):
    """Step 0 trains everything (so every weight has state); then two of
    the three weights are frozen, a different one trains each step."""
    return set() if i == 0 else {0, 1, 2} - {i % 3}


def fixed(i):
    """Weights 0 and 1 frozen for steps 1..8; everything trains again from step 9."""
    return {0, 1} if 1 <= i <= 8 else set()


class Run:
    """A training run with a frozen-weight schedule, as a scheduler would do it.

    ``mode``: a FrozenStateStore mode, None for plain PyTorch, or "drop" (a
    broken store that throws frozen state away: shows the exactness checks
    can fail).
    """

    def __init__(self, mode, make_opt=adamw):
        self.model = make_model()
        self.opt = make_opt(self.model.parameters())
        self.mode = mode
        self.store = O.FrozenStateStore(self.opt, mode) if mode in O.MODES else None
        self.weights = [self.model[0].weight, self.model[2].weight, self.model[4].weight]
        self.frozen: set[int] = set()

    def set_frozen(self, want: set[int]) -> None:
        thaw = [self.weights[j] for j in sorted(self.frozen - want)]
        freeze = [self.weights[j] for j in sorted(want - self.frozen)]
        if self.store is not None:
            self.store.prefetch(thaw)  # a no-op on the CPU, exercised anyway
            self.store.thaw(thaw)  # before the weight trains again
        for p in thaw:
            p.requires_grad_(True)
        for p in freeze:
            p.requires_grad_(False)  # grad is None: zero_grad(set_to_none) ended each step
        if self.store is not None:
            self.store.freeze(freeze)
        if self.mode == "drop":
            for p in freeze:
                self.opt.state.pop(p, None)
        self.frozen = set(want)

    def step(self, i: int) -> None:
        x, y = batch(i)
        nn.functional.mse_loss(self.model(x), y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, schedule, steps, start=0):
        for i in range(start, start + steps):
            self.set_frozen(schedule(i))
            self.step(i)
        return self

    def params(self):
        return [p.detach().clone() for p in self.model.parameters()]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _displacement_error(run, ref, init):
    """|theta_run - theta_ref| / |theta_ref - theta_init| over all parameters."""
    num = sum(((a - b) ** 2).sum() for a, b in zip(run.params(), ref.params()))
    den = sum(((a - b) ** 2).sum() for a, b in zip(ref.params(), init))
    return (num / den).sqrt().item()


def _state_tensors(sd):
    """(param index, key) -> tensor of an optimizer state dict."""
    return {(i, k): v for i, st in sd["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}


def _assert_state_dicts_equal(a, b):
    ta, tb = _state_tensors(a), _state_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k].cpu(), tb[k].cpu()), k


# ------------------------------------------------------------------ modes


def test_bad_mode_names_the_choices():
    opt = adamw(make_model().parameters())
    with pytest.raises(ValueError, match=r"keep.*offload.*compress.*'gpu'"):
        O.FrozenStateStore(opt, mode="gpu")


# ---------------------------------------------------------------- offload


@pytest.mark.parametrize("schedule", [rotating, fixed], ids=["rotating", "fixed"])
def test_offload_is_exact(schedule):
    ref = Run(None).run(schedule, 12)
    keep = Run("keep").run(schedule, 12)
    off = Run("offload").run(schedule, 12)
    assert _equal(off.params(), ref.params())
    assert _equal(keep.params(), ref.params())
    _assert_state_dicts_equal(off.opt.state_dict(), ref.opt.state_dict())
    # The comparison is not vacuous: training without freezing, or a store
    # that loses the frozen state, ends elsewhere.
    assert not _equal(Run(None).run(lambda i: set(), 12).params(), ref.params())
    assert not _equal(Run("drop").run(schedule, 12).params(), ref.params())


def test_offload_while_frozen_state_is_host_resident():
    run = Run("offload").run(fixed, 3)  # weights 0 and 1 frozen since step 1
    w0, w1, w2 = run.weights
    frozen_bytes = 2 * (W_NUMEL[0] + W_NUMEL[1]) * F32  # exp_avg + exp_avg_sq
    assert run.store.nbytes() == {"device": 0, "host": frozen_bytes, "compressed": 0}
    assert w0 in run.store and w2 not in run.store
    for key in ("exp_avg", "exp_avg_sq"):
        assert M.is_host_resident(run.opt.state[w0][key])
        assert not M.is_host_resident(run.opt.state[w2][key])
    assert not M.is_host_resident(run.opt.state[w0]["step"])  # 0-d step stays
    exp_avg = run.opt.state[w0]["exp_avg"]
    run.set_frozen(set())  # thaw: on the CPU the same tensor comes back, unmarked
    assert run.opt.state[w0]["exp_avg"] is exp_avg and not M.is_host_resident(exp_avg)
    assert run.store.nbytes() == {"device": 0, "host": 0, "compressed": 0}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_offload_exact_with_amsgrad_and_foreach(amsgrad):
    def make(ps):
        return adamw(ps, amsgrad=amsgrad, foreach=True)

    ref = Run(None, make).run(rotating, 8)
    off = Run("offload", make).run(rotating, 8)
    assert _equal(off.params(), ref.params())
    if amsgrad:
        assert "max_exp_avg_sq" in off.opt.state[off.weights[0]]


def test_sgd_momentum_offload_exact_compress_close():
    init = [p.detach().clone() for p in make_model().parameters()]
    ref = Run(None, sgd).run(rotating, 12)
    off = Run("offload", sgd).run(rotating, 12)
    comp = Run("compress", sgd).run(rotating, 12)
    assert _equal(off.params(), ref.params())
    assert not _equal(Run("drop", sgd).run(rotating, 12).params(), ref.params())
    # compress: lossy, really used, close. Measured: 0.45% of the distance
    # travelled (dropping the frozen momentum: 50%), largest element 6.3e-5.
    assert 0 < _displacement_error(comp, ref, init) < 0.01
    for a, b in zip(comp.params(), ref.params()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-4)
    # momentum_buffer is signed: coded linearly
    comp.set_frozen({0})
    assert comp.opt.state[comp.weights[0]]["momentum_buffer"].kind == "linear"


def test_step_refuses_a_frozen_parameter_with_a_gradient():
    run = Run("offload").run(fixed, 2)
    w0 = run.weights[0]
    w0.requires_grad_(True)  # unfrozen without thaw
    x, y = batch(5)
    nn.functional.mse_loss(run.model(x), y).backward()
    with pytest.raises(RuntimeError, match="thaw"):
        run.opt.step()
    run.store.thaw([w0])
    run.opt.step()  # fine once thawed


# --------------------------------------------------------------- compress


def _assert_coded_close(key, got, ref):
    """``got`` is ``ref`` after one 8-bit code, exactly."""
    assert not torch.equal(got, ref)
    assert torch.equal(got, O.dequantize_state(O.quantize_state(key, ref))), key


def _trained_state():
    run = Run(None).run(lambda i: set(), 10)
    return run, {p: {k: v.clone() for k, v in run.opt.state[p].items()} for p in run.model.parameters()}


def test_compress_error_on_real_adamw_state():
    run, before = _trained_state()
    params = list(run.model.parameters())
    store = O.FrozenStateStore(run.opt, "compress")
    store.freeze(params)
    for p in params:
        st = run.opt.state[p]
        assert st["exp_avg"].kind == "linear" and st["exp_avg_sq"].kind == "log"
        assert st["exp_avg"].codes.dtype == torch.int8 and st["exp_avg_sq"].codes.dtype == torch.uint8
        assert torch.equal(st["step"], before[p]["step"])
    store.thaw(params)
    zeros = 0
    for p in params:
        for key, bound in (("exp_avg", EXP_AVG_NORM_ERR), ("exp_avg_sq", EXP_AVG_SQ_NORM_ERR)):
            t, r = before[p][key], run.opt.state[p][key]
            assert r.shape == t.shape and r.dtype == t.dtype
            assert (r - t).norm() / t.norm() < bound, (key, p.shape)
            assert torch.all(r[t == 0] == 0)  # zeros stay zeros
            zeros += int((t == 0).sum())
        t, r = before[p]["exp_avg_sq"], run.opt.state[p]["exp_avg_sq"]
        nz = t != 0
        assert torch.all(r[nz] > 0)  # nothing nonzero becomes zero under the sqrt
        assert ((r - t).abs() / t)[nz].max() < EXP_AVG_SQ_ELEM_ERR
    assert zeros == 2 * 1024  # the zero-input columns of the first weight, in both tensors


def test_compress_bounds_per_block_on_synthetic_data():
    g = torch.Generator().manual_seed(0)
    n = 1000  # not a multiple of the block: a short last block
    m = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)  # magnitudes over 6 decades
    q = O.quantize_linear(m, block_size=128)
    r = O.dequantize_state(q)
    absmax = torch.cat([b.abs().max().expand(b.numel()) for b in m.split(128)])
    assert torch.all((r - m).abs() <= absmax / 254 * (1 + 1e-5))
    assert q.nbytes == n + 8 * F32  # 8 blocks: codes + fp32 scales

    v = m.square()
    v[::10] = 0
    q = O.quantize_log(v, block_size=128)
    r = O.dequantize_state(q)
    bound = (2 ** (q.scale / 2) - 1).repeat_interleave(128)[:n]  # per block: half a step in log2
    nz = v > 0
    assert torch.all(((r - v).abs() / v)[nz] <= bound[nz] * (1 + 1e-3) + 1e-6)
    assert torch.all(r[~nz] == 0) and torch.all(r[nz] > 0)
    assert q.nbytes == n + 2 * 8 * F32  # codes + fp32 offset and step per block
    # A linear code of the same data loses the small values of each block entirely.
    lin = O.dequantize_state(O.quantize_linear(v, block_size=128))
    assert int((lin[nz] == 0).sum()) > 100


def test_compress_choice_by_key_and_sign():
    t = torch.rand(300) + 0.1
    assert O.quantize_state("exp_avg_sq", t).kind == "log"
    assert O.quantize_state("exp_avg", t).kind == "linear"  # key decides, not sign
    assert O.quantize_state("exp_avg_sq", t - 0.5).kind == "linear"  # a negative value: linear
    bad = t.clone()
    bad[7] = math.inf
    assert O.quantize_state("exp_avg_sq", bad) is bad  # non-finite: not compressed
    bad[7] = math.nan
    assert O.quantize_state("exp_avg", bad) is bad


def test_compress_training_close_to_keep():
    init = [p.detach().clone() for p in make_model().parameters()]
    keep = Run("keep").run(rotating, 12)
    comp = Run("compress").run(rotating, 12)
    assert all(torch.isfinite(p).all() for p in comp.params())
    err = _displacement_error(comp, keep, init)
    # Measured 0.77% of the distance the weights travelled (a 1% larger lr
    # gives 1.1%). Elementwise the largest difference is 5.0e-3 (1.2e-2 for
    # the 1% lr change): Adam moves weights with tiny gradients by about lr
    # whatever their size, so single elements are noisy.
    assert 0 < err < 0.015
    for a, b in zip(comp.params(), keep.params()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
    # Far closer than dropping the frozen state, which is what compress avoids (69%).
    assert _displacement_error(Run("drop").run(rotating, 12), keep, init) > 0.3


# ------------------------------------------------------------ peak bytes


def _measured_step(mode):
    """peak_bytes of step 3 with weights 0 and 1 frozen (state present)."""
    run = Run(mode).run(fixed, 3)
    run.set_frozen(fixed(3))
    x, y = batch(3)

    def step():
        nn.functional.mse_loss(run.model(x), y).backward()
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)

    return run, M.peak_bytes(step, model=run.model, optimizer=run.opt, tensors=[x, y])


FROZEN_STATE = 2 * (W_NUMEL[0] + W_NUMEL[1]) * F32  # 196608


def test_peak_offload_reports_frozen_state_as_offloaded():
    _, keep = _measured_step("keep")
    _, off = _measured_step("offload")
    assert keep.offloaded == 0 and "host" not in keep.by_device
    assert off.offloaded == FROZEN_STATE
    assert off.by_device["host"] == FROZEN_STATE
    assert off.optimizer_state == keep.optimizer_state - FROZEN_STATE
    assert off.peak == keep.peak - FROZEN_STATE
    assert off.baseline == keep.baseline - FROZEN_STATE
    assert (off.parameters, off.gradients, off.other) == (keep.parameters, keep.gradients, keep.other)
    assert off.parameters + off.gradients + off.optimizer_state + off.other == off.peak
    assert off.by_device["cpu"] == off.peak


def test_peak_compress_cuts_frozen_state_about_4x():
    _, keep = _measured_step("keep")
    run, comp = _measured_step("compress")
    compressed = run.store.nbytes()["compressed"]
    # per weight: int8 exp_avg + one fp32 scale per 256, uint8 exp_avg_sq + two fp32 per 256
    expected = sum(2 * n + 3 * F32 * (n // 256) for n in W_NUMEL[:2])
    assert compressed == expected == 50304
    assert comp.offloaded == 0
    assert comp.optimizer_state == keep.optimizer_state - FROZEN_STATE + compressed
    ratio = FROZEN_STATE / (comp.optimizer_state - (keep.optimizer_state - FROZEN_STATE))
    assert 3.85 < ratio < 3.95  # 3.91
    assert comp.peak == keep.peak - FROZEN_STATE + compressed


# ------------------------------------------------------------ checkpoints


def _reload(run, sd):
    """A fresh plain-PyTorch run resumed from ``run``'s weights and ``sd`` (via bytes)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = Run(None)
    fresh.model.load_state_dict(run.model.state_dict())
    fresh.opt.load_state_dict(torch.load(buf))
    return fresh


@pytest.mark.parametrize("mode", ["offload", "compress"])
def test_state_dict_while_frozen_is_full(mode):
    keep = Run("keep").run(fixed, 6)
    run = Run(mode).run(fixed, 6)  # weights 0 and 1 frozen
    w0 = run.weights[0]
    held = run.opt.state[w0]["exp_avg"]
    sd = run.opt.state_dict()
    # the live optimizer stays frozen; the dict holds full tensors in place of codes
    assert run.opt.state[w0]["exp_avg"] is held
    assert all(isinstance(v, torch.Tensor) for st in sd["state"].values() for v in st.values())
    fresh = _reload(run, sd)
    if mode == "offload":
        _assert_state_dicts_equal(fresh.opt.state_dict(), keep.opt.state_dict())
        # and training on from the checkpoint matches the run that never left the device
        fresh.frozen = set()
        fresh.run(fixed, 6, start=6)
        keep.run(fixed, 6, start=6)
        run.run(fixed, 6, start=6)
        assert _equal(fresh.params(), keep.params())
        assert _equal(run.params(), keep.params())
    else:
        # The frozen weights' state was coded once (step 1) and not used since;
        # everything else trained identically, so it is equal to keep's.
        got, ref = _state_tensors(fresh.opt.state_dict()), _state_tensors(keep.opt.state_dict())
        assert got.keys() == ref.keys()
        for i, key in got:
            if i in (0, 2) and key != "step":  # the frozen weights (indices of model.parameters())
                _assert_coded_close(key, got[i, key], ref[i, key])
            else:
                assert torch.equal(got[i, key], ref[i, key])
        # the checkpoint holds exactly what thaw gives back
        run.set_frozen(set())
        _assert_state_dicts_equal(fresh.opt.state_dict(), run.opt.state_dict())


@pytest.mark.parametrize("mode", ["offload", "compress"])
def test_load_state_dict_into_store_optimizer_refreezes(mode):
    keep = Run("keep").run(fixed, 6)
    run = Run(mode).run(fixed, 4)  # different state from keep's
    ref_sd = keep.opt.state_dict()
    run.opt.load_state_dict(ref_sd)
    w0 = run.weights[0]
    assert w0 in run.store
    if mode == "offload":
        assert M.is_host_resident(run.opt.state[w0]["exp_avg"])
    else:
        assert isinstance(run.opt.state[w0]["exp_avg"], O.Blockwise8bit)
    run.store.thaw(run.weights)
    got = _state_tensors(run.opt.state_dict())
    for k, v in _state_tensors(keep.opt.state_dict()).items():
        if mode == "offload" or k[0] not in (0, 2) or k[1] == "step":
            assert torch.equal(got[k], v), k
        else:
            _assert_coded_close(k[1], got[k], v)
