"""Orchestration: trace -> analyse -> (passes) -> module.

``analyze`` is the read-only half: it captures the model and returns its
MemoryPlan without changing anything the user owns.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .analysis import analyze_graph
from .config import SlimFitConfig
from .memory import MemoryPlan
from .trace import trace

__all__ = ["analyze", "plan_for_graph"]


def plan_for_graph(gm, config: SlimFitConfig | None = None, model: nn.Module | None = None) -> MemoryPlan:
    """MemoryPlan of an already captured graph (``slimfit_fx.trace``)."""
    buffers = sum(b.numel() * b.element_size() for b in (model or gm).buffers())
    analysis = analyze_graph(gm, config, model=model)
    return MemoryPlan(analysis, buffers_bytes=buffers, description=gm.meta.get("model_class", ""))


def analyze(model: nn.Module, example_inputs: Any, config: SlimFitConfig | None = None) -> MemoryPlan:
    """Predict the training memory of ``model`` on inputs shaped like ``example_inputs``.

    Without ``config``: the model as plain PyTorch runs it.  With a
    ``SlimFitConfig``: saved activations in the config's formats (quantized
    attention and GELU inputs, pruned frozen LayerNorms, no dropout masks).
    Nothing is run and the model is not modified; the graph is captured in the
    model's current mode (``model.train()`` for fine-tuning).
    """
    gm = trace(model, example_inputs, dynamic=False)
    return plan_for_graph(gm, config, model)
