"""Conformance: every model family of tests/families.py, tiny configs, against the unmodified eager model.

Per family (figures from tests/conformance.py): ``off()`` equals eager exactly; ``SlimFitConfig()``
gives the same loss and a per-parameter gradient cosine >= 0.99 (parameters carrying >= 1e-6 of the
global gradient norm); predicted == measured saved bytes under three frozen patterns and at a tiny
and an odd shape after capture; the compiled module never keeps more than eager; five Scheduler steps
stay finite; deepcopy and torch.save/load keep the model and plan.

Families in ``families.HEAVY`` run with ``SLIMFIT_HEAVY_TESTS=1``.
"""
import copy
import io
import os

import pytest
import torch
from conformance import freeze, loss_of, measure
from families import FAMILIES, HEAVY

from slimfit_fx import Ratio, Scheduler

HEAVY_ON = os.environ.get("SLIMFIT_HEAVY_TESTS", "") not in ("", "0")
NAMES = [pytest.param(n, marks=pytest.mark.skipif(n in HEAVY and not HEAVY_ON, reason="heavy: SLIMFIT_HEAVY_TESTS=1"))
         for n in FAMILIES]


@pytest.mark.parametrize("name", NAMES)
def test_family_conforms(name):
    c = measure(name)
    model, inputs, slim = c.model, c.inputs, c.slim
    assert c.off_loss_diff == 0 and c.off_grad_diff == 0, (name, c.off_loss_diff, c.off_grad_diff)
    assert c.default_loss_diff == 0, (name, c.default_loss_diff)
    worst, cosine = c.worst_cosine
    assert cosine >= 0.99, f"{name}: gradient of {worst} has cosine {cosine:.4f} to eager"
    for label, (predicted, measured) in c.predictions.items():
        assert predicted == measured, (name, label, predicted, measured)
    for label, (compiled, eager) in c.against_eager.items():
        assert compiled <= eager, (name, label, compiled, eager)

    # Five Scheduler steps stay finite.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Scheduler(slim, opt, Ratio(0.5))
    for step in range(5):
        loss = loss_of(slim, inputs, seed=step)
        assert torch.isfinite(loss), (name, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    sched.remove()
    freeze(model, set())

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
