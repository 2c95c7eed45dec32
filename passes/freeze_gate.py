"""Pass: convolutions keep their input only while their weight trains.

Matches ``aten.conv1d/conv2d/conv3d(x, weight, bias, stride, padding, dilation,
groups)`` with a parameter weight and numeric padding.  Emits
``slimfit_fx.ops.gated.gated_conv``, which reads ``weight.requires_grad`` at
run time: a frozen conv keeps nothing and computes no weight gradient.

Linear, addmm and embedding are left alone: their autograd formulas already
keep the input (indices) only for the weight gradient, which
tests/test_op_table.py checks against autograd.  Rewrites ``gm`` in place.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.ops.gated import gated_conv

from ._match import arg, is_parameter, nodes_of, replace_call


def freeze_gate(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    if not config.freeze_gate:
        return gm
    for node in nodes_of(gm, "aten.conv1d", "aten.conv2d", "aten.conv3d"):
        weight, padding = node.args[1], arg(node, 4, "padding", 0)
        if not is_parameter(gm, weight) or isinstance(padding, str):
            continue
        args = (node.args[0], weight, arg(node, 2, "bias"), arg(node, 3, "stride", 1), padding,
                arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1))
        replace_call(node, gated_conv, args, note="freeze-gated conv")
    gm.recompile()
    return gm
