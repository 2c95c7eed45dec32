"""Orchestration: trace -> analyse -> passes -> SlimFitModule.

``analyze`` is the read-only half: it captures the model and returns its
MemoryPlan without changing anything the user owns.  ``compile`` returns a
drop-in module that runs the rewritten graph in training mode.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .analysis import analyze_graph
from .config import SlimFitConfig
from .memory import MemoryPlan
from .trace import _share_with_model, normalize_inputs, trace

__all__ = ["analyze", "plan_for_graph", "compile", "SlimFitModule"]


def _passes():
    # passes/ is installed as slimfit_fx.passes; imported late because the passes import the ops.
    from .passes.dropout_masks import regenerate_dropout_masks
    from .passes.freeze_gate import freeze_gate
    from .passes.prune_layernorm import prune_layernorm
    from .passes.quantize_activations import quantize_activations

    # quantize_activations first: it finds FFN-out Linears by their (still ATen) GELU producer.
    return [quantize_activations, prune_layernorm, regenerate_dropout_masks, freeze_gate]


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


def _structure(args: tuple, kwargs: dict) -> tuple:
    """What a captured graph is specialised on: which arguments are tensors, of what rank
    and dtype (batch and sequence lengths are symbolic)."""

    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dim(), v.dtype, v.device.type)
        if isinstance(v, (int, float, bool, str, type(None))):
            return ("const", v)
        return ("other", type(v).__name__)

    return (tuple(sig(a) for a in args), tuple(sorted((k, sig(v)) for k, v in kwargs.items())))


class SlimFitModule(nn.Module):
    """A drop-in for the user's model that trains through the rewritten graph.

    It holds the user's own submodules, parameters and buffers (the same dicts), so
    ``state_dict()`` keys and parameter objects are the original model's and
    nothing is copied.  ``train()`` runs the SlimFit graph; ``eval()`` runs the
    original model's forward, untouched.  ``plan`` is the MemoryPlan of the
    captured graph under the config (predicted before anything ran).
    """

    def __init__(self, model: nn.Module, config: SlimFitConfig, example_inputs: Any = None):
        super().__init__()
        object.__setattr__(self, "original", model)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_graphs", {})
        object.__setattr__(self, "plan", None)
        # Share, don't copy: the user's dicts become this module's.
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training
        if example_inputs is not None:
            inputs = normalize_inputs(example_inputs)
            self._capture(inputs.args, inputs.kwargs)

    def _capture(self, args: tuple, kwargs: dict) -> fx.GraphModule:
        model = self.original
        was_training = model.training
        model.train()
        try:
            gm = trace(model, _as_inputs(args, kwargs), dynamic=True)
        finally:
            model.train(was_training)
        plan = plan_for_graph(gm, self.config, model)
        for rewrite in _passes():
            gm = rewrite(gm, self.config)
        self._graphs[_structure(args, kwargs)] = gm
        if self.plan is None:
            object.__setattr__(self, "plan", plan)
        return gm

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The rewritten training graph captured first (None before the first call)."""
        return next(iter(self._graphs.values()), None)

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.original(*args, **kwargs)
        gm = self._graphs.get(_structure(args, kwargs)) or self._capture(args, kwargs)
        return gm(*args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.original.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        # Buffers are replaced (not updated in place) by .to()/.half(): point the graphs
        # at the new tensors.
        for gm in self._graphs.values():
            _share_with_model(gm, self.original)
        return out

    def extra_repr(self) -> str:
        return f"SlimFit of {type(self.original).__name__}, {len(self._graphs)} captured graph(s)"


def _as_inputs(args: tuple, kwargs: dict):
    from .trace import Inputs

    return Inputs(tuple(args), dict(kwargs))


def compile(model: nn.Module, example_inputs: Any = None, config: SlimFitConfig | None = None) -> SlimFitModule:
    """Compile ``model`` for memory-efficient fine-tuning.

    Returns a ``SlimFitModule``: same forward signature and outputs (HF
    ``ModelOutput`` included), same ``state_dict()`` keys, the same parameter
    objects.  ``example_inputs`` (dict of keyword arguments or tuple of positional
    ones) may be omitted: the graph is then captured on the first training call.
    ``config`` defaults to ``SlimFitConfig()``, every feature on in the paper's
    formats; ``SlimFitConfig.off()`` computes exactly what the original does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"slimfit_fx.compile needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, SlimFitModule):
        raise TypeError("this model is already compiled by slimfit_fx; compile the original (module.original)")
    config = SlimFitConfig() if config is None else config
    if not isinstance(config, SlimFitConfig):
        raise TypeError(f"config must be a SlimFitConfig, got {type(config).__name__}")
    return SlimFitModule(model, config, example_inputs)
