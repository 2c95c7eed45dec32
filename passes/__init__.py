"""Graph rewrites of slimfit_fx (installed as ``slimfit_fx.passes``).

One pass per module; each is a function ``(GraphModule, SlimFitConfig) -> GraphModule`` whose
docstring states what it matches and what it emits.  Importing the package registers them with
``slimfit_fx.extend.register_pass`` in their required order; ``extend.pipeline()`` lists them.
"""
from slimfit_fx.extend import register_pass

from .dropout_masks import compact_dropout_masks
from .freeze_gate import freeze_gate
from .fuse_patterns import fuse_patterns
from .prune_layernorm import prune_layernorm
from .quantize_activations import quantize_activations
from .recast_weights import recast_weights

# fuse_patterns first: it reads the graph the analysis read.  quantize_activations before
# recast_weights: it finds FFN-out Linears by their (still ATen) activation producer, and
# recast_weights takes the Linears left over.
register_pass("fuse_patterns", fuse_patterns)
register_pass("quantize_activations", quantize_activations, after=["fuse_patterns"])
register_pass("recast_weights", recast_weights, after=["quantize_activations"])
register_pass("prune_layernorm", prune_layernorm, after=["fuse_patterns"])
register_pass("compact_dropout_masks", compact_dropout_masks, after=["fuse_patterns"])
register_pass("freeze_gate", freeze_gate, after=["fuse_patterns"])
