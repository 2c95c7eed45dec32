"""Static analysis: what a captured graph saves for backward, for any frozen set.

Takes a GraphModule from ``slimfit_fx.trace`` (ATen training IR, FakeTensor metadata on every node),
a ``SlimFitConfig`` or None (plain PyTorch) and the model that names the parameters; gives a
``GraphAnalysis``: one record per node, every storage kept for backward and each op's use of it with
the condition under which it is kept, and a networkx graph of layers, ops and tensors.  What each
op keeps is ``op_table.OP_TABLE``'s.  Must never: mutate the graph, run the model, import the
runtime ops (``slimfit_fx.ops``), or drop a save silently (an op missing from the table keeps every
tensor argument and is listed in ``unknown_ops``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from .config import SlimFitConfig
from .extend import Fusion, find_fusions
from .nodes import arg, cast_source, has_float_value, hint, numel, op_key, value
from .op_table import (
    OP_TABLE,
    VIEW_OPS,
    OpContext,
    Rule,
    Save,
    format_for,
    grad_reachable,
    is_differentiable,
    match_tanh_gelu,
    returns_input,
)

__all__ = ["NodeInfo", "SavedUse", "SavedStorage", "GraphAnalysis", "ParameterNames", "analyze_graph",
           "parameter_names", "classify_nodes", "layer_parameters", "storage_ref"]


def layer_parameters(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """SlimFit layers: every parameter with 2+ dims, plus LayerNorm/RMSNorm weights (the SlimFit paper's definition).

    Biases never count.  Norm weights are recognised by name (``norm`` or ``ln`` in the
    path, ending in ``weight``), which covers HF BERT/ViT/GPT-2/LLaMA naming.
    """
    out = []
    for name, p in named_params:
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2:
            out.append(name)
        elif p.dim() == 1 and leaf == "weight":
            path = name.lower()
            if "norm" in path or ".ln" in path or path.startswith("ln") or "layernorm" in path:
                out.append(name)
    return out


@dataclass
class SavedUse:
    """One op keeping one tensor for backward."""

    node: str
    op: str
    role: str
    storage: int  # index into GraphAnalysis.storages
    when: tuple[str, ...]  # node names; saved iff any requires grad (empty: whenever recorded)
    owners: tuple[str, ...]  # parameter FQNs when the condition names only parameters (dynamic)
    fmt: str = "full"  # "ln_full"/"ln_pruned" pick a LayerNorm variant by the frozen state
    variant: tuple[str, bool] | None = None  # (node, requires_grad): saved only in that state

    @property
    def dynamic(self) -> bool:
        """Kept only for its owners' gradients: frozen owners keep nothing."""
        return bool(self.owners)


@dataclass
class SavedStorage:
    """One storage kept for backward (a tensor with several consumers counts once)."""

    index: int
    producer: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    uses: list[int] = field(default_factory=list)


@dataclass
class NodeInfo:
    """What the analysis knows of one graph node, whatever the frozen set."""

    name: str
    kind: str  # "param" | "input" | "op" (autograd may record it) | "nograd" | "const" | "other"
    inputs: tuple[str, ...]  # the nodes it reads
    float_out: bool  # a floating (or complex) result: one that can require grad
    param: str | None = None  # kind "param": the parameter it reads, by the model's name
    layer: str | None = None  # a call: the nearest preceding layer parameter (what it is attributed to)
    norm_weight: str | None = None  # a priced LayerNorm: its weight parameter (set by the rule stage)


@dataclass
class GraphAnalysis:
    """The saved-tensor inventory of one graph, independent of the frozen set."""

    parameters: dict[str, tuple[int, str]]  # fqn -> (bytes, storage id string)
    layers: list[str]
    storages: list[SavedStorage]
    uses: list[SavedUse]
    unknown_ops: dict[str, int]
    nodes: dict[str, NodeInfo]  # every node, in graph order
    graph: nx.DiGraph
    config: SlimFitConfig | None
    aliases: dict[str, str] = field(default_factory=dict)  # tied-parameter name -> canonical name
    transients: dict[str, tuple] = field(default_factory=dict)  # node -> (forward, backward) bytes a fusion declares
    device: str = "cpu"  # the device type the graph's tensors live on

    def requires_grad(self, trainable: set[str]) -> dict[str, bool]:
        """Which node outputs require grad when exactly ``trainable`` parameters do."""
        rg: dict[str, bool] = {}
        for name, info in self.nodes.items():
            if info.kind == "param":
                rg[name] = info.param in trainable
            elif info.kind == "op":
                rg[name] = info.float_out and any(rg.get(i, False) for i in info.inputs)
            else:
                rg[name] = False
        return rg

    def active_uses(self, trainable: set[str]) -> list[SavedUse]:
        """The saves that happen for this trainable set (one entry per op and tensor)."""
        rg = self.requires_grad(trainable)
        active = []
        for use in self.uses:
            if not rg.get(use.node, False):
                continue  # the op is not recorded by autograd at all
            if use.when and not any(rg.get(w, False) for w in use.when):
                continue
            if use.variant is not None and rg.get(use.variant[0], False) != use.variant[1]:
                continue
            if use.fmt in ("ln_full", "ln_pruned"):
                w = self.nodes[use.node].norm_weight
                frozen = w is not None and w not in trainable
                if (use.fmt == "ln_pruned") != frozen:
                    continue
            active.append(use)
        return active


def storage_ref(n: fx.Node, val: torch.Tensor):
    """Which storage the tensor ``val`` of node ``n`` is: its FakeTensor's storage.  Where one captured
    graph was inlined several times (slimfit_fx.blocks), its nodes carry ``meta["slimfit_copy"]``: the
    copies share FakeTensors but not storages at run time, and a tensor on the storage of one of the
    graph's inputs is on the storage of what the copy was fed (``meta["slimfit_storages"]``)."""
    ref = StorageWeakRef(val.untyped_storage())
    copy = n.meta.get("slimfit_copy")
    if copy is None:
        return ref
    return n.meta["slimfit_storages"].get(ref, (copy, ref))


# The stages of ``analyze_graph``: name the parameters, classify the nodes, find the fusions, apply
# the table's rules.


@dataclass(frozen=True)
class ParameterNames:
    """The graph's parameters under the model's own names: a tied parameter (one ``nn.Parameter``
    under two names, GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) is one, named as
    ``model.named_parameters()`` first names it."""

    canonical: dict[str, str]  # every name, the graph's and the model's -> the parameter's first name
    params: dict[str, torch.nn.Parameter]  # first name -> parameter, in the graph's order
    in_graph: dict[str, torch.nn.Parameter]  # the graph's own names (tied ones too) -> parameter

    @property
    def aliases(self) -> dict[str, str]:
        """Every other name of a tied parameter -> its first name."""
        return {k: v for k, v in self.canonical.items() if k != v}


def parameter_names(gm: fx.GraphModule, model: torch.nn.Module | None = None) -> ParameterNames:
    """Name ``gm``'s parameters as ``model`` (default: ``gm``) does; a graph of a submodule (a
    backbone) then speaks the whole model's names."""
    source = model if model is not None else gm
    canonical: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for fqn, p in source.named_parameters(remove_duplicate=False):
        canonical[fqn] = first_name.setdefault(id(p), fqn)
    in_graph = dict(gm.named_parameters(remove_duplicate=False))
    for fqn, p in in_graph.items():
        canonical.setdefault(fqn, first_name.setdefault(id(p), fqn))
    params: dict[str, torch.nn.Parameter] = {}
    for fqn, p in in_graph.items():
        params.setdefault(canonical[fqn], p)
    return ParameterNames(canonical, params, in_graph)


def _node_kind(n: fx.Node, names: ParameterNames) -> str:
    if n.op == "get_attr":
        return "param" if n.target in names.in_graph else "const"
    if n.op == "placeholder":
        return "input"
    if n.op == "call_function":
        return "op" if is_differentiable(n) else "nograd"
    return "other"


def classify_nodes(gm: fx.GraphModule, names: ParameterNames, layers: set[str]) -> dict[str, NodeInfo]:
    """One record per node of ``gm``, in graph order.  A call is attributed to the last layer
    parameter any call so far has read."""
    nodes: dict[str, NodeInfo] = {}
    last_layer: str | None = None
    for n in gm.graph.nodes:
        info = NodeInfo(n.name, _node_kind(n, names), tuple(a.name for a in n.all_input_nodes), has_float_value(n))
        if info.kind == "param":
            info.param = names.canonical[n.target]
        nodes[n.name] = info
        if n.op == "call_function":
            for a in n.all_input_nodes:
                fqn = _param_behind(a, nodes)
                if fqn in layers:
                    last_layer = fqn
            info.layer = last_layer
    return nodes


def _param_behind(node, nodes: dict[str, NodeInfo], through_casts: bool = False) -> str | None:
    """The parameter ``node`` is, looking through views (``weight.t()`` is still the parameter's
    storage) and, with ``through_casts``, dtype casts (autocast's low-precision copy gets its gradient
    to the parameter: ownership)."""
    while isinstance(node, fx.Node):
        info = nodes.get(node.name)
        if info is not None and info.param is not None:
            return info.param
        if node.op == "call_function" and op_key(node.target) in VIEW_OPS:
            node = node.args[0]
            continue
        if through_casts and cast_source(node) is not None:
            node = node.args[0]
            continue
        return None
    return None


def _storage_keys(gm: fx.GraphModule) -> tuple[dict[str, object], dict[object, str]]:
    """The storage each tensor node's result is on (a node that hands back its input at run time: its
    input's), and the first node to produce each storage (the base of its views)."""
    keys: dict[str, object] = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            source = returns_input(n)
            keys[n.name] = keys[source.name] if source is not None and source.name in keys else storage_ref(n, val)
    roots: dict[object, str] = {}
    for name, key in keys.items():
        roots.setdefault(key, name)
    return keys, roots


@dataclass
class _Fused:
    """The nodes priced as one fused op: the patterns' fusions and GPT-2's tanh GELU spelled out in
    ops (the quantize pass makes it one GELU that keeps its quantized input)."""

    fusions: dict[str, Fusion]  # output node -> its fusion
    args: dict[str, tuple]  # output node -> the fused op's arguments
    inner: set[str]  # absorbed nodes: they keep nothing

    def arg_of(self, n: fx.Node, index: int):
        """Argument ``index`` of ``n`` as the op that prices it takes it (fused or not)."""
        return self.args[n.name][index] if n.name in self.args else arg(n, index)


def _find_fused(gm: fx.GraphModule, config: SlimFitConfig | None) -> _Fused:
    """The fusions ``extend.find_fusions`` finds (the ones ``fuse_patterns`` emits) and the tanh GELUs
    the quantize pass fuses (``op_table.match_tanh_gelu``)."""
    args: dict[str, tuple] = {}
    inner: set[str] = set()
    if config is not None and config.gelu_input_format is not None:
        for n in gm.graph.nodes:
            match = match_tanh_gelu(n) if n.op == "call_function" else None
            if match is not None and format_for(config.gelu_input_format, match[0]) is not None:
                x, pattern, _ = match
                args[n.name] = (x,)
                inner.update(p.name for p in pattern[:-1])
    fusions = find_fusions(gm, config)
    for name, fusion in fusions.items():
        args[name] = fusion.args
        inner.update(p.name for p in fusion.inner)
    return _Fused(fusions, args, inner)


def _fused_gelu_rule(x: fx.Node) -> Rule:
    """The saves of a matched tanh-GELU chain once fused: its input, in the GELU format."""

    def rule(node, ctx):
        return [Save("arg", 0, (0,), "gelu_input", fmt="gelu_q",
                     copy_bytes=ctx.config.gelu_input_format.nbytes(numel(x)))]

    return rule


def _unknown_rule(node, ctx):
    """An op missing from the table: assume it keeps every tensor argument in full, whenever recorded."""
    return [Save("arg", i, (), "unknown") for i, a in enumerate(node.args) if isinstance(a, fx.Node)]


def _rule_of(n: fx.Node, fused: _Fused, float_out: bool, unknown: dict[str, int]) -> tuple[str, Rule | None]:
    """``(op key, rule)`` pricing ``n``: a fusion's saves, the fused GELU's, the table's, or, for an op
    missing from the table, ``_unknown_rule`` (counted in ``unknown``).  No rule: nothing to price."""
    key = op_key(n.target)
    rule = OP_TABLE.get(key)
    if n.name in fused.fusions:
        fusion = fused.fusions[n.name]
        key, rule = f"slimfit.{fusion.pattern}", (lambda node, c: fusion.saves(c))
    elif n.name in fused.args:
        key, rule = "aten.gelu", _fused_gelu_rule(fused.args[n.name][0])
    if rule is None:
        if not float_out:
            return key, None  # integer/bool results never require grad: nothing to save
        unknown[key] = unknown.get(key, 0) + 1
        rule = _unknown_rule
    return key, rule


class _Inventory:
    """The rule stage: turns each priced node's ``Save``s into ``SavedStorage``s and ``SavedUse``s and
    the networkx graph of layers, ops and tensors."""

    def __init__(self, gm: fx.GraphModule, nodes: dict[str, NodeInfo], names: ParameterNames,
                 fused: _Fused, ctx: OpContext):
        self.nodes, self.names, self.fused, self.ctx = nodes, names, fused, ctx
        self.fx_nodes = {n.name: n for n in gm.graph.nodes}
        self.storage_key, self.root_of = _storage_keys(gm)
        self.ids: dict = {}
        self.storages: list[SavedStorage] = []
        self.uses: list[SavedUse] = []
        self.unknown: dict[str, int] = {}
        self.graph = nx.DiGraph()

    def add_graph(self, gm: fx.GraphModule) -> None:
        """Price every call node of ``gm``, in graph order."""
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            self.graph.add_node(f"op:{n.name}", kind="op", target=op_key(n.target))
            for a in n.all_input_nodes:
                fqn = _param_behind(a, self.nodes)
                if fqn is not None:
                    self.graph.add_edge(f"layer:{fqn}", f"op:{n.name}")
            if self.keeps_own(n):
                self.add_node(n)

    def keeps_own(self, n: fx.Node) -> bool:
        """Whether ``n`` is priced: a call autograd may record, not absorbed by a fusion, and not in a
        recomputed block (``slimfit_fx.blocks``: its checkpoint keeps the block's inputs instead)."""
        return (self.nodes[n.name].kind == "op" and n.name not in self.fused.inner
                and not n.meta.get("slimfit_recomputed"))

    def add_node(self, n: fx.Node) -> None:
        """Apply the rule that prices ``n``."""
        info = self.nodes[n.name]
        key, rule = _rule_of(n, self.fused, info.float_out, self.unknown)
        if rule is None:
            return
        if key in ("aten.layer_norm", "aten.native_layer_norm") and arg(n, 2, "weight") is not None:
            info.norm_weight = self.weight_of(arg(n, 2, "weight"))
        for i, save in enumerate(rule(n, self.ctx)):
            sid = self.storage_of(n, i, save)
            if sid is not None:
                self.add_use(n, key, save, sid)

    def weight_of(self, node) -> str | None:
        """The parameter ``node`` is, through views and dtype casts."""
        return _param_behind(node, self.nodes, through_casts=True)

    def storage_for(self, key, producer: fx.Node, nbytes: int, dtype, shape) -> int:
        """Index of the saved storage ``key``, recorded on first sight."""
        idx = self.ids.get(key)
        if idx is None:
            idx = self.ids.setdefault(key, len(self.ids))
            self.storages.append(SavedStorage(idx, producer.name, int(nbytes), str(dtype).replace("torch.", ""),
                                              tuple(hint(s) for s in shape)))
            self.graph.add_node(f"tensor:{idx}", kind="tensor", producer=producer.name, nbytes=int(nbytes))
            self.graph.add_edge(f"op:{producer.name}", f"tensor:{idx}")
        return idx

    def storage_of(self, n: fx.Node, i: int, save: Save) -> int | None:
        """The storage save ``i`` of ``n`` keeps; None where it keeps nothing."""
        if save.source == "arg":
            return self._argument_storage(n, i, save)
        if save.source == "out":
            v = n.meta["val"]
            v = v[save.index] if isinstance(v, (tuple, list)) else v
            return self.storage_for(storage_ref(n, v), n, hint(v.untyped_storage().nbytes()), v.dtype, v.shape)
        if save.copy_bytes == 0:
            return None  # regenerated from RNG state: nothing kept
        return self.storage_for((n.name, save.share or f"#{i}", save.fmt), n, save.copy_bytes,
                                value(n).dtype if value(n) is not None else "?", ())

    def _argument_storage(self, n: fx.Node, i: int, save: Save) -> int | None:
        src = self.fused.arg_of(n, save.index)
        if save.sub is not None:
            src = src[save.sub]
        if not isinstance(src, fx.Node) or value(src) is None or _param_behind(src, self.nodes) is not None:
            return None  # parameters are not activations
        if save.copy_bytes is not None:
            return self.storage_for((n.name, save.share or f"#{i}", save.fmt), n, save.copy_bytes,
                                    value(src).dtype, value(src).shape)
        key = self.storage_key[src.name]
        sv = value(src)
        return self.storage_for(key, self.fx_nodes[self.root_of[key]], hint(sv.untyped_storage().nbytes()),
                                sv.dtype, sv.shape)

    def add_use(self, n: fx.Node, key: str, save: Save, sid: int) -> None:
        """Record that ``n`` keeps storage ``sid`` under the save's condition."""
        def at(j):
            return self.fused.arg_of(n, j)

        when_nodes = tuple(at(j).name for j in save.when if isinstance(at(j), fx.Node))
        if save.when and not when_nodes:
            return  # the condition names only constants: never requires grad
        serves = save.when if save.serves is None else save.serves
        owners = tuple(self.owner_of(at(j)) for j in serves if isinstance(at(j), fx.Node))
        owners = owners if owners and all(o is not None for o in owners) else ()
        variant = None
        if save.variant is not None and isinstance(at(save.variant[0]), fx.Node):
            variant = (at(save.variant[0]).name, save.variant[1])
        use = SavedUse(n.name, key, save.role, sid, when_nodes, owners, save.fmt, variant)
        self.storages[sid].uses.append(len(self.uses))
        self.uses.append(use)
        self.graph.add_edge(f"tensor:{sid}", f"op:{n.name}", role=save.role, dynamic=bool(owners))
        for o in owners:
            self.graph.add_edge(f"layer:{o}", f"tensor:{sid}", requires="trainable")

    def owner_of(self, node: fx.Node) -> str | None:
        """The parameter whose gradient needs a save conditioned on ``node``, by its first name."""
        weight = self.weight_of(node)
        return self.names.canonical.get(weight, weight)


def analyze_graph(gm: fx.GraphModule, config: SlimFitConfig | None = None,
                  model: torch.nn.Module | None = None) -> GraphAnalysis:
    """Build the saved-tensor inventory of ``gm`` (from ``trace``) under ``config`` formats, its
    parameters named as ``model`` names them (``parameter_names``)."""
    names = parameter_names(gm, model)
    layers = layer_parameters(names.params.items())
    nodes = classify_nodes(gm, names, set(layers))
    reachable = grad_reachable(gm)
    ctx = OpContext(config=config, is_param=lambda n: _param_behind(n, nodes, through_casts=True) is not None,
                    may_require_grad=lambda n: isinstance(n, fx.Node) and n.name in reachable)
    fused = _find_fused(gm, config)
    ctx.fused_op = lambda node: fused.fusions[node.name].op if node.name in fused.fusions else None
    inventory = _Inventory(gm, nodes, names, fused, ctx)
    inventory.add_graph(gm)
    param_info = {fqn: (p.numel() * p.element_size(), str(StorageWeakRef(p.untyped_storage()).cdata))
                  for fqn, p in names.params.items()}
    return GraphAnalysis(
        parameters=param_info, layers=layers, storages=inventory.storages, uses=inventory.uses,
        unknown_ops=inventory.unknown, nodes=nodes, graph=inventory.graph, config=config, aliases=names.aliases,
        transients={k: (f.forward_bytes, f.backward_bytes) for k, f in fused.fusions.items()
                    if f.forward_bytes is not None or f.backward_bytes is not None},
        device=next((v.device.type for n in gm.graph.nodes if (v := value(n)) is not None), "cpu"),
    )
