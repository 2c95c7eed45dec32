"""torch.compile(backend="slimfit") and slimfit_fx.compile(mode="compiled") against the eager
slimfit module (same seeds): same results, same saved bytes, and a frozen set that changes every
iteration without recompiling (slimfit_fx/integrations/dynamo.py states the design and the bound)."""
import contextlib
import dataclasses
import importlib.metadata
import logging
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_bert, make_custom
from torch._dynamo.utils import counters

import slimfit_fx
import slimfit_fx.backend
from slimfit_fx import SlimFitConfig
from slimfit_fx.analysis import layer_parameters
from slimfit_fx.integrations.dynamo import CompiledSlimFitModule
from slimfit_fx.measure import saved_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # One thread: these tiny graphs gain nothing from two, and under a loaded CI machine
    # oversubscribed OpenMP threads make each step tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _bert():
    """The tiny BERT with HF's ``config.problem_type`` already set: the first forward sets it,
    which fails a guard on the model's own state and recompiles once (the 100-iteration test
    keeps that recompile in its count; the others skip it to save time)."""
    torch.manual_seed(0)
    model, inputs = make_bert()
    model.config.problem_type = "single_label_classification"
    return model.train(), inputs


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def dynamo_log():
    """Dynamo's recompile reasons and warnings (e.g. "hit config.recompile_limit")."""
    recompiles, other = _Log(), _Log()
    torch._logging.set_logs(recompiles=True)
    loggers = [(logging.getLogger("torch._dynamo.guards.__recompiles"), recompiles),
               (logging.getLogger("torch._dynamo"), other)]
    for logger, handler in loggers:
        logger.addHandler(handler)
    try:
        yield recompiles.messages, other.messages
    finally:
        for logger, handler in loggers:
            logger.removeHandler(handler)
        torch._logging.set_logs()


def _freeze(model, frozen):
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)


def _step(fn, inputs, model, seed=5):
    """Loss, output and gradients of one forward/backward; gradients cleared afterwards."""
    torch.manual_seed(seed)
    out = fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, loss.detach(), grads


def _assert_same_step(ref, got, frozen):
    (ref_out, ref_loss, ref_grads), (out, loss, grads) = ref, got
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    if not isinstance(out, torch.Tensor):
        assert type(out) is type(ref_out)
        torch.testing.assert_close(out.logits, ref_out.logits, rtol=0, atol=0)
    for n, g in ref_grads.items():
        if n in frozen:
            assert g is None and grads[n] is None, n
        else:
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


def _slimfit_ops(gm):
    return sorted(n.target.__name__ for n in gm.graph.nodes
                  if n.op == "call_function" and getattr(n.target, "__module__", "").startswith("slimfit_fx.ops"))


