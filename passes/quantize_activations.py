"""Pass: keep quantized copies of saved activations; forward results unchanged.

Matches, on the op table's roles (slimfit_fx.analysis):
- ``aten.linear`` fed by a GELU (the FFN-out Linear): emits
  ``ops.gated.gated_linear(x, W, b, fmt, dtype)``, keeping x in ``ffn_out_input_format``
  while W trains (under autocast W and b are the parameters behind autocast's casts,
  and ``dtype`` the cast's dtype: the op casts them itself);
- ``aten.addmm(b, x, W)`` fed by a GELU (GPT-2's Conv1D FFN-out): emits
  ``gated_linear(x, W.t(), b, fmt, dtype)``, which runs the same addmm;
- ``aten.gelu``: emits ``ops.gelu.gelu_quantized`` keeping its input in
  ``gelu_input_format``; a tanh GELU spelled out in ops
  (``analysis.match_tanh_gelu``, GPT-2's ``gelu_new``) becomes one
  ``ops.gelu.tanh_gelu_quantized`` node;
- ``aten.scaled_dot_product_attention``: emits ``ops.attention.attention_quantized``
  keeping Q/K, V and the softmax output in their formats, but only where
  ``analysis.quantized_attention_wins`` says that keeps fewer bytes than the
  kernel PyTorch would run (a fused kernel keeps no N x N matrix); the choice
  is recorded in ``node.meta["slimfit"]`` for the report.
Rewrites ``gm`` in place and returns it.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.analysis import match_tanh_gelu, produced_by_gelu, quantized_attention_wins, sdpa_backend
from slimfit_fx.config import SlimFitConfig
from slimfit_fx.ops._saved import fmt_to_args
from slimfit_fx.ops.attention import attention_quantized
from slimfit_fx.ops.gated import gated_linear
from slimfit_fx.ops.gelu import gelu_quantized, tanh_gelu_quantized

from ._match import addmm_as_linear, arg, bias_source, nodes_of, replace_call, weight_source


def quantize_activations(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    fmt = config.ffn_out_input_format
    # FFN-out Linears first: they are found by their GELU producer, before GELUs change.
    if fmt is not None:
        for node in nodes_of(gm, "aten.linear"):
            if produced_by_gelu(node.args[0]):
                weight, dtype = weight_source(gm, node.args[1]) or (node.args[1], None)
                bias = bias_source(gm, arg(node, 2, "bias"), dtype)
                replace_call(node, gated_linear, (node.args[0], weight, bias, fmt_to_args(fmt), dtype),
                             note="FFN-out input quantized while trainable")
        for node in nodes_of(gm, "aten.addmm"):
            bias, x, weight = node.args[:3]
            source = weight_source(gm, weight)
            if produced_by_gelu(x) and source is not None and not node.kwargs:
                replace_call(node, gated_linear, addmm_as_linear(gm, node, *source) + (fmt_to_args(fmt), source[1]),
                             note="FFN-out input quantized while trainable")
    if config.gelu_input_format is not None:
        for node in nodes_of(gm, "aten.mul"):
            match = match_tanh_gelu(node)
            if match is None:
                continue
            x, pattern, consts = match
            replace_call(node, tanh_gelu_quantized, (x, *consts, fmt_to_args(config.gelu_input_format)),
                         note="tanh GELU fused, input quantized")
            for inner in reversed(pattern[:-1]):
                gm.graph.erase_node(inner)
        for node in nodes_of(gm, "aten.gelu"):
            replace_call(node, gelu_quantized,
                         (node.args[0], arg(node, 1, "approximate", "none"), fmt_to_args(config.gelu_input_format)),
                         note="GELU input quantized")
    for node in nodes_of(gm, "aten.scaled_dot_product_attention"):
        if not quantized_attention_wins(node, config):
            node.meta.setdefault("slimfit", []).append(f"attention kept on the {sdpa_backend(node)} kernel "
                                                       "(keeps fewer bytes than the quantized core)")
            continue
        kwargs = dict(
            attn_mask=arg(node, 3, "attn_mask"), dropout_p=arg(node, 4, "dropout_p", 0.0),
            is_causal=arg(node, 5, "is_causal", False), scale=node.kwargs.get("scale"),
            enable_gqa=node.kwargs.get("enable_gqa", False), qk_fmt=fmt_to_args(config.attn_qk_format),
            v_fmt=fmt_to_args(config.attn_v_format), p_fmt=fmt_to_args(config.attn_probs_format),
        )
        replace_call(node, attention_quantized, tuple(node.args[:3]), kwargs, note="attention core quantized")
    gm.recompile()
    return gm
