"""Per-block capture: ``slimfit_fx.compile(model, blocks="auto")``.

Takes a model and a training call.  Its *stacks* are the ``nn.ModuleList``s of two or more blocks of
one class, two of them with equal parameter shapes (HF encoder and decoder layers); blocks of one
*kind* also agree on every plain attribute but their layer index.  :func:`capture` gives a
:class:`Captured`:

* ``graph``: one captured graph of the code around the blocks, in which every block call is one node
  that calls the block *module* (so its hooks fire, FSDP2's among them), running its kind's captured
  and rewritten graph on the block's own parameters (through a checkpoint for recomputed blocks);
* ``inlined``: the same computation with every block's graph inlined, the graph a whole-model capture
  gives, which is what the MemoryPlan prices: predictions are those of a whole capture.

Capture costs one export of the code around the blocks plus one per kind, whatever the depth.  Where
the model does not fit (no stack, a block called twice or returning more than its hidden states)
:func:`capture` raises :class:`Unsupported` with the reason; the caller captures the whole model.

Must never: run one kind's graph for a block of another kind, draw from the user's random stream
while capturing, or leave a block's ``forward`` replaced after a call returns.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .analysis import storage_ref
from .config import SlimFitConfig
from .extend import Save, pipeline, register_rule
from .op_table import grad_reachable
from .ops import saved
from .precision import autocast_disabled
from .quant import accepts
from .trace import Inputs, call_by_name, hf_eager_mask_decisions, inputs_of, instance_forwards, no_kv_cache, trace

__all__ = ["Captured", "Stack", "Unsupported", "CompactCheckpoint", "find_stacks", "kind_of", "capture"]

_INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index"})


@torch.library.custom_op("slimfit::block", mutates_args=())
def block_stand_in(index: int, hidden: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stands for block ``index`` while the code around the blocks is captured; never runs."""
    raise RuntimeError("slimfit::block only stands for a block in a captured graph; it does not run")


@block_stand_in.register_fake
def _(index: int, hidden: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(tensors[hidden])


# Seen by the passes that run on the graph around the blocks: the block's own graph keeps its tensors.
register_rule(block_stand_in, lambda node, ctx: [])


@torch.library.custom_op("slimfit::checkpoint_inputs", mutates_args=())
def checkpoint_inputs(tensors: list[torch.Tensor], parameters: list[torch.Tensor], hidden: int) -> torch.Tensor:
    """Marks, in the graph that is priced, what a recomputed block keeps: its tensor inputs (the
    hidden states ``tensors[hidden]`` in ``checkpoint_input_format``), whenever one of them or one of
    the block's parameters requires grad (then the checkpoint is recorded)."""
    raise RuntimeError("slimfit::checkpoint_inputs only marks a recomputed block in a priced graph")


@checkpoint_inputs.register_fake
def _(tensors, parameters, hidden):
    return tensors[0].new_empty(0, dtype=torch.float32)


def _checkpoint_saves(node, ctx) -> list:
    fmt, hidden = ctx.config.checkpoint_input_format, node.args[2]
    saves = []
    for j, t in enumerate(node.args[0]):
        val = t.meta.get("val")
        if j == hidden and fmt is not None and val is not None and accepts(val.dtype):
            numel = val.numel()
            numel = numel.node.hint if isinstance(numel, torch.SymInt) else int(numel)
            saves.append(Save("arg", 0, sub=j, role="checkpoint_input", copy_bytes=fmt.nbytes(numel), fmt="q"))
        else:
            saves.append(Save("arg", 0, sub=j, role="checkpoint_input"))
    return saves


register_rule(checkpoint_inputs, _checkpoint_saves)


class Unsupported(Exception):
    """The model does not fit per-block capture; the message says why."""


@dataclass
class Stack:
    """A run of blocks: ``prefix`` is the ModuleList's qualified name."""

    prefix: str
    blocks: nn.ModuleList


def _shape_key(block: nn.Module) -> tuple:
    return type(block), tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, (tuple, list)) else value


