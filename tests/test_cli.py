"""Tests of the ``slimfit-fx`` command line and the named models, run in-process on tiny models."""
import json
import math
import re

import pytest
import torch

from slimfit_fx import TraceError, analyze, cli, models

# bert-tiny's SlimFit layers (the SlimFit paper's definition): 3 embeddings + embedding LayerNorm
# + 2 blocks x 8 (Q, K, V, attention output, FFN in, FFN out, two LayerNorms) + pooler + classifier.
BERT_TINY_LAYERS = 3 + 1 + 2 * 8 + 1 + 1
SMALL = ["--batch", "4", "--seq", "32"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def report_json(capsys, *argv):
    code, out, err = run(capsys, "report", "--format", "json", *argv)
    assert code == 0, err
    return json.loads(out)


def columns(report):
    return {c["name"]: c for c in report["columns"]}


# ------------------------------------------------------------------ report contents


def test_json_report_is_consistent(capsys):
    report = report_json(capsys, "--model", "bert-tiny", *SMALL)
    cols = columns(report)
    assert list(cols) == ["PyTorch", "PyTorch + freezing", "SlimFit"]
    acts = {name: c["predicted"]["activations"] for name, c in cols.items()}
    assert acts["SlimFit"] < acts["PyTorch + freezing"] < acts["PyTorch"]
    k = math.floor(0.9 * BERT_TINY_LAYERS)
    assert len(report["frozen"]) == k
    assert report["settings"]["frozen layers"] == f"{k}/{BERT_TINY_LAYERS}"
    assert cols["PyTorch"]["predicted"]["frozen_parameters"] == 0
    assert cols["PyTorch + freezing"]["predicted"]["frozen_parameters"] == k
    assert all(c["measured"] is None for c in cols.values())


def test_zero_ratio_freezes_nothing(capsys):
    cols = columns(report_json(capsys, "--model", "bert-tiny", "--freeze-ratio", "0", *SMALL))
    assert cols["PyTorch + freezing"]["predicted"] == cols["PyTorch"]["predicted"]


def test_optimizer_option_changes_state(capsys):
    adamw = columns(report_json(capsys, "--model", "bert-tiny", *SMALL))["PyTorch"]["predicted"]
    sgd = columns(report_json(capsys, "--model", "bert-tiny", "--optimizer", "sgd", *SMALL))["PyTorch"]["predicted"]
    assert sgd["optimizer_state"] == 0
    assert adamw["optimizer_state"] >= 2 * adamw["parameters"]


def test_frozen_count_is_floor_of_ratio_and_seeded():
    names = [f"layer{i}" for i in range(100)]
    assert len(cli.frozen_layers(names, 0.29)) == 29  # 0.29 * 100 is 28.999... in floats
    assert cli.frozen_layers(names, 0.5) == cli.frozen_layers(names, 0.5)
    assert cli.frozen_layers(names, 0.0) == set()


@pytest.mark.parametrize("name", ["bert-tiny", "llama-tiny"])
def test_measured_saved_activations_match_prediction(capsys, name):
    cols = columns(report_json(capsys, "--model", name, "--measure", *SMALL))
    for col in ("PyTorch", "PyTorch + freezing", "SlimFit"):
        predicted = cols[col]["predicted"]["activations"]
        measured = cols[col]["measured"]["saved_activations"]
        assert abs(measured - predicted) <= 0.02 * predicted, (col, measured, predicted)
        assert cols[col]["measured"]["peak"] >= cols[col]["predicted"]["parameters"] + measured
    plain, frozen, slim = (cols[c]["measured"]["saved_activations"] for c in ("PyTorch", "PyTorch + freezing",
                                                                                 "SlimFit"))
    assert slim < frozen < plain


def test_measure_step_restores_requires_grad():
    model, inputs = models.build("bert-tiny", 2, seq=8)
    model.classifier.bias.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    frozen = {"bert.pooler.dense.weight"}
    measured = cli.measure_step(model, inputs, frozen, "sgd")
    assert measured["saved_activations"] > 0 and measured["optimizer_state"] == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_markdown_is_a_github_table(capsys):
    code, out, _ = run(capsys, "report", "--model", "bert-tiny", "--format", "markdown", *SMALL)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("## ")
    header = next(i for i, line in enumerate(lines) if line.startswith("| bytes"))
    assert re.fullmatch(r"\|[-:| ]+\|", lines[header + 1])
    assert any(line.startswith("| saved activations") for line in lines)


def test_per_layer_lists_every_layer(capsys):
    model, inputs = models.build("bert-tiny", 4, seq=32)
    layers = analyze(model, inputs).layers
    assert len(layers) == BERT_TINY_LAYERS
    code, out, _ = run(capsys, "report", "--model", "bert-tiny", "--per-layer", *SMALL)
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.split()[1:2] in (["frozen"], ["trained"])}
    assert listed == set(layers)


