"""slimfit_fx: memory-efficient fine-tuning of transformer models through torch.fx.

Public API: ``compile`` (a drop-in module that trains with far less activation
memory), ``trace``, ``analyze`` (MemoryPlan before anything runs),
``SlimFitConfig``, ``MemoryReport``, ``Scheduler`` with its ``Ratio`` and
``Budget`` policies, the ``measure`` module (device-independent measurement) and
the ``extend`` module (register what your own ops keep, patterns and passes).
"""
from . import extend, measure
from .compiler import ShardedParametersError, SlimFitModule, analyze, compile
from .config import ConfigError, QuantFormat, SlimFitConfig
from .memory import MemoryEstimate, MemoryPlan, MemoryReport, PlanError
from .scheduler import Budget, Ratio, Scheduler, SchedulerError
from .trace import TraceError, trace

__version__ = "0.1.0"

__all__ = [
    "compile",
    "SlimFitModule",
    "analyze",
    "trace",
    "measure",
    "extend",
    "SlimFitConfig",
    "QuantFormat",
    "ConfigError",
    "MemoryPlan",
    "MemoryEstimate",
    "MemoryReport",
    "PlanError",
    "ShardedParametersError",
    "TraceError",
    "Scheduler",
    "Ratio",
    "Budget",
    "SchedulerError",
]