def kind_of(block: nn.Module) -> tuple:
    """What one graph may serve: class, parameter shapes and every plain attribute of every submodule
    (a sliding-window layer differs from a global one), the layer index left out unless a module
    computes with it (GPT-2's ``scale_attn_by_inverse_layer_idx``)."""
    uses_index = any(getattr(m, "scale_attn_by_inverse_layer_idx", False) for m in block.modules())
    attributes = []
    for path, m in block.named_modules():
        for name, value in sorted(vars(m).items()):
            if name.startswith("_") or not _plain(value):
                continue
            if name in _INDEX_ATTRIBUTES and not uses_index:
                continue
            attributes.append((path, name, _hashable(value)))
    return _shape_key(block), tuple(attributes)


def _is_stack(module: nn.Module) -> bool:
    """Two or more blocks of one class, two of them with equal parameter shapes (T5's first block
    alone holds the relative-position table; Swin's stages, of growing width, are not a stack)."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(b) for b in module}) > 1:
        return False
    keys = [_shape_key(b) for b in module]
    return bool(keys[0][1]) and max(keys.count(k) for k in keys) >= 2


def find_stacks(model: nn.Module) -> list[Stack]:
    """The model's stacks, outermost first (a stack's own blocks are not searched)."""
    stacks: list[Stack] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _is_stack(child):
                stacks.append(Stack(path, child))
            else:
                visit(path, child)

    visit("", model)
    return stacks


@dataclass
class _Call:
    """How the model calls one block, by its forward's names (``call_by_name``): the non-tensor
    leaves and the structure, with the tensors' positions among the leaves."""

    spec: pytree.TreeSpec
    constants: list
    tensor_at: list[int]

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> "_Call":
        """How ``args`` and ``kwargs`` call a block."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        return cls(spec, constants, tensor_at)

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors of a call made like this one, in order."""
        leaves = pytree.tree_leaves((args, kwargs))
        return [leaves[i] for i in self.tensor_at]

    def rebuild(self, tensors) -> tuple[tuple, dict]:
        """The call's ``(args, kwargs)`` with ``tensors`` in the tensors' places."""
        leaves = list(self.constants)
        for i, t in zip(self.tensor_at, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.spec)

    def same_as(self, other: "_Call") -> bool:
        """Whether ``other`` calls a block the same way, up to the tensors."""
        return (self.spec == other.spec and self.tensor_at == other.tensor_at
                and all(a == b for a, b in zip(self.constants, other.constants)))


@dataclass
class _Kind:
    """One kind of block: how it is called, what it returns, and its captured graph."""

    members: list[int]
    call: _Call
    out_leaves: list  # the output's leaves, the hidden states' place included
    out_spec: pytree.TreeSpec
    hidden_out: int  # the output leaf that is the block's hidden states
    hidden_in: int  # the input tensor (among the call's tensors) of the same shape and dtype
    graph: fx.GraphModule | None = None
    example: tuple | None = None  # the first block's (args, kwargs) until its graph is captured


@dataclass
class Captured:
    """``graph``: what runs (the code around the blocks, each block call a call of the block module
    through its kind's rewritten graph); None when only the plan was asked for.  ``inlined``: the
    same computation with every block's captured graph inlined, not rewritten: what is priced."""

    graph: fx.GraphModule | None
    inlined: fx.GraphModule


class _Model:
    """The blocks of one model, in call order, with their names and kinds."""

    def __init__(self, model: nn.Module):
        stacks = find_stacks(model)
        if not stacks:
            raise Unsupported("has no stack of repeated blocks (an nn.ModuleList of two or more blocks of "
                              "one class)")
        self.model = model
        self.blocks = [b for st in stacks for b in st.blocks]
        self.names = [f"{st.prefix}.{i}" for st in stacks for i in range(len(st.blocks))]
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(self.blocks):
            groups.setdefault(kind_of(b), []).append(i)
        self.groups = list(groups.values())
        self.kind_index = [0] * len(self.blocks)
        for k, members in enumerate(self.groups):
            for i in members:
                self.kind_index[i] = k


