"""MemoryPlan: what a training step keeps in memory, predicted for any frozen set.

Reads a ``GraphAnalysis`` (analysis.py) and prices it: parameters, gradients,
optimizer state, static and dynamic saved activations, per layer.  Pure
arithmetic over the inventory: nothing runs, nothing is measured here.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable

from .analysis import GraphAnalysis
from .measure import fmt_bytes

__all__ = ["OPTIMIZERS", "LayerEstimate", "MemoryEstimate", "MemoryPlan", "PlanError", "MemoryReport", "ReportColumn",
           "fmt_bytes"]

# Bytes of optimizer state per byte of trainable parameter, and per-parameter extras.
# AdamW keeps exp_avg and exp_avg_sq (2x) plus a 0-d float32 ``step`` tensor per parameter.
OPTIMIZERS = {
    "adamw": (2, 4),
    "adam": (2, 4),
    "sgd-momentum": (1, 0),
    "sgd": (0, 0),
}


class PlanError(ValueError):
    """Bad argument to a plan query (unknown parameter name, unknown optimizer)."""


@dataclass
class LayerEstimate:
    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    static_activations: int = 0
    dynamic_activations: int = 0

    @property
    def activations(self) -> int:
        return self.static_activations + self.dynamic_activations

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


@dataclass
class MemoryEstimate:
    """Predicted bytes of one training step with a given frozen set (all integers).

    ``total`` = parameters + buffers + gradients + optimizer_state + activations, the
    sum of the categories (gradients and all saved activations never coexist in
    full, so a step's real high-water mark is lower); ``peak`` models that
    high-water mark: the start of backward, with every saved tensor and the first
    gradient buffers alive (see ``MemoryPlan.predict``).
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

    def to_dict(self, per_layer: bool = True) -> dict:
        d = asdict(self)
        if per_layer:
            d["per_layer"] = {k: {**asdict(v), "activations": v.activations} for k, v in self.per_layer.items()}
        else:
            d.pop("per_layer")
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


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
        return list(self.analysis.parameters)

    @property
    def layers(self) -> list[str]:
        """SlimFit layers: the weight tensors the scheduler may freeze (SLIMFIT.md section 1)."""
        return list(self.analysis.layers)

    @property
    def unknown_ops(self) -> dict[str, int]:
        """Ops not in the table, counted as saving every tensor argument in full."""
        return dict(self.analysis.unknown_ops)

    @property
    def config(self):
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
        return set(self.analysis.parameters) - self._check_names(frozen)

    def predict(self, frozen: Iterable[str] = (), optimizer: str = "adamw") -> MemoryEstimate:
        """Bytes of a training step when the parameters named in ``frozen`` are frozen.

        ``optimizer``: one of ``OPTIMIZERS``; state is counted for trainable
        parameters only (the steady state of a fixed frozen set).
        """
        if optimizer not in OPTIMIZERS:
            raise PlanError(f"unknown optimizer {optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
        state_factor, state_extra = OPTIMIZERS[optimizer]
        trainable = self.trainable(frozen)
        a = self.analysis

        per_layer = {name: LayerEstimate() for name in a.parameters}
        seen_storage: set[int] = set()
        for name, (nbytes, storage) in a.parameters.items():
            layer = per_layer[name]
            # Tied parameters share one storage: count its bytes once.
            if storage not in seen_storage:
                layer.parameters = nbytes
                seen_storage.add(storage)
            if name in trainable:
                layer.gradients = nbytes
                layer.optimizer_state = state_factor * nbytes + (state_extra if state_factor else 0)

        active = a.active_uses(trainable)
        by_storage: dict[int, list] = {}
        for use in active:
            by_storage.setdefault(use.storage, []).append(use)
        static = dynamic = 0
        largest = 0
        by_role: dict[str, int] = {}
        for sid, uses in by_storage.items():
            nbytes = a.storages[sid].nbytes
            largest = max(largest, nbytes)
            role = uses[0].role
            by_role[role] = by_role.get(role, 0) + nbytes
            statics = [u for u in uses if not u.dynamic]
            if statics:
                static += nbytes
                owner = a.layer_op.get(statics[0].node) or (a.layers[0] if a.layers else None)
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

        params = sum(l.parameters for l in per_layer.values())
        grads = sum(l.gradients for l in per_layer.values())
        state = sum(l.optimizer_state for l in per_layer.values())
        acts = static + dynamic
        total = params + self.buffers_bytes + grads + state + acts
        # At the start of backward every saved tensor is alive and the first
        # gradients appear; gradient buffers of the size of the largest saved
        # tensor (the incoming gradient and the one being produced) are the
        # dominant transient.  Parameter gradients accumulate while activations are
        # released, so the step peaks at whichever end of backward is larger.
        peak = params + self.buffers_bytes + state + max(acts + 2 * largest, grads + largest)
        return MemoryEstimate(
            parameters=params, buffers=self.buffers_bytes, gradients=grads, optimizer_state=state,
            static_activations=static, dynamic_activations=dynamic, activations=acts, total=total, peak=peak,
            frozen_parameters=len(a.parameters) - len(trainable), trainable_parameters=len(trainable),
            per_layer=per_layer, by_role=dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
        )

    def saved_tensors(self, frozen: Iterable[str] = ()) -> list[dict]:
        """Every storage saved for backward under this frozen set: producer, consumers,
        static/dynamic, owner layers, bytes, dtype (what ``slimfit-fx report`` lists)."""
        a = self.analysis
        trainable = self.trainable(frozen)
        by_storage: dict[int, list] = {}
        for use in a.active_uses(trainable):
            by_storage.setdefault(use.storage, []).append(use)
        rows = []
        for sid, uses in sorted(by_storage.items()):
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

    def layer_costs(self, frozen: Iterable[str] = (), optimizer: str = "adamw") -> dict[str, int]:
        """Bytes each SlimFit layer adds when trained (gradient, optimizer state, dynamic activations),
        for the scheduler's budget policy."""
        est = self.predict(frozen, optimizer)
        return {
            name: est.per_layer[name].gradients + est.per_layer[name].optimizer_state
            + est.per_layer[name].dynamic_activations
            for name in self.layers
        }


# ------------------------------------------------------------------ the report


@dataclass
class ReportColumn:
    """One setting in a report: its prediction and, when a step was run, its measurement.

    ``measured`` keys: ``saved_activations`` and ``peak`` (bytes), optionally
    ``parameters``, ``gradients``, ``optimizer_state``, ``other`` at the peak.
    """

    name: str
    estimate: MemoryEstimate
    measured: dict[str, int] | None = None
    note: str = ""


_ROWS = [
    ("parameters", "parameters"),
    ("buffers", "buffers"),
    ("gradients", "gradients"),
    ("optimizer state", "optimizer_state"),
    ("static activations", "static_activations"),
    ("dynamic activations", "dynamic_activations"),
    ("saved activations", "activations"),
    ("sum of the above", "total"),
    ("peak of a step", "peak"),
]
# Measured rows: saved activations from saved_bytes; the rest is the breakdown of the
# step's peak (gradients at that moment may be partial, so they are not shown).
_MEASURED_ROW = {"activations": "saved_activations", "peak": "peak", "parameters": "parameters",
                 "optimizer_state": "optimizer_state"}


@dataclass
class MemoryReport:
    """Plain PyTorch vs SlimFit, predicted (and measured where a step ran), per layer.

    Every figure is labelled predicted or measured; ``render`` gives ``table``,
    ``markdown`` or ``json``.
    """

    title: str
    settings: dict
    columns: list[ReportColumn]
    notes: list[str] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    frozen: set[str] = field(default_factory=set)

    def totals_rows(self) -> tuple[list[str], list[list[str]]]:
        headers = ["bytes"]
        for col in self.columns:
            headers.append(f"{col.name}\npredicted")
            if col.measured is not None:
                headers += [f"{col.name}\nmeasured", "error"]
        base = self.columns[0].estimate
        if len(self.columns) > 1:
            headers.append(f"{self.columns[-1].name}\n/ {self.columns[0].name}")
        rows = []
        for label, attr in _ROWS:
            row = [label]
            for col in self.columns:
                pred = getattr(col.estimate, attr)
                row.append(fmt_bytes(pred))
                if col.measured is not None:
                    meas = col.measured.get(_MEASURED_ROW.get(attr, ""))
                    row.append(fmt_bytes(meas))
                    row.append(f"{(pred - meas) / meas * 100:+.1f}%" if meas else "-")
            if len(self.columns) > 1:
                last = getattr(self.columns[-1].estimate, attr)
                first = getattr(base, attr)
                row.append(f"{last / first:.2f}x" if first else "-")
            rows.append(row)
        return headers, rows

    def layer_rows(self) -> tuple[list[str], list[list[str]]]:
        plain, slim = self.columns[0].estimate, self.columns[-1].estimate
        headers = ["layer", "state", "parameters", "gradients", "optimizer", "static act.",
                   f"dynamic act.\n{self.columns[0].name}", f"dynamic act.\n{self.columns[-1].name}"]
        rows = []
        for name in self.layer_names:
            p, s = plain.per_layer[name], slim.per_layer[name]
            rows.append([name, "frozen" if name in self.frozen else "trained", fmt_bytes(p.parameters),
                         fmt_bytes(s.gradients), fmt_bytes(s.optimizer_state), fmt_bytes(s.static_activations),
                         fmt_bytes(p.dynamic_activations), fmt_bytes(s.dynamic_activations)])
        return headers, rows

    def to_dict(self, per_layer: bool = False) -> dict:
        return {
            "title": self.title,
            "settings": self.settings,
            "columns": [
                {"name": c.name, "note": c.note, "predicted": c.estimate.to_dict(per_layer=per_layer),
                 "measured": c.measured}
                for c in self.columns
            ],
            "frozen": sorted(self.frozen),
            "notes": self.notes,
        }

    def render(self, fmt: str = "table", per_layer: bool = False) -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(per_layer=per_layer), indent=2)
        from tabulate import tabulate

        tablefmt = {"table": "simple", "markdown": "github"}.get(fmt)
        if tablefmt is None:
            raise ValueError(f"unknown report format {fmt!r}: use table, markdown or json")
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        heading = f"## {self.title}" if fmt == "markdown" else self.title
        out = [heading, settings, ""]
        headers, rows = self.totals_rows()
        if fmt == "markdown":
            headers = [h.replace("\n", " ") for h in headers]
        out.append(tabulate(rows, headers=headers, tablefmt=tablefmt, colalign=("left",) + ("right",) * (len(headers) - 1)))
        col_notes = [f"{col.name}: {col.note}" for col in self.columns if col.note]
        if col_notes:
            out += [""] + [f"* {n}" for n in col_notes]
        if per_layer:
            headers, rows = self.layer_rows()
            if fmt == "markdown":
                headers = [h.replace("\n", " ") for h in headers]
            out += ["", tabulate(rows, headers=headers, tablefmt=tablefmt)]
        if self.notes:
            out += [""] + [f"* {n}" for n in self.notes]
        return "\n".join(out)
