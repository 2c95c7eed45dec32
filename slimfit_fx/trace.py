"""Capture: ``nn.Module`` + example inputs -> ATen training-IR ``torch.fx.GraphModule``.

Takes a model and one call's inputs.  Gives the graph non-strict ``torch.export`` records in the
model's current mode (a FakeTensor in every tensor node's ``meta["val"]``), held by the model's own
parameter and buffer objects; and the helpers the compiler shares with it: call signatures, train
mode, the HuggingFace adjustments a capture needs.
Never copies a parameter, and never leaves the model changed (mode, config, forward) once it returns.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import fx, nn

from .precision import autocast_state, materialize_autocast

__all__ = ["TraceError", "trace", "normalize_inputs", "Inputs", "call_by_name", "inputs_of", "input_signature",
           "training_mode", "share_model_tensors", "class_forward", "no_kv_cache",
           "hf_eager_mask_decisions", "instance_forwards", "IN_PLACE_ATTRIBUTE"]

# The attribute ``compiler.compile_in_place`` sets on a model: its SlimFitModule.
IN_PLACE_ATTRIBUTE = "_slimfit_module"


class TraceError(RuntimeError):
    """The model could not be captured as a graph; the message says what to try."""


@dataclass(frozen=True)
class Inputs:
    """Example inputs split into positional and keyword arguments."""

    args: tuple
    kwargs: dict

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor arguments by name (``arg<i>`` for positional ones)."""
        named = {f"arg{i}": a for i, a in enumerate(self.args)}
        named.update(self.kwargs)
        return {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}


def normalize_inputs(example_inputs: Any) -> Inputs:
    """Accept a dict of keyword arguments, a tuple/list of positional ones, or one tensor."""
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, Mapping):
        return Inputs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return Inputs(tuple(example_inputs), {})
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,), {})
    raise TraceError(
        f"example_inputs must be a dict of keyword arguments, a tuple of positional "
        f"arguments or a tensor, got {type(example_inputs).__name__}."
    )


def _structure_of(value) -> tuple:
    """A tensor's rank, dtype and device type (a symbolic graph's sizes vary), a constant's value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dim(), value.dtype, value.device.type)
    if isinstance(value, (int, float, bool, str, type(None))):
        return ("const", value)
    return ("other", type(value).__name__)


def _shape_of(value) -> tuple:
    """A tensor's shape and dtype, the type of anything else: what a memory plan depends on."""
    if isinstance(value, torch.Tensor):
        return ("t", tuple(value.shape), value.dtype)
    return ("v", type(value).__name__)


def _identity_of(value) -> tuple:
    """A parameter by identity, another tensor by its metadata and ``requires_grad``, a number by value."""
    if isinstance(value, nn.Parameter):
        return ("param", id(value), value.dtype, tuple(value.shape))
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.requires_grad)
    return ("value", type(value).__name__, value if isinstance(value, (int, float, bool)) else None)


_DESCRIBE = {"shapes": _shape_of, "structure": _structure_of, "identity": _identity_of}


def input_signature(args, kwargs: dict | None = None, *, by: str = "shapes", autocast: bool = True) -> tuple:
    """A hashable key of a call's inputs, each described ``by``: ``"shapes"`` (a memory plan's key),
    ``"structure"`` (a symbolic graph's key) or ``"identity"`` (parameters by identity: a dynamo graph's
    inputs across frozen sets); with ``autocast``, the ambient autocast state last."""
    describe = _DESCRIBE[by]
    signature = (tuple(describe(a) for a in args), tuple(sorted((k, describe(v)) for k, v in (kwargs or {}).items())))
    return signature + (autocast_state(),) if autocast else signature




@contextlib.contextmanager
def training_mode(model: nn.Module):
    """``model`` in training mode for the length of the block, its own mode restored after."""
    was_training = model.training
    model.train()
    try:
        yield model
    finally:
        model.train(was_training)


def _wants_no_cache(model: nn.Module, inputs: Inputs) -> bool:
    """HF decoders return a KV cache object when ``use_cache`` is on; training needs none."""
    if "use_cache" in inputs.kwargs:
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params and bool(getattr(getattr(model, "config", None), "use_cache", False))


