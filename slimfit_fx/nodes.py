"""Read-only accessors of a captured graph's fx nodes.

Takes the nodes of an ATen graph from ``slimfit_fx.trace`` (FakeTensor example values in
``meta["val"]``); gives their op key, their arguments, their example values and sizes (a symbolic
size by its hint) and the source of a dtype cast.  The analysis, the passes and the patterns all
read nodes through these.  Never mutates a node or a graph, and knows nothing of what an op saves.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

__all__ = ["op_key", "is_op", "arg", "value", "hint", "numel", "itemsize", "has_float_value", "size", "cast_source"]


def op_key(target) -> str:
    """Table key of a graph target: the overload packet name (``aten.linear``)."""
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "name", None)
    if callable(name):  # OpOverload.name() -> "aten::linear"
        return name().split(".")[0].replace("::", ".")
    return str(getattr(target, "__name__", target))


def is_op(node, *keys: str) -> bool:
    """Whether ``node`` is a call of one of the ops ``keys`` (``"aten.mul"``...)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and op_key(node.target) in keys


def arg(node: fx.Node, index: int, name: str | None = None, default=None):
    """Argument ``index`` of ``node``, else its keyword ``name``, else ``default``."""
    if index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def value(node) -> torch.Tensor | None:
    """The example tensor of ``node`` (None for a non-node, or a node whose value is not a tensor)."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def hint(x) -> int:
    """Concrete value of a possibly symbolic int (its example value)."""
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else int(x)
    return int(x)


def numel(node) -> int:
    """Elements of the tensor of ``node`` at its example shape."""
    return hint(value(node).numel())


def itemsize(node) -> int:
    """Bytes of one element of the tensor of ``node``."""
    return value(node).dtype.itemsize


def has_float_value(node: fx.Node) -> bool:
    """Whether the result of ``node`` (one of its results) is a floating or complex tensor: one that
    can require grad."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    return any(isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) for v in vals)


def size(node, dim: int) -> int:
    """Size of dimension ``dim`` of the tensor of ``node`` at its example shape."""
    return hint(value(node).shape[dim])


_CAST_OPS = {"aten._to_copy", "aten.to"}


def cast_source(node) -> fx.Node | None:
    """The input of ``node`` when it is a pure dtype cast (autocast's, or ``x.to(dtype)``), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and op_key(node.target) in _CAST_OPS):
        return None
    src, out = node.args[0] if node.args else None, value(node)
    if value(src) is None or out is None or out.device != value(src).device:
        return None
    if set(node.kwargs) - {"dtype"} or any(not isinstance(a, torch.dtype) for a in node.args[1:]):
        return None
    return src
