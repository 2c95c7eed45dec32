"""Pass: under autocast, Linears keep the parameter instead of autocast's low-precision copy.

Reads the ``aten.linear(x, W', b')`` and ``aten.addmm(b', x, W')`` left over by the earlier passes
whose weight ``W'`` is a dtype cast of a parameter (the casts ``slimfit_fx.precision`` makes
explicit).  Rewrites each, in place, to ``ops.gated.gated_linear(x, W, b, None, dtype)``: the same
forward; backward casts ``W`` again instead of keeping ``W'``, and the input is kept only while
``W`` trains.  A graph without autocast has no such casts.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.nodes import arg
from slimfit_fx.ops.gated import gated_linear

from .match import addmm_as_linear, bias_source, nodes_of, replace_call, weight_source


def recast_weights(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    """Point Linears whose weight is autocast's cast of a parameter at ``gated_linear`` on the parameter."""
    if not config.recast_weights:
        return gm
    for node in nodes_of(gm, "aten.linear"):
        source = weight_source(gm, node.args[1])
        if source is None or source[1] is None:
            continue
        weight, dtype = source
        args = (node.args[0], weight, bias_source(gm, arg(node, 2, "bias"), dtype), None, dtype)
        replace_call(node, gated_linear, args, note=f"weight cast to {dtype} again in backward")
    for node in nodes_of(gm, "aten.addmm"):
        source = weight_source(gm, node.args[2])
        if source is None or source[1] is None or node.kwargs:
            continue
        replace_call(node, gated_linear, addmm_as_linear(gm, node, *source) + (None, source[1]),
                     note=f"weight cast to {source[1]} again in backward")
    gm.recompile()
    return gm
