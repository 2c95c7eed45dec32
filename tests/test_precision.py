"""Mixed precision: bf16 autocast and bf16 models, against the unmodified eager model in the same precision."""
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, call

import slimfit_fx
from slimfit_fx import SlimFitConfig
from slimfit_fx.measure import saved_bytes
from slimfit_fx.precision import autocast_state

PRECISIONS = ["bf16-autocast", "bf16-model"]
# RoBERTa is BERT's graph with other position ids: the full bf16 matrices leave it out (CI time);
# tests/test_families.py checks it in fp32 and off() below checks it under bf16 autocast.
PRECISION_FAMILIES = sorted(set(FAMILIES) - {"roberta"})


def _setup(name, precision):
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    model.train()
    if precision == "bf16-model":
        model.to(torch.bfloat16)
        if isinstance(inputs, dict):
            inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    return model, inputs


def _context(precision, dtype=torch.bfloat16):
    if precision.endswith("-autocast"):
        return torch.autocast("cpu", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _step(module, inputs, precision, seed=1):
    with _context(precision):
        torch.manual_seed(seed)
        loss = call(module, inputs)
    loss.backward()  # outside autocast, as PyTorch recommends
    return loss.detach()


def _grads(model):
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@functools.cache
def _carrying(name):
    """Parameters whose true gradient is not zero: those carrying >= 1e-6 of the global gradient
    norm in fp32.  In bf16 a true zero (an attention key bias: softmax ignores it) comes out as
    rounding noise of about that size, which no two implementations share."""
    model, inputs = _setup(name, "fp32")
    _step(model, inputs, "fp32")
    grads = _grads(model)
    total = torch.stack([g.norm() for g in grads.values()]).norm()
    return {k for k, g in grads.items() if g.norm() >= 1e-6 * total}


def _eager_and_compiled(name, precision, config):
    """(loss, gradients) of one step of the eager model, then of it compiled with ``config``."""
    model, inputs = _setup(name, precision)
    eager = _step(model, inputs, precision), _grads(model)
    slim = slimfit_fx.compile(model, inputs, config)
    return eager, (_step(slim, inputs, precision), _grads(model))


@pytest.mark.parametrize("name,precision", [(n, p) for n in PRECISION_FAMILIES for p in PRECISIONS]
                         + [("roberta", "bf16-autocast")])
def test_off_equals_eager_in_the_same_precision(name, precision):
    (ref, ref_grads), (loss, grads) = _eager_and_compiled(name, precision, SlimFitConfig.off())
    assert loss.dtype == ref.dtype
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for k, g in ref_grads.items():
        assert grads[k].dtype == g.dtype, k
        torch.testing.assert_close(grads[k], g, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", PRECISION_FAMILIES)
def test_default_formats_same_loss_and_close_gradients(name, precision):
    (ref, ref_grads), (loss, grads) = _eager_and_compiled(name, precision, SlimFitConfig())
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    cos = {k: F.cosine_similarity(grads[k].flatten().float(), ref_grads[k].flatten().float(), dim=0).item()
           for k in _carrying(name)}
    worst = min(cos, key=cos.get)
    assert cos[worst] >= 0.98, f"{name} {precision}: gradient of {worst} has cosine {cos[worst]:.4f} to eager"


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_a_module_used_under_autocast_and_then_without_matches_eager_both_times(name):
    model, inputs = _setup(name, "fp32")
    slim = slimfit_fx.compile(model, config=SlimFitConfig())  # captured on first use
    for precision in ("bf16-autocast", "fp32", "bf16-autocast"):
        with _context(precision):
            torch.manual_seed(3)
            ref = call(model, inputs)
            torch.manual_seed(3)
            out = call(slim, inputs)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=precision)
    states = {key[-1] for key in slim._graphs}
    assert states == {(), (("cpu", torch.bfloat16),)}


@pytest.mark.parametrize("config", [None, SlimFitConfig()], ids=["plain", "slimfit"])
@pytest.mark.parametrize("name", PRECISION_FAMILIES)
def test_analyze_under_autocast_predicts_the_saved_bytes(name, config):
    model, inputs = _setup(name, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = slimfit_fx.analyze(model, inputs, config)
        module = model if config is None else slimfit_fx.compile(model, inputs, config)
        measured = saved_bytes(lambda module=module: call(module, inputs), params=model)
    predicted = plan.predict().activations
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)
    assert predicted == measured  # the aim: to the byte
    fp32 = slimfit_fx.analyze(model, inputs, config).predict().activations
    assert predicted < fp32


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_bf16_model_prediction_counts_what_cpu_kernels_keep(name):
    # CPU's math attention computes bf16 in fp32: its scores, masks and copies are fp32.
    model, inputs = _setup(name, "bf16-model")
    for config in (None, SlimFitConfig()):
        module = model if config is None else slimfit_fx.compile(model, inputs, config)
        measured = saved_bytes(lambda module=module: call(module, inputs), params=model)
        assert slimfit_fx.analyze(model, inputs, config).predict().activations == measured


def test_fp16_autocast_with_grad_scaler_trains_like_eager():
    results = []
    for compiled in (False, True):
        model, inputs = _setup("bert", "fp32")
        module = slimfit_fx.compile(model, inputs, SlimFitConfig.off()) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.float16):
                torch.manual_seed(step)
                loss = call(module, inputs)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        results.append((loss.detach(), {k: v.clone() for k, v in model.state_dict().items()}))
    (ref_loss, ref_state), (loss, state) = results
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=0, atol=0, msg=k)


def test_fp16_autocast_default_formats_are_finite_and_close():
    model, inputs = _setup("gpt2", "fp32")
    with torch.autocast("cpu", dtype=torch.float16):
        torch.manual_seed(1)
        ref = call(model, inputs)
    ref.backward()
    ref_grads = _grads(model)
    slim = slimfit_fx.compile(model, inputs, SlimFitConfig())
    with torch.autocast("cpu", dtype=torch.float16):
        torch.manual_seed(1)
        loss = call(slim, inputs)
        assert autocast_state() == (("cpu", torch.float16),)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    grads = _grads(model)
    for k in _carrying("gpt2"):
        assert torch.isfinite(grads[k]).all(), k
        assert F.cosine_similarity(grads[k].flatten().float(), ref_grads[k].flatten().float(), dim=0) >= 0.98, k


def test_float64_runs_unquantized_with_a_note():
    model, inputs = _setup("bert", "fp32")
    model.to(torch.float64)
    torch.manual_seed(1)
    ref = call(model, inputs)
    ref.backward()
    ref_grads = _grads(model)
    slim = slimfit_fx.compile(model, inputs, SlimFitConfig())
    torch.manual_seed(1)
    loss = call(slim, inputs)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for k, g in _grads(model).items():  # nothing frozen, nothing quantized: eager's arithmetic
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-12, atol=1e-15, msg=k)
    notes = slim.rewrite_notes()
    assert notes["GELU input kept unquantized: the formats do not take torch.float64"] == 2
    assert notes["attention kept unquantized: the formats do not take torch.float64"] == 2
    measured = saved_bytes(lambda: call(slim, inputs), params=model)
    assert slim.plan.predict().activations == measured
