"""slimfit_fx: memory-efficient fine-tuning of PyTorch models through torch.fx.

Gives the public API: ``compile`` (a drop-in ``SlimFitModule`` that keeps far fewer activation bytes),
``trace``, ``analyze`` (a MemoryPlan before anything runs), ``SlimFitConfig``, ``MemoryReport``,
``Scheduler`` with its ``Ratio`` and ``Budget`` policies, and the modules ``measure`` (measurement)
and ``extend`` (what your own ops keep, patterns and passes).
Never imports transformers, accelerate or torch._dynamo when imported: integrations load on first use.
"""
from . import extend, integrations, measure  # integrations: registers compile(mode="compiled")
from .compiler import ShardedParametersError, SlimFitModule, analyze, compile
from .config import ConfigError, QuantFormat, SlimFitConfig
from .memory import MemoryEstimate, MemoryPlan, MemoryReport, PlanError
from .scheduler import Budget, FreezePolicy, Ratio, Scheduler, SchedulerError
from .trace import TraceError, trace

__version__ = "0.1.0"

__all__ = [
    "compile",
    "SlimFitModule",
    "analyze",
    "trace",
    "measure",
    "extend",
    "integrations",
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
    "FreezePolicy",
    "SchedulerError",
]
