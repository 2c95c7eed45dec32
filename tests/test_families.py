"""Conformance: every model family of tests/families.py, tiny configs, against the unmodified eager model.

Per family: ``compile`` works (or names the construct and the workaround); ``off()`` equals eager
exactly; ``SlimFitConfig()`` gives the same loss and a per-parameter gradient cosine >= 0.99
(parameters carrying >= 1e-6 of the global gradient norm); predicted == measured saved bytes under
three frozen patterns and at a tiny shape after capture (odd ones: tests/test_compile.py); the compiled module never keeps
more than eager; five Scheduler steps stay finite; deepcopy and torch.save/load work.

Eager runs with ``use_cache`` off, as the compiled module does (training keeps no KV cache).
Families in ``families.HEAVY`` run with ``SLIMFIT_HEAVY_TESTS=1``.
"""
import copy
import io
import os
import random

import pytest
import torch
import torch.nn.functional as F

import slimfit_fx
from slimfit_fx import Ratio, Scheduler, SlimFitConfig
from slimfit_fx.measure import saved_bytes
from families import FAMILIES, HEAVY

HEAVY_ON = os.environ.get("SLIMFIT_HEAVY_TESTS", "") not in ("", "0")
NAMES = [pytest.param(n, marks=pytest.mark.skipif(n in HEAVY and not HEAVY_ON, reason="heavy: SLIMFIT_HEAVY_TESTS=1"))
         for n in FAMILIES]


def _loss(module, inputs, seed=1):
    torch.manual_seed(seed)
    out = module(**inputs)
    return out if isinstance(out, torch.Tensor) else out.loss


def _no_cache(model):
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False


def _grads(model):
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _freeze(model, frozen):
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)


def _planned(slim, inputs, measured):
    """What the plan covers of a step that keeps ``measured``: all of it, or, when only the backbone is
    captured (DeBERTa-v2), what the backbone alone keeps when called as the model calls it."""
    if slim.backbone is None:
        return measured
    calls = []
    handle = slim.backbone.original.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    _loss(slim, inputs)
    handle.remove()
    args, kwargs = calls[0]
    return saved_bytes(lambda: slim.backbone(*args, **kwargs)[0].sum(), params=slim)


def _shapes(inputs):
    """A tiny and an odd batch cut from the family's own (text: batch x sequence; images: batch)."""
    if "input_ids" in inputs:  # a batch of one token: where symbolic graphs' guards and kernels turn
        cut = [{k: v[:b, :n] if v.dim() > 1 else v[:b] for k, v in inputs.items()} for b, n in ((1, 1),)]
    else:
        cut = [{k: v[:b] for k, v in inputs.items()} for b in (1,)]
    return [{k: v.contiguous() for k, v in shape.items()} for shape in cut]


@pytest.mark.parametrize("name", NAMES)
def test_family_conforms(name):
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    model.train()
    _no_cache(model)
    ref = _loss(model, inputs)
    ref.backward()
    ref_grads = _grads(model)
    total = torch.stack([g.norm() for g in ref_grads.values()]).norm()
    carrying = [k for k, g in ref_grads.items() if g.norm() >= 1e-6 * total]
    eager_saved = saved_bytes(lambda: _loss(model, inputs), params=model)

    # off(): eager's arithmetic, exactly.
    off = slimfit_fx.compile(model, inputs, SlimFitConfig.off())
    loss = _loss(off, inputs)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    loss.backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[k], rtol=0, atol=0, msg=k)
    measured = saved_bytes(lambda: _loss(off, inputs), params=model)
    assert _planned(off, inputs, measured) == off.plan.predict().activations

    # SlimFitConfig(): the same loss, close gradients, exact predictions, never more than eager.
    slim = slimfit_fx.compile(model, inputs)
    loss = _loss(slim, inputs)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    loss.backward()
    grads = _grads(model)
    cos = {k: F.cosine_similarity(grads[k].flatten(), ref_grads[k].flatten(), dim=0).item() for k in carrying}
    worst = min(cos, key=cos.get)
    assert cos[worst] >= 0.99, f"{name}: gradient of {worst} has cosine {cos[worst]:.4f} to eager"

    layers = slim.plan.layers
    patterns = {"none": set(), "every other": set(layers[::2]),
                "random 90%": set(random.Random(0).sample(layers, int(0.9 * len(layers))))}
    for label, frozen in patterns.items():
        _freeze(model, frozen)
        measured = saved_bytes(lambda: _loss(slim, inputs), params=model)
        assert _planned(slim, inputs, measured) == slim.plan.predict(frozen).activations, (name, label)
        eager = eager_saved if not frozen else saved_bytes(lambda: _loss(model, inputs), params=model)
        assert measured <= eager, (name, label, measured, eager)
    _freeze(model, set())
    if slim.backbone is None:  # a backbone-only capture is analysed at the captured shape (the plan)
        for shape in _shapes(inputs):
            measured = saved_bytes(lambda: _loss(slim, shape), params=model)
            assert measured == slimfit_fx.analyze(model, shape, SlimFitConfig()).predict().activations, \
                (name, {k: tuple(v.shape) for k, v in shape.items()})

    # Five Scheduler steps stay finite.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Scheduler(slim, opt, Ratio(0.5))
    for step in range(5):
        loss = _loss(slim, inputs, seed=step)
        assert torch.isfinite(loss), (name, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    sched.remove()
    _freeze(model, set())

    # A drop-in: deepcopy and torch.save/load keep the model and plan (the graphs are captured again on
    # the next call: tests/test_compile.py runs one).
    buf = io.BytesIO()
    torch.save(slim, buf)
    buf.seek(0)
    for other in (copy.deepcopy(slim), torch.load(buf, weights_only=False)):
        assert other.original is not model and other._modules is other.original._modules and not other._graphs
        assert other.plan is not None and type(other.original) is type(model)
        for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), (name, k)
