"""Pass: under autocast, Linears keep the parameter instead of autocast's low-precision copy.

Matches ``aten.linear(x, W', b')`` and ``aten.addmm(b', x, W')`` whose weight ``W'`` is a
dtype cast of a parameter (the casts ``slimfit_fx.precision`` makes explicit), left
over by the earlier passes.  Emits ``ops.gated.gated_linear(x, W, b, None, dtype)``
(``W.t()`` for addmm): the same forward; backward casts ``W`` again instead of keeping
``W'`` (eager autocast keeps one low-precision copy of every weight), and the input is
kept only while ``W`` trains.  Graphs without autocast have no such casts and are left
alone.  Rewrites ``gm`` in place and returns it.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.ops.gated import gated_linear

from ._match import addmm_as_linear, arg, bias_source, nodes_of, replace_call, weight_source


def recast_weights(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
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
