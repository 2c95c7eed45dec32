"""The memory model: what a training step keeps, predicted for any frozen set before anything runs.

Takes a ``GraphAnalysis`` (slimfit_fx.analysis); gives ``MemoryPlan`` and its ``MemoryEstimate``
(plan.py), the step-peak model (peak.py), ``MemoryReport`` (report.py), the optimizers it prices
and their one resolver (optimizer.py), and the scheduler's ``BudgetPricing`` (budget.py).  Pure
arithmetic: it never runs a model, never measures, never rewrites a graph, and never imports
slimfit_fx.ops.
"""
from ..measure import fmt_bytes
from .budget import BudgetPricing
from .errors import PlanError
from .optimizer import OPTIMIZER_IMPLS, OPTIMIZERS, resolve_optimizer
from .peak import device_workspace_bytes
from .plan import LayerEstimate, MemoryEstimate, MemoryPlan
from .report import MemoryReport, ReportColumn

__all__ = ["OPTIMIZERS", "OPTIMIZER_IMPLS", "LayerEstimate", "MemoryEstimate", "MemoryPlan", "PlanError",
           "MemoryReport", "ReportColumn", "fmt_bytes", "BudgetPricing", "resolve_optimizer",
           "device_workspace_bytes"]
