"""torch.compile integration: the ``"slimfit"`` dynamo backend and ``compile(mode="compiled")``.

Takes the torch-level graphs dynamo captures, parameters lifted to inputs.  Gives a ``CompiledGraph``
per graph (lowered to ATen training IR, priced and rewritten by the analysis and passes of
``slimfit_fx.compile``, run with eager kernels), ``guard_filter`` (the frozen set changes without
recompiling) and ``CompiledSlimFitModule``.  docs/DESIGN.md, "The torch.compile backend", says why.
Never keeps a parameter or a compiled module alive, bakes a frozen set into a graph, or drops a guard
but the TENSOR_MATCH guard of a parameter that one of its graphs takes.
"""
from __future__ import annotations

import inspect
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..compiler import SlimFitModule, plan_for_graph
from ..config import SlimFitConfig
from ..extend import pipeline
from ..precision import autocast_disabled, autocast_state, materialize_autocast
from ..trace import input_signature, normalize_inputs, trace, training_mode

__all__ = [
    "SlimFitBackend",
    "CompiledGraph",
    "CompiledSlimFitModule",
    "guard_filter",
    "lower_to_training_ir",
]


# ----------------------------------------------------------------- parameters whose guard the filter drops

class _WeakParams:
    """A set of parameters by identity, not keeping them alive (tensors compare by value)."""

    def __init__(self):
        self._refs: dict[int, weakref.ref] = {}

    def add(self, p: torch.Tensor) -> None:
        """Hold ``p`` (weakly)."""
        key = id(p)
        if key not in self._refs or self._refs[key]() is not p:
            self._refs[key] = weakref.ref(p, lambda _ref, key=key: self._refs.pop(key, None))

    def __contains__(self, p) -> bool:
        ref = self._refs.get(id(p))
        return ref is not None and ref() is p


class _PatternsSeen:
    """The parameters' ``requires_grad`` patterns compiled per signature of a graph's inputs.  A signature
    names its parameters by ``id``: its entry goes when one of them dies, so a parameter made where a
    freed one was starts afresh and nothing is kept for parameters that are gone."""

    def __init__(self):
        self._entries: dict[tuple, tuple[list, set]] = {}

    def __contains__(self, signature: tuple) -> bool:
        """Whether patterns are held for ``signature``."""
        return signature in self._entries

    def patterns(self, signature: tuple, params: list[torch.Tensor]) -> set:
        """The patterns seen for ``signature`` (whose parameters are ``params``), to read and add to."""
        entry = self._entries.get(signature)
        if entry is None:
            def forget(_ref, signature=signature):
                self._entries.pop(signature, None)

            entry = self._entries[signature] = ([weakref.ref(p, forget) for p in params], set())
        return entry[1]


_GATED = _WeakParams()  # inputs of a graph this backend compiled: their guard may go
_UNGUARDED = _WeakParams()  # whose guard guard_filter did drop
_SEEN = _PatternsSeen()


def guard_filter(entries: Sequence[Any]) -> list[bool]:
    """``guard_filter_fn`` for ``torch.compile``: drop the TENSOR_MATCH guard (dtype, device,
    shape, strides, requires_grad) of the parameters that are inputs of a graph compiled by the
    slimfit backend, keep every other guard.

    Those parameters' dtype, device and shape are checked by the compiled callable itself; their
    ``requires_grad`` is read by the rewritten ops at run time, so flipping it (the scheduler does,
    every iteration) needs no recompile::

        torch.compile(model, backend="slimfit", options={"guard_filter_fn": guard_filter})
    """
    keep = []
    for e in entries:
        drop = e.guard_type == "TENSOR_MATCH" and isinstance(e.value, nn.Parameter) and e.value in _GATED
        if drop:
            _UNGUARDED.add(e.value)
        keep.append(not drop)
    return keep


# ----------------------------------------------------------------- lowering

