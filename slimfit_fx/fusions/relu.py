"""Pattern: ReLU keeps its sign bits, not its output.

Matches ``aten.relu(x)`` and emits ``ops.relu.relu_bits``: one bit per element kept while ``x``
needs grad (eager keeps the output).  Under ``SlimFitConfig.relu_bits``.  The output stays an FFN
hidden activation, so a Linear reading it keeps it in ``ffn_out_input_format`` while it trains.
"""
from __future__ import annotations

from slimfit_fx.extend import Fusion, register_pattern
from slimfit_fx.nodes import is_op, value
from slimfit_fx.op_table import Save
from slimfit_fx.ops.relu import relu_bits


def match(node, ctx):
    """The fusion of ``aten.relu`` at ``node``, or None."""
    if not (ctx.config.relu_bits and is_op(node, "aten.relu")) or value(node) is None:
        return None
    if not value(node).is_floating_point():
        return None
    bits = -(-int(value(node).numel()) // 8)
    return Fusion(node, (), relu_bits, (node.args[0],),
                  lambda ctx: [Save("new", 0, (0,), "relu_bits", copy_bytes=bits, share="bits")],
                  note="ReLU keeps its sign bits")


register_pattern("relu", match)
