"""Pass: train-mode dropout keeps its mask as bits, or replays it from the RNG state.

Matches ``aten.dropout(x, p, train=True)`` with 0 < p < 1.
Emits ``slimfit_fx.ops.dropout.dropout_compact(x, p, True, mode)`` with the mode
``SlimFitConfig.dropout_mode`` picks for the graph's device (bits on the CPU,
replay on accelerators): same forward (same RNG draws), a 1-bit or no mask kept.
Eval-mode dropout (train=False) is left alone.  Rewrites ``gm`` in place and returns it.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.ops.dropout import dropout_compact

from ._match import arg, nodes_of, replace_call


def compact_dropout_masks(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    if not config.compacts_dropout:
        return gm
    for node in nodes_of(gm, "aten.dropout"):
        p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
        if train and 0 < p < 1:
            mode = config.dropout_mode(node.args[0].meta["val"].device.type)
            replace_call(node, dropout_compact, (node.args[0], p, True, mode), note=f"dropout mask kept as {mode}")
    gm.recompile()
    return gm
