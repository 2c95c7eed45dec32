"""Pass: train-mode dropout keeps its mask as bits, or replays it from the RNG state.

Reads ``aten.dropout(x, p, train=True)`` with 0 < p < 1.  Rewrites it, in place, to
``ops.dropout.dropout_compact(x, p, True, mode)`` in the mode ``SlimFitConfig.dropout_mode`` picks
for the graph's device (bits on the CPU, replay on accelerators): the same RNG draws, so the same
forward, with a 1-bit mask or none kept.  Leaves eval-mode dropout alone.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.nodes import arg
from slimfit_fx.ops.dropout import dropout_compact

from .match import nodes_of, replace_call


def compact_dropout_masks(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    """Point train-mode dropout at ``dropout_compact``, in the mode ``config`` picks for the device."""
    if not config.compacts_dropout:
        return gm
    for node in nodes_of(gm, "aten.dropout"):
        p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
        if train and 0 < p < 1:
            mode = config.dropout_mode(node.args[0].meta["val"].device.type)
            replace_call(node, dropout_compact, (node.args[0], p, True, mode), note=f"dropout mask kept as {mode}")
    gm.recompile()
    return gm
