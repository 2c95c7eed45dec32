"""Pattern: a gated MLP's ``act(gate) * up`` keeps its inputs quantized.

Matches ``aten.mul(a, up)`` (either order) where ``a`` is ``aten.silu(gate)`` or
``aten.gelu(gate)`` used only by the product: LLaMA, Qwen, Mistral (SwiGLU), Gemma (GeGLU), and
Phi3's fused ``gate_up`` projection split in two.  Emits ``ops.glu.glu(gate, up, act, approximate,
gate_fmt, up_fmt)``: the gate in ``SlimFitConfig.glu_gate_format`` (the GELU input's width),
the up-projection output in ``glu_up_format``.  The product stays an FFN hidden activation, so the
down-projection keeps it in ``ffn_out_input_format`` while it trains (``quantize_activations``).
"""
from __future__ import annotations

from slimfit_fx.extend import Fusion, register_pattern
from slimfit_fx.nodes import arg, is_op, numel, value
from slimfit_fx.op_table import Save, format_for
from slimfit_fx.ops.glu import glu
from slimfit_fx.ops.saved import fmt_to_args


def _keep(index, fmt, node, when, role, share):
    if fmt is None:
        return Save("arg", index, when, role)
    return Save("arg", index, when, role, copy_bytes=fmt.nbytes(numel(node)), share=share, fmt=role)


def match(node, ctx):
    """The fusion of a gated MLP's product at ``node``, or None."""
    config = ctx.config
    if not (config.fuse_gated_mlp and is_op(node, "aten.mul") and len(node.args) == 2):
        return None
    for a, up in (node.args, node.args[::-1]):
        if not is_op(a, "aten.silu", "aten.gelu") or len(a.users) != 1:
            continue
        if value(up) is None or value(up).shape != value(node).shape:
            continue
        gate = a.args[0]
        if value(gate) is None or value(gate).shape != value(node).shape:
            continue
        act = "silu" if is_op(a, "aten.silu") else "gelu"
        approximate = arg(a, 1, "approximate", "none") if act == "gelu" else "none"
        gate_fmt = format_for(config.glu_gate_format, gate)
        up_fmt = format_for(config.glu_up_format, up)

        def saves(ctx, gate=gate, up=up, gate_fmt=gate_fmt, up_fmt=up_fmt):
            return [_keep(0, gate_fmt, gate, (0, 1), "glu_gate", "gate"),
                    _keep(1, up_fmt, up, (0,), "glu_up", "up")]

        return Fusion(node, (a,), glu, (gate, up, act, approximate, fmt_to_args(gate_fmt), fmt_to_args(up_fmt)),
                      saves, note="gated MLP inputs quantized")
    return None


register_pattern("gated_mlp", match)
