"""Pass: train-mode dropout keeps its RNG state instead of its mask.

Matches ``aten.dropout(x, p, train=True)`` with 0 < p < 1.
Emits ``slimfit_fx.ops.dropout.dropout_regenerated(x, p, True)``: same forward
(same op, same RNG draws), mask replayed in backward.  Eval-mode dropout
(train=False) is left alone.  Rewrites ``gm`` in place and returns it.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.ops.dropout import dropout_regenerated

from ._match import arg, nodes_of, replace_call


def regenerate_dropout_masks(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    if not config.dropout_without_masks:
        return gm
    for node in nodes_of(gm, "aten.dropout"):
        p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
        if train and 0 < p < 1:
            replace_call(node, dropout_regenerated, (node.args[0], p, True), note="dropout mask regenerated")
    gm.recompile()
    return gm
