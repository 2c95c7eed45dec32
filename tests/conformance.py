"""One family's conformance figures against the unmodified eager model (tests/families.py configs).

``measure(name) -> Conformance``: eager and ``off()`` losses and gradients, the default formats'
gradient cosines, predicted and measured saved bytes under three frozen patterns and at tiny and odd
shapes, and eager's saved bytes under the same frozen sets.  It asserts nothing: tests/test_families.py
asserts on it, ``tools/conformance.py`` tabulates it.

Eager runs with ``use_cache`` off, as the compiled module does (training keeps no KV cache).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from families import FAMILIES

import slimfit_fx
from slimfit_fx import SlimFitConfig
from slimfit_fx.measure import saved_bytes


@dataclass
class Conformance:
    name: str
    model: torch.nn.Module
    inputs: dict
    slim: torch.nn.Module  # compiled with SlimFitConfig()
    off_loss_diff: float  # |loss(off()) - loss(eager)|
    off_grad_diff: float  # max over parameters of max |grad(off()) - grad(eager)|
    default_loss_diff: float
    cosines: dict[str, float]  # parameter -> cosine of SlimFitConfig()'s gradient to eager's (carrying ones)
    # label -> (predicted, measured) saved bytes: off(), three frozen patterns, tiny/odd shapes
    predictions: dict[str, tuple[int, int]] = field(default_factory=dict)
    # frozen pattern -> (compiled, eager) saved bytes
    against_eager: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def worst_cosine(self) -> tuple[str, float]:
        name = min(self.cosines, key=self.cosines.get)
        return name, self.cosines[name]

    @property
    def worst_prediction_error(self) -> float:
        """Largest |predicted - measured| / measured over every label, as a fraction."""
        return max(abs(p - m) / max(m, 1) for p, m in self.predictions.values())


def loss_of(module, inputs, seed=1):
    torch.manual_seed(seed)
    out = module(**inputs)
    return out if isinstance(out, torch.Tensor) else out.loss


def no_cache(model):
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False


def take_grads(model):
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def freeze(model, frozen):
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)


def planned_part(slim, inputs, measured):
    """What the plan covers of a step that keeps ``measured``: all of it, or, when only the backbone is
    captured (DeBERTa-v2), what the backbone alone keeps when called as the model calls it."""
    if slim.backbone is None:
        return measured
    calls = []
    handle = slim.backbone.original.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    loss_of(slim, inputs)
    handle.remove()
    args, kwargs = calls[0]
    return saved_bytes(lambda: slim.backbone(*args, **kwargs)[0].sum(), params=slim)


def small_shapes(inputs):
    """A tiny and an odd batch cut from the family's own (text: batch x sequence; images: batch)."""
    if "input_ids" in inputs:  # a batch of one token: where symbolic graphs' guards and kernels turn
        cut = {f"{b}x{n}": {k: v[:b, :n] if v.dim() > 1 else v[:b] for k, v in inputs.items()}
               for b, n in ((1, 1), (2, 5))}
    else:
        cut = {"1": {k: v[:1] for k, v in inputs.items()}}
    return {label: {k: v.contiguous() for k, v in shape.items()} for label, shape in cut.items()}


def _max_diff(grads, ref):
    """Largest elementwise difference; infinite when the two disagree on which parameters have one."""
    if grads.keys() != ref.keys():
        return float("inf")
    return max((float((g - ref[k]).abs().max()) for k, g in grads.items()), default=0.0)


def measure(name: str, blocks: str | None = None) -> Conformance:
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    model.train()
    no_cache(model)
    ref = loss_of(model, inputs)
    ref.backward()
    ref_grads = take_grads(model)
    total = torch.stack([g.norm() for g in ref_grads.values()]).norm()
    carrying = [k for k, g in ref_grads.items() if g.norm() >= 1e-6 * total]
    eager_saved = saved_bytes(lambda: loss_of(model, inputs), params=model)

    off = slimfit_fx.compile(model, inputs, SlimFitConfig.off(), blocks=blocks)
    loss = loss_of(off, inputs)
    loss.backward()
    off_loss, off_grad = float((loss - ref).detach().abs()), _max_diff(take_grads(model), ref_grads)
    measured = saved_bytes(lambda: loss_of(off, inputs), params=model)
    predictions = {"off()": (off.plan.predict().activations, planned_part(off, inputs, measured))}

    slim = slimfit_fx.compile(model, inputs, blocks=blocks)
    loss = loss_of(slim, inputs)
    loss.backward()
    grads = take_grads(model)
    cosines = {k: F.cosine_similarity(grads[k].flatten(), ref_grads[k].flatten(), dim=0).item() for k in carrying}
    result = Conformance(name, model, inputs, slim, off_loss, off_grad, float((loss - ref).detach().abs()), cosines,
                         predictions)

    layers = slim.plan.layers
    patterns = {"none": set(), "every other": set(layers[::2]),
                "random 90%": set(random.Random(0).sample(layers, int(0.9 * len(layers))))}
    for label, frozen in patterns.items():
        freeze(model, frozen)
        measured = saved_bytes(lambda: loss_of(slim, inputs), params=model)
        result.predictions[label] = (slim.plan.predict(frozen).activations, planned_part(slim, inputs, measured))
        eager = eager_saved if not frozen else saved_bytes(lambda: loss_of(model, inputs), params=model)
        result.against_eager[label] = (measured, eager)
    freeze(model, set())
    if slim.backbone is None:  # a backbone-only capture is analysed at the captured shape (the plan)
        for label, shape in small_shapes(inputs).items():
            measured = saved_bytes(lambda shape=shape: loss_of(slim, shape), params=model)
            plan = (slimfit_fx.analyze(model, shape, SlimFitConfig()) if blocks is None
                    else slim.plan_for_call((), shape))
            result.predictions[label] = (plan.predict().activations, measured)
    return result
