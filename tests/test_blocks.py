"""Per-block capture (``compile(..., blocks="auto")``) against eager PyTorch and the whole capture:
the same losses and gradients bit for bit, predictions exact under frozen patterns and at tiny and
odd shapes, never more saved than eager, the fallbacks said out loud."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from conformance import loss_of, measure
from families import FAMILIES

import slimfit_fx
from slimfit_fx import SlimFitConfig
from slimfit_fx.blocks import find_stacks, kind_of
from slimfit_fx.measure import saved_bytes

# One per architecture the blockwise path handles differently: encoder, decoder with rotary and GQA,
# alternating sliding/global layers (two kinds), GPT-2's Conv1D, a vision encoder, a backbone-only capture.
FAMILIES_BLOCKWISE = ["bert", "llama", "gemma2", "gpt2", "vit", "deberta-v2", "clip-vision"]


def _blockwise(slim) -> bool:
    return "slimfit_blocks" in slim.graph_module.meta


@pytest.mark.parametrize("name", FAMILIES_BLOCKWISE)
def test_family_blockwise_conforms(name):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*blocks='auto'")  # no fallback to the whole capture
        c = measure(name, blocks="auto")
    assert _blockwise(c.slim)
    assert c.off_loss_diff == 0 and c.off_grad_diff == 0
    assert c.default_loss_diff < 1e-4 and min(c.cosines.values()) >= 0.99
    for label, (predicted, measured) in c.predictions.items():
        assert predicted == measured, (name, label, predicted, measured)
    for label, (compiled, eager) in c.against_eager.items():
        assert compiled <= eager, (name, label, compiled, eager)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_blockwise_equals_whole_capture_bitwise(name):
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    model.train()
    results = []
    for blocks in (None, "auto"):
        slim = slimfit_fx.compile(model, inputs, blocks=blocks)
        loss = loss_of(slim, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        (slim.plan.predict().activations, slim.plan.layers), slim.rewrite_notes()))
        model.zero_grad(set_to_none=True)
    (l0, g0, p0, n0), (l1, g1, p1, n1) = results
    assert torch.equal(l0, l1) and p0 == p1 and n0 == n1
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_one_graph_serves_every_block_of_a_kind():
    model, inputs = FAMILIES["gemma2"]()
    slim = slimfit_fx.compile(model, inputs, blocks="auto")
    served = [times for _, times in slim.graph_module.meta["slimfit_blocks"]]
    assert served == [1, 1]  # sliding and global layers: two kinds of one block each
    stacks = find_stacks(model)
    assert [s.prefix for s in stacks] == ["model.layers"]
    a, b = stacks[0].blocks
    assert kind_of(a) != kind_of(b)


def test_deep_model_captures_one_block():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                  intermediate_size=64)
    model = transformers.BertForSequenceClassification(cfg).train()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.tensor([0, 1])}
    slim = slimfit_fx.compile(model, inputs, blocks="auto")
    assert [times for _, times in slim.graph_module.meta["slimfit_blocks"]] == [6]
    measured = saved_bytes(lambda: slim(**inputs).loss, params=model)
    assert slim.plan.predict().activations == measured


def test_block_hooks_fire_and_forward_is_restored():
    model, inputs = FAMILIES["llama"]()
    slim = slimfit_fx.compile(model, inputs, blocks="auto")
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, a: calls.append(m)) for layer in model.model.layers]
    slim(**inputs).loss.backward()
    assert calls == list(model.model.layers)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    for h in handles:
        h.remove()


def test_random_stream_is_the_users():
    model, inputs = FAMILIES["bert"]()  # dropout in the embeddings and every block
    model.train()
    torch.manual_seed(3)
    eager = loss_of(model, inputs, seed=3)
    torch.manual_seed(3)
    slim = slimfit_fx.compile(model, inputs, SlimFitConfig.off(), blocks="auto")  # captures now
    assert torch.equal(loss_of(slim, inputs, seed=3), eager)
    torch.manual_seed(5)
    slimfit_fx.compile(model, inputs, SlimFitConfig.off(), blocks="auto")
    after_capture = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(4), after_capture)


def test_no_repeated_blocks_falls_back_and_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.warns(RuntimeWarning, match="no stack of repeated blocks.*whole model"):
        slim = slimfit_fx.compile(model, (torch.randn(3, 4),), blocks="auto")
    assert not _blockwise(slim)
    assert slim.plan.predict().activations == saved_bytes(lambda: slim(torch.randn(3, 4)), params=model)


def test_bad_blocks_argument():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="blocks must be 'auto'"):
        slimfit_fx.compile(model, blocks="yes")
    with pytest.raises(ValueError, match="mode='eager'"):
        slimfit_fx.compile(model, mode="compiled", blocks="auto")


def test_pickles_and_recaptures_blockwise():
    model, inputs = FAMILIES["llama"]()
    slim = slimfit_fx.compile(model, inputs, blocks="auto")
    clone = copy.deepcopy(slim)
    torch.manual_seed(0)
    a = loss_of(slim, inputs)
    torch.manual_seed(0)
    b = loss_of(clone, inputs)
    assert torch.equal(a, b) and _blockwise(clone)


def _checkpoint_runs(name, config):
    model, inputs = FAMILIES[name]()  # BERT's dropout: the recompute replays the random stream
    model.train()
    runs = {}
    for checkpoint in (None, "all"):
        slim = slimfit_fx.compile(model, inputs, config, blocks="auto", checkpoint=checkpoint)
        loss = loss_of(slim, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        measured = saved_bytes(lambda slim=slim: loss_of(slim, inputs), params=model)
        assert slim.plan.predict().activations == measured
        runs[checkpoint] = (loss.detach(), grads, measured)
    return runs[None], runs["all"]


@pytest.mark.parametrize("name", ["bert", "llama", "gemma2"])
def test_checkpointing_with_exact_inputs_changes_nothing(name):
    (l0, g0, m0), (l1, g1, m1) = _checkpoint_runs(name, SlimFitConfig(checkpoint_input_format=None))
    assert torch.equal(l0, l1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert m1 < m0 / 2


@pytest.mark.parametrize("name", ["bert", "llama", "gemma2"])
def test_checkpointing_with_int8_inputs_keeps_the_formats_tolerance(name):
    (l0, g0, m0), (l1, g1, m1) = _checkpoint_runs(name, SlimFitConfig())
    assert torch.equal(l0, l1)  # the first forward is exact; only the recompute sees int8 inputs
    assert any(not torch.equal(g0[k], g1[k]) for k in g0)  # the recompute did read int8 inputs
    total = torch.stack([g.norm() for g in g0.values()]).norm()
    for k, g in g0.items():
        if g.norm() >= 1e-6 * total:
            assert torch.nn.functional.cosine_similarity(g.flatten(), g1[k].flatten(), dim=0) >= 0.99, k
    assert m1 < m0 / 2


def test_checkpointing_a_block_whose_input_needs_no_grad():
    model, inputs = FAMILIES["llama"]()
    for n, p in model.named_parameters():  # nothing upstream of the first block trains
        p.requires_grad_("embed" not in n)
    slim = slimfit_fx.compile(model, inputs, checkpoint="all")  # per-block capture implied
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    loss_of(slim, inputs).backward()
    assert all(p.grad is not None for p in model.model.layers[0].parameters())
    model.zero_grad(set_to_none=True)
    assert slim.plan.predict(frozen).activations == saved_bytes(lambda: loss_of(slim, inputs), params=model)
    for p in model.model.layers.parameters():  # a frozen block fed no gradient records nothing
        p.requires_grad_(False)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert slim.plan.predict(frozen).activations == saved_bytes(lambda: loss_of(slim, inputs), params=model)


def test_checkpoint_budget_recomputes_the_fewest_blocks():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64)
    model = transformers.BertForSequenceClassification(cfg).train()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.tensor([0, 1])}
    full = slimfit_fx.compile(model, inputs, blocks="auto").plan.predict().activations
    every = slimfit_fx.compile(model, inputs, checkpoint="all").plan.predict().activations
    budget = (full + every) // 2
    slim = slimfit_fx.compile(model, inputs, checkpoint=budget)
    kept = slim.plan.predict().activations
    assert every < kept <= budget
    assert kept == saved_bytes(lambda: slim(**inputs).loss, params=model)
    with pytest.warns(RuntimeWarning, match="every block is recomputed"):
        slimfit_fx.compile(model, inputs, checkpoint=1)
    with pytest.raises(ValueError, match="checkpoint must be"):
        slimfit_fx.compile(model, checkpoint="some")
