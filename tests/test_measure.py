"""Tests of slimfit_fx.measure against hand-computed byte counts.

All figures are fp32 (4 bytes per element) on CPU. The model throughout is

    Linear(64, 128) -> ReLU -> Linear(128, 32),  batch 16

    W1 128x64 = 32768 B   b1 128 = 512 B   W2 32x128 = 16384 B   b2 32 = 128 B
    parameters  = 49792 B
    x   16x64   =  4096 B   (input)
    a1  16x128  =  8192 B   (first addmm output, pre-ReLU)
    h   16x128  =  8192 B   (ReLU output)
    out 16x32   =  2048 B

nn.Linear reaches ATen as addmm(b, x, W.t()) (linear is a composite op).
"""

import gc
import weakref

import pytest
import torch
from torch import nn

from slimfit_fx import measure as M

F32 = 4
W1, B1, W2, B2 = 128 * 64 * F32, 128 * F32, 32 * 128 * F32, 32 * F32
PARAMS = W1 + B1 + W2 + B2  # 49792
X, A1, H, OUT = 16 * 64 * F32, 16 * 128 * F32, 16 * 128 * F32, 16 * 32 * F32
SCALAR = F32  # a 0-dim fp32 tensor: a loss, autograd's initial ones_like grad


def make_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    return model, torch.randn(16, 64)


# ---------------------------------------------------------------- saved bytes


def test_saved_bytes_mlp_hand_computed():
    model, x = make_mlp()
    # What autograd saves for model(x).square().mean():
    #   addmm #1: mat1 = x (W1 needs a grad); mat2 = W1.t() is not saved because
    #             x does not require grad (mat2 is only needed for mat1's grad)
    #   relu:     its result h
    #   addmm #2: mat1 = h (same storage as relu's result: counted once) and
    #             mat2 = W2.t() (a parameter view: excluded)
    #   square:   pow(out, 2) saves out;  mean saves only sizes
    expected = X + H + OUT  # 14336

    def fn():
        return model(x).square().mean()

    assert M.saved_bytes(fn) == expected  # params=None: W2.t() has a Parameter _base
    assert M.saved_bytes(fn, model) == expected
    # Excluding nothing shows the W2.t() storage that the default leaves out.
    assert M.saved_bytes(fn, []) == expected + W2

    records = M.saved_tensors(fn, model)
    assert [r.nbytes for r in records if r.is_parameter] == [W2]
    assert sum(r.new_bytes for r in records) == expected
    # h is saved twice (relu result, addmm #2 input) and counted once
    assert [r.new_bytes for r in records if r.nbytes == H] == [H, 0]


def test_saved_bytes_first_linear_frozen_drops_input():
    model, x = make_mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    # addmm #1 and relu need no backward at all; addmm #2 still saves h
    # (for W2's grad) but not W2.t() (h does not require grad); pow saves out.
    assert M.saved_bytes(lambda: model(x).square().mean(), model) == H + OUT


def test_views_of_one_storage_counted_once():
    base = torch.randn(1000, requires_grad=True)
    y = base.clone()  # clone saves nothing; y is a 4000-byte storage

    def fn():
        # sin saves its input: two different views of y's storage
        return (y[:500].sin().sum() + y[500:].sin().sum())

    m = M.measure_saved(fn)
    assert len(m.records) == 2
    assert len({r.storage_ids for r in m.records}) == 1
    assert m.bytes == 1000 * F32


def test_parameter_exclusion_by_type_and_by_storage():
    w = nn.Parameter(torch.randn(256))
    x = torch.randn(256, requires_grad=True)
    alias = w.detach()  # shares w's storage but is neither a Parameter nor a view of one
    # x * w saves both operands (each is needed for the other's grad); w is
    # excluded because it is a Parameter.
    assert M.saved_bytes(lambda: (x * w).sum()) == 256 * F32
    # x * alias saves only alias (alias needs no grad, so x is not needed).
    # An alias is recognised only by storage: with params=None it counts.
    assert M.saved_bytes(lambda: (x * alias).sum()) == 256 * F32
    assert M.saved_bytes(lambda: (x * alias).sum(), [w]) == 0