def test_output_file_holds_the_report(capsys, tmp_path):
    path = tmp_path / "report.md"
    code, out, _ = run(capsys, "report", "--model", "bert-tiny", "--format", "markdown", "--output", str(path), *SMALL)
    assert code == 0
    assert path.read_text() == out


def test_cpu_dropout_mask_note(capsys):
    report = report_json(capsys, "--model", "bert-tiny", *SMALL)
    mask = columns(report)["PyTorch"]["predicted"]["by_role"]["dropout_mask"]
    note = next(n for n in report["notes"] if n.startswith("Dropout masks"))
    assert cli.fmt_bytes(mask) in note and cli.fmt_bytes(mask // 4) in note


# ------------------------------------------------------------------ bad input


def test_unknown_model_lists_known_names(capsys):
    code, out, err = run(capsys, "report", "--model", "bert-huge")
    assert code == 2 and out == ""
    error_lines = [line for line in err.splitlines() if line.startswith("slimfit-fx: error:")]
    assert len(error_lines) == 1 and "bert-huge" in error_lines[0]
    assert all(name in error_lines[0] for name in models.KNOWN_MODELS)


@pytest.mark.parametrize("argv, what", [
    (["--batch", "-1"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--seq", "0"], "--seq"),
    (["--freeze-ratio", "1.0"], "--freeze-ratio"),
    (["--freeze-ratio", "-0.1"], "--freeze-ratio"),
    (["--model", "vit-tiny", "--image-size", "30"], "patch size"),
    (["--model", "bert-tiny", "--seq", "513"], "512 positions"),
    (["--optimizer", "lamb"], "--optimizer"),
])
def test_impossible_values_exit_2(capsys, argv, what):
    code, out, err = run(capsys, "report", *argv)
    assert code == 2 and out == ""
    assert "slimfit-fx: error:" in err and what in err
    assert "Traceback" not in err


def test_library_error_exits_1_without_traceback(capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise TraceError("could not capture BertForSequenceClassification as a graph: boom")

    monkeypatch.setattr(cli, "trace", fail)
    code, out, err = run(capsys, "report", "--model", "bert-tiny", *SMALL)
    assert code == 1 and out == ""
    assert "slimfit-fx: error: could not capture" in err and "Traceback" not in err


def test_demo_is_the_measured_bert_base_report():
    args = cli._parser().parse_args(["demo"])
    assert (args.model, args.batch, args.seq, args.measure) == ("bert-base", 32, 128, True)
    assert cli._parser().parse_args(["report"]).measure is False


# ------------------------------------------------------------------ models


def test_build_text_inputs_pad_the_first_row():
    model, inputs = models.build("gpt2-tiny", 3, seq=16)
    assert model.training
    mask = inputs["attention_mask"]
    assert mask[0].tolist() == [1] * 12 + [0] * 4 and mask[1:].all()
    assert (inputs["labels"][0, 12:] == -100).all() and (inputs["labels"][1:] >= 0).all()
    _, again = models.build("gpt2-tiny", 3, seq=16)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)


def test_build_vit_takes_the_image_size():
    model, inputs = models.build("vit-tiny", 2, image_size=48)
    assert inputs["pixel_values"].shape == (2, 3, 48, 48)
    assert model(**inputs).loss.ndim == 0


def test_model_directory_is_built_from_its_config(capsys, tmp_path):
    from transformers import GPT2Config, ViTConfig

    GPT2Config(n_embd=32, n_layer=1, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              image_size=32, patch_size=8).save_pretrained(tmp_path / "vit")
    assert "GPT2LMHeadModel" in report_json(capsys, "--model", str(tmp_path / "gpt"), *SMALL)["title"]
    vit = report_json(capsys, "--model", str(tmp_path / "vit"), "--batch", "2")
    assert "ViTForImageClassification" in vit["title"] and vit["settings"]["image size"] == 32


def test_model_directory_heads_for_encoder_decoders_and_configs_without_architectures(capsys, tmp_path):
    from transformers import LlamaConfig, T5Config

    from slimfit_fx.models import build

    T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, vocab_size=100, decoder_start_token_id=0,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path / "t5")
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=100).save_pretrained(tmp_path / "llama")  # no architectures
    t5, inputs = build(str(tmp_path / "t5"), batch=2, seq=8)
    assert type(t5).__name__ == "T5ForConditionalGeneration" and t5(**inputs).loss is not None
    llama, _ = build(str(tmp_path / "llama"), batch=2, seq=8)
    assert type(llama).__name__ == "LlamaForCausalLM"
    err = capsys.readouterr().err
    assert "t5 with a seq2seq-lm head" in err and "no architectures in the config; a decoder-only" in err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("slimfit-fx 0.") and "torch" in out
