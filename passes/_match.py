"""Helpers shared by the passes: matching ATen nodes and swapping their target."""
from __future__ import annotations

from typing import Callable, Iterator

from torch import fx, nn

from slimfit_fx.analysis import op_key


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


def replace_call(node: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None, note: str = "") -> fx.Node:
    """Point ``node`` at ``target`` with new arguments, keeping its name, users and metadata."""
    node.target = target
    node.args = args
    node.kwargs = kwargs or {}
    if note:
        node.meta.setdefault("slimfit", []).append(note)
    return node


def arg(node: fx.Node, i: int, name: str, default=None):
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)
