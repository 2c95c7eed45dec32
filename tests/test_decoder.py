"""Decoder LLMs: the saving over plain freezing, rotary tables kept once, attention at any length."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES
from torch import nn

import slimfit_fx
from slimfit_fx import SlimFitConfig
from slimfit_fx.analysis import layer_parameters
from slimfit_fx.measure import saved_bytes, saved_tensors

DECODERS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gpt2", "opt", "gpt-neox"]


def _no_cache(model):
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False


def _freeze(model, frozen):
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)


def _loss(module, inputs):
    torch.manual_seed(1)
    return module(**inputs).loss


@pytest.mark.parametrize("name", DECODERS)
def test_decoders_keep_a_third_of_plain_freezing(name):
    """90% of the layers frozen at random: the compiled module keeps at most a third of what plain
    PyTorch keeps with the same layers frozen, and the prediction is the measurement."""
    model, inputs = FAMILIES[name]()
    _no_cache(model)
    model.train()
    slim = slimfit_fx.compile(model, inputs)
    layers = layer_parameters(model.named_parameters())
    frozen = set(random.Random(0).sample(layers, int(0.9 * len(layers))))
    _freeze(model, frozen)
    eager = saved_bytes(lambda: _loss(model, inputs))
    measured = saved_bytes(lambda: _loss(slim, inputs))
    assert slim.plan.predict(frozen=frozen).activations == measured
    assert measured * 3 <= eager, f"{name}: {measured} B vs plain freezing {eager} B"


def _llama(layers, seq=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq, use_cache=False)
    torch.manual_seed(0)
    ids = torch.randint(64, (2, seq))
    return LlamaForCausalLM(cfg).train(), {"input_ids": ids, "labels": ids}


def test_rotary_tables_are_kept_once_whatever_the_depth():
    """cos/sin are computed once per forward and kept once, not per layer."""
    counts = {}
    for layers in (2, 4):
        model, inputs = _llama(layers)
        rows = slimfit_fx.compile(model, inputs).plan.saved_tensors()
        rotary = [r for r in rows if r["shape"][-2:] == [16, 8] and r["shape"][:2] == [1, 1]]
        counts[layers] = len(rotary)
    assert counts[2] == counts[4] == 2


class Causal(nn.Module):
    """One attention block over long sequences, as decoders call SDPA."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv, self.o, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(h.transpose(1, 2).reshape(b, s, d)).square().mean()


def test_attention_at_4096_keeps_no_square_matrix():
    seq = 4096
    torch.manual_seed(0)
    model, x = Causal(), torch.randn(1, seq, 16)
    slim = slimfit_fx.compile(model, (x,))
    notes = [note for node in slim.graph_module.graph.nodes for note in node.meta.get("slimfit", [])]
    assert any("flash_cpu kernel" in note for note in notes), notes
    kept = saved_tensors(lambda: slim(x))
    assert kept, "something is kept for backward"
    assert max(r.nbytes for r in kept) < seq * seq // 8, [(r.shape, r.dtype) for r in kept]
    assert slim.plan.predict().activations == saved_bytes(lambda: slim(x))
    assert saved_bytes(lambda: slim(x)) < saved_bytes(lambda: model(x))
    out, ref = slim(x), model(x)
    assert torch.equal(out, ref)


def test_short_sequences_keep_the_quantized_softmax_core():
    """At 8 tokens of 32-wide heads the S x S matrix is smaller than the output: the analysis keeps
    the softmax core there."""
    model, x = Causal(d=64, heads=2), torch.randn(2, 8, 64)
    slim = slimfit_fx.compile(model, (x,))
    notes = [note for node in slim.graph_module.graph.nodes for note in node.meta.get("slimfit", [])]
    assert "attention core quantized" in notes
    assert slim.plan.predict().activations == saved_bytes(lambda: slim(x))


def test_fused_attention_trains_like_eager_in_bf16_autocast():
    torch.manual_seed(0)
    model, x = Causal(), torch.randn(1, 512, 16)
    slim = slimfit_fx.compile(model, (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = slim(x)
    out.backward()
    assert torch.equal(out, ref)
    for n, p in model.named_parameters():
        assert F.cosine_similarity(p.grad.flatten(), want[n].flatten(), dim=0) > 0.99, n


def test_decoder_patterns_are_off_under_off():
    model, inputs = _llama(2)
    slim = slimfit_fx.compile(model, inputs, SlimFitConfig.off())
    targets = {getattr(n.target, "__module__", "") for n in slim.graph_module.graph.nodes}
    assert not any(t.startswith("slimfit_fx.ops") for t in targets)


def test_grouped_query_causal_attention_runs_on_the_fused_kernel():
    """LLaMA with 4 query and 2 KV heads at 128 tokens: the fused path, exact prediction, eager's
    loss and close gradients."""
    model, inputs = _llama(2, seq=128)
    slim = slimfit_fx.compile(model, inputs)
    notes = [note for node in slim.graph_module.graph.nodes for note in node.meta.get("slimfit", [])]
    assert sum("flash_cpu kernel" in note for note in notes) == 2, notes
    ref = _loss(model, inputs)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = _loss(slim, inputs)
    out.backward()
    assert torch.equal(out, ref)
    for n, p in model.named_parameters():
        assert F.cosine_similarity(p.grad.flatten(), want[n].flatten(), dim=0) > 0.99, n
    assert slim.plan.predict().activations == saved_bytes(lambda: _loss(slim, inputs))


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_pruned_rmsnorm_is_predicted_exactly(name):
    """SlimFitConfig(prune_rmsnorm=True): frozen norms keep their top 10%, trainable ones int8."""
    model, inputs = FAMILIES[name]()
    _no_cache(model)
    model.train()
    slim = slimfit_fx.compile(model, inputs, SlimFitConfig(prune_rmsnorm=True))
    layers = layer_parameters(model.named_parameters())
    norms = [n for n in layers if "norm" in n]
    for frozen in (set(norms[::2]), set(random.Random(1).sample(layers, int(0.9 * len(layers))))):
        _freeze(model, frozen)
        assert slim.plan.predict(frozen=frozen).activations == saved_bytes(lambda: _loss(slim, inputs))
    _freeze(model, set())