def capture(model: nn.Module, args: tuple, kwargs: dict, config: SlimFitConfig, *, dynamic: bool = True,
            assemble: bool = True, checkpoint=None, price=None) -> Captured:
    """Capture ``model`` block by block for a training call (the model in training mode); raises
    :class:`Unsupported` where it does not fit (the caller captures the whole model).  ``checkpoint``:
    None, ``"all"`` or a byte budget for the saved activations, met by recomputing the fewest blocks
    (``price(inlined graph) -> bytes`` prices a choice)."""
    blocks = _Model(model)
    inputs = Inputs(tuple(args), dict(kwargs))
    with no_kv_cache(model, inputs), hf_eager_mask_decisions():
        kinds = [_probe_kind(blocks, members, args, kwargs) for members in blocks.groups]
        around = _capture_around(blocks, kinds, inputs, dynamic)
        reachable = grad_reachable(around)
        for kind in kinds:
            _capture_kind(blocks, kind, around, reachable, dynamic)
    recomputed = _recomputed(checkpoint, len(blocks.blocks), lambda r: price(_inline(around, blocks, kinds, r)))
    inlined = _inline(around, blocks, kinds, recomputed)
    graph = _assemble(around, blocks, kinds, config, recomputed) if assemble else None
    return Captured(graph, inlined)


def _recomputed(checkpoint, count: int, price) -> set[int]:
    """The blocks to recompute: none, all, or the fewest whose recompute brings the saved activations
    within the budget, the first blocks first (their backward comes last, when the blocks after them
    have freed what they kept, so the recompute adds least to the step's peak); all, with a warning,
    when even that does not."""
    if checkpoint is None:
        return set()
    if checkpoint == "all":
        return set(range(count))
    if price(set()) <= checkpoint:
        return set()
    low, high = 1, count  # saved bytes fall as more blocks are recomputed
    while low < high:
        mid = (low + high) // 2
        if price(set(range(mid))) <= checkpoint:
            high = mid
        else:
            low = mid + 1
    chosen = set(range(low))
    if low == count and price(chosen) > checkpoint:
        warnings.warn(f"slimfit_fx: checkpoint={checkpoint} bytes: recomputing every block keeps {price(chosen)} "
                      "bytes; every block is recomputed", RuntimeWarning, stacklevel=5)
    return chosen


def _probe_kind(blocks: _Model, members: list[int], args, kwargs) -> _Kind:
    """How the model calls the first block of a kind and what the block returns: the model runs up to
    the block, and the block once, without grad (the user's random stream is kept)."""
    first = members[0]
    block, name = blocks.blocks[first], blocks.names[first]
    with _rng_kept(args, kwargs), _as_when_exporting():
        call = inputs_of(block, blocks.model, args, kwargs)
        if call is None:
            raise Unsupported(f"does not call its block {name} in this forward")
        with torch.no_grad():
            out = block(*call[0], **call[1])
    leaves, out_spec = pytree.tree_flatten(out)
    tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    signature = _Call.of(*call)
    tensors = signature.tensors(*call)
    if len(tensor_at) != 1:
        raise Unsupported(f"block {name} returns {len(tensor_at)} tensors; per-block capture needs blocks "
                          "that return their hidden states alone")
    hidden = leaves[tensor_at[0]]
    hidden_in = next((i for i, t in enumerate(tensors) if t.shape == hidden.shape and t.dtype == hidden.dtype),
                     None)
    if hidden_in is None:
        raise Unsupported(f"block {name} returns a tensor of another shape than any of its inputs")
    return _Kind(members, signature, [None if isinstance(v, torch.Tensor) else v for v in leaves], out_spec,
                 tensor_at[0], hidden_in, example=call)


def _capture_kind(blocks: _Model, kind: _Kind, around: fx.GraphModule, reachable: set[str], dynamic: bool):
    """The kind's graph, captured on its first block's inputs.  An input requires grad where, in the
    graph around the blocks, a gradient can reach what any block of the kind is fed (the hidden
    states; not a mask), so the analysis and the passes see the same gradients as in a whole capture."""
    fed = [n.args[2] for n in around.graph.nodes if _is_stand_in(n) and n.args[0] in set(kind.members)]
    with_grad = {j for feeds in fed for j, t in enumerate(feeds) if t.name in reachable}
    tensors = kind.call.tensors(*kind.example)
    tensors = [t.detach().requires_grad_(True) if j in with_grad else t for j, t in enumerate(tensors)]
    a, kw = kind.call.rebuild(tensors)
    with _quiet_export():
        kind.graph = trace(blocks.blocks[kind.members[0]], Inputs(tuple(a), dict(kw)), dynamic=dynamic,
                           every_dim=True)
    kind.example = None  # not held: the user's batch