def _dynamic_shapes(model: nn.Module, inputs: Inputs, every_dim: bool = False) -> tuple | dict:
    """Batch (dim 0) of every tensor, and sequence (dim 1) of integer token-like tensors; with
    ``every_dim``, every dim of every tensor, nested ones included (a block's hidden states and masks).

    ``Dim.AUTO`` lets export specialise a dim the model forces to a constant
    instead of failing, so marking too much dynamic is harmless.  Export wants
    the spec shaped like the bound forward() arguments: keywords that the
    signature does not name go under its ``**kwargs`` parameter.
    """
    from torch.export import Dim

    def every(v):
        if isinstance(v, torch.Tensor):
            return {d: Dim.AUTO for d in range(v.dim())} or None
        if isinstance(v, (tuple, list)):
            return type(v)(every(x) for x in v)
        return None

    def spec(v):
        if every_dim:
            return every(v)
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        dims = {0: Dim.AUTO}
        if v.dim() >= 2 and not v.is_floating_point():
            dims[1] = Dim.AUTO
        return dims

    arg_specs = tuple(spec(a) for a in inputs.args)
    if not inputs.kwargs:
        return arg_specs
    params = inspect.signature(model.forward).parameters
    var_kw = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
    kw_specs: dict = {}
    for k, v in inputs.kwargs.items():
        if k in params or var_kw is None:
            kw_specs[k] = spec(v)
        else:
            kw_specs.setdefault(var_kw, {})[k] = spec(v)
    if not inputs.args:
        return kw_specs
    # Positional and keyword arguments together: by name, as export binds them.
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(inputs.args) > len(positional):
        return (arg_specs, kw_specs)  # a *args forward: export's own error explains what it needs
    return {**dict(zip(positional, arg_specs)), **kw_specs}


class _ExplicitKwargs(nn.Module):
    """``model`` with every keyword it is called with as an explicit parameter.

    torch.export (2.13) cannot combine dynamic shapes with keywords that land in
    a ``**kwargs`` parameter (pytorch/pytorch#164313; e.g. the Trainer's
    ``num_items_in_batch`` for HF models, whose forward ends in
    ``**kwargs: TransformersKwargs``).  This stand-in shares the model's
    submodule, parameter and buffer dicts, so the captured graph's names are the
    model's own, and calls the model's class ``forward``.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training

        def forward(*args, **kwargs):
            return type(model).forward(model, *args, **kwargs)

        sig = inspect.signature(model.forward)
        params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD,)]
        known = {p.name for p in params}
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names
                   if n not in known]
        forward.__signature__ = inspect.Signature(params)
        object.__setattr__(self, "forward", forward)

    @classmethod
    def wrap_if_needed(cls, model: nn.Module, inputs: "Inputs") -> nn.Module:
        """The stand-in when a keyword of ``inputs`` lands in the forward's ``**kwargs``, else ``model``."""
        params = inspect.signature(model.forward).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return model
        extra = [k for k in inputs.kwargs if k not in params]
        return cls(model, extra) if extra else model


