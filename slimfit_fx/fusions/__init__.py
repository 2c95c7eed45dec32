"""The library's own patterns (``slimfit_fx.extend.register_pattern``), one per module.

Cross-entropy without logits, gated MLPs, RMSNorm, ReLU bits, attention written out in ops.
Importing the package registers them; each ``match(node, ctx)`` reads the graph and returns a
``Fusion`` or None, never changing the graph (the ``fuse_patterns`` pass does).
"""
from . import cross_entropy, eager_attention, glu, relu, rmsnorm  # noqa: F401
