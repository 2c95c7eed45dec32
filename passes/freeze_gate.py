"""Pass: convolutions keep their input only while their weight trains.

Matches ``aten.conv1d/conv2d/conv3d(x, weight, bias, stride, padding, dilation,
groups)`` with a parameter weight (or autocast's cast of one) and numeric padding.
Emits ``slimfit_fx.ops.gated.gated_conv``, which reads ``weight.requires_grad`` at
run time: a frozen conv keeps nothing and computes no weight gradient.  Under
autocast it takes the parameter and the cast's dtype and casts it itself.

Linear, addmm and embedding are left alone: their autograd formulas already
keep the input (indices) only for the weight gradient, which
tests/test_op_table.py checks against autograd.  Rewrites ``gm`` in place.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.ops.gated import gated_conv

from ._match import arg, bias_source, nodes_of, replace_call, weight_source


def freeze_gate(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    if not config.freeze_gate:
        return gm
    for node in nodes_of(gm, "aten.conv1d", "aten.conv2d", "aten.conv3d"):
        source, padding = weight_source(gm, node.args[1]), arg(node, 4, "padding", 0)
        if source is None or isinstance(padding, str):
            continue
        weight, dtype = source
        args = (node.args[0], weight, bias_source(gm, arg(node, 2, "bias"), dtype), arg(node, 3, "stride", 1),
                padding, arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1), dtype)
        replace_call(node, gated_conv, args, note="freeze-gated conv")
    gm.recompile()
    return gm
