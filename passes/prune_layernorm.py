"""Pass: LayerNorm keeps a pruned copy of its normalized input while its weight is frozen.

Reads ``aten.layer_norm(x, shape, weight, bias, eps)`` whose weight is a parameter (or autocast's
cast of one).  Rewrites each, in place, to ``ops.layernorm.layer_norm_pruned``, which decides when
it runs: a trainable weight keeps what eager keeps; a frozen one, the top ``layernorm_keep_ratio``
of the normalized row plus 1/sigma.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.config import SlimFitConfig
from slimfit_fx.nodes import arg
from slimfit_fx.ops.layernorm import layer_norm_pruned

from .match import bias_source, nodes_of, replace_call, weight_source


def prune_layernorm(gm: fx.GraphModule, config: SlimFitConfig) -> fx.GraphModule:
    """Point every LayerNorm with a parameter weight at ``layer_norm_pruned``."""
    if not config.prune_layernorm:
        return gm
    for node in nodes_of(gm, "aten.layer_norm"):
        source = weight_source(gm, arg(node, 2, "weight"))
        if source is None:
            continue  # no weight to freeze: nothing to gate on
        weight, dtype = source
        args = (node.args[0], tuple(arg(node, 1, "normalized_shape")), weight,
                bias_source(gm, arg(node, 3, "bias"), dtype), arg(node, 4, "eps", 1e-5),
                config.layernorm_keep_ratio, dtype)
        replace_call(node, layer_norm_pruned, args,
                     note=f"layernorm pruned to {config.layernorm_keep_ratio:g} when frozen")
    gm.recompile()
    return gm
