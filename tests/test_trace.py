"""Capture: every family traces to ATen training IR that shares the user's parameters
and computes what eager computes."""
import pytest
import torch
from conftest import BATCH, SEQ, call, make_bert, make_gpt2
from torch import nn

import slimfit_fx


def _call_graph(gm, inputs):
    out = gm(**inputs) if isinstance(inputs, dict) else gm(*inputs)
    return out if isinstance(out, torch.Tensor) else out.loss


def test_trace_shares_parameters_and_matches_eager(family):
    name, model, inputs = family
    gm = slimfit_fx.trace(model, inputs)
    assert isinstance(gm, torch.fx.GraphModule)
    originals = dict(model.named_parameters(remove_duplicate=False))
    for fqn, p in gm.named_parameters(remove_duplicate=False):
        assert p is originals[fqn], f"{fqn} is a copy, not the user's parameter"
    assert list(gm.state_dict().keys()) == list(model.state_dict().keys()) or set(gm.state_dict()) == set(
        model.state_dict())
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, f"{node.name} has no shape/dtype metadata"
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("aten." not in o and "getitem" not in o and "wrap_with" not in o for o in ops), ops

    torch.manual_seed(123)
    ref = call(model, inputs)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    got = _call_graph(gm, inputs)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        assert (p.grad is None) == (k not in ref_grads), k
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_train_mode_keeps_dropout():
    model, inputs = make_bert()
    gm = slimfit_fx.trace(model.train(), inputs)
    dropouts = [n for n in gm.graph.nodes if n.op == "call_function" and "dropout" in str(n.target)]
    assert dropouts and all(n.args[2] is True for n in dropouts)
    assert gm.meta["training"] is True


def test_dynamic_batch_and_sequence():
    model, inputs = make_gpt2()
    model.eval()
    gm = slimfit_fx.trace(model, inputs, dynamic=True)
    b, n = BATCH - 1, SEQ - 5
    other = {"input_ids": inputs["input_ids"][:b, :n], "attention_mask": inputs["attention_mask"][:b, :n],
             "labels": inputs["labels"][:b, :n]}
    torch.testing.assert_close(gm(**other).logits, model(**other).logits, rtol=1e-5, atol=1e-6)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if (x.sum() > 0).item():  # a branch on tensor data cannot be captured
            return self.lin(x).sum()
        return x.sum()


def test_untraceable_model_raises_trace_error_with_guidance():
    with pytest.raises(slimfit_fx.TraceError) as info:
        slimfit_fx.trace(DataDependent(), (torch.randn(2, 4),))
    msg = str(info.value)
    assert "DataDependent" in msg
    assert "test_trace.py" in msg and "forward" in msg, "must point at the failing line of the model"
    assert "try:" in msg
    assert len(msg.splitlines()) < 12, "a short message, not a traceback"


def test_bad_example_inputs_type():
    model, _ = make_bert()
    with pytest.raises(slimfit_fx.TraceError, match="example_inputs must be"):
        slimfit_fx.trace(model, 42)


def test_decoder_gets_use_cache_off():
    model, inputs = make_gpt2()
    gm = slimfit_fx.trace(model, inputs)
    out = gm(**inputs)
    assert getattr(out, "past_key_values", None) is None


def test_a_failed_capture_keeps_torchs_partial_graph_out_of_sight(capfd):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            if (y > 0).nonzero().size(0) > 0:  # a branch on tensor values
                return y.sum()
            return y.mean()

    with pytest.raises(slimfit_fx.TraceError, match="failing construct") as info:
        slimfit_fx.trace(Branchy(), (torch.randn(2, 4),))
    out, err = capfd.readouterr()
    assert len((out + err).splitlines()) < 5
    assert "lines while capturing" in str(info.value) and "SLIMFIT_VERBOSE" in str(info.value)


def test_nothing_in_the_repository_points_outside_it():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".toml", ".cfg", "")
             and not any(part.startswith(".") or part in ("build", "results") or part.endswith(".egg-info")
                         for part in p.relative_to(root).parts)]
    offenders = [str(p.relative_to(root)) for p in files if "../shared" in p.read_text(errors="ignore")
                 and p.name != "test_trace.py"]
    assert not offenders, offenders
