"""Named model configurations that build offline, with example training inputs.

Takes a name in ``KNOWN_MODELS`` or a directory holding a HuggingFace ``config.json``, a batch size and
a sequence length or image size.  Gives ``build``: the model in train mode with random weights (memory
depends on shapes and dtypes, not on weight values) and keyword inputs with labels, so that
``model(**inputs)`` returns a loss, both from a fixed seed; ``model_factory`` and ``text_inputs`` for
``slimfit_fx.estimate``.  A directory's head follows its config (``_task_of``), said on stderr.
Never downloads anything or loads a checkpoint's weights.
"""
from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["KNOWN_MODELS", "ModelError", "build", "DEFAULT_SEQ", "model_factory", "text_inputs", "CAUSAL_LM",
           "SEQ_CLS", "IMAGE_CLS", "SEQ2SEQ", "FREEZE_SEED", "frozen_layers"]

DEFAULT_SEQ = 128
# Token ids are drawn from [_FIRST_ID, vocab): clear of the usual special ids
# (BERT pads with 0, RoBERTa with 1), so only the attention mask marks padding.
_FIRST_ID = 5
SEED = 0
FREEZE_SEED = 0


class ModelError(ValueError):
    """A model name, directory or size that cannot be built; the message says what is allowed."""


# Tasks: which head the model has and so which inputs and labels it takes.
SEQ_CLS, IMAGE_CLS, CAUSAL_LM, SEQ2SEQ = ("sequence-classification", "image-classification", "causal-lm",
                                          "seq2seq-lm")


@dataclass(frozen=True)
class _Spec:
    """A named model: its HF config class, model class and config values."""

    config_class: str
    model_class: str
    task: str
    values: dict = field(default_factory=dict)


_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                layer_norm_eps=1e-5)
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

# The dims of the public checkpoints: BERT and RoBERTa as GLUE-style classifiers (2 labels), ViT as
# ImageNet's (1000 labels, 224 px, patch 16), GPT-2 124M, LLaMA-3.2-1B; llama-1b-4l keeps its widths
# with 4 layers (fits a CPU benchmark).  The *-tiny ones (hidden 64, 2 layers) are for tests.
_SPECS: dict[str, _Spec] = {
    "bert-base": _Spec("BertConfig", "BertForSequenceClassification", SEQ_CLS, dict(num_labels=2)),
    "bert-large": _Spec("BertConfig", "BertForSequenceClassification", SEQ_CLS, dict(num_labels=2, **_LARGE)),
    "roberta-base": _Spec("RobertaConfig", "RobertaForSequenceClassification", SEQ_CLS,
                          dict(num_labels=2, **_ROBERTA)),
    "vit-base": _Spec("ViTConfig", "ViTForImageClassification", IMAGE_CLS,
                      dict(image_size=224, patch_size=16, num_labels=1000)),
    "vit-large": _Spec("ViTConfig", "ViTForImageClassification", IMAGE_CLS,
                       dict(image_size=224, patch_size=16, num_labels=1000, **_LARGE)),
    "gpt2": _Spec("GPT2Config", "GPT2LMHeadModel", CAUSAL_LM, dict(use_cache=False)),
    "llama-1b": _Spec("LlamaConfig", "LlamaForCausalLM", CAUSAL_LM, dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, use_cache=False)),
    "llama-1b-4l": _Spec("LlamaConfig", "LlamaForCausalLM", CAUSAL_LM, dict(
        hidden_size=2048, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, use_cache=False)),
    "bert-tiny": _Spec("BertConfig", "BertForSequenceClassification", SEQ_CLS,
                       dict(num_labels=2, vocab_size=1024, max_position_embeddings=512, **_TINY)),
    "roberta-tiny": _Spec("RobertaConfig", "RobertaForSequenceClassification", SEQ_CLS,
                          dict(num_labels=2, **{**_ROBERTA, "vocab_size": 1024}, **_TINY)),
    "vit-tiny": _Spec("ViTConfig", "ViTForImageClassification", IMAGE_CLS,
                      dict(image_size=32, patch_size=8, num_labels=10, **_TINY)),
    "gpt2-tiny": _Spec("GPT2Config", "GPT2LMHeadModel", CAUSAL_LM,
                       dict(vocab_size=1024, n_positions=512, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                            eos_token_id=0, use_cache=False)),
    "llama-tiny": _Spec("LlamaConfig", "LlamaForCausalLM", CAUSAL_LM, dict(
        num_key_value_heads=1, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=True,
        use_cache=False, **_TINY)),
}

KNOWN_MODELS: tuple[str, ...] = tuple(_SPECS)


