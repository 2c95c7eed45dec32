"""Helpers shared by the passes: finding ATen nodes, their parameters, and swapping their target.

Takes a GraphModule the passes rewrite; gives the call nodes of given ops, the parameter behind a
weight argument, and ``replace_call``, the one way a pass points a node at a runtime op.  Only
``addmm_as_linear`` and ``replace_call`` change the graph; nothing here measures or prices.
"""
from __future__ import annotations

from typing import Callable, Iterator

from torch import fx, nn

from slimfit_fx.nodes import cast_source, op_key


def nodes_of(gm: fx.GraphModule, *keys: str) -> Iterator[fx.Node]:
    """call_function nodes whose op is one of ``keys`` (``aten.linear``...), in graph order."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and op_key(node.target) in keys:
            yield node


def is_parameter(gm: fx.GraphModule, node) -> bool:
    """Whether ``node`` reads an ``nn.Parameter`` of ``gm`` (a freezable weight)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        return isinstance(gm.get_parameter(node.target), nn.Parameter)
    except AttributeError:
        return False


def weight_source(gm: fx.GraphModule, node) -> tuple[fx.Node, object] | None:
    """``(parameter node, compute dtype)`` for a weight argument: a parameter ``(p, None)``, or
    autocast's cast of one ``(p, dtype)``; None for anything else."""
    if is_parameter(gm, node):
        return node, None
    src = cast_source(node)
    if src is not None and is_parameter(gm, src):
        return src, node.meta["val"].dtype
    return None


def bias_source(gm: fx.GraphModule, node, dtype):
    """The bias to hand an op that casts to ``dtype`` itself: the parameter behind autocast's cast."""
    src = cast_source(node)
    if dtype is not None and src is not None and is_parameter(gm, src):
        return src
    return node


def addmm_as_linear(gm: fx.GraphModule, node: fx.Node, weight: fx.Node, dtype) -> tuple:
    """``(x, W.t(), b)`` such that ``linear(x, W.t(), b)`` runs the very ``addmm(b, x, W)`` of ``node``."""
    import torch

    bias, x = node.args[0], node.args[1]
    with gm.graph.inserting_before(node):
        weight_t = gm.graph.call_function(torch.ops.aten.t.default, (weight,))
    return x, weight_t, bias_source(gm, bias, dtype)


def replace_call(node: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None, note: str = "") -> fx.Node:
    """Point ``node`` at ``target`` with new arguments, keeping its name, users and metadata."""
    node.target = target
    node.args = args
    node.kwargs = kwargs or {}
    if note:
        node.meta.setdefault("slimfit", []).append(note)
    return node

