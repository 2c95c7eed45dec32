"""Pass: replace every registered pattern's match by its op (``slimfit_fx.extend``).

Reads the fusions ``extend.find_fusions`` finds: the very ones the analysis priced, so it runs
first, on the graph the analysis read.  Rewrites, in place, each match's output node to
``Fusion.op(*Fusion.args, **Fusion.kwargs)`` and erases its inner nodes (with the metadata
assertions export put on them).
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.extend import find_fusions

from .match import replace_call


def fuse_patterns(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    """Replace each fusion ``extend.find_fusions`` finds by its op and erase its inner nodes."""
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
