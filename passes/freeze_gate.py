"""Pass: convolutions keep their input only while their weight trains.

Reads ``aten.conv1d/conv2d/conv3d`` whose weight is a parameter (or autocast's cast of one) and
whose padding is numeric.  Rewrites each, in place, to ``ops.gated.gated_conv``, which reads
``weight.requires_grad`` when it runs: a frozen conv keeps nothing; under autocast it takes the
parameter and casts it itself.  Leaves Linear, addmm and embedding alone: their autograd formulas
already keep the input only for the weight gradient (tests/test_op_table.py).
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.nodes import arg
from slimfit_fx.ops.gated import gated_conv

from .match import bias_source, nodes_of, replace_call, weight_source


def freeze_gate(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    """Point every convolution with a parameter weight and numeric padding at ``gated_conv``."""
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