def _fake_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]):
    """Fake versions of the backend's inputs in dynamo's fake mode (symbolic sizes kept),
    as AOTAutograd makes them; (None, inputs) outside dynamo."""
    from torch._guards import TracingContext, detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return None, list(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    context = TracingContext.try_get()
    out = []
    for node, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.Tensor):
            if isinstance(x, torch._subclasses.FakeTensor) and x.fake_mode is fake_mode:
                out.append(x)
                continue
            symbolic = context.tensor_to_context.get(x) if context is not None else None
            if symbolic is not None:
                out.append(fake_mode.from_tensor(x, symbolic_context=symbolic, source=symbolic.tensor_source))
            else:
                out.append(fake_mode.from_tensor(x))
        else:
            value = node.meta.get("example_value")
            out.append(value if isinstance(value, torch.SymInt) else x)
    return fake_mode, out


def lower_to_training_ir(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The ATen training-IR graph of a dynamo (torch-level) graph: ``make_fx`` pre-dispatch,
    the tracer of non-strict ``torch.export``.  Same placeholders, in the same order."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode, args = _fake_inputs(gm, example_inputs)
    if fake_mode is None:
        return make_fx(gm, pre_dispatch=True, tracing_mode="fake")(*args)
    with fake_mode:
        return make_fx(gm, pre_dispatch=True)(*args)


_PATH = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")


def _source_name(node: fx.Node) -> str:
    """Dynamo's source of a placeholder, e.g. ``L['self']._modules['bert']._parameters['weight']``."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return ""
    try:
        return str(source.name() if callable(source.name) else source.name)
    except Exception:  # noqa: BLE001 - a source kind without a name
        return ""


def _path_of(source: str) -> str | None:
    """``bert.encoder.layer.0.attention.self.query.weight`` from a parameter's or buffer's source."""
    parts = _PATH.findall(source)
    return ".".join(parts) if parts and all(p.isidentifier() or p.isdigit() for p in parts) else None


class _Lifted:
    """Parameters and buffers of a lowered graph as ``get_attr`` nodes, for the analysis and the
    passes (which recognise a freezable weight by its ``get_attr``), and back."""

    def __init__(self, gm: fx.GraphModule, dynamo_gm: fx.GraphModule, example_inputs: Sequence[Any]):
        self.gm = gm
        self.roots: list[str] = []
        self.pairs: list[tuple[fx.Node, fx.Node]] = []
        graph = gm.graph
        lowered = [n for n in graph.nodes if n.op == "placeholder"]
        original = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
        anchor = lowered[-1] if lowered else None
        for i, (node, x) in enumerate(zip(lowered, example_inputs)):
            source = _source_name(original[i]) if i < len(original) else ""
            is_param = isinstance(x, nn.Parameter)
            if not (is_param or (isinstance(x, torch.Tensor) and "._buffers[" in source)):
                continue  # a real input (input_ids, hidden states) or a size: stays a placeholder
            target = self._register(_path_of(source) or f"_slimfit_input_{i}", x, is_param)
            with graph.inserting_after(anchor):
                attr = graph.get_attr(target)
            anchor = attr
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            self.pairs.append((node, attr))
        gm.recompile()

    def _register(self, path: str, tensor: torch.Tensor, is_param: bool) -> str:
        parts = path.split(".")
        if parts[0] not in self.roots and hasattr(self.gm, parts[0]):
            parts = ["_slimfit_lifted", *parts]  # never shadow an attribute the graph already has
        module = self.gm
        for i, part in enumerate(parts[:-1]):
            child = getattr(module, part, None)
            if not isinstance(child, nn.Module):
                child = nn.Module()
                module.add_module(part, child)
                if i == 0:
                    self.roots.append(part)
            module = child
        leaf = parts[-1]
        if leaf in module._parameters or leaf in module._buffers:
            return self._register(f"{path}_{len(self.pairs)}", tensor, is_param)
        if len(parts) == 1:
            self.roots.append(leaf)
        if is_param:
            module.register_parameter(leaf, tensor)
        else:
            module.register_buffer(leaf, tensor)
        return ".".join(parts)

    def restore(self) -> None:
        """Placeholders back in place of the ``get_attr`` nodes; the graph keeps no reference to
        the tensors (a graph is shared by every module instance dynamo reuses it for)."""
        graph = self.gm.graph
        for node, attr in self.pairs:
            attr.replace_all_uses_with(node)
            graph.erase_node(attr)
        for root in dict.fromkeys(self.roots):
            if hasattr(self.gm, root):
                delattr(self.gm, root)
        self.gm.recompile()


# ----------------------------------------------------------------- the compiled callable

class ParameterChanged(RuntimeError):
    """A parameter's dtype, device or shape changed after its graph was compiled."""


@dataclass
class CompiledGraph:
    """What the backend returns to dynamo: the rewritten ATen graph, run eagerly.

    ``checks``: (input index, name, dtype, device, shape) of every parameter input; a mismatch
    raises ``ParameterChanged`` (the guard that would have caught it was dropped by
    ``guard_filter``).  ``plan``: the MemoryPlan of this graph under the config.  ``notes``: what
    the passes rewrote (``node.meta["slimfit"]``).
    """

    graph_module: fx.GraphModule
    checks: list[tuple[int, str, torch.dtype, torch.device, torch.Size]]
    plan: Any = None
    notes: list[str] = field(default_factory=list)
    rewritten: bool = True

    def __call__(self, *args):
        for i, name, dtype, device, shape in self.checks:
            a = args[i]
            if a.dtype != dtype or a.device != device or a.shape != shape:
                raise ParameterChanged(
                    f"parameter {name} is now {a.dtype} {tuple(a.shape)} on {a.device}; it was {dtype} "
                    f"{tuple(shape)} on {device} when torch.compile traced this graph, and the slimfit guard "
                    "filter leaves parameters to this check: call torch._dynamo.reset() after .to()/.half(), "
                    "or compile again")
        with autocast_disabled(self.graph_module.meta.get("autocast")):  # its casts are explicit nodes
            return self.graph_module(*args)


def _requires_grad(example_inputs) -> tuple:
    return tuple(x.requires_grad for x in example_inputs if isinstance(x, nn.Parameter))


class SlimFitBackend:
    """A dynamo backend: lower to ATen training IR, analyse, run ``extend.pipeline()``, return a
    ``CompiledGraph`` that runs the rewritten graph eagerly.

    ``config``: ``SlimFitConfig`` (default: the paper's formats).  ``on_compile``: called with each
    ``CompiledGraph``.  ``graphs``: every graph compiled so far; ``fallbacks``: graphs that could not
    be lowered and run unrewritten (with the reason).
    """

    def __init__(self, config: SlimFitConfig | None = None, on_compile: Callable[[CompiledGraph], None] | None = None):
        config = SlimFitConfig() if config is None else config
        if not isinstance(config, SlimFitConfig):
            raise TypeError(f"config must be a SlimFitConfig, got {type(config).__name__}")
        self.config = config
        self.on_compile = on_compile
        self.graphs: list[CompiledGraph] = []
        self.fallbacks: list[str] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        self._warn_on_requires_grad_recompile(example_inputs)
        try:
            compiled = self._compile(gm, list(example_inputs))
        except Exception as exc:  # noqa: BLE001 - an unlowerable graph still runs, unrewritten
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self.fallbacks.append(reason)
            warnings.warn(f"slimfit backend: could not lower a graph to ATen training IR ({reason}); it runs "
                          "as plain PyTorch, without the SlimFit rewrites", stacklevel=2)
            compiled = CompiledGraph(gm, [], rewritten=False)
        self.graphs.append(compiled)
        if self.on_compile is not None:
            self.on_compile(compiled)
        return compiled

    def _compile(self, gm: fx.GraphModule, example_inputs: list) -> CompiledGraph:
        lowered = lower_to_training_ir(gm, example_inputs)
        materialize_autocast(lowered, autocast_state())  # dynamo guards on the autocast state
        lowered.meta["model_class"] = f"torch.compile graph of {gm.__class__.__name__}"
        lifted = _Lifted(lowered, gm, example_inputs)
        lifted_names = {node: attr.target for node, attr in lifted.pairs}
        try:
            plan = plan_for_graph(lowered, self.config)
            for _, rewrite in pipeline():
                lowered = rewrite(lowered, self.config)
            notes = [f"{n.name}: {note}" for n in lowered.graph.nodes for note in n.meta.get("slimfit", [])]
        finally:
            lifted.restore()
        checks = []
        placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"]
        for i, x in enumerate(example_inputs):
            if isinstance(x, nn.Parameter):
                _GATED.add(x)
                checks.append((i, lifted_names.get(placeholders[i], f"input {i}"), x.dtype, x.device, x.shape))
        return CompiledGraph(lowered, checks, plan, notes)

    def _warn_on_requires_grad_recompile(self, example_inputs) -> None:
        """Warn once when dynamo recompiles a graph whose inputs are unchanged but for parameters'
        requires_grad, unless guard_filter dropped those guards (then something else changed)."""
        params = [x for x in example_inputs if isinstance(x, nn.Parameter)]
        if any(p in _UNGUARDED for p in params):
            return
        # What a recompile for a new frozen set leaves unchanged: the parameters, the other inputs' metadata.
        sig, rg = input_signature(example_inputs, by="identity", autocast=False), _requires_grad(example_inputs)
        seen = _SEEN.patterns(sig, params)
        if seen and rg not in seen:
            warnings.warn(
                "slimfit backend: torch.compile recompiled this graph because parameters' requires_grad "
                "changed; with a frozen set that changes every step it recompiles every step and, at the "
                "recompile limit, falls back to eager PyTorch without the SlimFit rewrites. Use "
                "slimfit_fx.compile(model, mode='compiled') or torch.compile(model, backend='slimfit', "
                "options={'guard_filter_fn': slimfit_fx.backend.guard_filter})", stacklevel=3)
        seen.add(rg)


# ----------------------------------------------------------------- slimfit_fx.compile(mode="compiled")

def _compile_kwargs() -> dict:
    params = inspect.signature(torch.compile).parameters
    return {"isolate_recompiles": True} if "isolate_recompiles" in params else {}


class CompiledSlimFitModule(SlimFitModule):
    """``slimfit_fx.compile(model, mode="compiled")``: the drop-in SlimFitModule, trained through
    ``torch.compile(model, backend=SlimFitBackend(config))`` with ``guard_filter``.

    Same sharing as the eager module (the user's submodules, parameters and buffers; the same
    ``state_dict()`` keys); ``eval()`` runs the original forward.  ``plan``: with
    ``example_inputs``, predicted before anything runs (from ``trace``, as in eager mode);
    otherwise the plan of the first graph dynamo compiles.  ``backend.graphs``: the compiled
    graphs; ``graph_module``: the first rewritten graph.
    """

    def __init__(self, model: nn.Module, config: SlimFitConfig, example_inputs: Any = None):
        super().__init__(model, config, None)
        self._reset_compiled()
        if example_inputs is not None:
            inputs = normalize_inputs(example_inputs)
            with training_mode(model):
                gm = trace(model, inputs, dynamic=True)
            object.__setattr__(self, "plan", plan_for_graph(gm, config, model))
            object.__setattr__(self, "plan_signature", input_signature(inputs.args, inputs.kwargs))

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("backend", "_compiled"):  # torch.compile's wrapper does not pickle: made again
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reset_compiled()

    def _reset_compiled(self) -> None:
        # The backend lives in dynamo's cache as long as the model's code does: it must not keep
        # this module (and through it the model) alive.
        this = weakref.ref(self)

        def on_compile(compiled: CompiledGraph) -> None:
            module = this()
            if module is not None:
                module._on_compile(compiled)

        backend = SlimFitBackend(self.slimfit_config, on_compile=on_compile)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "_compiled", torch.compile(
            self.original, backend=backend, options={"guard_filter_fn": guard_filter}, **_compile_kwargs()))
        self._graphs.clear()

    def _on_compile(self, compiled: CompiledGraph) -> None:
        self._graphs[("torch.compile", len(self._graphs))] = compiled.graph_module
        if self.plan is None and compiled.plan is not None:
            object.__setattr__(self, "plan", compiled.plan)

    def forward(self, *args, **kwargs):
        """Training: through ``torch.compile`` and the slimfit backend; else the original forward."""
        if not self.training:
            return self.original(*args, **kwargs)
        self._check_parameters()
        return self._compiled(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        out = nn.Module._apply(self, fn, recurse)
        # Parameters may have a new dtype/device: compile afresh (a new backend object fails
        # dynamo's backend check on the old cache entries).
        self._reset_compiled()
        return out

    def extra_repr(self) -> str:
        """The original model's class and how many graphs torch.compile compiled."""
        return (f"SlimFit of {type(self.original).__name__} through torch.compile, "
                f"{len(self.backend.graphs)} compiled graph(s)")
