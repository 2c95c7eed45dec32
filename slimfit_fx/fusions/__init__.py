"""The library's own patterns (``slimfit_fx.extend.register_pattern``), one per module:
cross-entropy without logits, gated MLPs, RMSNorm.  Importing the package registers them."""
from . import cross_entropy, glu, rmsnorm  # noqa: F401
