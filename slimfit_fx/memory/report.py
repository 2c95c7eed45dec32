"""MemoryReport: predicted (and, where a step ran, measured) memory side by side, rendered.

Takes ``MemoryEstimate``s, each with an optional measurement, in ``ReportColumn``s; gives a
table, markdown or JSON (``MemoryReport.render``).  Formats only: never predicts, never measures.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..measure import fmt_bytes
from .plan import MemoryEstimate

__all__ = ["MemoryReport", "ReportColumn"]


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
        """(headers, rows) of the totals table: one row per category, each column predicted, measured
        and its error where a step ran, and the last column over the first."""
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
        """(headers, rows) of the per-layer table: the first column's and the last column's bytes."""
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
        """The report as plain data (what ``render("json")`` dumps)."""
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
        """The report as ``table`` (plain text), ``markdown`` or ``json``; ``per_layer`` adds the layer table."""
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
        colalign = ("left",) + ("right",) * (len(headers) - 1)
        out.append(tabulate(rows, headers=headers, tablefmt=tablefmt, colalign=colalign))
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
