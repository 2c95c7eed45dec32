"""The library's graph rewrites (installed as ``slimfit_fx.passes``), one pass per module.

Each pass is ``fn(gm, config) -> gm``: it reads the graph the analysis priced and rewrites it in
place through the runtime ops of ``slimfit_fx.ops``; its module docstring says what it reads and
what it rewrites.  ``BUILTIN_PASSES`` lists them with their order constraints, and
``slimfit_fx.extend`` registers them on first use.  A pass never measures and never prices: the op
table prices what it emits.
"""
from .dropout_masks import compact_dropout_masks
from .freeze_gate import freeze_gate
from .fuse_patterns import fuse_patterns
from .prune_layernorm import prune_layernorm
from .quantize_activations import quantize_activations
from .recast_weights import recast_weights

__all__ = ["BUILTIN_PASSES", "compact_dropout_masks", "freeze_gate", "fuse_patterns", "prune_layernorm",
           "quantize_activations", "recast_weights"]

# (name, pass, the passes it runs after), in registration order: the tie-break of extend.pipeline().
# fuse_patterns first: it reads the graph the analysis read.  quantize_activations before
# recast_weights: it finds FFN-out Linears by their (still ATen) activation producer, and
# recast_weights takes the Linears left over.
BUILTIN_PASSES = (
    ("fuse_patterns", fuse_patterns, ()),
    ("quantize_activations", quantize_activations, ("fuse_patterns",)),
    ("recast_weights", recast_weights, ("quantize_activations",)),
    ("prune_layernorm", prune_layernorm, ("fuse_patterns",)),
    ("compact_dropout_masks", compact_dropout_masks, ("fuse_patterns",)),
    ("freeze_gate", freeze_gate, ("fuse_patterns",)),
)
