"""Walking ATen graphs for the patterns: through views and dtype casts, to a producer."""
from __future__ import annotations

from torch import fx

from slimfit_fx.analysis import VIEW_OPS, _hint, cast_source, op_key
from slimfit_fx.passes._match import arg  # noqa: F401  (the patterns' argument helper: one copy)


def is_op(node, *keys: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_key(node.target) in keys


def through_views(node, casts: bool = True):
    """The first node behind ``node`` that is neither a view nor (with ``casts``) a dtype cast."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args:
        if op_key(node.target) in VIEW_OPS or (casts and cast_source(node) is not None):
            node = node.args[0]
            continue
        break
    return node


def numel(node) -> int:
    """Elements of a node's value at its example shape (symbolic sizes by their hint)."""
    return _hint(value(node).numel())


def size(node, dim: int) -> int:
    return _hint(value(node).shape[dim])


def value(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None
