"""Walking ATen graphs for the patterns: through views and dtype casts, to a producer.

Takes an fx node of a captured graph; gives the node behind it.  Never changes the graph.
"""
from __future__ import annotations

from torch import fx

from slimfit_fx.nodes import cast_source, op_key
from slimfit_fx.op_table import VIEW_OPS


def through_views(node, casts: bool = True):
    """The first node behind ``node`` that is neither a view nor (with ``casts``) a dtype cast."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args:
        if op_key(node.target) in VIEW_OPS or (casts and cast_source(node) is not None):
            node = node.args[0]
            continue
        break
    return node
