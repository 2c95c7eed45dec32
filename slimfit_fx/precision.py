"""Mixed precision: autocast made explicit in captured graphs.

Takes a graph captured under ``torch.autocast`` (FakeTensor metadata in the dtypes autocast produced)
and its ``autocast_state()`` (``((device_type, dtype), ...)``, hashable, ``()`` with autocast off).
Gives ``materialize_autocast``: the casts autocast made, as explicit ``aten._to_copy`` nodes read off
autocast itself (each op run again on its recorded inputs), so that the graph run under
``autocast_disabled(state)`` computes what eager autocast computes, op for op; and the context
managers ``autocast_disabled`` / ``autocast_enabled``.
Never changes anything else in a graph, nor a graph captured without autocast.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from .nodes import op_key

__all__ = ["AutocastState", "autocast_state", "autocast_disabled", "autocast_enabled", "materialize_autocast",
           "PrecisionError", "describe"]

AutocastState = tuple  # ((device_type, dtype), ...), sorted by device type

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS",
                  "hpu": "AutocastHPU"}
aten = torch.ops.aten


class PrecisionError(RuntimeError):
    """A graph's dtypes cannot be made explicit; the message names the op and what to try."""


def _available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    module = getattr(torch, device_type, None)
    return bool(module is not None and getattr(module, "is_available", lambda: False)())


def autocast_state() -> AutocastState:
    """``((device_type, dtype), ...)`` for every device type whose autocast is on now."""
    state = []
    for dev in _DEVICE_TYPES:
        if _available(dev) and torch.is_autocast_enabled(dev):
            state.append((dev, torch.get_autocast_dtype(dev)))
    return tuple(state)


def describe(state: AutocastState) -> str:
    """``"autocast cpu/bfloat16"`` or ``"no autocast"``, for reports and errors."""
    if not state:
        return "no autocast"
    return "autocast " + ", ".join(f"{dev}/{str(dtype).replace('torch.', '')}" for dev, dtype in state)


@contextlib.contextmanager
def _autocast_each(state: AutocastState | None, enabled: bool) -> Iterator[None]:
    """Autocast entered for each device type of ``state``: in its dtype, or turned off."""
    with contextlib.ExitStack() as stack:
        for dev, dtype in state or ():
            stack.enter_context(torch.autocast(dev, dtype=dtype) if enabled else torch.autocast(dev, enabled=False))
        yield


def autocast_disabled(state: AutocastState | None) -> contextlib.AbstractContextManager:
    """Autocast off for the device types of ``state`` (nothing to do when it is empty)."""
    return _autocast_each(state, enabled=False)


def autocast_enabled(state: AutocastState | None) -> contextlib.AbstractContextManager:
    """Re-enter the autocast of ``state`` (e.g. to analyse a batch the way it was run)."""
    return _autocast_each(state, enabled=True)


# ----------------------------------------------------------------------------- casts

_NEVER_CAST = {
    # Casts and metadata checks the model wrote itself: autocast does not touch them.
    "aten._to_copy", "aten.to", "aten._assert_tensor_metadata", "aten.type_as", "aten.detach", "aten.alias",
}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _meta(value):
    """Argument values as the capture saw them (FakeTensors for nodes)."""
    if isinstance(value, fx.Node):
        return value.meta.get("val")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value


class _CastRecorder(TorchDispatchMode):
    """Records the casts autocast makes of given tensors: ``{id(tensor): dtype}``."""

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.inputs = {id(t) for t in inputs}
        self.casts: dict[int, torch.dtype] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and args and id(args[0]) in self.inputs and "dtype" in kwargs:
            self.casts.setdefault(id(args[0]), kwargs["dtype"])
        return func(*args, **kwargs)


