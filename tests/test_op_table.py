"""The op table against autograd itself: for every rule, and every pattern of which
inputs and weights require grad, the predicted saved bytes equal what autograd saves.

Each case is a tiny module.  Its activation inputs pass through a scalar
parameter (``x * s``) so that whether they require grad is a freezing choice
too, and every subset of its parameters is frozen in turn.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimfit_fx
from slimfit_fx.measure import saved_bytes


class Case(nn.Module):
    """fn(module, *scaled_inputs) with one scale parameter per floating input."""

    def __init__(self, fn, n_float_inputs, **params):
        super().__init__()
        self.fn = fn
        self.scales = nn.ParameterList([nn.Parameter(torch.tensor(1.5)) for _ in range(n_float_inputs)])
        for name, value in params.items():
            setattr(self, name, nn.Parameter(value))

    def forward(self, *inputs):
        scaled, k = [], 0
        for x in inputs:
            if x.is_floating_point():
                x = x * self.scales[k]
                k += 1
            scaled.append(x)
        out = self.fn(self, *scaled)
        return out.float().sum() if out.is_floating_point() else out


def g(*shape):
    return torch.randn(*shape)


CASES = {
    "linear_2d": (lambda m, x: F.linear(x, m.w, m.b), [g(4, 8)], dict(w=g(6, 8), b=g(6))),
    "linear_3d": (lambda m, x: F.linear(x, m.w, m.b), [g(2, 5, 8)], dict(w=g(6, 8), b=g(6))),
    "linear_3d_strided": (lambda m, x: F.linear(x.transpose(0, 1), m.w), [g(5, 2, 8)], dict(w=g(6, 8))),
    "linear_shared_input": (lambda m, x: F.linear(x, m.w1) + F.linear(x, m.w2), [g(2, 5, 8)],
                            dict(w1=g(8, 8), w2=g(8, 8))),
    "addmm": (lambda m, x: torch.addmm(m.b, x, m.w), [g(4, 8)], dict(w=g(8, 6), b=g(6))),
    "bmm": (lambda m, a, b: torch.bmm(a, b), [g(2, 3, 4), g(2, 4, 5)], {}),
    "matmul_4d_transposed": (lambda m, q, k: q @ k.transpose(-1, -2), [g(2, 3, 5, 4), g(2, 3, 5, 4)], {}),
    "matmul_3d_2d": (lambda m, x: x @ m.w, [g(2, 5, 8)], dict(w=g(8, 3))),
    "conv2d": (lambda m, x: F.conv2d(x, m.w, m.b, stride=2), [g(2, 3, 8, 8)], dict(w=g(4, 3, 2, 2), b=g(4))),
    "embedding": (lambda m, i: F.embedding(i, m.w), [torch.randint(0, 10, (2, 5))], dict(w=g(10, 4))),
    "layer_norm": (lambda m, x: F.layer_norm(x, (8,), m.w, m.b), [g(2, 5, 8)], dict(w=g(8), b=g(8))),
    "gelu": (lambda m, x: F.gelu(x), [g(3, 7)], {}),
    "silu": (lambda m, x: F.silu(x), [g(3, 7)], {}),
    "relu_tanh_sigmoid": (lambda m, x: F.relu(x) + torch.tanh(x) + torch.sigmoid(x), [g(3, 7)], {}),
    "softmax": (lambda m, x: torch.softmax(x, -1), [g(3, 7)], {}),
    "log_softmax": (lambda m, x: torch.log_softmax(x, -1), [g(3, 7)], {}),
    "mul_div_pow_rsqrt": (lambda m, a, b: a * b / (b * b + 1) + a.pow(2) + torch.rsqrt(b * b + 1),
                          [g(3, 7), g(3, 7)], {}),
    "mul_by_weight": (lambda m, x: x * m.w, [g(3, 7)], dict(w=g(7))),
    "cross_entropy": (lambda m, x, t: F.cross_entropy(x, t), [g(6, 5), torch.randint(0, 5, (6,))], {}),
    "gather_index_masked_fill": (
        lambda m, x, i: x.gather(1, i).sum() + x[i[:, 0]].sum() + x.masked_fill(x > 0, 0.0).sum(),
        [g(4, 6), torch.randint(0, 4, (4, 2))], {}),
    "sdpa_flash": (lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v),
                   [g(2, 2, 5, 4), g(2, 2, 5, 4), g(2, 2, 5, 4)], {}),
    "sdpa_bool_mask": (lambda m, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                       [g(2, 2, 5, 4), g(2, 2, 5, 4), g(2, 2, 5, 4), torch.rand(2, 1, 5, 5) > 0.2], {}),
    "sdpa_math_dropout": (
        lambda m, q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          dropout_p=0.3),
        [g(2, 5, 2, 4), g(2, 5, 2, 4), g(2, 5, 2, 4)], {}),
    "sdpa_causal": (lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    [g(2, 2, 5, 4), g(2, 2, 5, 4), g(2, 2, 5, 4)], {}),
    "dropout": (lambda m, x: F.dropout(x, 0.25, training=True), [g(3, 7)], {}),
}


def freeze_patterns(module):
    names = [n for n, _ in module.named_parameters()]
    for r in range(len(names) + 1):
        for frozen in itertools.combinations(names, r):
            yield set(frozen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_table_matches_autograd(case):
    torch.manual_seed(0)
    fn, inputs, params = CASES[case]
    module = Case(fn, sum(x.is_floating_point() for x in inputs), **params).train()
    plan = slimfit_fx.analyze(module, tuple(inputs))
    assert not plan.unknown_ops, f"{case} hit ops outside the table: {plan.unknown_ops}"
    patterns = list(freeze_patterns(module))
    assert len(patterns) >= 2
    for frozen in patterns:
        for name, p in module.named_parameters():
            p.requires_grad_(name not in frozen)
        measured = saved_bytes(lambda: module(*inputs), params=module)
        predicted = plan.predict(frozen).activations
        assert predicted == measured, f"{case} frozen={sorted(frozen)}: predicted {predicted} B, autograd {measured} B"


def test_unknown_op_counted_in_full_and_listed():
    class Cumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.cumsum(x @ self.w, dim=-1).sum()

    x = torch.randn(4, 8)
    plan = slimfit_fx.analyze(Cumsum(), (x,))
    assert "aten.cumsum" in plan.unknown_ops
    rows = [r for r in plan.saved_tensors() if any("cumsum" in c for c in r["consumers"])]
    assert rows and rows[0]["bytes"] == 4 * 8 * 4, "unknown op's tensor input must be counted in full"
