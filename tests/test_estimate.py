"""Tests of ``slimfit_fx.estimate`` and ``slimfit-fx report --meta``: estimates from a config alone."""
import json
import sys
import time

import pytest
import torch
from conftest import load_tool

from slimfit_fx import SlimFitConfig, analyze, cli, models
from slimfit_fx.estimate import (
    CATEGORIES,
    PLAIN,
    PLAIN_CKPT,
    SLIM,
    SLIM_CKPT,
    EstimateError,
    check_world_size,
    estimate,
    frozen_per_block,
    plot,
    predict_at_depth,
    sharded_bytes,
)

# A LLaMA of 8 small blocks: deep enough that extrapolating from 1 and 2 blocks is a real test.
LLAMA_8 = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=192,
               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=8, vocab_size=512,
               max_position_embeddings=1024, tie_word_embeddings=False)
TINY = dict(batch=2, seq=32)


def config_dir(tmp_path, config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    return config_dir(tmp_path_factory.mktemp("llama8"), LLAMA_8)


def relative_errors(extrapolated, full) -> dict[str, float]:
    keys = ("parameters", "gradients", "optimizer_state", "static_activations", "dynamic_activations", "total",
            "peak")
    return {k: abs(getattr(extrapolated, k) - getattr(full, k)) / getattr(full, k) for k in keys
            if getattr(full, k)}


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_extrapolated_totals_within_3_percent_of_the_full_depth(llama8, precision):
    est = estimate(llama8, precision=precision, **TINY)
    full = predict_at_depth(llama8, precision=precision, **TINY)
    assert est.depth == full.depth == 8
    for setting in (PLAIN, SLIM):
        errors = relative_errors(est.column(setting), full.estimates[setting])
        worst = max(errors, key=errors.get)
        off = {k: getattr(est.column(setting), k) - getattr(full.estimates[setting], k) for k in errors}
        print(f"{precision} {setting}: largest error {errors[worst]:.4%} ({worst}); bytes off: {off}")
        assert errors[worst] <= 0.03, errors


def test_fake_capture_prices_what_the_built_model_keeps():
    # Fake tensors keep the CPU's dispatch: autocast's casts and the attention kernel are the CPU's, so
    # the capture equals an analysis of the model built for real (plain meta tensors get neither).
    fake = predict_at_depth("llama-tiny", precision="bf16-autocast", **TINY)
    model, inputs = models.build("llama-tiny", TINY["batch"], seq=TINY["seq"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plans = {PLAIN: analyze(model, inputs), SLIM: analyze(model, inputs, SlimFitConfig())}
    frozen = frozen_per_block(plans[PLAIN].layers, fake.block_prefix, 0.9)
    assert frozen == fake.frozen
    real = {PLAIN: plans[PLAIN].predict(set()), SLIM: plans[SLIM].predict(frozen)}
    for setting in (PLAIN, SLIM):
        assert fake.estimates[setting].to_dict(per_layer=False) == real[setting].to_dict(per_layer=False)


def test_frozen_set_is_the_same_draw_in_every_block():
    layers = ["emb.weight"] + [f"m.layers.{i}.{w}.weight" for i in range(3) for w in "abcdefghij"] + ["head.weight"]
    frozen = frozen_per_block(layers, "m.layers.", 0.9)
    per_block = [{n.split(".")[3] for n in frozen if n.startswith(f"m.layers.{i}.")} for i in range(3)]
    assert per_block[0] == per_block[1] == per_block[2] and len(per_block[0]) == 9
    assert len(frozen & {"emb.weight", "head.weight"}) == 1  # floor(0.9 x 2)


def test_world_size_that_leaves_ranks_empty_is_refused_naming_shape_and_fix():
    shapes = {"model.layers.<i>.self_attn.k_proj.weight": (1024, 8192), "model.layers.<i>.norm.weight": (8192,)}
    check_world_size(8, shapes)
    check_world_size(3, shapes)  # uneven: FSDP2 pads the shards, the estimate prices the padding
    with pytest.raises(EstimateError, match=r"k_proj.weight of shape \(1024, 8192\).*at most 1024"):
        check_world_size(1025, shapes)
    with pytest.raises(EstimateError, match=r"ceil\(1024/1000\) = 2 rows, which fill only 512 of the 1000"):
        check_world_size(1000, shapes)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(EstimateError, match="positive integer"):
            check_world_size(bad, shapes)


def test_uneven_shards_are_padded_as_fsdp2_pads_them():
    shapes = {"w": ((5, 4), 5 * 4 * 4), "b": ((2,), 2 * 4)}
    # torch.chunk(5 rows, 4) -> 2, 2, 1 rows; every rank's shard is padded to the first chunk's 2 rows.
    assert sharded_bytes(shapes, {"w"}, 4) == 2 * 4 * 4
    assert sharded_bytes(shapes, {"w", "b"}, 4) == 2 * 4 * 4 + 1 * 4
    assert sharded_bytes(shapes, {"w", "b"}, 1) == 5 * 4 * 4 + 2 * 4


def test_cli_bad_world_size_is_a_command_line_error(capsys):
    code = cli.main(["report", "--model", "llama-tiny", "--meta", "--world-size", "33", "--seq", "16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "world size 33" in err and "shape (" in err and "Use a world size of at most" in err
    assert cli.main(["report", "--model", "llama-tiny", "--meta", "--world-size", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_fsdp2_shards_parameters_gradients_and_state_and_keeps_activations(llama8):
    one, two = estimate(llama8, **TINY), estimate(llama8, world_size=2, **TINY)
    for a, b in zip(one.columns, two.columns):
        assert b.parameters == a.parameters // 2  # every dim 0 of this model is even
        assert b.gradients == a.gradients // 2
        assert b.optimizer_state == pytest.approx(a.optimizer_state / 2, rel=1e-3)
        assert (b.static_activations, b.dynamic_activations) == (a.static_activations, a.dynamic_activations)
        assert a.fsdp_working_set == 0 < b.fsdp_working_set
        assert b.peak < a.peak
    assert any("FSDP2 over 2 GPUs" in n for n in two.notes)


def test_checkpointing_keeps_block_inputs_and_one_block(llama8):
    est = estimate(llama8, **TINY)
    kept = TINY["batch"] * TINY["seq"] * LLAMA_8["hidden_size"] * 4
    for plain, ckpt in ((est.column(PLAIN), est.column(PLAIN_CKPT)), (est.column(SLIM), est.column(SLIM_CKPT))):
        assert ckpt.per_block.static_activations == kept and ckpt.per_block.dynamic_activations == 0
        assert (ckpt.parameters, ckpt.gradients, ckpt.optimizer_state) == (
            plain.parameters, plain.gradients, plain.optimizer_state)
        # the depth-1 model's activations (one block and what lies outside) plus every block's input
        outside_and_one = plain.activations - 7 * plain.per_block.activations
        assert ckpt.activations == outside_and_one + 8 * kept
        assert ckpt.peak < plain.peak


def test_precision_and_device_settings(llama8):
    fp32, bf16 = estimate(llama8, **TINY), estimate(llama8, precision="bf16", **TINY)
    assert bf16.column(PLAIN).parameters == fp32.column(PLAIN).parameters // 2
    cuda = estimate(llama8, device="cuda", **TINY)
    if not torch.cuda.is_available():
        assert any("without CUDA" in n and "workspaces" in n for n in cuda.notes)
    assert cuda.column(PLAIN).peak > fp32.column(PLAIN).peak  # cuBLAS workspaces, foreach AdamW
    with pytest.raises(EstimateError, match="unknown precision"):
        estimate(llama8, precision="fp8", **TINY)


def test_models_without_one_text_stack_are_refused():
    with pytest.raises(EstimateError, match="text models"):
        estimate("vit-tiny")


def test_plot_needs_matplotlib_and_says_how_to_get_it(llama8, monkeypatch, tmp_path):
    est = estimate(llama8, **TINY)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install slimfit-fx\[plot\]"):
        plot(est, str(tmp_path / "x.png"))


def test_cli_meta_on_a_70b_config_in_under_a_minute(capsys, tmp_path):
    png = tmp_path / "out.png"
    llama_70b = load_tool("estimate_table").CONFIGS["llama-70b"]  # LLaMA-3-70B's shape, 80 blocks
    argv = ["report", "--model", config_dir(tmp_path, llama_70b), "--meta", "--batch", "1", "--seq", "4096",
            "--precision", "bf16-autocast", "--world-size", "8", "--format", "json", "--plot", str(png)]
    start = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    print(f"70B estimate: {seconds:.1f} s")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 1 and "pip install slimfit-fx[plot]" in err
        return
    assert code == 0, err
    assert seconds < 60
    assert png.stat().st_size > 10_000
    report = json.loads(out)
    assert report["depth"] == 80 and 70e9 < report["parameter_count"] < 71e9
    cols = {c["name"]: c for c in report["columns"]}
    # FSDP2 over 8: parameters per GPU are the fp32 model's bytes / 8 (every dim 0 of LLaMA-70B divides by 8)
    assert cols[PLAIN]["parameters"] == report["parameter_count"] * 4 // 8
    assert cols[SLIM_CKPT]["peak"] < cols[SLIM]["peak"] < cols[PLAIN_CKPT]["peak"] < cols[PLAIN]["peak"]
    assert set(CATEGORIES) <= set(cols[PLAIN])


def test_setting_options_need_meta(capsys):
    assert cli.main(["report", "--model", "bert-tiny", "--world-size", "2"]) == 2
    assert "need(s) --meta" in capsys.readouterr().err
