"""Tiny random-init configs of the model families people fine-tune, each with a training batch
(padding in the attention mask, labels so the loss is inside the graph).

``FAMILIES[name]() -> (model, inputs)``; ``HEAVY`` names the ones CI runs only with
``SLIMFIT_HEAVY_TESTS=1`` (slow to capture, or costly at these sizes).
"""
from __future__ import annotations

import torch

BATCH, SEQ, VOCAB = 2, 12, 96


def _text(labels="class", vocab=VOCAB, seq=SEQ, pad_tail=3):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (BATCH, seq), generator=g)
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    mask[0, -pad_tail:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels == "class":
        out["labels"] = torch.tensor([0, 1])
    elif labels == "lm":
        out["labels"] = ids.clone()
    return out


def _image(size=32, labels=3, channels=3):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=g),
            "labels": torch.tensor([0, labels - 1])}


def _tf(name):
    import transformers

    return getattr(transformers, name)


_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
_DEC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _classifier(config_name, model_name, **kw):
    def make():
        cfg = _tf(config_name)(**{**_ENC, **kw})
        return _tf(model_name)(cfg), _text()
    return make


def _causal(config_name, model_name, **kw):
    def make():
        cfg = _tf(config_name)(**{**_DEC, **kw})
        return _tf(model_name)(cfg), _text("lm")
    return make


def make_distilbert():
    cfg = _tf("DistilBertConfig")(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=64)
    return _tf("DistilBertForSequenceClassification")(cfg), _text()


def make_t5():
    cfg = _tf("T5Config")(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
    inputs = _text("lm")
    return _tf("T5ForConditionalGeneration")(cfg), inputs


def make_bart():
    cfg = _tf("BartConfig")(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                            eos_token_id=2, decoder_start_token_id=2)
    return _tf("BartForConditionalGeneration")(cfg), _text("lm")


def make_gpt2():
    cfg = _tf("GPT2Config")(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
    return _tf("GPT2LMHeadModel")(cfg), _text("lm")


def make_opt():
    cfg = _tf("OPTConfig")(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1)
    return _tf("OPTForCausalLM")(cfg), _text("lm")


def make_gpt_neox():
    cfg = _tf("GPTNeoXConfig")(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5)
    return _tf("GPTNeoXForCausalLM")(cfg), _text("lm")


def make_phi3():
    cfg = _tf("Phi3Config")(**{**_DEC, "pad_token_id": 0})
    return _tf("Phi3ForCausalLM")(cfg), _text("lm")


def make_gemma():
    cfg = _tf("GemmaConfig")(**_DEC, head_dim=8)
    return _tf("GemmaForCausalLM")(cfg), _text("lm")


def make_gemma2():
    cfg = _tf("Gemma2Config")(**_DEC, head_dim=8, sliding_window=8)
    return _tf("Gemma2ForCausalLM")(cfg), _text("lm")


def make_qwen3():
    cfg = _tf("Qwen3Config")(**_DEC, head_dim=8)
    return _tf("Qwen3ForCausalLM")(cfg), _text("lm")


def make_deberta_v2():
    cfg = _tf("DebertaV2Config")(**_ENC, relative_attention=True, position_buckets=8, max_relative_positions=16,
                                 pos_att_type=["p2c", "c2p"], type_vocab_size=0)
    return _tf("DebertaV2ForSequenceClassification")(cfg), _text()


def make_modernbert():
    cfg = _tf("ModernBertConfig")(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                                  global_attn_every_n_layers=2, local_attention=8)
    return _tf("ModernBertForSequenceClassification")(cfg), _text()


def _vision(config_name, model_name, **kw):
    def make():
        base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
        cfg = _tf(config_name)(**{**base, **kw})
        return _tf(model_name)(cfg), _image()
    return make


def make_swin():
    cfg = _tf("SwinConfig")(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                            window_size=4, num_labels=3)
    return _tf("SwinForImageClassification")(cfg), _image()


def make_clip_vision():
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64)
    cfg = _tf("CLIPConfig")(vision_config=vision, text_config=dict(vocab_size=VOCAB, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64), num_labels=3)
    return _tf("CLIPForImageClassification")(cfg), _image()


def make_convnext():
    cfg = _tf("ConvNextConfig")(image_size=32, num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                                num_stages=2, patch_size=2)
    return _tf("ConvNextForImageClassification")(cfg), _image()


FAMILIES = {
    "bert": _classifier("BertConfig", "BertForSequenceClassification"),
    "roberta": _classifier("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=1),
    "xlm-roberta": _classifier("XLMRobertaConfig", "XLMRobertaForSequenceClassification", pad_token_id=1),
    "electra": _classifier("ElectraConfig", "ElectraForSequenceClassification", embedding_size=32),
    "albert": _classifier("AlbertConfig", "AlbertForSequenceClassification", embedding_size=16),
    "distilbert": make_distilbert,
    "deberta-v2": make_deberta_v2,
    "modernbert": make_modernbert,
    "t5": make_t5,
    "bart": make_bart,
    "gpt2": make_gpt2,
    "opt": make_opt,
    "gpt-neox": make_gpt_neox,
    "llama": _causal("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": make_qwen3,
    "mistral": _causal("MistralConfig", "MistralForCausalLM"),
    "phi3": make_phi3,
    "gemma": make_gemma,
    "gemma2": make_gemma2,
    "vit": _vision("ViTConfig", "ViTForImageClassification"),
    "deit": _vision("DeiTConfig", "DeiTForImageClassification"),
    "dinov2": _vision("Dinov2Config", "Dinov2ForImageClassification", mlp_ratio=2),
    "swin": make_swin,
    "clip-vision": make_clip_vision,
    "convnext": make_convnext,
}

HEAVY: set[str] = set()