def build(name: str, batch: int, seq: int | None = None,
          image_size: int | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Model ``name`` (a ``KNOWN_MODELS`` name or a HF model directory) in train mode,
    with example inputs of ``batch`` rows.

    ``seq``: tokens per row for text models (default ``DEFAULT_SEQ``); the first
    row ends in a quarter of padding, so the attention mask is a real one.
    ``image_size``: pixels per side for vision models (default: the config's).
    Seeds torch's global RNG for the random init.  Names, directories and sizes
    it cannot build raise ``ModelError``.
    """
    if not (isinstance(batch, int) and batch > 0):
        raise ModelError(f"batch must be a positive integer, got {batch!r}")
    config, make_model, task = _config(name)
    if task == IMAGE_CLS:
        _set_image_size(config, image_size)
    else:
        seq = DEFAULT_SEQ if seq is None else seq
        _check_seq(config, seq)
    torch.manual_seed(SEED)
    model = make_model(config).train()
    gen = torch.Generator().manual_seed(SEED)
    inputs = _image_inputs(config, batch, gen) if task == IMAGE_CLS else _text_inputs(config, task, batch, seq, gen)
    return model, inputs


def frozen_layers(layers: list[str], ratio: float) -> set[str]:
    """floor(ratio x len(layers)) layers, a random subset drawn with ``FREEZE_SEED``: the frozen set of
    ``slimfit-fx report``, standing for one iteration of SlimFit's scheduler (which picks as many)."""
    k = math.floor(round(ratio * len(layers), 9))  # round: 0.29 * 100 is 28.999...
    return set(random.Random(FREEZE_SEED).sample(layers, k))


def model_factory(name: str):
    """What ``build`` builds ``name`` from, with nothing built yet: (HF config, a function config ->
    model, task).  ``slimfit_fx.estimate`` changes the config's depth and builds on fake tensors."""
    return _config(name)


def text_inputs(config, task: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``build``'s inputs for a text model of ``config`` (the same padding, labels and seed);
    ``ModelError`` for a size the model cannot take."""
    if not (isinstance(batch, int) and batch > 0):
        raise ModelError(f"batch must be a positive integer, got {batch!r}")
    _check_seq(config, seq)
    return _text_inputs(config, task, batch, seq, torch.Generator().manual_seed(SEED))


def _config(name: str):
    """(config, a function config -> model, task) of a known name or a model directory."""
    import transformers

    spec = _SPECS.get(name)
    if spec is not None:
        config = getattr(transformers, spec.config_class)(**spec.values)
        return config, getattr(transformers, spec.model_class), spec.task
    if os.path.isdir(name):
        return _directory_config(name)
    raise ModelError(f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, "
                     "or a directory holding a HuggingFace config.json")


def _directory_config(path: str):
    """Read a local config.json and pick the Auto class of its task (no download: a path)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read a HuggingFace config from {path!r}: {exc}") from exc
    task, why = _task_of(config)
    auto = {SEQ_CLS: transformers.AutoModelForSequenceClassification,
            IMAGE_CLS: transformers.AutoModelForImageClassification,
            CAUSAL_LM: transformers.AutoModelForCausalLM,
            SEQ2SEQ: transformers.AutoModelForSeq2SeqLM}[task]
    print(f"slimfit-fx: {path}: {config.model_type} with a {task} head ({why})", file=sys.stderr)
    if hasattr(config, "use_cache"):
        config.use_cache = False  # training keeps no KV cache

    def make_model(config):
        try:
            return auto.from_config(config)
        except ValueError as exc:  # no model of this task for this model type
            raise ModelError(f"{path!r}: {exc}") from exc

    return config, make_model, task


def _task_of(config) -> tuple[str, str]:
    """The head to build for a config, and why: its ``architectures`` when it names them, else its kind
    (encoder-decoder, vision, a decoder-only model type, an encoder)."""
    from transformers.models.auto import modeling_auto as auto

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM, f"architectures {archs}"
    if getattr(config, "is_encoder_decoder", False) and (not archs or any(
            a.endswith(("ForConditionalGeneration", "Seq2SeqLM")) for a in archs)):
        return SEQ2SEQ, f"architectures {archs}" if archs else "an encoder-decoder config"
    if hasattr(config, "patch_size") and hasattr(config, "image_size"):
        return IMAGE_CLS, f"architectures {archs}" if archs else "a vision config"
    if archs:
        return SEQ_CLS, f"architectures {archs}"
    kind = config.model_type
    if kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return CAUSAL_LM, "no architectures in the config; a decoder-only model type"
    return SEQ_CLS, "no architectures in the config; an encoder model type"


def _set_image_size(config, image_size: int | None) -> None:
    """Build the model for ``image_size`` px (position embeddings follow the patch count)."""
    if image_size is None:
        return
    patch = config.patch_size
    if not (isinstance(image_size, int) and image_size > 0 and image_size % patch == 0):
        raise ModelError(f"image size must be a positive multiple of the patch size {patch}, got {image_size!r}")
    config.image_size = image_size


def _max_seq(config) -> int | None:
    """Longest sequence the model's positions allow (None: the config sets no limit)."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n is not None and "roberta" in config.model_type:
        n -= config.pad_token_id + 1  # RoBERTa's positions start after the padding index
    return n


def _check_seq(config, seq: int) -> None:
    if not (isinstance(seq, int) and seq > 0):
        raise ModelError(f"sequence length must be a positive integer, got {seq!r}")
    limit = _max_seq(config)
    if limit is not None and seq > limit:
        raise ModelError(f"sequence length {seq} exceeds the model's {limit} positions")


def _text_inputs(config, task: str, batch: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids, an attention mask padding the last quarter of row 0, and labels."""
    input_ids = torch.randint(_FIRST_ID, config.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    pad = seq // 4
    if pad:
        attention_mask[0, -pad:] = 0
        if config.pad_token_id is not None:
            input_ids[0, -pad:] = config.pad_token_id
    if task in (CAUSAL_LM, SEQ2SEQ):
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # no loss on padding
    else:
        labels = torch.randint(config.num_labels, (batch,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _image_inputs(config, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    size = config.image_size
    pixel_values = torch.randn(batch, config.num_channels, size, size, generator=gen)
    return {"pixel_values": pixel_values, "labels": torch.randint(config.num_labels, (batch,), generator=gen)}
