"""Analysis and MemoryPlan: predictions against what eager PyTorch really saves."""
import math
import random

import networkx as nx
import pytest
import torch
from conftest import call, make_bert, make_gpt2, make_vit

import slimfit_fx
from slimfit_fx import PlanError, SlimFitConfig
from slimfit_fx.measure import saved_bytes


def _patterns(plan, model):
    layers = plan.layers
    return {
        "nothing": set(),
        "bottom_half": set(layers[: len(layers) // 2]),
        "every_other": set(layers[::2]),
        "random_90": set(random.Random(0).sample(layers, int(0.9 * len(layers)))),
        "everything": {n for n, _ in model.named_parameters()},
    }


def _measure(model, inputs, frozen):
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    try:
        torch.manual_seed(0)
        return saved_bytes(lambda: call(model, inputs), params=model)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_predicted_saved_bytes_match_eager_within_2_percent(family):
    name, model, inputs = family
    plan = slimfit_fx.analyze(model, inputs)
    assert not plan.unknown_ops, plan.unknown_ops
    for pattern, frozen in _patterns(plan, model).items():
        measured = _measure(model, inputs, frozen)
        predicted = plan.predict(frozen).activations
        if measured == 0:
            assert predicted == 0, f"{name}/{pattern}: predicted {predicted} B, nothing saved"
            continue
        err = abs(predicted - measured) / measured
        assert err <= 0.02, f"{name}/{pattern}: predicted {predicted} B, measured {measured} B ({err:.1%})"


def test_eager_attention_path_is_predicted():
    # HF "eager" attention: matmul + softmax + dropout + matmul instead of SDPA.
    model, inputs = make_bert(attn_implementation="eager")
    model.train()
    plan = slimfit_fx.analyze(model, inputs)
    ops = {u.op for u in plan.analysis.uses}
    assert "aten.matmul" in ops and "aten.softmax" in ops
    for frozen in (set(), set(plan.layers[::2])):
        assert plan.predict(frozen).activations == _measure(model, inputs, frozen)


def test_shared_qkv_input_is_one_dynamic_tensor_needed_by_three_layers():
    model, inputs = make_bert()
    plan = slimfit_fx.analyze(model.train(), inputs)
    rows = plan.saved_tensors()
    q = "bert.encoder.layer.0.attention.self.query.weight"
    shared = [r for r in rows if q in r["layers"]]
    assert len(shared) == 1
    row = shared[0]
    assert row["kind"] == "dynamic"
    assert set(row["layers"]) == {q, q.replace("query", "key"), q.replace("query", "value")}
    assert len(row["consumers"]) == 3 and row["bytes"] == 4 * 16 * 32 * 4

    # Freezing two of the three still keeps it; freezing all three drops it.
    two = {q, q.replace("query", "key")}
    three = two | {q.replace("query", "value")}
    before = plan.predict(set()).dynamic_activations
    assert plan.predict(two).dynamic_activations == before
    assert plan.predict(three).dynamic_activations == before - row["bytes"]


def test_static_and_dynamic_roles():
    model, inputs = make_bert()
    plan = slimfit_fx.analyze(model.train(), inputs)
    kinds = {}
    for u in plan.analysis.uses:
        kinds.setdefault(u.role, set()).add("dynamic" if u.dynamic else "static")
    assert kinds["linear_input"] == {"dynamic"} and kinds["ffn_out_input"] == {"dynamic"}
    assert kinds["embedding_indices"] == {"dynamic"}
    for static_role in ("gelu_input", "layernorm_input", "layernorm_stats", "dropout_mask", "attn_probs", "attn_qk"):
        assert kinds[static_role] == {"static"}, static_role
    # What static means: freezing every layer (biases still train) keeps static activations.
    est = plan.predict(set(plan.layers))
    assert est.dynamic_activations == 0 and est.static_activations == plan.predict().static_activations


def test_dependency_graph_is_networkx():
    model, inputs = make_bert()
    plan = slimfit_fx.analyze(model.train(), inputs)
    g = plan.analysis.graph
    assert isinstance(g, nx.DiGraph)
    layer = "layer:bert.encoder.layer.1.output.dense.weight"
    saved = [t for t in g.successors(layer) if t.startswith("tensor:")]
    assert len(saved) == 1 and g.nodes[saved[0]]["nbytes"] == 4 * 16 * 64 * 4  # the GELU output it consumes


def test_predict_fields_and_optimizers():
    model, inputs = make_bert()
    plan = slimfit_fx.analyze(model.train(), inputs)
    params = dict(model.named_parameters())
    frozen = set(plan.layers[:5])
    trainable_bytes = sum(p.numel() * 4 for n, p in params.items() if n not in frozen)
    all_bytes = sum(p.numel() * 4 for p in params.values())
    n_trainable = len(params) - len(frozen)
    adamw = plan.predict(frozen, optimizer="adamw")
    assert adamw.parameters == all_bytes
    assert adamw.gradients == trainable_bytes
    assert adamw.optimizer_state == 2 * trainable_bytes + 4 * n_trainable  # exp_avg, exp_avg_sq, step
    assert plan.predict(frozen, optimizer="sgd-momentum").optimizer_state == trainable_bytes
    assert plan.predict(frozen, optimizer="sgd").optimizer_state == 0
    assert adamw.activations == adamw.static_activations + adamw.dynamic_activations
    assert adamw.total == (adamw.parameters + adamw.buffers + adamw.gradients + adamw.optimizer_state
                           + adamw.activations)
    for field in ("parameters", "gradients", "optimizer_state", "static_activations", "dynamic_activations"):
        assert sum(getattr(layer, field) for layer in adamw.per_layer.values()) == getattr(adamw, field), field
    assert all(isinstance(v, int) for v in adamw.to_dict(per_layer=False).values() if not isinstance(v, dict))


def test_tied_weights_counted_once_and_alias_accepted():
    model, inputs = make_gpt2()
    plan = slimfit_fx.analyze(model.train(), inputs)
    unique = sum(p.numel() * 4 for p in model.parameters())
    assert plan.predict().parameters == unique
    assert plan.predict({"lm_head.weight"}).gradients == plan.predict({"transformer.wte.weight"}).gradients


def test_bad_queries_name_the_problem():
    model, inputs = make_bert()
    plan = slimfit_fx.analyze(model.train(), inputs)
    with pytest.raises(PlanError, match="did you mean"):
        plan.predict({"bert.encoder.layer.0.attention.self.query.weigth"})
    with pytest.raises(PlanError, match="optimizer"):
        plan.predict(set(), optimizer="lion")
    with pytest.raises(PlanError, match="collection"):
        plan.predict("classifier.weight")


def _minmax(numel, bits, group=128):
    return -(-numel * bits // 8) + -(-numel // group) * 8  # packed codes + an fp32 scale and offset per group


def test_slimfit_formats_are_priced_as_specified():
    model, inputs = make_bert()
    model.train()
    cfg = SlimFitConfig()
    plain = slimfit_fx.analyze(model, inputs).predict()
    slim_plan = slimfit_fx.analyze(model, inputs, cfg)
    slim = slim_plan.predict()
    b, n, h, heads, inter, layers = 4, 16, 32, 2, 64, 2
    # GELU input: 4 bits, two values per byte, per-group min/max.
    assert slim.by_role["gelu_input"] == layers * _minmax(b * n * inter, 4)
    # FFN-out Linear input: int8 while trainable.
    assert slim.by_role["ffn_out_input"] == layers * _minmax(b * n * inter, 8)
    # Attention core: Q, K, V, softmax output int8; no dropout mask anywhere.
    assert slim.by_role["attn_qk"] == layers * 2 * _minmax(b * n * h, 8)
    assert slim.by_role["attn_v"] == layers * _minmax(b * n * h, 8)
    assert slim.by_role["attn_probs"] == layers * _minmax(b * heads * n * n, 8)
    assert "dropout_mask" not in slim.by_role and plain.by_role["dropout_mask"] > 0
    # Trainable LayerNorms keep their full input; frozen ones the top 10% (values + int16 indices).
    assert "layernorm_pruned" not in slim.by_role
    ln_weights = [name for name in slim_plan.layers if "LayerNorm" in name]
    frozen = slim_plan.predict(set(ln_weights))
    rows = b * n
    k = math.ceil(0.1 * h)
    assert frozen.by_role["layernorm_pruned"] == len(ln_weights) * rows * k * (4 + 2)
    # On the CPU dropout masks are kept as bits: one per element.
    bits = [u for u in slim_plan.analysis.uses if u.role == "dropout_bits"]
    assert len(bits) == 8  # embeddings, 2 x (attention probabilities, attention output, FFN output), classifier
    hidden, probs = b * n * h // 8, b * heads * n * n // 8
    assert slim.by_role["dropout_bits"] == 5 * hidden + 2 * probs + b * h // 8
    # Nothing frozen, the fp32 Linear inputs stay: the formats above still more than halve the rest.
    assert slim.activations < plain.activations / 2


def test_dropout_masks_can_be_replayed_from_the_rng_state():
    model, inputs = make_bert()
    plan = slimfit_fx.analyze(model.train(), inputs, SlimFitConfig(dropout_masks="replay")).predict()
    state = torch.get_rng_state()
    assert plan.by_role["rng_state"] == 8 * state.numel() * state.element_size()
    assert "dropout_bits" not in plan.by_role


def test_config_validation():
    from slimfit_fx import ConfigError, QuantFormat

    with pytest.raises(ConfigError, match="bits"):
        QuantFormat(bits=3)
    with pytest.raises(ConfigError, match="power of two"):
        QuantFormat(kind="fixed", step=0.1)
    with pytest.raises(ConfigError, match="dropout_masks"):
        SlimFitConfig(dropout_masks="none")
    with pytest.raises(ConfigError, match="kind"):
        QuantFormat(kind="log")
    with pytest.raises(ConfigError, match="layernorm_keep_ratio"):
        SlimFitConfig(layernorm_keep_ratio=0.0)
    with pytest.raises(ConfigError, match="QuantFormat or None"):
        SlimFitConfig(gelu_input_format=4)
    off = SlimFitConfig.off()
    assert not off.freeze_gate and not off.quantizes_attention and not off.prune_layernorm


def test_config_off_predicts_plain_pytorch():
    model, inputs = make_vit()
    model.train()
    plain = slimfit_fx.analyze(model, inputs)
    off = slimfit_fx.analyze(model, inputs, SlimFitConfig.off())
    for frozen in (set(), set(plain.layers[::2])):
        assert off.predict(frozen).activations == plain.predict(frozen).activations
