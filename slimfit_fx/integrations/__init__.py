"""Integrations: torch.compile backend, HuggingFace Trainer, torch.distributed.

``slimfit_fx.integrations.SlimFitCallback`` and the other names below load their module on
first use, so importing slimfit_fx does not import the Trainer, accelerate or torch._dynamo.
"""
from __future__ import annotations

import importlib

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
