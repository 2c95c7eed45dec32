"""The library's own patterns (``slimfit_fx.extend.register_pattern``), one per module:
cross-entropy without logits, gated MLPs, RMSNorm, ReLU bits, attention written out in ops.  Importing the package registers them."""
from . import cross_entropy, eager_attention, glu, relu, rmsnorm  # noqa: F401
