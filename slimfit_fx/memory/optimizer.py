"""The optimizers the memory model prices: their state, how their step runs, its temporaries.

Takes an optimizer as a name in ``OPTIMIZERS`` or a ``torch.optim`` optimizer; gives its
canonical (name, implementation) through ``resolve_optimizer`` and the bytes its step
allocates and frees through ``optimizer_temporaries``.  Never reads an optimizer's parameters'
values or its state, never steps it.
"""
from __future__ import annotations

import torch

from .errors import PlanError

__all__ = ["OPTIMIZERS", "OPTIMIZER_IMPLS", "resolve_optimizer", "optimizer_temporaries"]

# Bytes of optimizer state per byte of trainable parameter, and per-parameter extras.
# AdamW keeps exp_avg and exp_avg_sq (2x) plus a 0-d float32 ``step`` tensor per parameter.
OPTIMIZERS = {
    "adamw": (2, 4),
    "adam": (2, 4),
    "sgd-momentum": (1, 0),
    "sgd": (0, 0),
}

# How ``optimizer.step()`` runs, which decides its temporaries (see ``optimizer_temporaries``):
# "for-loop" (PyTorch's default for CPU parameters), "foreach" (its default for CUDA ones), "fused".
OPTIMIZER_IMPLS = ("for-loop", "foreach", "fused")


def resolve_optimizer(optimizer, impl: str | None = None) -> tuple[str, str]:
    """(name in OPTIMIZERS, implementation in OPTIMIZER_IMPLS) from a name or a torch optimizer;
    an implementation left None is read from the torch optimizer, else "for-loop"."""
    if isinstance(optimizer, torch.optim.Optimizer):
        name = _torch_optimizer_name(optimizer)
        if impl is None:
            impl = _torch_optimizer_impl(optimizer)
        optimizer = name
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
    impl = "for-loop" if impl is None else impl
    if impl not in OPTIMIZER_IMPLS:
        raise PlanError(f"unknown optimizer implementation {impl!r}: choose one of {list(OPTIMIZER_IMPLS)}")
    return optimizer, impl


def _torch_optimizer_name(opt: torch.optim.Optimizer) -> str:
    # Subclasses (a wrapper that logs, a fused variant) keep their base's state; AdamW first, as
    # some torch versions derive it from Adam.
    kinds = ((torch.optim.AdamW, "adamw"), (torch.optim.Adam, "adam"))
    name = next((kind for cls, kind in kinds if isinstance(opt, cls)), None)
    if name is None and isinstance(opt, torch.optim.SGD):
        name = "sgd-momentum" if any(g.get("momentum", 0) for g in opt.param_groups) else "sgd"
    if name is None:
        raise PlanError(f"unknown optimizer {type(opt).__name__}: the plan knows AdamW, Adam and SGD; "
                        f"or pass one of {sorted(OPTIMIZERS)} by name")
    return name


def _torch_optimizer_impl(opt: torch.optim.Optimizer) -> str:
    if opt.defaults.get("fused"):
        return "fused"
    if opt.defaults.get("foreach") is not None:
        return "foreach" if opt.defaults["foreach"] else "for-loop"
    # PyTorch's own choice for these parameters
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(params, bool(opt.defaults.get("differentiable")), False)
    except (ImportError, TypeError):
        foreach = bool(params) and all(p.is_cuda for p in params)
    return "foreach" if foreach else "for-loop"


def optimizer_temporaries(optimizer: str, impl: str, trainable_bytes: list[int]) -> int:
    """Bytes ``optimizer.step()`` allocates and frees (AdamW/Adam: the denominator
    ``sqrt(exp_avg_sq) / bias_correction + eps``).  for-loop: a sqrt and a quotient of one
    parameter at a time (2 x the largest trainable parameter); foreach: the sqrt of every
    ``exp_avg_sq`` at once (1 x the trainable parameters), then updated in place; fused:
    none.  SGD, with or without momentum, updates in place."""
    if not trainable_bytes or optimizer not in ("adam", "adamw"):
        return 0
    if impl == "for-loop":
        return 2 * max(trainable_bytes)
    if impl == "foreach":
        return sum(trainable_bytes)
    return 0