def _cuda_devices(values) -> list[int]:
    """The CUDA devices of the tensors among ``values`` (nested), whose random states fork_rng keeps."""
    return sorted({t.device.index or 0 for t in pytree.tree_leaves(values)
                   if isinstance(t, torch.Tensor) and t.device.type == "cuda"})


@contextmanager
def _rng_kept(args, kwargs):
    """Running the model up to a block draws dropout masks: the user's random stream stays as it was."""
    with torch.random.fork_rng(devices=_cuda_devices((args, kwargs))):
        yield


@contextmanager
def _as_when_exporting():
    """HF builds attention masks differently under export (it materialises a padding mask eager may
    skip); the blocks' inputs are taken as the capture will see them."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    exporting = getattr(masking_utils, "is_torchdynamo_exporting", None)
    if exporting is None:
        yield
        return
    masking_utils.is_torchdynamo_exporting = lambda: True
    try:
        yield
    finally:
        masking_utils.is_torchdynamo_exporting = exporting


@contextmanager
def _quiet_export():
    """Export logs a warning for every dim of size 1 it specialises: expected for a block's masks."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _capture_around(blocks: _Model, kinds: list[_Kind], inputs: Inputs, dynamic: bool) -> fx.GraphModule:
    """The model captured with every block standing as one ``slimfit::block`` node."""
    seen: set[int] = set()
    problems: list[str] = []

    def stand_in(index: int):
        kind = kinds[blocks.kind_index[index]]
        block = blocks.blocks[index]

        def forward(*args, **kwargs):
            a, kw = call_by_name(block, args, kwargs)
            call = _Call.of(a, kw)
            if index in seen:
                problems.append(f"calls its block {blocks.names[index]} twice in one forward")
            elif not call.same_as(kind.call):
                problems.append(f"calls {blocks.names[index]} with other arguments than "
                                f"{blocks.names[kind.members[0]]}")
            seen.add(index)
            out = list(kind.out_leaves)
            out[kind.hidden_out] = block_stand_in(index, kind.hidden_in, call.tensors(a, kw))
            return pytree.tree_unflatten(out, kind.out_spec)

        return forward

    with instance_forwards([(block, stand_in(i)) for i, block in enumerate(blocks.blocks)]):
        around = trace(blocks.model, inputs, dynamic=dynamic)
    missing = [n for i, n in enumerate(blocks.names) if i not in seen]
    if problems or missing:
        raise Unsupported(problems[0] if problems else f"does not call its block {missing[0]} in this forward")
    return around


