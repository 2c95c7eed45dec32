"""Integrations: torch.compile backend, HuggingFace Trainer, torch.distributed.

Takes the core (``slimfit_fx.compiler``, ``slimfit_fx.scheduler``); gives ``SlimFitCallback`` and the
other names below, each loading its module on first use, and registers ``compile(mode="compiled")``.
Never imports the Trainer, accelerate or torch._dynamo when imported itself (``import slimfit_fx`` does).
"""
from __future__ import annotations

import importlib

from ..compiler import register_compiled_mode

_LAZY = {
    "SlimFitCallback": "huggingface",
    "compile_in_place": "huggingface",
    "uncompile": "huggingface",
    "wrap_ddp": "distributed",
    "check_ddp": "distributed",
    "ddp_kwargs": "distributed",
    "CompiledSlimFitModule": "dynamo",
    "guard_filter": "dynamo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slimfit_fx.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def _compiled_module(model, config, example_inputs):
    """``compile(mode="compiled")``: the torch.compile module, its module (and torch._dynamo) loaded now."""
    from .dynamo import CompiledSlimFitModule

    return CompiledSlimFitModule(model, config, example_inputs)


register_compiled_mode(_compiled_module)
