"""Pass: saved activations kept quantized; forward results unchanged.

Reads, on the op table's roles (``slimfit_fx.op_table``), and rewrites in place:

- an FFN-out ``aten.linear`` (fed by a GELU, ReLU or gated product) or GPT-2's ``aten.addmm``
  Conv1D: to ``ops.gated.gated_linear``, keeping x in ``ffn_out_input_format``
  (``glu_down_input_format`` after a gated product) while W trains; under autocast it takes the
  parameters behind autocast's casts and casts them itself;
- ``aten.gelu``, and GPT-2's tanh GELU spelled out in ops (``op_table.match_tanh_gelu``): to
  ``ops.gelu.gelu_quantized`` / ``tanh_gelu_quantized``, keeping the input in ``gelu_input_format``;
- ``aten.scaled_dot_product_attention``, as ``op_table.attention_choice`` picks for its shapes and
  device: to ``ops.attention.attention_quantized`` or ``ops.attention_fused.attention_fused_quantized``,
  or left to PyTorch's kernel.

A tensor of a dtype the formats do not take (float64) stays unquantized, as ``op_table.format_for``
prices it.  Each choice is noted in ``node.meta["slimfit"]`` for the report.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.nodes import arg
from slimfit_fx.op_table import (
    attention_choice,
    ffn_input_format,
    ffn_producer,
    format_for,
    fused_kernel,
    is_ffn_hidden,
    match_tanh_gelu,
    sdpa_backend,
)
from slimfit_fx.ops.attention import attention_quantized
from slimfit_fx.ops.attention_fused import attention_fused_quantized
from slimfit_fx.ops.gated import gated_linear
from slimfit_fx.ops.gelu import gelu_quantized, tanh_gelu_quantized
from slimfit_fx.ops.saved import fmt_to_args

from .match import addmm_as_linear, bias_source, nodes_of, replace_call, weight_source


def quantize_activations(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    """Point FFN-out Linears, GELUs and attention at the ops that keep their inputs quantized."""
    # FFN-out Linears first: they are found by their GELU producer, before GELUs change.
    _ffn_out_linears(gm, config)
    _gelus(gm, config)
    _attention(gm, config)
    gm.recompile()
    return gm


def _unquantized(node: fx.Node, what: str) -> None:
    dtype = node.meta["val"].dtype
    node.meta.setdefault("slimfit", []).append(f"{what} kept unquantized: the formats do not take {dtype}")


def _ffn_input_format(x: fx.Node, config: SlimFitConfig):
    """The FFN-out input's format, or None (noted when the format is set but the dtype is not taken)."""
    if not is_ffn_hidden(x):
        return None
    fmt = ffn_input_format(x, config)
    configured = config.glu_down_input_format if ffn_producer(x) == "glu" else config.ffn_out_input_format
    if fmt is None and configured is not None:
        _unquantized(x, "FFN-out input")
    return fmt


def _ffn_out_linears(gm: fx.GraphModule, config: SlimFitConfig) -> None:
    note = "FFN-out input quantized while trainable"
    for node in nodes_of(gm, "aten.linear"):
        x = node.args[0]
        fmt = _ffn_input_format(x, config)
        if fmt is None:
            continue
        weight, dtype = weight_source(gm, node.args[1]) or (node.args[1], None)
        bias = bias_source(gm, arg(node, 2, "bias"), dtype)
        replace_call(node, gated_linear, (x, weight, bias, fmt_to_args(fmt), dtype), note=note)
    for node in nodes_of(gm, "aten.addmm"):
        x = node.args[1]
        source = weight_source(gm, node.args[2])
        if source is None or node.kwargs:
            continue
        fmt = _ffn_input_format(x, config)
        if fmt is None:
            continue
        replace_call(node, gated_linear, addmm_as_linear(gm, node, *source) + (fmt_to_args(fmt), source[1]),
                     note=note)


def _gelus(gm: fx.GraphModule, config: SlimFitConfig) -> None:
    if config.gelu_input_format is None:
        return
    for node in nodes_of(gm, "aten.mul"):
        match = match_tanh_gelu(node)
        if match is None:
            continue
        x, pattern, consts = match
        fmt = format_for(config.gelu_input_format, x)
        if fmt is None:
            _unquantized(x, "GELU input")
            continue
        replace_call(node, tanh_gelu_quantized, (x, *consts, fmt_to_args(fmt)), note="tanh GELU fused, input quantized")
        for inner in reversed(pattern[:-1]):
            gm.graph.erase_node(inner)
    for node in nodes_of(gm, "aten.gelu"):
        fmt = format_for(config.gelu_input_format, node.args[0])
        if fmt is None:
            _unquantized(node.args[0], "GELU input")
            continue
        replace_call(node, gelu_quantized, (node.args[0], arg(node, 1, "approximate", "none"), fmt_to_args(fmt)),
                     note="GELU input quantized")


def _attention(gm: fx.GraphModule, config: SlimFitConfig) -> None:
    for node in nodes_of(gm, "aten.scaled_dot_product_attention"):
        choice = attention_choice(node, config)
        if choice == "fused":
            kwargs = dict(attn_mask=arg(node, 3, "attn_mask"), is_causal=arg(node, 5, "is_causal", False),
                          scale=node.kwargs.get("scale"), backend=fused_kernel(node),
                          qk_fmt=fmt_to_args(config.attn_qk_format), v_fmt=fmt_to_args(config.attn_v_format),
                          o_fmt=fmt_to_args(format_for(config.attn_v_format, node)))
            replace_call(node, attention_fused_quantized, tuple(node.args[:3]), kwargs,
                         note=f"attention on the {fused_kernel(node)} kernel, Q/K/V/output quantized")
            continue
        if choice == "kernel":
            if config.quantizes_attention and format_for(config.attn_qk_format or config.attn_v_format
                                                         or config.attn_probs_format, node.args[0]) is None:
                _unquantized(node.args[0], "attention")
            else:
                node.meta.setdefault("slimfit", []).append(
                    f"attention kept on the {sdpa_backend(node)} kernel (keeps fewer bytes than the quantized core)")
            continue
        device = node.args[0].meta["val"].device.type
        kwargs = dict(
            attn_mask=arg(node, 3, "attn_mask"), dropout_p=arg(node, 4, "dropout_p", 0.0),
            is_causal=arg(node, 5, "is_causal", False), scale=node.kwargs.get("scale"),
            enable_gqa=node.kwargs.get("enable_gqa", False), qk_fmt=fmt_to_args(config.attn_qk_format),
            v_fmt=fmt_to_args(config.attn_v_format), p_fmt=fmt_to_args(config.attn_probs_format),
            mask_mode=config.dropout_mode(device),
        )
        replace_call(node, attention_quantized, tuple(node.args[:3]), kwargs, note="attention core quantized")
