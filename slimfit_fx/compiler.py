"""Orchestration: trace -> analyse -> passes -> SlimFitModule.

Takes a model, optional example inputs and a ``SlimFitConfig``.  Gives ``analyze`` (its MemoryPlan)
and ``compile`` / ``compile_in_place`` (a drop-in ``SlimFitModule`` that trains through the rewritten
graph and shares the model's own parameters, buffers and submodules).
Never copies a parameter, changes the model's eval-mode forward, or imports an integration:
``compile(mode="compiled")`` runs what ``slimfit_fx.integrations`` registers.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable

import torch
from torch import fx, nn

from .analysis import analyze_graph
from .blocks import Unsupported
from .blocks import capture as capture_blocks
from .config import SlimFitConfig
from .extend import pipeline
from .memory import MemoryPlan
from .precision import autocast_disabled, autocast_state
from .trace import (
    IN_PLACE_ATTRIBUTE,
    Inputs,
    TraceError,
    call_by_name,
    class_forward,
    input_signature,
    inputs_of,
    instance_forwards,
    normalize_inputs,
    share_model_tensors,
    trace,
    training_mode,
)

__all__ = ["analyze", "plan_for_graph", "compile", "compile_in_place", "uncompile", "in_place_module",
           "register_compiled_mode", "SlimFitModule"]


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


class ShardedParametersError(RuntimeError):
    """The module's parameters were sharded (FSDP2) after the graph was captured."""


