"""The ``"slimfit"`` backend of ``torch.compile``.

    import slimfit_fx.backend          # registers the name (so does the installed entry point)
    compiled = torch.compile(model, backend="slimfit", options={"guard_filter_fn": slimfit_fx.backend.guard_filter})

Takes dynamo's graphs and, in ``options``, a ``"config"`` (a ``SlimFitConfig``).  Gives
``slimfit_backend``, registered as ``BACKEND_NAME`` when imported (the package's
``torch_dynamo_backends`` entry point finds it without the import), and re-exports the names of
``slimfit_fx.integrations.dynamo``, which holds the design.  Without ``guard_filter`` dynamo recompiles
for every new frozen set; ``slimfit_fx.compile(model, mode="compiled")`` passes it.
Never registers the name twice.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import fx

from .integrations.dynamo import CompiledGraph, ParameterChanged, SlimFitBackend, guard_filter, lower_to_training_ir

__all__ = ["slimfit_backend", "guard_filter", "SlimFitBackend", "CompiledGraph", "ParameterChanged",
           "lower_to_training_ir", "BACKEND_NAME"]

BACKEND_NAME = "slimfit"


def slimfit_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                    mode: str | None = None) -> CompiledGraph:
    """Dynamo backend: ``torch.compile(model, backend="slimfit", options={"config": SlimFitConfig(...)})``.

    ``options["config"]``: the ``SlimFitConfig`` (default ``SlimFitConfig()``).
    ``mode`` (torch.compile's) changes nothing: the rewritten graph runs eagerly.
    """
    options = dict(options or {})
    config = options.pop("config", None)
    if options:
        raise ValueError(f"slimfit backend: unknown options {sorted(options)}; it takes 'config' "
                         "(a SlimFitConfig), and torch.compile takes 'guard_filter_fn'")
    return SlimFitBackend(config)(gm, example_inputs)


def _register() -> None:
    """Register ``"slimfit"`` with dynamo unless the entry point is what is loading this module."""
    from torch._dynamo.backends import registry

    known = getattr(registry, "_COMPILER_FNS", {})
    discovered = getattr(registry, "_BACKENDS", {})
    if BACKEND_NAME in known or discovered.get(BACKEND_NAME) is not None:
        # Already registered, or discovered through the entry point: then lookup_backend() loads
        # this function itself, and registering here first would make its registration a duplicate.
        return
    try:
        registry.register_backend(slimfit_backend, name=BACKEND_NAME)
    except AssertionError:  # registered meanwhile ("duplicate name")
        pass


_register()
