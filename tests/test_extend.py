"""The public extension API: a user's own norm gets a format, a custom op gets a rule, a pass
gets its place in the pipeline, all without editing the library."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfit_fx
from slimfit_fx import ConfigError, SlimFitConfig
from slimfit_fx.extend import (
    Fusion,
    Save,
    find_fusions,
    pipeline,
    register_pass,
    register_pattern,
    register_rule,
    unregister,
)
from slimfit_fx.measure import saved_bytes
from slimfit_fx.nodes import op_key


class ScaleNorm(nn.Module):
    """A norm the library has never heard of: ``g * x / max(|x|, eps)``."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.g * (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(16, 64), ScaleNorm(64), nn.Linear(64, 3)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.inp(x)))).square().mean()


class _Compact(torch.autograd.Function):
    """The user's op: keeps its input in bf16 (half the bytes) and recomputes in backward."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x.to(torch.bfloat16), g)
        return g * (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5))

    @staticmethod
    def backward(ctx, grad):
        x, g = ctx.saved_tensors
        with torch.enable_grad():
            x = x.float().requires_grad_()
            g_ = g.detach().requires_grad_(g.requires_grad)
            out = g_ * (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5))
            inputs = [x] + ([g_] if g.requires_grad else [])
            grads = torch.autograd.grad(out, inputs, grad)
        return grads[0], (grads[1] if g.requires_grad else None)


def scale_norm(x, g):
    return _Compact.apply(x, g)


def _is(node, key):
    return getattr(node, "op", None) == "call_function" and op_key(node.target) == key


def match_scale_norm(node, ctx):
    """``mul(g, div(x, clamp_min(linalg_vector_norm(x))))`` with ``g`` a parameter."""
    if not _is(node, "aten.mul") or not ctx.is_param(node.args[0]):
        return None
    g, div = node.args
    if not (_is(div, "aten.div") and _is(div.args[1], "aten.clamp_min")):
        return None
    clamp = div.args[1]
    norm, x = clamp.args[0], div.args[0]
    if not (_is(norm, "aten.linalg_vector_norm") and norm.args[0] is x):
        return None
    numel = x.meta["val"].numel()
    return Fusion(node, (norm, clamp, div), scale_norm, (x, g),
                  lambda ctx: [Save("new", 0, (0, 1), "scalenorm_input", copy_bytes=numel * 2, share="x")])


@pytest.fixture
def scale_norm_pattern():
    register_pattern("test_scale_norm", match_scale_norm)
    yield
    unregister("test_scale_norm")


def _saved_and_predicted(model, x):
    slim = slimfit_fx.compile(model, (x,))
    measured = saved_bytes(lambda: slim(x))
    return measured, slim.plan.predict().activations, slim


def test_a_registered_pattern_gives_a_user_norm_a_format(scale_norm_pattern):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    unregister("test_scale_norm")
    before, predicted_before, _ = _saved_and_predicted(model, x)
    register_pattern("test_scale_norm", match_scale_norm)
    after, predicted_after, slim = _saved_and_predicted(model, x)
    assert predicted_before == before and predicted_after == after
    assert after < before
    assert any(node.target is scale_norm for node in slim.graph_module.graph.nodes)
    torch.manual_seed(1)
    ref = model(x)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = slim(x)
    out.backward()
    assert torch.equal(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=2e-2, atol=1e-3)


def test_patterns_are_off_without_a_config():
    gm = slimfit_fx.trace(Net(), (torch.randn(2, 16),))
    assert find_fusions(gm, None) == {}


@torch.library.custom_op("slimfit_test::softsign", mutates_args=())
def softsign(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + x.abs())


@softsign.register_fake
def _(x):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)  # keeps its output, not its input: no default rule can know that


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return grad * (1 - y.abs()) ** 2


softsign.register_autograd(_backward, setup_context=_setup)


class SoftsignNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 1)

    def forward(self, x):
        h = self.a(x)
        return self.b(softsign(h) + h.exp()).sum()  # exp keeps its output too: h and two outputs


def test_a_registered_rule_prices_a_custom_op():
    model, x = SoftsignNet(), torch.randn(4, 8)
    slim = slimfit_fx.compile(model, (x,), SlimFitConfig.off())
    assert "slimfit_test.softsign" in slim.plan.unknown_ops
    register_rule(torch.ops.slimfit_test.softsign, lambda node, ctx: [Save("out", 0, (0,), "activation_output")])
    try:
        slim = slimfit_fx.compile(model, (x,), SlimFitConfig.off())
        assert slim.plan.unknown_ops == {}
        assert slim.plan.predict().activations == saved_bytes(lambda: slim(x))
        with pytest.raises(ConfigError, match="replace=True"):
            register_rule("slimfit_test.softsign", lambda node, ctx: [])
    finally:
        from slimfit_fx.op_table import OP_TABLE

        OP_TABLE.pop("slimfit_test.softsign")


def test_the_pipeline_honours_declared_order():
    names = [name for name, _ in pipeline()]
    assert names[0] == "fuse_patterns"
    assert names.index("quantize_activations") < names.index("recast_weights")
    ran = []

    def mark(gm, config):
        ran.append(gm)
        return gm

    register_pass("test_mark", mark, before=["fuse_patterns"])
    try:
        assert [name for name, _ in pipeline()][0] == "test_mark"
        slimfit_fx.compile(Net(), (torch.randn(2, 16),))
        assert len(ran) == 1
        with pytest.raises(ConfigError, match="taken"):
            register_pass("test_mark", mark)
    finally:
        unregister("test_mark")
    register_pass("test_cycle", mark, after=["freeze_gate"], before=["fuse_patterns"])
    try:
        with pytest.raises(ConfigError, match="cycle"):
            pipeline()
    finally:
        unregister("test_cycle")
    register_pass("test_unknown", mark, after=["no_such_pass"])
    try:
        with pytest.raises(ConfigError, match="not registered"):
            pipeline()
    finally:
        unregister("test_unknown")
    with pytest.raises(ConfigError, match="no pattern or pass"):
        unregister("test_unknown")