def _user_frame(exc: BaseException) -> str | None:
    """The innermost frame of the failure that is not inside torch: the model's own line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        path = fr.filename.replace("\\", "/")
        if "/torch/" not in path and "/slimfit_fx/" not in path:
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"
    return None


def _hints(model: nn.Module, exc: BaseException) -> list[str]:
    text = f"{type(exc).__name__}: {exc}"
    hints = []
    if "DynamicCache" in text or "past_key_values" in text or "Cache" in type(exc).__name__:
        hints.append("pass use_cache=False in example_inputs (training needs no KV cache)")
    if "data-dependent" in text or "GuardOnDataDependent" in text or "Could not guard" in text:
        hints.append(
            "the model branches on tensor values; pass example inputs whose values take the "
            "training branch, or move the branch out of forward()"
        )
    if "missing" in text and "argument" in text:
        hints.append("example_inputs must hold every required forward() argument")
    if hasattr(model, "config"):
        import transformers

        hints.append(
            f"slimfit_fx is tested with transformers {transformers.__version__}; if the failure "
            "is inside transformers, try that version"
        )
    hints.append("try trace(model, inputs, dynamic=False) if the failure is about symbolic shapes")
    return hints


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def _capture_error(model: nn.Module, exc: BaseException, printed: str, verbose: bool) -> TraceError:
    """The ``TraceError`` of a failed capture: the model class, the failing construct and what to try."""
    if verbose:  # a failed export prints the partial graph (thousands of lines): shown only when asked for
        sys.stderr.write(printed)
    lines = [f"could not capture {type(model).__name__} as a graph: {type(exc).__name__}: {_first_line(exc)}"]
    where = _user_frame(exc)
    if where:
        lines.append(f"  failing construct: {where}")
    lines += [f"  try: {h}" for h in _hints(model, exc)]
    if printed and not verbose:
        lines.append(f"  (torch printed {len(printed.splitlines())} lines while capturing; trace(..., "
                     "verbose=True) or SLIMFIT_VERBOSE=1 shows them)")
    return TraceError("\n".join(lines))


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    dynamic: bool = True,
    verbose: bool = False,
    every_dim: bool = False,
) -> fx.GraphModule:
    """Capture ``model`` as an ATen training-IR GraphModule sharing the model's parameters.

    ``example_inputs``: dict of keyword arguments or tuple of positional ones.
    ``dynamic``: batch and sequence dims symbolic (one graph serves other shapes).
    ``every_dim``: with ``dynamic``, every dim of every input symbolic (a block's inputs: hidden
    states and masks whose sequence dims are float tensors' dims 1-3).
    ``verbose``: show what torch prints while capturing even when the capture fails (a partial
    graph, thousands of lines; also ``SLIMFIT_VERBOSE=1``).
    The graph is captured in the model's current mode (``model.training``): dropout
    is kept in train mode.  Under ``torch.autocast`` the casts autocast makes become
    explicit nodes and ``gm.meta["autocast"]`` records the state: run such a graph
    inside ``slimfit_fx.precision.autocast_disabled(gm.meta["autocast"])``.
    Raises ``TraceError`` with the model class, the failing
    construct and what to try when the model cannot be captured.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs an nn.Module, got {type(model).__name__}.")
    inputs = normalize_inputs(example_inputs)
    autocast = autocast_state()
    target = _ExplicitKwargs.wrap_if_needed(model, inputs) if dynamic else model
    shapes = _dynamic_shapes(target, inputs, every_dim) if dynamic else None
    verbose = verbose or os.environ.get("SLIMFIT_VERBOSE", "") not in ("", "0")
    torch_output = io.StringIO()
    try:
        with hf_eager_mask_decisions(), no_kv_cache(model, inputs), class_forward(model), \
                contextlib.redirect_stdout(torch_output), contextlib.redirect_stderr(torch_output):
            ep = torch.export.export(target, inputs.args, inputs.kwargs, dynamic_shapes=shapes, strict=False)
        gm = ep.module()
    except Exception as exc:  # noqa: BLE001 - every capture failure gets the same treatment
        raise _capture_error(model, exc, torch_output.getvalue(), verbose) from exc
    sys.stderr.write(torch_output.getvalue())  # warnings of a capture that worked stay visible

    share_model_tensors(gm, model)
    materialize_autocast(gm, autocast)
    gm.meta["training"] = model.training
    gm.meta["example_inputs"] = inputs
    gm.meta["model_class"] = type(model).__name__
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    if missing:
        # Export attaches FakeTensor metadata to every node; a gap means the analysis
        # would have to guess, which it must not.
        raise TraceError(f"captured graph of {type(model).__name__} lacks shape metadata on {missing[:5]}")
    return gm


@contextlib.contextmanager
def class_forward(model: nn.Module):
    """Capture the model's own forward, not one that compile_in_place installed on the instance."""
    installed = model.__dict__.get("forward")
    if installed is not None and not (IN_PLACE_ATTRIBUTE in model.__dict__
                                      or getattr(installed, "__slimfit_router__", False)):
        installed = None  # a forward the user installed: captured as it is
    if installed is None:
        yield
        return
    del model.__dict__["forward"]
    try:
        yield
    finally:
        model.__dict__["forward"] = installed


@contextlib.contextmanager
def no_kv_cache(model: nn.Module, inputs: Inputs):
    """Capture HF decoders with ``use_cache`` off: training needs no KV cache, and a cache object in
    the outputs cannot be exported.  Set on the configs rather than passed as an argument, so the graph
    keeps the forward signature the user calls; on every config the model's modules hold (an
    encoder-decoder's decoder stack has its own copy, T5's among them)."""
    if not _wants_no_cache(model, inputs):
        yield
        return
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", False) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


@contextlib.contextmanager
def hf_eager_mask_decisions():
    """Let HF skip an attention mask under export exactly when eager skips it without data.

    Under ``torch.export`` transformers' masking_utils always materialises the
    attention mask, even when the caller gave none, so the graph would feed SDPA
    an all-true mask that eager never builds (and SDPA would keep a float copy of
    it per layer).  When the padding mask is ``None`` the skip decision reads no
    tensor data, so asking it as eager does is safe; with a real padding mask the
    export behaviour (materialise) is kept.
    """
    try:
        from transformers import masking_utils as mu
    except Exception:  # noqa: BLE001 - transformers absent or reorganised: nothing to adjust
        yield
        return
    names = [n for n in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa") if hasattr(mu, n)]
    if not names or not hasattr(mu, "is_torchdynamo_exporting"):
        yield
        return
    originals = {n: getattr(mu, n) for n in names}
    exporting = mu.is_torchdynamo_exporting

    def eager_when_no_padding(fn):
        @functools.wraps(fn)
        def wrapper(padding_mask, *args, **kwargs):
            if padding_mask is not None:
                return fn(padding_mask, *args, **kwargs)
            mu.is_torchdynamo_exporting = lambda: False
            try:
                return fn(padding_mask, *args, **kwargs)
            finally:
                mu.is_torchdynamo_exporting = exporting

        return wrapper

    for n, fn in originals.items():
        setattr(mu, n, eager_when_no_padding(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(mu, n, fn)
        mu.is_torchdynamo_exporting = exporting


@contextlib.contextmanager
def instance_forwards(forwards: list[tuple[nn.Module, Any]]):
    """Give each module its instance ``forward`` of ``forwards`` for the length of the block, then put
    back what its instance had (nothing: the class's forward again)."""
    previous = [(module, module.__dict__.get("forward")) for module, _ in forwards]
    for module, forward in forwards:
        object.__setattr__(module, "forward", forward)
    try:
        yield
    finally:
        for module, forward in previous:
            if forward is None:
                del module.__dict__["forward"]
            else:
                object.__setattr__(module, "forward", forward)


class _Stop(Exception):
    """Cuts a call short once ``inputs_of`` has seen what it wanted."""


def call_by_name(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``((), kwargs)``: a call's arguments by the forward's own names, a None dropped where the
    parameter has a default (a backbone called positionally by its head; export pairs dynamic shapes
    with names).  As given if they do not bind."""
    forward = type(module).forward
    try:
        bound = inspect.signature(forward).bind(module, *args, **kwargs).arguments
    except TypeError:
        return tuple(args), dict(kwargs)
    params = inspect.signature(forward).parameters
    named = {}
    for k, v in list(bound.items())[1:]:  # [0] is self
        if params[k].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(v)
        elif params[k].kind is inspect.Parameter.VAR_POSITIONAL:
            if v:
                return tuple(args), dict(kwargs)
        elif v is not None or params[k].default is inspect.Parameter.empty:
            named[k] = v  # a None the forward requires (CLIP's attention_mask) stays
    return (), named


def inputs_of(submodule: nn.Module, model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """The (args, kwargs) ``model(*args, **kwargs)`` calls ``submodule`` with, by name: the call is cut
    short in a forward pre-hook of the submodule, before anything of it runs.  The model's code before
    it runs, without grad (it may draw dropout masks: keep the random state around this where that
    matters)."""
    seen: list = []

    def hook(module, a, kw):
        seen.append(call_by_name(module, a, kw))
        raise _Stop

    handle = submodule.register_forward_pre_hook(hook, with_kwargs=True)
    installed = submodule.__dict__.pop("forward", None)  # reach the module's own call, not compile_in_place's
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
        if installed is not None:
            submodule.__dict__["forward"] = installed
    return seen[0] if seen else None


def share_model_tensors(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make the graph hold the very Parameter/buffer objects of ``model`` (no copies)."""
    originals = dict(model.named_parameters(remove_duplicate=False))
    originals.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        orig = originals.get(name)
        if orig is None or orig is tensor:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if isinstance(orig, nn.Parameter):
            owner._parameters[attr] = orig
        else:
            owner._buffers[attr] = orig

