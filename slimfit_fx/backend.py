"""The ``"slimfit"`` backend of ``torch.compile``.

    import slimfit_fx.backend          # registers the name (so does the installed entry point)
    compiled = torch.compile(model, backend="slimfit")
    compiled = torch.compile(model, backend="slimfit",
                             options={"config": slimfit_fx.SlimFitConfig.paper(),
                                      "guard_filter_fn": slimfit_fx.backend.guard_filter})

The graph dynamo captures is lowered to ATen training IR, analysed and rewritten
by the same passes as ``slimfit_fx.compile``, and run eagerly; see
``slimfit_fx.integrations.dynamo`` for the design.  With a frozen set that
changes every step (``slimfit_fx.Scheduler``) pass ``guard_filter`` as above,
or use ``slimfit_fx.compile(model, mode="compiled")``, which does: without it
dynamo recompiles for every new frozen set (it guards on ``requires_grad``).

Discovery: the package declares the ``torch_dynamo_backends`` entry point
``slimfit = "slimfit_fx.backend:slimfit_backend"``, which torch reads on the
first lookup of an unknown backend name; importing this module registers the
name as well, for a checkout that is not (re)installed.
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
