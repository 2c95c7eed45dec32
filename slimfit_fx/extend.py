"""The extension API: teach slimfit_fx a new op, a new pattern or a new pass without editing it.

Three registries, all public and all consulted by both sides of the contract (the analysis that
predicts memory and the passes that rewrite the graph), so a registration changes the prediction
and the measurement alike:

* ``register_rule(op, rule)``: what one op (an ATen op, or your ``torch.library`` custom op) keeps
  for backward, as a list of ``Save``; the analysis prices exactly that.
* ``register_pattern(name, match, after=..., before=...)``: a subgraph that one op of yours
  replaces.  ``match(node, ctx)`` returns a ``Fusion`` (the op, its arguments, the nodes it absorbs
  and what it keeps) or None; the analysis prices the fused op, the ``fuse_patterns`` pass emits it.
* ``register_pass(name, fn, after=..., before=...)``: a graph rewrite ``fn(gm, config) -> gm``;
  ``pipeline()`` orders every pass by the declared constraints.

Must never: reorder registrations silently (a cycle or an unknown name is a ``ConfigError``), or
let two fusions claim one node (the first in pattern order wins).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
from torch import fx

from .config import ConfigError
from .nodes import cast_source, op_key
from .op_table import OP_TABLE, VIEW_OPS, OpContext, Rule, Save, grad_reachable

__all__ = ["Save", "OpContext", "Fusion", "register_rule", "register_pattern", "register_pass", "patterns",
           "pipeline", "find_fusions", "graph_context", "unregister"]


def register_rule(op, rule: Rule | None = None, *, replace: bool = False):
    """Declare what ``op`` keeps for backward: ``rule(node, ctx) -> list[Save]``.  ``op`` is an op
    overload or packet (``torch.ops.mylib.rms``) or its table key (``"mylib.rms"``).  Usable as a
    decorator.  An op already in the table needs ``replace=True``."""
    key = _table_key(op)

    def add(fn: Rule) -> Rule:
        if not callable(fn):
            raise ConfigError(f"register_rule({key!r}): the rule must be callable (node, ctx) -> list[Save]")
        if key in OP_TABLE and not replace:
            raise ConfigError(f"register_rule({key!r}): the op already has a rule; pass replace=True to override")
        OP_TABLE[key] = fn
        return fn

    return add(rule) if rule is not None else add


def _table_key(op) -> str:
    """``"ns.name"`` of an op overload, an overload packet, a ``torch.library.custom_op`` or a key."""
    if isinstance(op, str):
        return op
    qualified = getattr(op, "_qualified_op_name", None) or getattr(op, "_qualname", None)
    if isinstance(qualified, str):  # OpOverloadPacket, CustomOpDef
        return qualified.replace("::", ".")
    return op_key(op)


@dataclass
class Fusion:
    """One match of a pattern: ``op(*args, **kwargs)`` takes the place of ``output``.

    ``inner``: the other nodes of the match; each must feed only the match, and they are erased.
    ``saves(ctx) -> list[Save]``: what ``op`` keeps, with ``Save("arg", i)`` naming ``args[i]``.
    """

    output: fx.Node
    inner: tuple[fx.Node, ...]
    op: Callable
    args: tuple
    saves: Callable[[OpContext], list[Save]]
    kwargs: dict = field(default_factory=dict)
    note: str = ""
    pattern: str = ""
    # Working memory beyond what it keeps, for the peak model: the forward's (with its output) and
    # the backward's (with the gradients it returns).  None: the generic estimate.
    forward_bytes: int | None = None
    backward_bytes: int | None = None

    def self_contained(self) -> bool:
        """Whether every inner node is used only inside the match, or by a metadata assertion
        export adds after a cast (so erasing them loses nothing)."""
        members = set(self.inner) | {self.output}
        return all(set(n.users) - set(self.assertions()) <= members for n in self.inner)

    def assertions(self) -> list[fx.Node]:
        """The metadata assertions on inner nodes, erased with them."""
        return [u for n in self.inner for u in n.users
                if u.op == "call_function" and op_key(u.target) == "aten._assert_tensor_metadata"]


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: Callable
    after: tuple[str, ...]
    before: tuple[str, ...]
    index: int


_PATTERNS: dict[str, _Entry] = {}
_PASSES: dict[str, _Entry] = {}


def _register(table: dict, kind: str, name: str, fn, after, before, replace: bool):
    if isinstance(after, str) or isinstance(before, str):
        raise ConfigError(f"register_{kind}({name!r}): after/before take a sequence of names, e.g. after=['x']")

    def add(f):
        if not callable(f):
            raise ConfigError(f"register_{kind}({name!r}): {f!r} is not callable")
        if name in table and not replace:
            raise ConfigError(f"register_{kind}({name!r}): the name is taken; pass replace=True to override")
        index = table[name].index if name in table else len(table)
        table[name] = _Entry(name, f, tuple(after), tuple(before), index)
        return f

    return add(fn) if fn is not None else add


def register_pattern(name: str, match: Callable | None = None, *, after=(), before=(), replace: bool = False):
    """Register ``match(node, ctx) -> Fusion | None``, tried on every call node in graph order.
    ``after``/``before``: names of patterns this one is tried after/before (it then wins the nodes
    both would claim)."""
    return _register(_PATTERNS, "pattern", name, match, after, before, replace)


def register_pass(name: str, fn: Callable | None = None, *, after=(), before=(), replace: bool = False):
    """Register a graph rewrite ``fn(gm, config) -> gm``, run by ``compile`` in ``pipeline()`` order."""
    return _register(_PASSES, "pass", name, fn, after, before, replace)


def unregister(name: str) -> None:
    """Remove a pattern or pass registered under ``name`` (a test's, or one you replace)."""
    if _PATTERNS.pop(name, None) is None and _PASSES.pop(name, None) is None:
        raise ConfigError(f"unregister({name!r}): no pattern or pass has that name")


def _ordered(table: dict, kind: str) -> list[_Entry]:
    g = nx.DiGraph()
    g.add_nodes_from(table)
    for e in table.values():
        for other in e.after + e.before:
            if other not in table:
                raise ConfigError(f"{kind} {e.name!r} is ordered against {other!r}, which is not registered")
        g.add_edges_from((a, e.name) for a in e.after)
        g.add_edges_from((e.name, b) for b in e.before)
    try:
        names = list(nx.lexicographical_topological_sort(g, key=lambda n: table[n].index))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
        raise ConfigError(f"the {kind} order constraints form a cycle: {cycle}") from None
    return [table[n] for n in names]


def patterns() -> list[tuple[str, Callable]]:
    """``(name, match)`` of every registered pattern, in the order they are tried."""
    _load_builtins()
    return [(e.name, e.fn) for e in _ordered(_PATTERNS, "pattern")]


def pipeline() -> list[tuple[str, Callable]]:
    """``(name, fn)`` of every registered pass, in the order ``compile`` runs them."""
    _load_builtins()
    return [(e.name, e.fn) for e in _ordered(_PASSES, "pass")]


def graph_context(gm: fx.GraphModule, config) -> OpContext:
    """The context patterns match in: ``is_param`` follows views and dtype casts to an
    ``nn.Parameter`` of ``gm``; ``may_require_grad`` is ``op_table.grad_reachable``.  The analysis
    and the fuse pass both match through it, so they find the same fusions."""
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}

    def is_param(node) -> bool:
        while isinstance(node, fx.Node):
            if node.op == "get_attr":
                return node.target in params
            if node.op != "call_function" or not node.args or not (
                    op_key(node.target) in VIEW_OPS or cast_source(node) is not None):
                return False
            node = node.args[0]
        return False

    reachable = grad_reachable(gm)
    return OpContext(config=config, is_param=is_param,
                     may_require_grad=lambda node: isinstance(node, fx.Node) and node.name in reachable)


def find_fusions(gm: fx.GraphModule, config) -> dict[str, Fusion]:
    """Every fusion of ``gm`` under ``config``, keyed by the name of the node it replaces.  A node
    belongs to at most one fusion; the patterns are tried in ``patterns()`` order."""
    if config is None:
        return {}
    ctx = graph_context(gm, config)
    claimed: set[str] = set()
    found: dict[str, Fusion] = {}
    for name, match in patterns():
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.name in claimed:
                continue
            fusion = match(node, ctx)
            if fusion is None:
                continue
            members = {n.name for n in fusion.inner} | {fusion.output.name}
            if members & claimed or not fusion.self_contained():
                continue
            fusion.pattern = name
            claimed |= members
            found[fusion.output.name] = fusion
    return found


_LOADED = False


def _load_builtins() -> None:
    """The library's own patterns and passes register on first use (they import the ops)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from . import fusions, passes  # noqa: F401  (a pattern registers itself as its module loads)

        for name, fn, after in passes.BUILTIN_PASSES:
            register_pass(name, fn, after=after)