def _is_stand_in(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.slimfit.block.default


def _attribute(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _inline(around: fx.GraphModule, blocks: _Model, kinds: list[_Kind], recomputed: set[int] = frozenset()
            ) -> fx.GraphModule:
    """The graph a whole-model capture gives: every stand-in replaced by its kind's graph, reading
    the block's own parameters under their whole-model names.  A recomputed block keeps nothing of its
    own (``meta["slimfit_recomputed"]``) and its inputs instead (a ``slimfit::checkpoint_inputs`` node)."""
    graph, env, attributes = fx.Graph(), {}, {}
    for n in around.graph.nodes:
        if _is_stand_in(n):
            index = n.args[0]
            fed = [env[t] for t in n.args[2]]
            env[n], parameters = _inline_block(graph, kinds[blocks.kind_index[index]], blocks.blocks[index],
                                               blocks.names[index], fed, attributes, index in recomputed)
            if index in recomputed:
                marker = graph.call_function(torch.ops.slimfit.checkpoint_inputs.default,
                                             (fed, parameters, kinds[blocks.kind_index[index]].hidden_in))
                marker.meta["val"] = fed[0].meta["val"].new_empty(0, dtype=torch.float32)
            continue
        if n.op in ("get_attr", "call_module"):
            attributes[n.target] = _attribute(around, n.target)
        env[n] = graph.node_copy(n, lambda x: env[x])
    _in_model_order(graph, blocks.model, attributes)
    gm = fx.GraphModule(_holder(attributes), graph)  # copies the reads in graph order: the model's
    gm.meta.update(around.meta)
    return gm


def _holder(attributes: dict) -> nn.Module:
    """A module holding ``attributes`` under their qualified names (``fx.GraphModule`` given a dict
    would assign them shallowest first, listing the layers out of the model's order)."""
    root = nn.Module()
    for qualified, value in attributes.items():
        owner = root
        *path, attr = qualified.split(".")
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        if isinstance(value, nn.Parameter):
            owner.register_parameter(attr, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(attr, value)
        else:
            setattr(owner, attr, value)
    return root


def _in_model_order(graph: fx.Graph, model: nn.Module, attributes: dict) -> None:
    """Move the graph's parameter and buffer reads to its top in the model's own order (a tied weight
    where it first appears), so the priced graph lists its layers as a whole capture does and a
    seeded draw of frozen layers picks the same ones."""
    order: dict[int, int] = {}
    for i, (_, t) in enumerate(list(model.named_parameters(remove_duplicate=False))
                               + list(model.named_buffers(remove_duplicate=False))):
        order.setdefault(id(t), i)
    reads = sorted((n for n in graph.nodes if n.op == "get_attr"),
                   key=lambda n: order.get(id(attributes[n.target]), len(order)))
    anchor = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    for n in reads:
        anchor.prepend(n)


def _inline_block(graph: fx.Graph, kind: _Kind, block: nn.Module, name: str, tensors: list, attributes: dict,
                  recomputed: bool):
    env: dict = {}
    feed = iter(tensors)
    fed: dict = {}  # an input's FakeTensor storage -> the storage of what this copy is fed
    result, parameters = None, []
    for n in kind.graph.graph.nodes:
        if n.op == "placeholder":
            if isinstance(n.meta.get("val"), torch.Tensor):
                env[n] = next(feed)
                fed[StorageWeakRef(n.meta["val"].untyped_storage())] = storage_ref(env[n], env[n].meta["val"])
            elif any(u.op != "call_module" for u in n.users):  # read by more than export's guards
                raise Unsupported(f"block {name}'s graph reads a non-tensor input ({n.name})")
        elif n.op == "call_module":
            continue  # export's input guards: checked where the block runs
        elif n.op == "output":
            result = env[pytree.tree_leaves(n.args[0])[kind.hidden_out]]
        elif n.op == "get_attr":
            qualified = f"{name}.{n.target}"
            try:
                attributes[qualified] = _attribute(block, n.target)
            except AttributeError:  # a constant export lifted into the graph
                attributes[qualified] = _attribute(kind.graph, n.target)
            env[n] = graph.get_attr(qualified)
            env[n].meta = dict(n.meta)
            if isinstance(attributes[qualified], nn.Parameter):
                parameters.append(env[n])
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
            env[n].meta.update(slimfit_copy=name, slimfit_storages=fed,  # copies share FakeTensors, not storages
                               slimfit_recomputed=recomputed)
    return result, parameters


def _assemble(around: fx.GraphModule, blocks: _Model, kinds: list[_Kind], config: SlimFitConfig,
              recomputed: set[int]) -> fx.GraphModule:
    """Rewrite each kind's graph and the graph around the blocks; each stand-in becomes a call of its
    block module.  The kinds' graphs and how many blocks each serves are in ``meta["slimfit_blocks"]``,
    the recomputed blocks' names in ``meta["slimfit_recomputed"]``."""
    for kind in kinds:
        for _, rewrite in pipeline():
            kind.graph = rewrite(kind.graph, config)
    for _, rewrite in pipeline():
        around = rewrite(around, config)
    for n in list(around.graph.nodes):
        if not _is_stand_in(n):
            continue
        index = n.args[0]
        with around.graph.inserting_before(n):
            call = around.graph.call_function(
                _runner(blocks, kinds[blocks.kind_index[index]], index, index in recomputed,
                        config.checkpoint_input_format), (n.args[2],))
        call.meta = dict(n.meta)
        n.replace_all_uses_with(call)
        around.graph.erase_node(n)
    around.recompile()
    around.meta["slimfit_blocks"] = [(kind.graph, len(kind.members)) for kind in kinds]
    around.meta["slimfit_recomputed"] = [blocks.names[i] for i in sorted(recomputed)]
    return around


class CompactCheckpoint(torch.autograd.Function):
    """Reentrant checkpointing of one block that keeps its hidden-states input quantized
    (``torch.utils.checkpoint`` keeps inputs as they are).  Forward: the block without grad, the
    random state kept.  Backward: the block again from the dequantized input, with grad, under the
    same random state, and its backward.  The first forward is exact; the recomputed one sees the
    quantized input, as any other quantized saved activation is seen in backward."""

    @staticmethod
    def forward(ctx, run, hidden: int, fmt, *tensors):
        """``run(*tensors)`` without grad; keeps ``tensors[hidden]`` in ``fmt`` and the others as they are."""
        ctx.run = run
        ctx.devices = _cuda_devices(tensors)
        ctx.rng = [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in ctx.devices]
        with torch.no_grad():
            out = run(*tensors)
        saved.save(ctx, *[saved.keep(t, fmt) if j == hidden else t for j, t in enumerate(tensors)])
        return out

    @staticmethod
    def backward(ctx, grad):
        """The block run again with grad from the kept inputs, under the forward's random state."""
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved.load(ctx), ctx.needs_input_grad[3:])]
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.rng[0])
            for d, state in zip(ctx.devices, ctx.rng[1:]):
                torch.cuda.set_rng_state(state, d)
            with torch.enable_grad():
                out = ctx.run(*inputs)
        torch.autograd.backward(out, grad)
        return (None, None, None, *[t.grad if need else None for t, need in zip(inputs, ctx.needs_input_grad[3:])])