def test_backend_name_resolves_on_import_and_through_the_entry_point(tmp_path):
    from torch._dynamo.backends.registry import lookup_backend

    assert "slimfit" in torch._dynamo.list_backends()
    assert lookup_backend("slimfit") is slimfit_fx.backend.slimfit_backend
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["torch_dynamo_backends"] == {"slimfit": "slimfit_fx.backend:slimfit_backend"}
    if "slimfit" not in importlib.metadata.entry_points(group="torch_dynamo_backends").names:
        pytest.skip("installed metadata predates the entry point (pip install -e . refreshes it)")
    # A fresh interpreter that never imports slimfit_fx.backend finds it through the entry point.
    code = ("import sys; from torch._dynamo.backends.registry import lookup_backend; fn = lookup_backend('slimfit'); "
            "import slimfit_fx.backend as b; sys.exit(0 if fn is b.slimfit_backend else 3)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


def test_string_backend_matches_the_eager_slimfit_module():
    config = SlimFitConfig.minmax()
    model, inputs = _bert()
    keys = list(model.state_dict())
    eager = slimfit_fx.compile(model, inputs, config)
    compiled = torch.compile(model, backend="slimfit",
                             options={"config": config, "guard_filter_fn": slimfit_fx.backend.guard_filter})
    layers = eager.plan.layers
    for fraction in (0.0, 0.9):
        frozen = set(random.Random(1).sample(layers, int(fraction * len(layers))))
        _freeze(model, frozen)
        _assert_same_step(_step(eager, inputs, model), _step(compiled, inputs, model), frozen)
        ref = saved_bytes(lambda: eager(**inputs).loss, params=model)
        got = saved_bytes(lambda: compiled(**inputs).loss, params=model)
        assert abs(got - ref) <= 0.10 * ref, (fraction, got, ref)
    model.zero_grad(set_to_none=True)
    assert list(model.state_dict()) == keys
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


def test_compiled_mode_is_the_eager_module_through_torch_compile():
    config = SlimFitConfig()  # the default formats
    model, inputs = _bert()
    keys = list(model.state_dict())
    eager = slimfit_fx.compile(model, inputs, config)
    compiled = slimfit_fx.compile(model, inputs, config, mode="compiled")
    assert isinstance(compiled, CompiledSlimFitModule) and isinstance(compiled, slimfit_fx.SlimFitModule)
    assert list(compiled.state_dict()) == keys
    assert all(a is b for a, b in zip(compiled.parameters(), model.parameters()))
    frozen = set(random.Random(2).sample(eager.plan.layers, int(0.9 * len(eager.plan.layers))))
    _freeze(model, frozen)
    _assert_same_step(_step(eager, inputs, model), _step(compiled, inputs, model), frozen)
    # One set of passes: the graph dynamo handed over, lowered, is rewritten into the same ops,
    # and its own plan predicts what the eager module's plan does.
    assert not compiled.backend.fallbacks
    assert _slimfit_ops(compiled.graph_module) == _slimfit_ops(eager.graph_module)
    graph_plan = compiled.backend.graphs[0].plan
    assert set(graph_plan.layers) == set(eager.plan.layers)
    assert graph_plan.predict(frozen).activations == eager.plan.predict(frozen).activations
    ref = saved_bytes(lambda: eager(**inputs).loss, params=model)
    got = saved_bytes(lambda: compiled(**inputs).loss, params=model)
    assert abs(got - ref) <= 0.10 * ref and got == compiled.plan.predict(frozen).activations
    # eval() runs the original forward.
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_compiled_mode_other_families(name):
    """GPT-2: tied embedding/LM-head weight, Conv1D FFN-out (addmm) and a graph break (two graphs);
    ViT: the freeze-gated patch convolution."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    model.train()
    # GPT-2's graph break puts the loss in a graph of its own, where the logits are an input: the
    # LM head's cross-entropy cannot be fused with its Linear there, so both paths leave it alone.
    config = dataclasses.replace(SlimFitConfig.minmax(), fuse_cross_entropy=False)
    eager = slimfit_fx.compile(model, inputs, config)
    compiled = slimfit_fx.compile(model, config=config, mode="compiled")
    layers = layer_parameters(model.named_parameters())
    frozen = set(random.Random(0).sample(layers, int(0.9 * len(layers))))
    _freeze(model, frozen)
    _assert_same_step(_step(eager, inputs, model), _step(compiled, inputs, model), frozen)
    assert not compiled.backend.fallbacks
    assert sorted(op for g in compiled.backend.graphs for op in _slimfit_ops(g.graph_module)) == \
        _slimfit_ops(eager.graph_module)
    ref = saved_bytes(lambda: eager(**inputs).loss, params=model)
    assert abs(saved_bytes(lambda: compiled(**inputs).loss, params=model) - ref) <= 0.10 * ref


def test_compiled_mode_on_a_user_module_with_positional_inputs_and_dtype_change():
    torch.manual_seed(0)
    model, inputs = make_custom()
    model.train()
    eager = slimfit_fx.compile(model, inputs)
    with pytest.raises(ValueError, match="mode"):
        slimfit_fx.compile(model, mode="inductor")
    compiled = slimfit_fx.compile(model, mode="compiled")  # compiled on the first training call
    assert compiled.plan is None
    frozen = set(random.Random(0).sample(layer_parameters(model.named_parameters()), 10))
    _freeze(model, frozen)
    _assert_same_step(_step(eager, inputs, model), _step(compiled, inputs, model), frozen)
    assert compiled.plan is not None and not compiled.backend.fallbacks
    # .double() goes through _apply: the module compiles afresh for the new dtype.
    compiled.double()
    out, loss, grads = _step(compiled, inputs, model)
    assert loss.dtype == torch.float64 and all((g is None) == (n in frozen) for n, g in grads.items())


def test_parameter_change_after_compiling_is_caught_not_run_stale():
    torch.manual_seed(0)
    model, inputs = make_custom()
    compiled = torch.compile(model.train(), backend="slimfit",
                             options={"guard_filter_fn": slimfit_fx.backend.guard_filter})
    compiled(*inputs).backward()
    model.double()  # the parameters' dtype guard was dropped with requires_grad: the graph checks it
    with pytest.raises(slimfit_fx.backend.ParameterChanged, match="torch._dynamo.reset"):
        compiled(*inputs)


def test_100_iterations_of_random_90_percent_freezing_compile_a_bounded_number_of_graphs():
    torch.manual_seed(0)
    model, inputs = make_bert()
    model.train()
    compiled = slimfit_fx.compile(model, mode="compiled")
    layers = layer_parameters(model.named_parameters())
    rng = random.Random(0)
    frozen_sets = set()
    with dynamo_log() as (recompiles, messages):
        for it in range(100):
            frozen = set(rng.sample(layers, int(0.9 * len(layers))))
            frozen_sets.add(frozenset(frozen))
            _freeze(model, frozen)
            if it < 60:
                batch = inputs
            else:  # then batch and sequence lengths vary, as real batches do
                b, s = 4 - it % 2, 16 - it % 5
                batch = {k: (v[:b, :s] if v.dim() == 2 else v[:b]).contiguous() for k, v in inputs.items()}
            compiled(**batch).loss.backward()
            for n, p in model.named_parameters():
                assert (p.grad is None) == (n in frozen), (it, n)
                p.grad = None
            if it == 59:
                fixed_shape_graphs = counters["stats"]["unique_graphs"]
    graphs = counters["stats"]["unique_graphs"]
    assert len(frozen_sets) >= 90  # 3 of 22 layers trained: 1540 possible sets
    # Fixed shapes: the first call, and one recompile because that call set HF's
    # config.problem_type (a guard on the model's own state); none for 60 frozen sets.
    assert fixed_shape_graphs <= 2
    # Varying batch and sequence: one more graph with symbolic sizes (automatic dynamic shapes).
    assert graphs <= 3, recompiles
    assert len(compiled.backend.graphs) == graphs and not compiled.backend.fallbacks
    assert not any("requires_grad" in r for r in recompiles), recompiles
    assert not any("recompile_limit" in m for m in messages)
    assert not any("recompile limit" in k.lower() for k in counters["unimplemented"])


def test_scheduler_changes_the_frozen_set_every_step_without_recompiles():
    model, inputs = _bert()
    compiled = slimfit_fx.compile(model, mode="compiled")
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    # The paper's score changes the frozen set most often: the hardest case for the guards.
    scheduler = slimfit_fx.Scheduler(compiled, optimizer, policy=slimfit_fx.Ratio(0.9), metric="relative_change")
    with dynamo_log() as (recompiles, messages):
        for _ in range(100):  # the bar: 100 iterations of Ratio(0.9)
            frozen = set(scheduler.frozen)
            compiled(**inputs).loss.backward()
            for n, p in model.named_parameters():
                assert (p.grad is None) == (n in frozen), n
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert len({s for _, s in scheduler.history}) >= 30  # 42 distinct frozen sets in this run
    assert counters["stats"]["unique_graphs"] == 1  # bound: one graph at a fixed batch shape
    assert not any("requires_grad" in r for r in recompiles), recompiles
    assert not any("recompile_limit" in m for m in messages)


def test_without_the_guard_filter_each_frozen_set_recompiles_and_the_backend_says_so():
    torch.manual_seed(0)
    model, inputs = make_custom()
    compiled = torch.compile(model.train(), backend="slimfit")
    names = layer_parameters(model.named_parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in names[:3]:
            _freeze(model, {name})
            compiled(*inputs).backward()
    assert counters["stats"]["unique_graphs"] == 3
    assert any("guard_filter" in str(w.message) for w in caught)


def test_requires_grad_patterns_are_forgotten_with_their_parameters():
    # The recompile warning's memory names parameters by id: a freed parameter's entry must go, or a new
    # parameter made at its address would inherit its patterns (a false warning) and the entries pile up.
    import gc

    from slimfit_fx.integrations import dynamo
    from slimfit_fx.trace import input_signature

    param = torch.nn.Parameter(torch.ones(3))
    inputs = [param, torch.ones(2)]
    signature = input_signature(inputs, by="identity", autocast=False)
    dynamo.SlimFitBackend()._warn_on_requires_grad_recompile(inputs)
    assert signature in dynamo._SEEN
    del param, inputs
    gc.collect()
    assert signature not in dynamo._SEEN