def _sharding(module: nn.Module) -> tuple[bool, list[str]]:
    """Whether FSDP2 (``fully_shard``) manages ``module`` or a submodule, and which parameters are DTensors."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False, []
    sharded = isinstance(module, FSDPModule) or any(isinstance(m, FSDPModule) for m in module.modules())
    return sharded, [n for n, p in module.named_parameters() if isinstance(p, DTensor)]


def _refuse_sharded(module: "SlimFitModule") -> None:
    """FSDP2 swaps DTensor shards and unsharded copies in and out of the modules around each
    forward, in hooks of the modules it was applied to.  A per-block capture calls every block as its
    module, so the hooks fire: it trains, with each block and the SlimFitModule itself (the root)
    fully_shard-ed.  A whole-model graph never calls the blocks: it would compute with copies that
    never get a gradient, and training would silently do nothing."""
    sharded, names = _sharding(module)
    if not (sharded or names):
        return
    graphs = [gm for gm in module._graphs.values() if isinstance(gm, fx.GraphModule)]
    if graphs and all("slimfit_blocks" in gm.meta for gm in graphs):
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module.original, FSDPModule) and not isinstance(module, FSDPModule):
            raise ShardedParametersError(
                "fully_shard was applied to the original model, whose hooks the compiled module never calls: apply "
                "it to each block and then to the module slimfit_fx.compile returned (docs/DISTRIBUTED.md)")
        return
    where = f" ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''} are DTensors)" if names else ""
    raise ShardedParametersError(
        f"this slimfit_fx module is sharded by FSDP2 (fully_shard){where}: its captured graph would compute "
        "with unsharded copies that never get a gradient, so nothing would train. Compile with "
        "slimfit_fx.compile(model, example_inputs, blocks='auto') before fully_shard (each block, then the "
        "compiled module), use DistributedDataParallel around slimfit_fx.compile(model) (slimfit_fx.integrations."
        "distributed.wrap_ddp), or fully_shard the plain model with the Scheduler (docs/DISTRIBUTED.md)")


def _check_blocks_and_checkpoint(blocks, checkpoint) -> str | None:
    """The capture mode ``compile`` gets: checkpointing recomputes blocks, so it implies ``blocks="auto"``."""
    if blocks not in (None, "auto"):
        raise ValueError(f"blocks must be 'auto' (capture each repeated block once) or None (the whole model), "
                         f"got {blocks!r}")
    if checkpoint is None:
        return blocks
    if not (checkpoint == "all" or (isinstance(checkpoint, int) and not isinstance(checkpoint, bool)
                                    and checkpoint > 0)):
        raise ValueError(f"checkpoint must be None, 'all' (recompute every block) or a positive int (a byte budget "
                         f"for the saved activations, met by recomputing the fewest blocks), got {checkpoint!r}")
    return "auto"


class SlimFitModule(nn.Module):
    """A drop-in for the user's model that trains through the rewritten graph.

    It holds the user's own submodules, parameters and buffers (the same dicts), so
    ``state_dict()`` keys and parameter objects are the original model's and
    nothing is copied.  ``train()`` runs the SlimFit graph; ``eval()`` runs the
    original model's forward, untouched.  Any other attribute is the original
    model's (``config``, ``generate``, ``save_pretrained``, ``device``, ``dtype``...);
    the SlimFitConfig is ``slimfit_config``.  ``plan`` is the MemoryPlan of the
    captured graph under the config (predicted before anything ran).  Pickling,
    ``torch.save`` and ``copy.deepcopy`` keep the model, config and plan and leave the
    captured graphs out: the next training call captures them again.  ``names_from``: the model whose
    parameter names the plan speaks, when ``model`` is a part of it (a backbone).
    """

    def __init__(self, model: nn.Module, config: SlimFitConfig, example_inputs: Any = None,
                 blocks: str | None = None, checkpoint: str | int | None = None, *,
                 names_from: nn.Module | None = None):
        super().__init__()
        blocks = _check_blocks_and_checkpoint(blocks, checkpoint)
        object.__setattr__(self, "original", model)
        object.__setattr__(self, "slimfit_config", config)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "checkpoint", checkpoint)
        object.__setattr__(self, "_graphs", {})
        object.__setattr__(self, "plan", None)
        object.__setattr__(self, "plan_signature", None)  # shapes the plan was predicted for
        object.__setattr__(self, "_parameter_ids", None)  # identities the graphs were last pointed at
        if names_from is not None:
            object.__setattr__(self, "_names_from", names_from)
        # Share, don't copy: the user's dicts become this module's.
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training
        if example_inputs is not None:
            inputs = normalize_inputs(example_inputs)
            self.capture_call(inputs.args, inputs.kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # the shared parameters, buffers and submodules
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None:
                raise
            return getattr(original, name)

    def __getstate__(self):
        state = self.__dict__.copy()
        # Exported graphs hold closures that do not pickle; they are captured again on the next call.
        state["_graphs"] = {}
        state["_parameter_ids"] = None
        return state

    def _plan_names(self) -> nn.Module:
        """The model whose parameter names the plan speaks: the whole model, for a backbone."""
        return self.__dict__.get("_names_from") or self.original

    def capture_call(self, args: tuple, kwargs: dict, dynamic: bool = True) -> fx.GraphModule:
        """Capture, price and rewrite a graph for calls like this one: with symbolic batch and sequence
        sizes (``dynamic``), or for exactly these shapes (where the symbolic graph's guards exclude them)."""
        model = self.original
        if any(_sharding(self)):
            raise ShardedParametersError(
                "a training call that needs a new graph after fully_shard: capturing needs the unsharded parameters. "
                "Give slimfit_fx.compile(model, example_inputs, blocks='auto') an example of each input structure "
                "(tensor ranks and dtypes, autocast state) you train with, before fully_shard")
        names = self._plan_names()
        captured = self._capture_blocks(args, kwargs, dynamic, assemble=True)
        if captured is not None:
            gm = captured.graph
            plan = plan_for_graph(captured.inlined, self.slimfit_config, names)
        else:
            try:
                gm = _trace_training(model, args, kwargs, dynamic)
            except TraceError as exc:
                backbone = _backbone_for(model, exc)
                if backbone is None:
                    raise
                return self._capture_backbone(backbone, exc, args, kwargs)
            plan = plan_for_graph(gm, self.slimfit_config, names)
            for _, rewrite in pipeline():
                gm = rewrite(gm, self.slimfit_config)
        if dynamic:
            self._graphs[input_signature(args, kwargs, by="structure")] = gm
        else:
            self._graphs[("shapes", input_signature(args, kwargs))] = gm
        if self.plan is None:
            object.__setattr__(self, "plan", plan)
            object.__setattr__(self, "plan_signature", input_signature(args, kwargs))
        return gm

    def _capture_blocks(self, args: tuple, kwargs: dict, dynamic: bool, assemble: bool):
        """Per-block capture (``blocks="auto"``), or None when the model does not fit it: then the whole
        model is captured, said once in a warning."""
        if self.blocks != "auto":
            return None
        model = self.original
        names = self._plan_names()

        def price(inlined):
            return plan_for_graph(inlined, self.slimfit_config, names).predict().activations

        with training_mode(model):
            try:
                return capture_blocks(model, args, kwargs, self.slimfit_config, dynamic=dynamic,
                                      assemble=assemble, checkpoint=self.checkpoint, price=price)
            except Unsupported as exc:
                off = (f" (checkpoint={self.checkpoint!r} needs the blocks: nothing is recomputed)"
                       if self.checkpoint else "")
                warnings.warn(f"slimfit_fx: blocks='auto': {type(model).__name__} {exc}; capturing the whole "
                              f"model instead{off}", RuntimeWarning, stacklevel=5)
                return None
            except TraceError:
                return None  # the whole-model capture meets it too, and says what to do (or trains the backbone)

    def _capture_backbone(self, backbone: nn.Module, exc: TraceError, args: tuple, kwargs: dict) -> "_Backbone":
        """The model's own Python branches on tensor values outside its backbone (DeBERTa-v2's loss):
        the backbone trains through SlimFit, compiled in place, and the rest of the model runs eagerly
        around it (not rewritten, and outside ``plan``)."""
        prefix = next(n for n, m in self.original.named_modules() if m is backbone)
        where = next((line.split("failing construct: ", 1)[1] for line in str(exc).splitlines()
                      if "failing construct:" in line), "a data-dependent branch")
        warnings.warn(f"slimfit_fx: {type(self.original).__name__} branches on tensor values outside its backbone "
                      f"({where}); the backbone `{prefix}` trains through SlimFit and the rest of the model runs "
                      "eagerly around it (not rewritten; plan covers the backbone)", RuntimeWarning, stacklevel=4)
        inner = SlimFitModule(backbone, self.slimfit_config, blocks=self.blocks, checkpoint=self.checkpoint,
                              names_from=self.original)
        inner_args = inputs_of(backbone, self.original, args, kwargs)
        if inner_args is not None:
            inner.capture_call(*inner_args)
        marker = _Backbone(backbone, inner, autocast_state())
        self._graphs[input_signature(args, kwargs, by="structure")] = marker
        if self.plan is None and inner.plan is not None:
            object.__setattr__(self, "plan", inner.plan)
            object.__setattr__(self, "plan_signature", input_signature(args, kwargs))
        return marker

    def plan_for_call(self, args: tuple, kwargs: dict) -> MemoryPlan:
        """The MemoryPlan of a training call with these inputs, captured afresh at exactly their shapes
        (what a Budget is priced with): the model's, or its backbone's when only that is captured.
        Names are the whole model's.  Nothing runs but the model's code up to its backbone."""
        if self.backbone is not None:
            call = inputs_of(self.backbone.original, self.original, args, kwargs)
            if call is None:
                raise TraceError(f"{type(self.original).__name__} did not call its backbone with these inputs")
            return self.backbone.plan_for_call(*call)
        names = self._plan_names()
        captured = self._capture_blocks(args, kwargs, dynamic=False, assemble=False)
        gm = captured.inlined if captured is not None else _trace_training(self.original, args, kwargs, dynamic=False)
        return plan_for_graph(gm, self.slimfit_config, names)

    def rewrite_notes(self) -> dict[str, int]:
        """What the passes did in the captured graphs, counted by kind (``"GELU input quantized": 12``,
        where attention stayed on a fused kernel, what was kept unquantized and why)."""
        counts: dict[str, int] = {}
        for gm in self._graphs.values():
            if isinstance(gm, _Backbone):
                for note, n in gm.inner.rewrite_notes().items():
                    counts[note] = counts.get(note, 0) + n
                continue
            for graph, times in [(gm, 1)] + gm.meta.get("slimfit_blocks", []):
                for node in graph.graph.nodes:
                    for note in node.meta.get("slimfit", []):
                        counts[note] = counts.get(note, 0) + times
        return counts

    @property
    def backbone(self) -> "SlimFitModule | None":
        """The SlimFitModule of the backbone, when only the backbone is captured (the model branches on
        tensor values outside it, e.g. DeBERTa-v2's loss); None otherwise.  ``plan`` covers it alone."""
        gm = next(iter(self._graphs.values()), None)
        return gm.inner if isinstance(gm, _Backbone) else None

    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The rewritten training graph captured first (None before the first call)."""
        gm = next(iter(self._graphs.values()), None)
        return gm.inner.graph_module if isinstance(gm, _Backbone) else gm

    def forward(self, *args, **kwargs):
        """Training: the rewritten graph for these inputs (captured on first sight); else the original."""
        if not self.training:
            return self.original(*args, **kwargs)
        # Seen from inside: accelerate (the Trainer's bf16/fp16) enters autocast within the forward it
        # wraps, after the Scheduler's forward pre-hook; the Scheduler prices a Budget in this precision.
        object.__setattr__(self, "last_autocast", autocast_state())
        self._check_parameters()
        exact = self._graphs.get(("shapes", input_signature(args, kwargs))) if len(self._graphs) > 1 else None
        gm = exact or self._graphs.get(input_signature(args, kwargs, by="structure")) or self.capture_call(args, kwargs)
        if isinstance(gm, _Backbone):
            # The model's own forward (the class's, not one compile_in_place installed, which would
            # call back here), its backbone through the SlimFit graph.
            with gm.routed(), class_forward(self.original):
                out = self.original(*args, **kwargs)
            if self.plan is None and gm.inner.plan is not None:
                object.__setattr__(self, "plan", gm.inner.plan)
            return out
        try:
            with autocast_disabled(gm.meta.get("autocast")):  # its casts are explicit nodes (precision.py)
                return gm(*args, **kwargs)
        except AssertionError as exc:
            # The symbolic graph's guards (checked before anything runs) exclude these shapes, e.g. a
            # sequence shorter than a relative-position table needs: a graph for exactly them.
            if exact is not None or not str(exc).startswith("Guard failed"):
                raise
        gm = self.capture_call(args, kwargs, dynamic=False)
        with autocast_disabled(gm.meta.get("autocast")):
            return gm(*args, **kwargs)

    def _check_parameters(self) -> None:
        """Refuse FSDP2 sharding, and follow parameters the user replaced (``model.fc.weight =
        nn.Parameter(...)``) and buffers ``model.to(...)`` replaced after the capture (a model compiled
        in place is moved without this module); a cheap identity check when nothing changed."""
        current = tuple(map(id, self._parameters_in_order())) + tuple(
            id(b) for _, b in self.original.named_buffers(remove_duplicate=False))
        if current == self._parameter_ids:
            return
        _refuse_sharded(self)
        for gm in self._graphs.values():
            if isinstance(gm, fx.GraphModule):
                share_model_tensors(gm, self.original)
        object.__setattr__(self, "_parameter_ids", current)

    def _parameters_in_order(self):
        return [p for _, p in self.original.named_parameters(remove_duplicate=False)]

    def train(self, mode: bool = True):
        """Set the mode of this module and of the original model (eval runs the original forward)."""
        super().train(mode)
        self.original.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        # Buffers are replaced (not updated in place) by .to()/.half(): point the graphs
        # at the new tensors.
        for gm in self._graphs.values():
            if isinstance(gm, fx.GraphModule):
                share_model_tensors(gm, self.original)
        return out

    def extra_repr(self) -> str:
        """The original model's class and how many graphs are captured."""
        return f"SlimFit of {type(self.original).__name__}, {len(self._graphs)} captured graph(s)"


class _Backbone:
    """The graph-cache entry of a model whose backbone alone is captured (``_capture_backbone``):
    ``routed()`` sends the backbone's calls to its SlimFitModule for the length of one forward, so the
    user's model itself is never changed."""

    def __init__(self, backbone: nn.Module, inner: "SlimFitModule", autocast):
        self.backbone, self.inner = backbone, inner
        self.meta = {"autocast": autocast}

    @contextlib.contextmanager
    def routed(self):
        """The backbone's calls go to its SlimFitModule for the length of the block."""
        backbone, inner = self.backbone, self.inner

        def forward(*args, **kwargs):
            args, kwargs = call_by_name(backbone, args, kwargs)
            return inner(*args, **kwargs)

        forward.__slimfit_router__ = True  # slimfit_fx.trace captures the class's forward, not this
        with instance_forwards([(backbone, forward)]):
            yield


def _backbone_for(model: nn.Module, exc: TraceError) -> nn.Module | None:
    """The backbone to capture instead of ``model``, when ``model`` failed on a branch on tensor values
    and is a HuggingFace model with a distinct backbone (``base_model``); else None."""
    text = f"{exc} {exc.__cause__!r}"
    if "data-dependent" not in text and "DataDependent" not in text:
        return None
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model or isinstance(backbone, SlimFitModule):
        return None
    return backbone


def _trace_training(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    """``trace`` in training mode, the model's own mode restored after."""
    with training_mode(model):
        return trace(model, Inputs(tuple(args), dict(kwargs)), dynamic=dynamic)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


_COMPILED_MODE: dict[str, Callable[[nn.Module, SlimFitConfig, Any], SlimFitModule]] = {}


def register_compiled_mode(build: Callable[[nn.Module, SlimFitConfig, Any], SlimFitModule]) -> None:
    """Install ``build(model, config, example_inputs)``: what ``compile(mode="compiled")`` returns.
    ``slimfit_fx.integrations`` registers its torch.compile module here; the core imports no integration."""
    _COMPILED_MODE["build"] = build


def _compiled_mode(model: nn.Module, config: SlimFitConfig, example_inputs: Any, blocks, checkpoint) -> SlimFitModule:
    """``compile(mode="compiled")``: the checks, then the registered torch.compile module."""
    if blocks is not None or checkpoint is not None:
        raise ValueError("blocks='auto' and checkpoint capture with torch.export (mode='eager'); torch.compile "
                         "(mode='compiled') captures its own graphs: drop one of the two")
    if _torch_version() < (2, 9):
        raise RuntimeError(
            f"slimfit_fx.compile(mode='compiled') needs torch>=2.9 (torch.compile's guard_filter_fn option, "
            f"which keeps a changing frozen set from recompiling); this is torch {torch.__version__}. Upgrade "
            "torch, or use mode='eager' (the same rewrites and savings)")
    build = _COMPILED_MODE.get("build")
    if build is None:
        raise RuntimeError("slimfit_fx.compile(mode='compiled') needs slimfit_fx.integrations, which registers it "
                           "when imported (import slimfit_fx does)")
    return build(model, config, example_inputs)


def compile(model: nn.Module, example_inputs: Any = None, config: SlimFitConfig | None = None,
            mode: str = "eager", blocks: str | None = None, checkpoint: str | int | None = None) -> SlimFitModule:
    """Compile ``model`` for memory-efficient fine-tuning.

    Returns a ``SlimFitModule``: same forward signature and outputs (HF
    ``ModelOutput`` included), same ``state_dict()`` keys, the same parameter
    objects.  ``example_inputs`` (dict of keyword arguments or tuple of positional
    ones) may be omitted: the graph is then captured on the first training call.
    ``config`` defaults to ``SlimFitConfig()``, every feature on in per-group
    scale-adaptive formats at the SlimFit paper's bit widths (``SlimFitConfig.paper()``:
    the paper's own fixed-point formats); ``SlimFitConfig.off()`` computes exactly what
    the original does.  Under ``torch.autocast`` a graph is captured per autocast state,
    with autocast's casts made explicit (``slimfit_fx.precision``).

    ``mode="eager"`` captures with ``torch.export`` and runs the rewritten graph.
    ``mode="compiled"`` trains through ``torch.compile`` with the ``"slimfit"``
    backend (same passes on the graph dynamo captures, same results and saved
    bytes) and a guard filter that lets the frozen set change every step without
    recompiling (``slimfit_fx.integrations.dynamo``); the graph is compiled on the
    first training call.

    ``blocks="auto"`` captures each kind of repeated block (HF encoder and decoder layers) once and
    runs every block of that kind through the one rewritten graph, called as the block module; the
    code around the blocks is one graph of its own (``slimfit_fx.blocks``).  Capture time stays
    about constant in depth and predictions are those of a whole capture.  A model without repeated
    blocks is captured whole, with a warning.  ``blocks=None`` captures the whole model as one graph.

    ``checkpoint`` (per-block capture implied): ``"all"`` recomputes every block in backward from
    its inputs (``torch.utils.checkpoint``, reentrant), keeping only those; an int is a byte budget
    for the saved activations (with nothing frozen), met by recomputing the fewest blocks, the first
    first.  Results are those without checkpointing (the random stream is replayed); ``plan``
    prices what is kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"slimfit_fx.compile needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, SlimFitModule):
        raise TypeError("this model is already compiled by slimfit_fx; compile the original (module.original)")
    config = SlimFitConfig() if config is None else config
    if not isinstance(config, SlimFitConfig):
        raise TypeError(f"config must be a SlimFitConfig, got {type(config).__name__}")
    if mode == "compiled":
        return _compiled_mode(model, config, example_inputs, blocks, checkpoint)
    if mode != "eager":
        raise ValueError(f"mode must be 'eager' or 'compiled', got {mode!r}")
    return SlimFitModule(model, config, example_inputs, blocks=blocks, checkpoint=checkpoint)


class _InPlaceForward:
    """The forward ``compile_in_place`` installs on a model instance: training calls go through the
    model's SlimFitModule, the rest to the class's forward.  An object holding the model, not a
    closure, so that ``copy.deepcopy`` (an EMA or reference model) and pickling carry it over to the
    copy and its own SlimFitModule; it keeps the class forward's signature, which the Trainer reads."""

    def __init__(self, model: nn.Module, previous=None):
        self.model = model
        self.previous = previous  # an instance forward installed before (accelerate's), restored by uncompile
        self.__signature__ = inspect.signature(previous or type(model).forward.__get__(model))

    def __call__(self, *args, **kwargs):
        model = self.model
        base = self.previous or type(model).forward.__get__(model)
        slim = in_place_module(model)  # None after uncompile, under a wrapper that kept this
        if slim is None or not model.training or not torch.is_grad_enabled():
            return base(*args, **kwargs)
        slim.training = True  # the capture (slimfit_fx.trace) sees the class's forward, not this one
        args, kwargs = call_by_name(model, args, kwargs)
        return slim(*args, **kwargs)


def compile_in_place(model: nn.Module, example_inputs: Any = None, config: SlimFitConfig | None = None,
                     blocks: str | None = None, checkpoint: str | int | None = None) -> SlimFitModule:
    """Make ``model`` train through the SlimFit graph without replacing the object.

    Returns the SlimFitModule (its ``plan`` is set once a graph is captured).
    Idempotent for one model; call :func:`uncompile` to undo.  A deepcopy or a pickle of the model
    trains through a SlimFitModule of its own.
    """
    if isinstance(model, SlimFitModule):
        raise TypeError("compile_in_place needs the original model, not a SlimFitModule")
    existing = getattr(model, IN_PLACE_ATTRIBUTE, None)
    if existing is not None:
        return existing
    slim = compile(model, example_inputs, config, blocks=blocks, checkpoint=checkpoint)
    # object.__setattr__: not a submodule (it shares this model's dicts) and not in state_dict.
    object.__setattr__(model, IN_PLACE_ATTRIBUTE, slim)
    object.__setattr__(model, "forward", _InPlaceForward(model, model.__dict__.get("forward")))
    return slim


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_in_place` (an instance forward installed before it comes back)."""
    if IN_PLACE_ATTRIBUTE in model.__dict__:
        del model.__dict__[IN_PLACE_ATTRIBUTE]
        installed = model.__dict__.get("forward")
        if isinstance(installed, _InPlaceForward):
            del model.__dict__["forward"]
            if installed.previous is not None:
                model.__dict__["forward"] = installed.previous
        # else a wrapper installed after compile_in_place (accelerate's) stays: it calls the
        # _InPlaceForward it wraps, which now passes every call to the model's own forward.


def in_place_module(model: nn.Module) -> SlimFitModule | None:
    """The SlimFitModule :func:`compile_in_place` gave ``model``; None when it has none."""
    return model.__dict__.get(IN_PLACE_ATTRIBUTE)