def test_wrapper_subclass_counts_every_inner_storage():
    from torch.testing._internal.two_tensor import TwoTensor  # two inner tensors

    t = TwoTensor(torch.randn(100), torch.randn(100)).requires_grad_()
    m = M.measure_saved(lambda: t.sin().sum())  # sin saves its input
    assert [len(r.storage_ids) for r in m.records] == [2]
    assert m.bytes == 2 * 100 * F32


def test_measure_saved_keeps_graph_usable_and_returns_result():
    model, x = make_mlp()
    m = M.measure_saved(lambda: model(x).square().mean(), model)
    m.result.backward()  # the pack hook returned tensors unchanged
    ref_model, _ = make_mlp()
    ref_model(x).square().mean().backward()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_saved_meta_and_empty_tensors_do_not_crash():
    lin = nn.Linear(8, 8, device="meta")
    assert M.saved_bytes(lambda: lin(torch.randn(4, 8, device="meta")).sum()) == 0
    lin = nn.Linear(8, 8)
    # an empty batch saves a 0-byte input
    assert M.saved_bytes(lambda: lin(torch.randn(0, 8)).sum(), lin) == 0


# ----------------------------------------------------------------- peak bytes


def _step(model, x, opt, loss_fn=lambda out: out.sum()):
    def step():
        loss = loss_fn(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def test_peak_sgd_hand_computed():
    model, x = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no state
    m = M.peak_bytes(_step(model, x, opt), model=model, optimizer=opt, tensors=[x])

    base = PARAMS + X  # 53888
    # Forward: a1 and h are both live only inside relu (70272); then a1 dies.
    # loss = out.sum(): SumBackward saves no tensor, so out dies in forward.
    # Backward (ops in the order the engine runs them):
    #   ones_like(loss)            +4  (alive through backward: Python holds it)
    #   SumBackward: expand        a stride-0 view, no new storage
    #   AddmmBackward #2: grad@W2  +H  (grad wrt h)
    #     (grad.t()@h).t()         +W2 (laid out like W2: AccumulateGrad steals it)
    #     sum_to(grad, b2)         +B2 (engine reduces the broadcast bias grad)
    #   ReluBackward: threshold    +A1, then grad wrt h and h die (-2*8192)
    #   AddmmBackward #1: (grad.t()@x).t() +W1, sum_to -> b1 grad +B1; the
    #     incoming grad (8192) is still alive here: this is the peak.
    peak = base + SCALAR + SCALAR + W2 + B2 + A1 + W1 + B1
    assert peak == 111880
    assert m.peak == peak and int(m) == peak
    assert m.baseline == base
    assert m.end == base  # zero_grad(set_to_none=True) freed every grad
    assert m.parameters == PARAMS
    assert m.gradients == PARAMS  # all four grads were live; tagged when accumulated
    assert m.optimizer_state == 0
    assert m.other == X + SCALAR + SCALAR + A1  # input, loss, ones_like, relu grad
    assert m.parameters + m.gradients + m.optimizer_state + m.other == m.peak
    assert m.by_device == {"cpu": peak}
    assert m.cuda_max_allocated is None


def test_peak_adamw_hand_computed():
    model, x = make_mlp()
    # foreach=False is also the CPU default; pinned so the formula holds.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    step = _step(model, x, opt)
    state = 2 * PARAMS + 4 * SCALAR  # exp_avg, exp_avg_sq, and a 0-dim fp32 step each

    # The peak is in opt.step(), on the first parameter (W1): all grads, the
    # loss and the new state are live, and `exp_avg_sq.sqrt()` and its
    # division by bias_correction2_sqrt coexist (2*W1) before the sqrt dies.
    # Later parameters add less: the previous `denom` (still bound until
    # reassigned) plus their own 2 temporaries, e.g. W1 + 2*B1 < 2*W1.
    # The backward peak (111880 above) is lower.
    peak = PARAMS + X + SCALAR + PARAMS + state + 2 * W1
    assert peak == 268820

    first = M.peak_bytes(step, model=model, optimizer=opt, tensors=[x])
    assert first.baseline == PARAMS + X
    assert first.peak == peak
    assert first.end == PARAMS + X + state  # state created, grads freed
    assert (first.parameters, first.gradients, first.optimizer_state) == (PARAMS, PARAMS, state)
    assert first.other == X + SCALAR + 2 * W1
    assert first.parameters + first.gradients + first.optimizer_state + first.other == peak

    second = M.peak_bytes(step, model=model, optimizer=opt, tensors=[x])
    assert second.baseline == PARAMS + X + state  # state now pre-initialised
    assert second.peak == peak
    assert second.optimizer_state == state
    assert second.end == second.baseline


def test_grads_alive_at_start_are_baseline_and_freed():
    model, x = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()  # grads exist before the step
    m = M.peak_bytes(lambda: opt.zero_grad(set_to_none=True), model=model, optimizer=opt)
    assert m.baseline == m.peak == 2 * PARAMS
    assert m.gradients == PARAMS
    assert m.end == PARAMS


def test_peak_partially_frozen():
    # (torch.distributed._tools.mem_tracker crashes on such models)
    model, x = make_mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    m = M.peak_bytes(_step(model, x, opt), model=model, optimizer=opt, tensors=[x])
    # Forward as before (70272 inside relu). Backward: ones_like +4; addmm #2
    # computes only W2's grad +W2 and, via sum_to, b2's +B2 while h (saved)
    # is still live: the peak. h is then released; nothing else runs.
    base = PARAMS + X
    assert m.peak == base + SCALAR + SCALAR + W2 + B2 + H == 78600
    assert m.gradients == W2 + B2
    assert m.other == X + SCALAR + SCALAR + H
    assert m.parameters + m.gradients + m.other == m.peak


class _Stash(torch.autograd.Function):
    """Identity that keeps a `nbytes` temporary, on ctx or saved, or none."""

    @staticmethod
    def forward(ctx, x, nbytes, how):
        if how == "attr":
            ctx.big = torch.empty(nbytes, dtype=torch.uint8)
        elif how == "saved":
            ctx.save_for_backward(torch.empty(nbytes, dtype=torch.uint8))
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None, None


@pytest.mark.parametrize("how", ["attr", "saved"])
def test_custom_function_temporary_counted(how):
    big = 100_000

    def peak(how):
        model, x = make_mlp()
        x.requires_grad_(True)  # so that _Stash is part of the graph
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # _Stash is the first op, so its backward runs last: the temporary is
        # live from early in forward to the end of backward, an interval that
        # holds the step's peak, so it adds exactly its size to the peak.
        def step():
            loss = model(_Stash.apply(x, big, how)).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return M.peak_bytes(step, model=model, optimizer=opt, tensors=[x]).peak

    assert peak(how) - peak("none") == big


def test_no_leak_of_step_tensors():
    model, x = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs = []

    def step():
        h = model(x)
        # the storage too: the tracker deals in storages, and a storage can
        # outlive every tensor object that viewed it
        refs.extend([weakref.ref(h), weakref.ref(h.untyped_storage())])
        h.sum().backward()
        opt.step()

    M.peak_bytes(step, model=model, optimizer=opt, tensors=[x])
    assert [r() for r in refs] == [None, None]  # without gc.collect(): no cycle holds them
    # the measurement does not keep the model's tensors alive either
    wp = weakref.ref(model[0].weight)
    model = opt = step = None  # drop the test's own references (the closure's cells too)
    gc.collect()
    assert wp() is None


def test_a_step_can_watch_its_own_measurement():
    model, x = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    live_after_op, found = [], {}

    def step():
        tracker = M.running_tracker()
        with tracker.watch(lambda op, outputs: live_after_op.append(tracker.current)):
            model(x).sum().backward()
            opt.step()
        found["weight"] = [e.role for e in tracker.entries(model[0].weight)]
        found["peak_set"] = sum(nbytes for _, nbytes in tracker.peak_set())

    pm = M.peak_bytes(step, model=model, optimizer=opt, tensors=[x])
    assert max(live_after_op) == pm.peak  # the watcher sees the peak right after the op that made it
    assert found == {"weight": ["parameters"], "peak_set": pm.peak}
    with pytest.raises(RuntimeError, match="no peak_bytes"):
        M.running_tracker()


def test_fmt_bytes():
    assert M.fmt_bytes(512) == "512 B"
    assert M.fmt_bytes(2048) == "2.0 KiB"
    assert M.fmt_bytes(int(12.3 * 2**20)) == "12.3 MiB"
    assert M.fmt_bytes(3 * 2**30) == "3.0 GiB"
    assert M.fmt_bytes(-2048) == "-2.0 KiB"


# ------------------------------------------------- host-resident (offloaded)


def test_host_resident_marked_during_step_leaves_device_account():
    def step():
        a = torch.empty(1000)  # +4000: device (CPU) memory when made
        b = torch.empty(500)  # +2000: 6000 live
        M.mark_host_resident(a)  # a moves to the host account: device 2000
        c = torch.empty(3000)  # device 14000: the peak, with a (4000) on the host
        del c
        M.unmark_host_resident(a)  # back on the device: 6000, below the peak
        assert not M.is_host_resident(a) and not M.is_host_resident(b)

    m = M.peak_bytes(step)
    assert m.peak == 2000 + 12000
    assert m.offloaded == 4000  # host-resident bytes live at the peak
    assert m.by_device == {"cpu": 14000, "host": 4000}
    assert m.other == m.peak and m.baseline == m.end == 0


def test_host_resident_mark_after_the_peak_does_not_rewrite_it():
    def step():
        a = torch.empty(1000)
        b = torch.empty(500)  # 6000: the peak, a was device memory then
        M.mark_host_resident(a)
        del b

    m = M.peak_bytes(step)
    assert (m.peak, m.other, m.offloaded) == (6000, 6000, 0)
    assert m.by_device == {"cpu": 6000, "host": 4000}


def test_host_resident_marked_before_the_step_is_baseline_on_host():
    model, x = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    step = _step(model, x, opt)
    step()  # state now exists (see test_peak_adamw_hand_computed for the figures)
    w2_state = opt.state[model[2].weight]
    for key in ("exp_avg", "exp_avg_sq"):
        M.mark_host_resident(w2_state[key])
    state = 2 * PARAMS + 4 * SCALAR
    try:
        m = M.peak_bytes(step, model=model, optimizer=opt, tensors=[x])
    finally:
        for key in ("exp_avg", "exp_avg_sq"):
            M.unmark_host_resident(w2_state[key])
    assert m.baseline == PARAMS + X + state - 2 * W2
    assert m.peak == 268820 - 2 * W2  # the unmarked figure of test_peak_adamw_hand_computed
    assert m.offloaded == 2 * W2
    assert m.optimizer_state == state - 2 * W2
    assert m.parameters + m.gradients + m.optimizer_state + m.other == m.peak
    assert m.by_device == {"cpu": m.peak, "host": 2 * W2}
    assert m.end == m.baseline
    # unmarked again: the plain figures
    assert M.peak_bytes(step, model=model, optimizer=opt, tensors=[x]).peak == 268820


def test_host_resident_registry_is_weak():
    t = torch.randn(100)
    M.mark_host_resident(t)
    assert M.is_host_resident(t) and M.is_host_resident(t[10:20])  # views share the storage
    n = len(M._HOST_RESIDENT)
    ref = weakref.ref(t.untyped_storage())
    del t
    assert ref() is None  # the mark kept nothing alive
    assert len(M._HOST_RESIDENT) == n - 1
    assert not M.is_host_resident(torch.randn(100))
    assert not M.is_host_resident(torch.empty(0, device="meta"))