def _run(target, args, kwargs, fake_mode, state, autocast: bool):
    """(output dtypes, {id(input): cast dtype}) of ``target`` on fake inputs, with or without the
    autocast of ``state``; (None, {}) when the op refuses the inputs."""
    inputs = [t for t in _tensors(list(args) + list(kwargs.values()))]
    recorder = _CastRecorder(inputs)
    context = autocast_enabled(state) if autocast else autocast_disabled(state)
    try:
        with fake_mode, context, recorder:
            out = target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - e.g. mixed dtypes that only autocast reconciles
        return None, {}
    return [t.dtype for t in _tensors(out)], recorder.casts


def _has_autocast_kernel(op: torch._ops.OpOverload, state: AutocastState) -> bool:
    """Whether autocast handles ``op`` on a device of ``state`` (other ops fall through it)."""
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), _AUTOCAST_KEYS.get(dev, ""))
               for dev, _ in state)


def _autocast_casts(node: fx.Node, fake_mode, state: AutocastState) -> dict[int, torch.dtype]:
    """``{id(input FakeTensor): dtype}``: what autocast cast when ``node`` ran in the capture.

    Autocast casts every eligible argument of an op it handles to one dtype, the dtype of the
    op's result (lower-precision, fp32 and promote policies alike); casts to other dtypes seen
    while the op runs are its kernel's own (the CPU math attention upcasts bf16 to fp32).
    """
    if not _has_autocast_kernel(node.target, state):
        return {}
    recorded = [t.dtype for t in _tensors(node.meta.get("val"))]
    floating = [t.dtype for t in _tensors(node.meta.get("val")) if t.is_floating_point()]
    args, kwargs = _meta(node.args), _meta(node.kwargs)
    out, casts = _run(node.target, args, kwargs, fake_mode, state, autocast=True)
    if out == recorded:
        return {i: d for i, d in casts.items() if floating and d == floating[0]}
    # Recorded otherwise: the op ran in a region the model ran with autocast disabled.
    out, _ = _run(node.target, args, kwargs, fake_mode, state, autocast=False)
    if out == recorded:
        return {}
    raise PrecisionError(
        f"{node.name} ({op_key(node.target)}) was recorded as {recorded} under {describe(state)}, which neither "
        "autocast nor the op alone reproduces; capture the model without autocast (or cast the model: "
        "model.to(dtype))")


def materialize_autocast(gm: fx.GraphModule, state: AutocastState) -> fx.GraphModule:
    """Insert the casts autocast made during the capture as explicit ``aten._to_copy`` nodes.

    Reads ``node.meta["val"]`` (recorded under ``state``); rewrites ``gm`` in place; sets
    ``gm.meta["autocast"] = state``.  Casts of one parameter to one dtype are made once,
    as autocast's cache makes them once per forward.  Raises ``PrecisionError`` when an op
    does not reproduce its recorded dtypes with the casts made explicit.
    """
    gm.meta["autocast"] = tuple(state)
    if not state:
        return gm
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    fake_mode = detect_fake_mode(vals)
    if fake_mode is None:
        raise PrecisionError("the captured graph has no FakeTensor metadata: autocast cannot be made explicit")
    param_casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if op_key(node.target) in _NEVER_CAST:
            continue
        casts = _autocast_casts(node, fake_mode, state)
        if casts:
            _insert_casts(gm, node, casts, fake_mode, param_casts)
    gm.graph.lint()
    gm.recompile()
    return gm


def _insert_casts(gm, node, casts, fake_mode, param_casts) -> None:
    def cast(value):
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        if not isinstance(value, fx.Node):
            return value
        val = value.meta.get("val")
        dtype = casts.get(id(val))
        if dtype is None or val.dtype == dtype:
            return value
        key = (value, dtype)
        if value.op == "get_attr" and key in param_casts:
            return param_casts[key]
        with gm.graph.inserting_before(node):  # graph order: a parameter's later uses see this cast
            c = gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
        with fake_mode:
            c.meta["val"] = val.to(dtype)
        c.meta["slimfit_autocast"] = True
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in node.meta:
                c.meta[k] = node.meta[k]
        if value.op == "get_attr":
            param_casts[key] = c
        return c

    node.args = cast(node.args)
    node.kwargs = {k: cast(v) for k, v in node.kwargs.items()}
