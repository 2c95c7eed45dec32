"""MemoryPlan: what a training step keeps in memory, predicted for any frozen set.

Takes a ``GraphAnalysis`` (analysis.py); gives ``MemoryPlan.predict`` -> ``MemoryEstimate``:
parameters, gradients, optimizer state, static and dynamic saved activations per layer, and the
step's peak (peak.py); ``saved_tensors`` lists what is saved.  Pure arithmetic over the
inventory: nothing runs, nothing is measured, the analysis is never changed.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from ..analysis import GraphAnalysis
from .errors import PlanError
from .optimizer import OPTIMIZERS, resolve_optimizer
from .peak import device_workspace_bytes, peak_terms

__all__ = ["LayerEstimate", "MemoryEstimate", "MemoryPlan", "PlanError"]


@dataclass
class LayerEstimate:
    """Predicted bytes one parameter adds: itself, its gradient, its optimizer state, its activations."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    static_activations: int = 0
    dynamic_activations: int = 0

    @property
    def activations(self) -> int:
        """Static plus dynamic saved activations."""
        return self.static_activations + self.dynamic_activations

    @property
    def total(self) -> int:
        """Every category of this parameter together."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations


@dataclass
class MemoryEstimate:
    """Predicted bytes of one training step with a given frozen set (all integers).

    ``total`` = parameters + buffers + gradients + optimizer_state + activations, the
    sum of the categories (gradients and all saved activations never coexist in
    full, so a step's real high-water mark is lower); ``peak`` models that
    high-water mark over forward, backward and ``optimizer.step()``, input batch
    included (see ``MemoryPlan.predict``); ``peak_detail`` gives its terms.
    """

    parameters: int
    buffers: int
    gradients: int
    optimizer_state: int
    static_activations: int
    dynamic_activations: int
    activations: int
    total: int
    peak: int
    frozen_parameters: int
    trainable_parameters: int
    per_layer: dict[str, LayerEstimate] = field(default_factory=dict)
    by_role: dict[str, int] = field(default_factory=dict)  # saved bytes per activation class
    peak_detail: dict[str, Any] = field(default_factory=dict)  # terms of ``peak`` (MemoryPlan.predict)

    def to_dict(self, per_layer: bool = True) -> dict:
        """Every field as plain data; ``per_layer`` False leaves the per-layer breakdown out."""
        d = asdict(self)
        if per_layer:
            d["per_layer"] = {k: {**asdict(v), "activations": v.activations} for k, v in self.per_layer.items()}
        else:
            d.pop("per_layer")
        return d


class MemoryPlan:
    """Memory of a captured model, predicted for any frozen set before anything runs.

    Build it with ``slimfit_fx.analyze``.  ``predict(frozen=..., optimizer=...)``
    gives a ``MemoryEstimate``; ``analysis`` holds the saved-tensor inventory
    (``analysis.graph`` is the networkx dependency graph).
    """

    def __init__(self, analysis: GraphAnalysis, *, buffers_bytes: int = 0, description: str = ""):
        self.analysis = analysis
        self.buffers_bytes = buffers_bytes
        self.description = description

    # -- queries -------------------------------------------------------------------
    @property
    def parameter_names(self) -> list[str]:
        """Every parameter of the captured graph, by its name in ``model.named_parameters()``."""
        return list(self.analysis.parameters)

    @property
    def layers(self) -> list[str]:
        """SlimFit layers: the weight tensors the scheduler may freeze (the SlimFit paper's definition)."""
        return list(self.analysis.layers)

    @property
    def unknown_ops(self) -> dict[str, int]:
        """Ops not in the table, counted as saving every tensor argument in full."""
        return dict(self.analysis.unknown_ops)

    @property
    def config(self):
        """The ``SlimFitConfig`` the analysis priced (None: plain PyTorch)."""
        return self.analysis.config

    def _check_names(self, names: Iterable[str]) -> set[str]:
        if isinstance(names, str):
            raise PlanError("frozen must be a collection of parameter names, not a single string")
        aliases = self.analysis.aliases
        names = {aliases.get(n, n) for n in names}
        known = self.analysis.parameters
        bad = sorted(n for n in names if n not in known)
        if bad:
            close = difflib.get_close_matches(bad[0], list(known), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise PlanError(
                f"unknown parameter name(s) {bad[:5]} in frozen set: use names from model.named_parameters(){hint}"
            )
        return names

    def trainable(self, frozen: Iterable[str]) -> set[str]:
        """The parameters that train when those named in ``frozen`` are frozen."""
        return set(self.analysis.parameters) - self._check_names(frozen)

    def predict(self, frozen: Iterable[str] = (), optimizer: "str | torch.optim.Optimizer" = "adamw", *,
                optimizer_impl: str | None = None) -> MemoryEstimate:
        """Bytes of a training step when the parameters named in ``frozen`` are frozen.

        ``optimizer``: one of ``OPTIMIZERS``, or a ``torch.optim`` optimizer
        (AdamW, Adam or SGD; its kind and implementation are read from it, its
        parameters and state are not); state is counted for trainable parameters
        only (the steady state of a fixed frozen set).  ``optimizer_impl``: how its
        step runs, one of ``OPTIMIZER_IMPLS``; it changes only ``peak`` (the step's
        temporaries).  Default: what PyTorch picks for CPU parameters, "for-loop"
        (for CUDA parameters PyTorch picks "foreach": say so, or pass the optimizer).
        """
        optimizer, impl = resolve_optimizer(optimizer, optimizer_impl)
        trainable = self.trainable(frozen)
        a = self.analysis
        per_layer = self._parameter_estimates(trainable, optimizer)
        active = a.active_uses(trainable)
        static, dynamic, by_role = self._price_activations(active, trainable, per_layer)
        params = sum(layer.parameters for layer in per_layer.values())
        grads = sum(layer.gradients for layer in per_layer.values())
        state = sum(layer.optimizer_state for layer in per_layer.values())
        acts = static + dynamic
        total = params + self.buffers_bytes + grads + state + acts
        detail = peak_terms(a, trainable, active, optimizer, impl)
        detail["device_workspaces"] = device_workspace_bytes(a.device)
        detail["fixed"] = params + self.buffers_bytes + state + detail["inputs"] + detail["device_workspaces"]
        peak = detail["fixed"] + detail[detail["phase"]]
        return MemoryEstimate(
            parameters=params, buffers=self.buffers_bytes, gradients=grads, optimizer_state=state,
            static_activations=static, dynamic_activations=dynamic, activations=acts, total=total, peak=peak,
            frozen_parameters=len(a.parameters) - len(trainable), trainable_parameters=len(trainable),
            per_layer=per_layer, by_role=dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
            peak_detail=detail,
        )

    def _parameter_estimates(self, trainable: set[str], optimizer: str) -> dict[str, LayerEstimate]:
        """Per parameter: its bytes and, when it trains, its gradient and optimizer state."""
        state_factor, state_extra = OPTIMIZERS[optimizer]
        per_layer = {name: LayerEstimate() for name in self.analysis.parameters}
        seen_storage: set[int] = set()
        for name, (nbytes, storage) in self.analysis.parameters.items():
            layer = per_layer[name]
            # Tied parameters share one storage: count its bytes once.
            if storage not in seen_storage:
                layer.parameters = nbytes
                seen_storage.add(storage)
            if name in trainable:
                layer.gradients = nbytes
                layer.optimizer_state = state_factor * nbytes + (state_extra if state_factor else 0)
        return per_layer

    def _price_activations(self, active: list, trainable: set[str],
                           per_layer: dict[str, LayerEstimate]) -> tuple[int, int, dict[str, int]]:
        """(static bytes, dynamic bytes, bytes per role) of the active saves, each storage once;
        adds each storage's bytes to the layers that own it in ``per_layer``."""
        a = self.analysis
        static = dynamic = 0
        by_role: dict[str, int] = {}
        for sid, uses in _uses_by_storage(active).items():
            nbytes = a.storages[sid].nbytes
            role = uses[0].role
            by_role[role] = by_role.get(role, 0) + nbytes
            statics = [u for u in uses if not u.dynamic]
            if statics:
                static += nbytes
                owner = a.nodes[statics[0].node].layer or (a.layers[0] if a.layers else None)
                if owner is not None:
                    per_layer[owner].static_activations += nbytes
                continue
            dynamic += nbytes
            # A shared input (Q/K/V) is split evenly among the trainable layers that need it.
            owners = sorted({o for u in uses for o in u.owners if o in trainable})
            # Eager PyTorch keeps a frozen conv's input anyway (its bias is trainable):
            # the bytes still belong to that layer.
            owners = owners or sorted({o for u in uses for o in u.owners})
            share, rest = divmod(nbytes, len(owners))
            for i, o in enumerate(owners):
                per_layer[o].dynamic_activations += share + (rest if i == 0 else 0)
        return static, dynamic, by_role

    def saved_tensors(self, frozen: Iterable[str] = ()) -> list[dict]:
        """Every storage saved for backward under this frozen set: producer, consumers,
        static/dynamic, owner layers, bytes, dtype (what ``slimfit-fx report`` lists)."""
        a = self.analysis
        trainable = self.trainable(frozen)
        rows = []
        for sid, uses in sorted(_uses_by_storage(a.active_uses(trainable)).items()):
            st = a.storages[sid]
            static = any(not u.dynamic for u in uses)
            rows.append({
                "producer": st.producer,
                "consumers": sorted({f"{u.node} ({u.op}: {u.role})" for u in uses}),
                "kind": "static" if static else "dynamic",
                "layers": sorted({o for u in uses for o in u.owners}),
                "bytes": st.nbytes,
                "dtype": st.dtype,
                "shape": list(st.shape),
            })
        return rows


def _uses_by_storage(active: list) -> dict[int, list]:
    """The active saves grouped by the storage they keep, in order of first appearance."""
    by_storage: dict[int, list] = {}
    for use in active:
        by_storage.setdefault(use.storage, []).append(use)
    return by_storage
