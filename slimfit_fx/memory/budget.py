"""Budget pricing: the exact marginal bytes of training one more layer, for the scheduler's Budget policy.

Takes a ``MemoryPlan``, the scheduled layers, the parameters the user froze and an optimizer
name; gives ``BudgetPricing``, whose ``marginal`` and ``total`` answer from the plan's
predictions.  Never changes the plan, never flips ``requires_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BudgetPricing"]


@dataclass
class BudgetPricing:
    """Exact marginal bytes of training one more layer, for one MemoryPlan.

    ``base`` is the predicted total with every scheduled layer frozen.  A layer
    alone adds ``alone[name]``; when another trained layer already keeps the
    same dynamic input (Q/K/V), that input is subtracted (``shared``).
    """

    plan: Any
    base: int
    alone: dict[str, int]
    shared: dict[str, list[tuple[int, frozenset]]] = field(default_factory=dict)

    fixed_frozen: frozenset = frozenset()

    @classmethod
    def build(cls, plan, layers: list[str], fixed_frozen: set[str], optimizer: str) -> "BudgetPricing":
        """``fixed_frozen``: parameters frozen by the user (never scheduled, never trained)."""
        known = plan.analysis.parameters
        fixed_frozen = frozenset(n for n in fixed_frozen if n in known)
        all_frozen = {n for n in layers if n in known} | fixed_frozen
        base = plan.predict(frozen=all_frozen, optimizer=optimizer).total
        alone = {}
        for name in layers:  # a layer outside the plan (a head run eagerly around a captured backbone): unpriced
            alone[name] = plan.predict(frozen=all_frozen - {name}, optimizer=optimizer).total - base \
                if name in known else 0
        a = plan.analysis
        shared: dict[str, list[tuple[int, frozenset]]] = {name: [] for name in layers}
        by_storage: dict[int, set[str]] = {}
        static_storage: set[int] = set()
        for use in a.uses:
            if use.owners:
                by_storage.setdefault(use.storage, set()).update(use.owners)
            else:
                static_storage.add(use.storage)
        for sid, owners in by_storage.items():
            if sid in static_storage:
                continue  # kept whatever is frozen: already in base
            if any(o not in shared and o not in fixed_frozen for o in owners):
                continue  # an always-trained layer keeps it: already in base
            owners = {o for o in owners if o in shared}
            if len(owners) > 1:
                for o in owners:
                    shared[o].append((a.storages[sid].nbytes, frozenset(owners - {o})))
        return cls(plan=plan, base=base, alone=alone, shared=shared, fixed_frozen=fixed_frozen)

    def marginal(self, name: str, trained: set[str]) -> int:
        """Bytes training layer ``name`` adds when the layers in ``trained`` already train."""
        cost = self.alone[name]
        for nbytes, others in self.shared[name]:
            if others & trained:
                cost -= nbytes
        return cost

    def total(self, frozen: set[str], optimizer: str) -> int:
        """Predicted total bytes with ``frozen`` (and the user's frozen parameters) frozen."""
        known = self.plan.analysis.parameters
        return self.plan.predict(frozen={n for n in frozen if n in known} | self.fixed_frozen,
                                 optimizer=optimizer).total