def _slots(graph: fx.GraphModule, block: nn.Module) -> list[tuple[dict, str, dict, str]]:
    """Where each parameter and buffer of ``graph`` lives and where ``block`` keeps its own:
    (graph owner's dict, name, block owner's dict, name), so pointing the graph at a block is a
    few dict assignments per call (what ``trace.share_model_tensors`` does, without walking the modules)."""
    slots = []
    for kind in ("_parameters", "_buffers"):
        listing = graph.named_parameters if kind == "_parameters" else graph.named_buffers
        for qualified, _ in listing(remove_duplicate=False):
            owner, _, attr = qualified.rpartition(".")
            try:
                source = block.get_submodule(owner) if owner else block
            except AttributeError:
                continue  # a constant export lifted: not the block's
            if attr in getattr(source, kind):
                target = graph.get_submodule(owner) if owner else graph
                slots.append((getattr(target, kind), attr, getattr(source, kind), attr))
    return slots


def _runner(blocks: _Model, kind: _Kind, index: int, recompute: bool, fmt=None):
    """What a block's node calls: the block module (its hooks fire) running its kind's graph on its
    own parameters; under ``recompute``, through :class:`CompactCheckpoint` (the hidden-states input
    kept in ``fmt``) or, with ``fmt=None``, reentrant ``torch.utils.checkpoint``.  Both keep the
    block's inputs with ``save_for_backward``: what the analysis prices and saved-tensor hooks see."""
    block = blocks.blocks[index]
    graph = kind.graph
    slots = _slots(graph, block)

    def forward(*args, **kwargs):
        for into, attr, source, name in slots:  # the block's tensors now (FSDP2 swaps them around calls)
            into[attr] = source[name]
        with autocast_disabled(graph.meta.get("autocast")):
            return graph(*args, **kwargs)

    def call(*tensors):
        args, kwargs = kind.call.rebuild(tensors)
        with instance_forwards([(block, forward)]):
            out = block(*args, **kwargs)
        return pytree.tree_leaves(out)[kind.hidden_out]

    def slimfit_block(tensors):
        if not (recompute and torch.is_grad_enabled()):
            return call(*tensors)
        if not any(t.requires_grad for t in tensors):
            if not any(p.requires_grad for p in block.parameters()):
                return call(*tensors)  # nothing to record, as the analysis prices it
            # Reentrant checkpoint gives parameters a gradient only through an input that requires grad;
            # nothing upstream trains, so a leaf cut here loses nothing.
            tensors = list(tensors)
            tensors[kind.hidden_in] = tensors[kind.hidden_in].detach().requires_grad_(True)
        if fmt is None:
            return torch_checkpoint(call, *tensors, use_reentrant=True, preserve_rng_state=True)
        return CompactCheckpoint.apply(call, kind.hidden_in, fmt, *tensors)

    return slimfit_block
