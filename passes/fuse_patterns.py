"""Pass: replace every registered pattern's match by its op (``slimfit_fx.extend``).

Reads the fusions ``extend.find_fusions`` finds, the same ones the analysis priced; for each,
points the matched output node at ``Fusion.op`` with ``Fusion.args``/``kwargs`` and erases the
inner nodes (with the metadata assertions export put on them).  Runs first, on the graph the analysis read.  Rewrites ``gm`` in place.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.extend import find_fusions

from ._match import replace_call


def fuse_patterns(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    fusions = find_fusions(gm, config)
    for fusion in fusions.values():
        replace_call(fusion.output, fusion.op, fusion.args, fusion.kwargs, note=fusion.note or fusion.pattern)
    for fusion in fusions.values():
        for node in fusion.assertions():
            gm.graph.erase_node(node)
        for node in reversed(fusion.inner):
            gm.graph.erase_node(node)
    gm.recompile()
    return gm
