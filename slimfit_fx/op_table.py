"""The op table: what each ATen op keeps for backward, and when.

Takes an fx node of a captured graph (ATen training IR, FakeTensor metadata) and an ``OpContext``
(the SlimFitConfig, which arguments are parameters); gives, through ``OP_TABLE[op_key](node, ctx)``,
the list of ``Save``s autograd (or, with a config, the rewritten op) makes for that node.  Also the
decisions the passes share with the prediction: ``attention_choice``, ``format_for``, the FFN
hidden activation, the spelled-out tanh GELU.  Must never: mutate a graph, run a model, or import
the runtime ops (``slimfit_fx.ops``); what an op keeps is said here once, for both sides.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from .attention_kernels import kernel_for
from .config import QuantFormat, SlimFitConfig
from .nodes import arg, cast_source, has_float_value, hint, is_op, itemsize, numel, op_key, value
from .quant import accepts, mask_nbytes, pruned_layernorm_bytes

__all__ = [
    "Save", "OpContext", "Rule", "OP_TABLE", "VIEW_OPS", "NON_DIFFERENTIABLE", "MASK_ROLES", "match_tanh_gelu",
    "returns_input", "ffn_producer", "is_ffn_hidden", "ffn_input_format", "format_for", "sdpa_backend",
    "fused_kernel", "attention_choice", "is_differentiable", "grad_reachable",
]


@dataclass(frozen=True)
class Save:
    """One tensor an op keeps for its backward.

    ``source``: ``"arg"`` (argument ``index``), ``"out"`` (output ``index``) or
    ``"new"`` (a temporary made inside the op, e.g. a dropout mask).
    ``when``: argument positions; saved iff any of them requires grad.  Empty:
    saved whenever the op is recorded.
    ``copy_bytes``: None when the saved tensor shares the storage of its source;
    else the bytes of a fresh storage (a temporary, a reshape copy, a quantized copy).
    ``share``: saves of one node with the same tag are one storage.
    ``role``: the class of activation (``attn_qk``, ``gelu_input``, ...), which
    selects its SlimFit format and lets the passes find it.
    """

    source: str
    index: int = 0
    when: tuple[int, ...] = ()
    role: str = "other"
    copy_bytes: int | None = None
    share: str | None = None
    fmt: str = "full"
    sub: int | None = None  # position inside a list argument (aten.index indices)
    serves: tuple[int, ...] | None = None  # args whose gradient needs it (default: ``when``)
    # (arg, requires_grad): saved only while that argument's requires_grad is this; the kernel an
    # op runs can depend on it (SDPA runs its math kernel for a mask that trains)
    variant: tuple[int, bool] | None = None


@dataclass
class OpContext:
    """What a rule may consult besides the node: the SlimFit config and parameter roles.

    ``is_param(node)``: ``node`` is a parameter, a view of one, or a dtype cast of one
    (autocast's low-precision weight copy): a freezable weight.
    """

    config: SlimFitConfig | None
    is_param: Callable[[fx.Node], bool]
    may_require_grad: Callable[[fx.Node], bool] = lambda node: True  # under some frozen set
    fused_op: Callable[[fx.Node], Callable | None] = lambda node: None  # the op a pattern fuses it into

    def absorbs_cast(self, weight) -> bool:
        """Whether the rewritten op takes the parameter behind this autocast cast and casts it
        again in backward, so the low-precision copy is never kept (``SlimFitConfig.recast_weights``)."""
        return (self.config is not None and self.config.recast_weights and cast_source(weight) is not None
                and self.is_param(weight))


Rule = Callable[[fx.Node, OpContext], list[Save]]


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(
        [hint(s) for s in t.shape], [hint(s) for s in t.stride()], dtype=t.dtype, device="meta"
    )


def _reshape_copies(node: fx.Node, shape: list[int]) -> bool:
    """Whether ``reshape`` of this node's tensor to ``shape`` must copy (decided on meta tensors)."""
    m = _meta_like(value(node))
    return not m.reshape(shape)._is_view()


def _fmt_bytes(fmt: QuantFormat | None, count: int, item_bytes: int) -> int:
    """Bytes of ``count`` elements kept in ``fmt`` (None: as they are, ``item_bytes`` each)."""
    return count * item_bytes if fmt is None else fmt.nbytes(count)


def _no_save(node, ctx):
    return []


def _save_args(*specs: tuple[int, tuple[int, ...]], role="other") -> Rule:
    """Rule saving argument ``i`` when any argument in its tuple requires grad."""

    def rule(node, ctx):
        return [Save("arg", i, when, role) for i, when in specs if isinstance(arg(node, i), fx.Node)]

    return rule


def _save_out(role="other", when=()) -> Rule:
    def rule(node, ctx):
        return [Save("out", 0, when, role)]

    return rule


def _binary_mul(node, ctx):
    # d(a*b)/da = b, d(a*b)/db = a: each operand is kept only for the other's gradient.
    saves = []
    a, b = arg(node, 0), arg(node, 1)
    if isinstance(b, fx.Node) and isinstance(a, fx.Node):
        saves += [Save("arg", 1, (0,)), Save("arg", 0, (1,))]
    return saves


def _binary_div(node, ctx):
    a, b = arg(node, 0), arg(node, 1)
    if not isinstance(b, fx.Node):
        return []
    saves = [Save("arg", 1, (0, 1))]
    if isinstance(a, fx.Node):
        saves.append(Save("arg", 0, (1,)))
    return saves


def _mm_like(a_idx: int, b_idx: int) -> Rule:
    """mm/bmm/addmm/baddbmm: each matrix operand kept for the other's gradient."""

    def rule(node, ctx):
        return [Save("arg", a_idx, (b_idx,), "linear_input"), Save("arg", b_idx, (a_idx,), "linear_input")]

    return rule


def _addmm(node, ctx):
    """addmm(bias, x, W) (GPT-2's Conv1D): like mm; fed by a GELU it is an FFN-out
    projection whose input the config may keep quantized while W trains."""
    saves = _mm_like(1, 2)(node, ctx)
    fmt = ffn_input_format(arg(node, 1), ctx.config, ctx.fused_op)
    ffn_out = is_ffn_hidden(arg(node, 1), ctx.fused_op) and ctx.is_param(arg(node, 2))
    if ffn_out:
        first = saves[0]
        copy = fmt.nbytes(numel(arg(node, 1))) if fmt is not None else None
        saves[0] = Save(first.source, first.index, first.when, "ffn_out_input", copy_bytes=copy,
                        fmt="ffn_out_input" if fmt is not None else "full")
    if ctx.absorbs_cast(arg(node, 2)) or (ffn_out and fmt is not None and cast_source(arg(node, 2)) is not None):
        # (ffn_out implies a parameter behind the cast)
        saves = saves[:1]  # the rewritten op keeps the parameter, not its cast copy
    return saves


def _matmul(node, ctx):
    """aten.matmul folds its operands to 2-D/3-D and calls mm/bmm, which keep each
    folded operand for the other's gradient; folding copies when it cannot view."""
    a, b = arg(node, 0), arg(node, 1)
    av, bv = value(a), value(b)
    ash, bsh = [hint(s) for s in av.shape], [hint(s) for s in bv.shape]
    if len(ash) >= 3 and len(bsh) <= 2:
        # (..., n, k) @ (k, m): a folds to (-1, k), b is used as is.
        a_fold = ash, [-1, ash[-1]]
        b_fold = None
    elif len(ash) >= 3 or len(bsh) >= 3:
        # Batched: both operands are broadcast to the common batch and folded to 3-D.
        batch = list(torch.broadcast_shapes(tuple(ash[:-2]), tuple(bsh[:-2])))
        nb = math.prod(batch)
        a_fold = (batch + ash[-2:], [nb] + ash[-2:]) if len(ash) >= 2 else None
        b_fold = (batch + bsh[-2:], [nb] + bsh[-2:]) if len(bsh) >= 2 else None
    else:
        a_fold = b_fold = None

    def copy_bytes(operand, fold):
        if fold is None:
            return None
        expanded, folded = fold
        m = _meta_like(value(operand)).expand(expanded)
        if m.reshape(folded)._is_view():
            return None
        return math.prod(folded) * value(operand).dtype.itemsize

    return [Save("arg", 0, (1,), "matmul_input", copy_bytes=copy_bytes(a, a_fold), share="a"),
            Save("arg", 1, (0,), "matmul_input", copy_bytes=copy_bytes(b, b_fold), share="b")]


def _linear(node, ctx):
    """aten.linear(x, W, b): x kept for dW (dynamic), W kept for dx (a parameter, not an activation;
    under autocast W is a low-precision copy, kept unless the rewritten op casts the parameter again)."""
    x = value(arg(node, 0))
    saves = []
    in_features = hint(x.shape[-1])
    copy = None
    if x.dim() > 2 and _reshape_copies(arg(node, 0), [-1, in_features]):
        copy = numel(arg(node, 0)) * x.dtype.itemsize
    role = "ffn_out_input" if is_ffn_hidden(arg(node, 0), ctx.fused_op) else "linear_input"
    fmt_name = "full"
    ffn_fmt = ffn_input_format(arg(node, 0), ctx.config, ctx.fused_op)
    if role == "ffn_out_input" and ffn_fmt is not None:
        copy = ffn_fmt.nbytes(numel(arg(node, 0)))
        fmt_name = "ffn_out_input"
    weight = arg(node, 1)
    absorbed = ctx.absorbs_cast(weight) or (fmt_name == "ffn_out_input" and cast_source(weight) is not None
                                            and ctx.is_param(weight))
    if absorbed and fmt_name == "full":
        copy = None  # ops.gated.gated_linear keeps x itself, not linear's 2-D copy
    saves.append(Save("arg", 0, (1,), role, copy_bytes=copy, fmt=fmt_name))
    if not absorbed:  # the rewritten op keeps the parameter and casts it again in backward
        saves.append(Save("arg", 1, (0,), "weight"))
    return saves


# Ops that return a view of (or, for reshape/contiguous, a value equal to) their first argument.
VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.reshape", "aten.transpose", "aten.permute", "aten.expand",
    "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select", "aten.t", "aten.alias", "aten.flatten",
    "aten.contiguous", "aten.view_as", "aten.expand_as", "aten.unflatten",
})


def _scalar_mul(node, name_value) -> tuple[fx.Node, float] | None:
    """(tensor, scalar) when ``node`` is ``aten.mul(tensor, scalar)`` (either order)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and op_key(node.target) == "aten.mul"):
        return None
    a, b = node.args[0], node.args[1]
    if isinstance(a, fx.Node) and isinstance(b, (int, float)):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)):
        return b, float(a)
    return None


def match_tanh_gelu(out: fx.Node) -> tuple[fx.Node, list[fx.Node], tuple] | None:
    """Match the tanh-approximated GELU written out in ops (GPT-2's ``gelu_new``):
    ``0.5*x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))``.

    Returns ``(x, pattern nodes in graph order, constants)`` or None.  Every inner
    node must feed only the pattern, so replacing the output removes them all.
    The analysis prices a match as one GELU and the quantize pass rewrites it; both
    call this function.
    """
    if not is_op(out, "aten.mul") or len(out.args) != 2 or not all(isinstance(a, fx.Node) for a in out.args):
        return None
    for half_node, one_plus in (out.args, out.args[::-1]):
        half = _scalar_mul(half_node, None)
        if half is None or not is_op(one_plus, "aten.add") or one_plus.args[1] != 1.0:
            continue
        x, c_half = half
        tanh = one_plus.args[0]
        if not is_op(tanh, "aten.tanh"):
            continue
        inner = _scalar_mul(tanh.args[0], None)
        if inner is None:
            continue
        poly, c_sqrt = inner
        if not (is_op(poly, "aten.add") and poly.args[0] is x):
            continue
        cubic = _scalar_mul(poly.args[1], None)
        if cubic is None or not (is_op(cubic[0], "aten.pow") and cubic[0].args[0] is x and cubic[0].args[1] == 3.0):
            continue
        c_cubic = cubic[1]
        if not (c_half == 0.5 and abs(c_sqrt - math.sqrt(2 / math.pi)) < 1e-6 and abs(c_cubic - 0.044715) < 1e-9):
            continue
        pow_node, cubic_node = cubic[0], poly.args[1]
        nodes = [half_node, pow_node, cubic_node, poly, tanh.args[0], tanh, one_plus, out]
        inner_nodes = nodes[:-1]
        if any(len(n.users) != 1 for n in inner_nodes):
            continue
        return x, nodes, (c_half, c_cubic, c_sqrt)
    return None


def returns_input(node) -> fx.Node | None:
    """The input ``node`` hands back unchanged at run time, where the captured metadata shows a fresh
    tensor: ``dropout`` with ``p=0`` or ``train=False``, ``contiguous`` of a contiguous tensor."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.args):
        return None
    key, src = op_key(node.target), node.args[0]
    if not isinstance(src, fx.Node) or value(src) is None:
        return None
    if key == "aten.dropout" and (arg(node, 1, "p", 0.5) == 0 or not arg(node, 2, "train", True)):
        return src
    if key == "aten.contiguous" and value(src).is_contiguous():
        return src
    return None


def ffn_producer(node, fused_op: Callable = lambda node: None) -> str | None:
    """``"gelu"``, ``"relu"`` or ``"glu"`` when ``node`` is an FFN's hidden activation, looking through
    views (the FFN-out Linear input): a GELU output, or the output of an op whose ``ffn_hidden``
    names its kind (ReLU bits, a gated MLP's product), already in the graph or, by ``fused_op``,
    about to be fused into one."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        key = op_key(node.target)
        if key == "aten.gelu" or match_tanh_gelu(node) is not None:
            return "gelu"
        kind = getattr(node.target, "ffn_hidden", None) or getattr(fused_op(node), "ffn_hidden", None)
        if kind:
            return kind
        if key in VIEW_OPS or cast_source(node) is not None:
            node = node.args[0]
            continue
        return None
    return None


def is_ffn_hidden(node, fused_op: Callable = lambda node: None) -> bool:
    """Whether ``node`` is an FFN's hidden activation (``ffn_producer``)."""
    return ffn_producer(node, fused_op) is not None


def ffn_input_format(node, config: SlimFitConfig | None, fused_op: Callable = lambda node: None):
    """The format an FFN-out Linear keeps its input ``node`` in while it trains:
    ``ffn_out_input_format`` after a GELU or ReLU, ``glu_down_input_format`` after a gated product."""
    producer = ffn_producer(node, fused_op)
    if config is None or producer is None:
        return None
    return format_for(config.glu_down_input_format if producer == "glu" else config.ffn_out_input_format, node)


def _conv(node, ctx):
    """Convolution keeps input and weight whenever recorded (one backward formula for all
    outputs), so a frozen conv with a trainable bias still keeps its input in eager
    PyTorch; the input only serves the weight gradient, hence dynamic.  The freeze
    gate (which leaves string paddings such as "same" alone) makes it conditional on
    the weight."""
    gated = (ctx.config is not None and ctx.config.freeze_gate and ctx.is_param(arg(node, 1))
             and not isinstance(arg(node, 4, "padding"), str))
    saves = [Save("arg", 0, (1,) if gated else (), "conv_input", serves=(1,))]
    if not (gated and cast_source(arg(node, 1)) is not None):  # a gated conv casts the parameter itself
        saves.append(Save("arg", 1, () if not gated else (0,), "weight", serves=(0,)))
    return saves


def _embedding(node, ctx):
    return [Save("arg", 1, (0,), "embedding_indices")]


def _layer_norm(node, ctx):
    """layer_norm(x, shape, w, b): x, per-row mean and 1/sigma, kept whenever recorded.

    Under SlimFit pruning, a LayerNorm whose weight is frozen keeps the top
    ``keep_ratio`` of |normalized x| per row (values and int16/int32 indices)
    plus 1/sigma; that choice depends on the frozen set, so both variants are
    listed and the plan picks one (``fmt``: ``ln_full`` / ``ln_pruned``).
    """
    x = value(arg(node, 0))
    shape = arg(node, 1)
    row = math.prod(hint(s) for s in shape)
    rows = numel(arg(node, 0)) // max(row, 1)
    stat = rows * _layer_norm_stat_dtype(node).itemsize
    pruning = ctx.config is not None and ctx.config.prune_layernorm
    variant = "ln_full" if pruning else "full"
    full = [
        Save("arg", 0, (), "layernorm_input", fmt=variant),
        Save("new", 0, (), "layernorm_stats", copy_bytes=stat, share="mean", fmt=variant),
        Save("new", 0, (), "layernorm_stats", copy_bytes=stat, share="rstd", fmt=variant),
    ]
    if not (pruning and ctx.is_param(arg(node, 2, "weight"))):
        # Parameters are not activations, but an autocast copy of them is (CUDA's fp32 LayerNorm
        # of bf16 weights); the pruning pass casts the parameters itself.
        full += [Save("arg", i, (), "weight", fmt=variant) for i in (2, 3) if cast_source(arg(node, i)) is not None]
    if not pruning:
        return full
    # Frozen weight: only the input's gradient needs anything (the bias gets sum(g)).
    pruned = [
        Save("new", 0, (0,), "layernorm_pruned", share="topk", fmt="ln_pruned",
             copy_bytes=pruned_layernorm_bytes(rows, row, x.dtype, ctx.config.layernorm_keep_ratio)),
        Save("new", 0, (0,), "layernorm_stats", copy_bytes=stat, share="rstd", fmt="ln_pruned"),
    ]
    return full + pruned


def _layer_norm_stat_dtype(node) -> torch.dtype:
    """Dtype of LayerNorm's mean and 1/sigma: fp32 for fp32 and mixed inputs and on CUDA; the CPU keeps
    a bf16/fp16 LayerNorm's statistics in bf16/fp16 when its parameters share that dtype."""
    x = value(arg(node, 0))
    if x.dtype not in (torch.float16, torch.bfloat16):
        return x.dtype if x.dtype == torch.float64 else torch.float32
    params = [value(arg(node, i)) for i in (2, 3) if value(arg(node, i)) is not None]
    if x.device.type == "cpu" and all(p.dtype == x.dtype for p in params):
        return x.dtype
    return torch.float32


def _dropout(node, ctx):
    """Train-mode dropout keeps its mask: float noise of the input's dtype on CPU, bool on CUDA.
    Under SlimFit (``ops.dropout``) it keeps the mask's bits or the RNG state instead."""
    p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
    if not train or p == 0:
        return []
    x = value(arg(node, 0))
    if ctx.config is not None and ctx.config.compacts_dropout:
        mode = ctx.config.dropout_mode(x.device.type)
        return [Save("new", 0, (0,), MASK_ROLES[mode], share="mask",
                     copy_bytes=mask_nbytes(numel(arg(node, 0)), mode, x.device, x.dtype))]
    per = 1 if x.device.type in ("cuda", "xpu") else x.dtype.itemsize
    return [Save("new", 0, (0,), "dropout_mask", copy_bytes=numel(arg(node, 0)) * per)]


# The role of what a dropout keeps, by ``SlimFitConfig.dropout_mode``.
MASK_ROLES = {"bits": "dropout_bits", "replay": "rng_state", "full": "dropout_mask"}


def _native_dropout(node, ctx):
    return [Save("out", 1, (0,), "dropout_mask")]


def sdpa_backend(node: fx.Node) -> str:
    """Which kernel ``scaled_dot_product_attention`` runs on the graph's device: ``flash``,
    ``efficient``, ``cudnn`` or ``math``; asked of PyTorch itself with tensors of the node's shapes."""
    q, k, v = (value(arg(node, i)) for i in range(3))
    mask = arg(node, 3, "attn_mask")
    mv = value(mask) if isinstance(mask, fx.Node) else None

    def sig(t):
        return None if t is None else (tuple(hint(s) for s in t.shape), tuple(hint(s) for s in t.stride()), t.dtype)

    return _sdpa_choice(
        str(q.device), sig(q), sig(k), sig(v), sig(mv),
        float(arg(node, 4, "dropout_p", 0.0)), bool(arg(node, 5, "is_causal", False)),
        node.kwargs.get("scale", arg(node, 6)), bool(node.kwargs.get("enable_gqa", arg(node, 7, default=False))),
    )


@functools.lru_cache(maxsize=64)
def _sdpa_choice(device, q, k, v, mask, dropout_p, is_causal, scale, gqa) -> str:
    # Every layer of a model asks the same question: answer it once per signature.
    # Shapes and strides decide the kernel, values don't; empty_strided allocates
    # without initialising.
    def real(sig):
        return None if sig is None else torch.empty_strided(sig[0], sig[1], dtype=sig[2], device=device)

    choice = torch._fused_sdp_choice(real(q), real(k), real(v), real(mask), dropout_p, is_causal,
                                     scale=scale, enable_gqa=gqa)
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
    return names.get(int(choice), "math")


def _sdpa(node, ctx):
    choice = attention_choice(node, ctx.config, ctx) if ctx.config is not None else "kernel"
    if choice == "core":
        return _sdpa_quantized(node, ctx.config)
    if choice == "fused":
        return _sdpa_fused_quantized(node, ctx.config)
    return _sdpa_plain(node, ctx)


def fused_kernel(node) -> str | None:
    """The fused kernel ``ops.attention_fused`` runs for this SDPA node, or None where it cannot
    (dropout, grouped-query heads left to the kernel, a kernel it does not drive)."""
    if arg(node, 4, "dropout_p", 0.0) > 0 or node.kwargs.get("enable_gqa", False):
        return None
    return kernel_for(value(arg(node, 0)).device.type, sdpa_backend(node),
                      isinstance(arg(node, 3, "attn_mask"), fx.Node))


def _sdpa_fused_quantized(node, cfg: SlimFitConfig) -> list[Save]:
    """``ops.attention_fused`` keeps Q, K, V (their formats) and the output (``attn_v_format``),
    the log-sum-exp, and the mask as given: whenever recorded, as the kernels do."""
    q = value(arg(node, 0))
    rows = math.prod(hint(s) for s in q.shape[:-1])

    def kept(i, fmt, role):
        if fmt is None:
            return Save("arg", i, (), role)
        return Save("arg", i, (), role, copy_bytes=fmt.nbytes(numel(arg(node, i))), fmt="q")

    saves = [kept(0, cfg.attn_qk_format, "attn_qk"), kept(1, cfg.attn_qk_format, "attn_qk"),
             kept(2, cfg.attn_v_format, "attn_v")]
    out_fmt = format_for(cfg.attn_v_format, node)
    saves.append(Save("out", 0, (), "attn_output") if out_fmt is None else
                 Save("new", 0, (), "attn_output", copy_bytes=out_fmt.nbytes(numel(node)), share="out"))
    saves.append(Save("new", 0, (), "attn_logsumexp", copy_bytes=rows * 4, share="lse"))
    if isinstance(arg(node, 3, "attn_mask"), fx.Node):
        saves.append(Save("arg", 3, (), "attn_mask"))
    return saves


def _sdpa_quantized(node, cfg: SlimFitConfig) -> list[Save]:
    """ops.attention keeps Q, K, V and the softmax output (fp32 for bf16/fp16 inputs) in the
    config's formats (a format of None keeps the tensor itself) and, with dropout, the mask's
    bits or RNG state (``SlimFitConfig.dropout_mode``)."""
    q, k, v = (arg(node, i) for i in range(3))
    qv = value(q)
    lead = [hint(s) for s in qv.shape[:-2]]
    probs_numel = math.prod(lead) * hint(qv.shape[-2]) * hint(value(k).shape[-2])
    acc = torch.float32 if qv.dtype in (torch.bfloat16, torch.float16) else qv.dtype

    def kept(i, when, role, fmt):
        if fmt is None:
            return Save("arg", i, when, role)
        return Save("arg", i, when, role, copy_bytes=fmt.nbytes(numel(arg(node, i))), fmt="q")

    saves = [
        kept(0, (1,), "attn_qk", cfg.attn_qk_format),
        kept(1, (0,), "attn_qk", cfg.attn_qk_format),
        kept(2, (0, 1, 3), "attn_v", cfg.attn_v_format),  # 3: a mask that trains (a relative-position bias)
        Save("new", 0, (), "attn_probs", share="probs",
             copy_bytes=_fmt_bytes(cfg.attn_probs_format, probs_numel, acc.itemsize)),
    ]
    if arg(node, 4, "dropout_p", 0.0) > 0:
        mode = cfg.dropout_mode(qv.device.type)
        saves.append(Save("new", 0, (), MASK_ROLES[mode], share="mask",
                          copy_bytes=mask_nbytes(probs_numel, mode, qv.device, acc)))
    return saves


def _sdpa_plain(node, ctx: OpContext | None = None) -> list[Save]:
    """What eager SDPA keeps: the kernel PyTorch picks for these shapes, or, while an additive mask
    trains (a relative-position bias), the math kernel, the only one with a mask gradient."""
    mask = arg(node, 3, "attn_mask")
    backend = sdpa_backend(node)
    if not (isinstance(mask, fx.Node) and ctx is not None and ctx.may_require_grad(mask)) or backend == "math":
        return _sdpa_kernel_saves(node, backend)
    frozen = [dataclasses.replace(s, variant=(3, False)) for s in _sdpa_kernel_saves(node, backend)]
    trains = [dataclasses.replace(s, variant=(3, True), share=f"{s.share or s.role}/math")
              for s in _sdpa_kernel_saves(node, "math")]
    return frozen + trains


def _sdpa_kernel_saves(node, backend: str) -> list[Save]:
    q, k, v = (arg(node, i) for i in range(3))
    qv, kv, vv = value(q), value(k), value(v)
    mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    lead = [hint(s) for s in qv.shape[:-2]]
    n_q, n_k = hint(qv.shape[-2]), hint(kv.shape[-2])
    probs_numel = math.prod(lead) * n_q * n_k
    item = qv.dtype.itemsize
    if backend in ("flash", "efficient", "cudnn"):
        # Fused kernels keep q, k, v, the output and the row log-sum-exp; a boolean
        # mask is converted to an additive float mask that is kept too.
        saves = [Save("arg", i, (), "attn_fused_input") for i in range(3)]
        saves.append(Save("out", 0, (), "attn_output"))
        saves.append(Save("new", 0, (), "attn_logsumexp", copy_bytes=math.prod(lead) * n_q * 4, share="lse"))
        if isinstance(mask, fx.Node):
            mv = value(mask)
            if mv.dtype == torch.bool:
                saves.append(Save("new", 0, (), "attn_mask", copy_bytes=numel(mask) * item, share="mask"))
            else:
                saves.append(Save("arg", 3, (), "attn_mask"))
        return saves
    # Math path: q and k^T are scaled copies, softmax output and (in training with
    # dropout) the float mask and the dropped probabilities are kept; v is folded to
    # 3-D for bmm, which copies it unless its batch dims merge as a view.  On the CPU
    # the math path computes bf16/fp16 in fp32: every one of these is an fp32 copy.
    batch = math.prod(lead)
    v_copy = None
    if qv.device.type == "cpu" and qv.dtype in (torch.bfloat16, torch.float16):
        item = 4
        v_copy = numel(v) * item
    elif _reshape_copies(v, [batch, hint(vv.shape[-2]), hint(vv.shape[-1])]):
        v_copy = numel(v) * item
    saves = [
        Save("new", 0, (1,), "attn_qk", copy_bytes=numel(q) * item, share="q_scaled"),
        Save("new", 0, (0,), "attn_qk", copy_bytes=numel(k) * item, share="k_scaled"),
        Save("new", 0, (0, 1, 3), "attn_probs", copy_bytes=probs_numel * item, share="probs"),
        Save("arg", 2, (0, 1, 3), "attn_v", copy_bytes=v_copy),
    ]
    if dropout_p > 0:
        saves.append(Save("new", 0, (0, 1, 3), "dropout_mask", copy_bytes=probs_numel * item, share="mask"))
        saves.append(Save("new", 0, (2,), "attn_probs", copy_bytes=probs_numel * item, share="dropped"))
    else:
        saves.append(Save("new", 0, (2,), "attn_probs", copy_bytes=probs_numel * item, share="probs"))
    return saves


def _saves_bytes(node: fx.Node, saves: list[Save]) -> int:
    """Bytes a list of saves keeps, counting every input as its own storage."""
    total = 0
    for save in saves:
        if save.copy_bytes is not None:
            total += save.copy_bytes
        elif save.source == "arg":
            total += numel(arg(node, save.index)) * itemsize(arg(node, save.index))
        elif save.source == "out":
            total += numel(node) * itemsize(node)
    return total


def attention_choice(node: fx.Node, config: SlimFitConfig, ctx: OpContext | None = None) -> str:
    """How an SDPA node keeps its tensors: ``"kernel"`` (as PyTorch's kernel does), ``"core"``
    (``ops.attention``: quantized Q/K/V and softmax output, an S x S matrix) or ``"fused"``
    (``ops.attention_fused``: quantized Q/K/V/output on the fused kernel, no S x S matrix),
    whichever keeps the fewest bytes for these shapes on this device.  A mask that trains sends
    PyTorch to the math kernel and rules the fused path out.  The attention pass and the
    prediction both ask this one function."""
    if not config.quantizes_attention or not accepts(value(arg(node, 0)).dtype):
        return "kernel"
    mask = arg(node, 3, "attn_mask")
    trains = isinstance(mask, fx.Node) and (ctx.may_require_grad(mask) if ctx is not None else
                                            _depends_on_parameter(mask))
    costs = {"kernel": _saves_bytes(node, _sdpa_kernel_saves(node, "math" if trains else sdpa_backend(node))),
             "core": _saves_bytes(node, _sdpa_quantized(node, config))}
    if not trains and fused_kernel(node) is not None:
        costs["fused"] = _saves_bytes(node, _sdpa_fused_quantized(node, config))
    return min(costs, key=lambda c: (costs[c], c != "kernel"))


def _depends_on_parameter(node: fx.Node) -> bool:
    """Whether a parameter (a ``get_attr`` of an ``nn.Parameter``) reaches ``node`` (the passes' view)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            owner = n.graph.owning_module
            try:
                if isinstance(owner.get_parameter(n.target), torch.nn.Parameter):
                    return True
            except AttributeError:
                pass
        stack.extend(n.all_input_nodes)
    return False


def _cross_entropy(node, ctx):
    """cross_entropy = log_softmax + nll_loss: keeps log-probabilities, target, total weight."""
    logits = arg(node, 0)
    return [
        Save("new", 0, (0,), "logprobs", copy_bytes=numel(logits) * itemsize(logits), share="logp"),
        Save("arg", 1, (0,), "target"),
        Save("new", 0, (0,), "other", copy_bytes=itemsize(logits), share="total_weight"),
    ]


def _gelu(node, ctx):
    fmt = format_for(ctx.config and ctx.config.gelu_input_format, arg(node, 0))
    if fmt is not None:
        return [Save("arg", 0, (0,), "gelu_input", fmt="gelu_q", copy_bytes=fmt.nbytes(numel(arg(node, 0))))]
    return [Save("arg", 0, (0,), "gelu_input")]


def format_for(fmt: QuantFormat | None, node) -> QuantFormat | None:
    """``fmt``, or None when the tensor of ``node`` has a dtype the formats do not take (float64,
    integers): such a tensor is kept unquantized, by the prediction and the passes alike."""
    val = value(node)
    return fmt if fmt is not None and val is not None and accepts(val.dtype) else None


def _index(node, ctx):
    """aten.index(x, [i0, i1, ...]): the index tensors are kept for the gradient of x."""
    indices = arg(node, 1) or []
    return [Save("arg", 1, (0,), "indices", sub=k) for k, t in enumerate(indices) if isinstance(t, fx.Node)]


def _adaptive_pool(node, ctx):
    """Adaptive average pooling keeps its input for the gradient, except to size 1: then it is a mean."""
    size = arg(node, 1, "output_size")
    if size is not None and all(int(s) == 1 for s in size):
        return []
    return [Save("arg", 0, (0,), "pool_input")]


def _where(node, ctx):
    return [Save("arg", 0, (1, 2), "mask")]


# Ops whose output never requires grad (comparisons, factories, metadata checks,
# integer arithmetic) or that keep nothing for backward.
NON_DIFFERENTIABLE = {
    "aten.arange", "aten.ge", "aten.gt", "aten.le", "aten.lt", "aten.eq", "aten.ne", "aten.__and__",
    "aten.__or__", "aten.bitwise_and", "aten.bitwise_or", "aten.bitwise_not", "aten.logical_not",
    "aten.logical_and", "aten.logical_or", "aten._assert_tensor_metadata", "aten.new_ones",
    "aten.new_zeros", "aten.new_full", "aten.new_empty", "aten.ones", "aten.zeros", "aten.full",
    "aten.empty", "aten.ones_like", "aten.zeros_like", "aten.full_like", "aten.empty_like",
    "aten.scalar_tensor", "aten.detach", "aten.argmax", "aten.argmin", "aten.sym_size", "aten.sym_numel",
    "aten._assert_async", "aten._assert_scalar", "aten.lift_fresh_copy", "aten.isinf", "aten.isnan",
    "aten.tril_indices", "aten.triu_indices", "aten.randint", "aten.rand", "aten.randn", "aten.bernoulli",
    "wrap_with_set_grad_enabled_false",
}

_NO_SAVE_OPS = VIEW_OPS | {
    "aten.add", "aten.sub", "aten.neg", "aten.cat", "aten.stack", "aten.split", "aten.split_with_sizes",
    "aten.chunk", "aten.unbind", "aten.clone", "aten.to", "aten._to_copy", "aten.type_as", "aten.mean",
    "aten.sum", "aten.pad", "aten.constant_pad_nd", "aten.tril", "aten.triu", "aten.repeat", "aten.copy",
    "aten.fill", "aten.zero", "aten.roll", "aten.narrow", "aten.movedim", "aten.swapaxes", "aten.tensor_split",
    "aten.as_strided", "aten.squeeze_", "aten.unsqueeze_", "aten.diagonal", "aten.flip", "aten.rsub", "getitem",
}

OP_TABLE: dict[str, Rule] = {
    **{k: _no_save for k in _NO_SAVE_OPS},
    "aten.linear": _linear,
    "aten.matmul": _matmul,
    "aten.addmm": _addmm,
    "aten.mm": _mm_like(0, 1),
    "aten.bmm": _mm_like(0, 1),
    "aten.baddbmm": _mm_like(1, 2),
    "aten.conv1d": _conv,
    "aten.conv2d": _conv,
    "aten.conv3d": _conv,
    "aten.convolution": _conv,
    "aten.embedding": _embedding,
    "aten.layer_norm": _layer_norm,
    "aten.native_layer_norm": _layer_norm,
    "aten.dropout": _dropout,
    "aten.native_dropout": _native_dropout,
    "aten.scaled_dot_product_attention": _sdpa,
    "aten.cross_entropy_loss": _cross_entropy,
    "aten.gelu": _gelu,
    "aten.silu": _save_args((0, (0,)), role="activation_input"),
    "aten.relu": _save_out("activation_output", (0,)),
    "aten.tanh": _save_out("activation_output", (0,)),
    "aten.sigmoid": _save_out("activation_output", (0,)),
    "aten.exp": _save_out("activation_output", (0,)),
    "aten.rsqrt": _save_out("activation_output", (0,)),
    "aten.sqrt": _save_out("activation_output", (0,)),
    "aten.softmax": _save_out("attn_probs", (0,)),
    "aten._softmax": _save_out("attn_probs", (0,)),
    "aten.log_softmax": _save_out("logprobs", (0,)),
    "aten._log_softmax": _save_out("logprobs", (0,)),
    "aten.pow": _save_args((0, (0,))),
    "aten.log": _save_args((0, (0,))),
    "aten.sin": _save_args((0, (0,))),  # rotary embeddings (LLaMA): cos/sin of positions, no grad there
    "aten.cos": _save_args((0, (0,))),
    "aten.abs": _save_args((0, (0,))),
    "aten.clamp": _save_args((0, (0,))),
    "aten.clamp_min": _save_args((0, (0,))),
    "aten.clamp_max": _save_args((0, (0,))),
    "aten.adaptive_avg_pool1d": _adaptive_pool,
    "aten.adaptive_avg_pool2d": _adaptive_pool,
    "aten.floor": _no_save,  # zero gradient: nothing kept
    "aten.ceil": _no_save,
    "aten.round": _no_save,
    "aten.trunc": _no_save,
    "aten.sign": _no_save,
    "aten.topk": lambda node, ctx: [Save("out", 1, (0,), "indices")],  # the indices scatter the gradient
    # transformers' MoE expert matmul (Mixtral, Qwen-MoE): its autograd keeps input and weights (save_for_backward)
    # and holds the offsets on ctx, out of the saved-tensor hooks' sight.
    "transformers.grouped_mm_fallback": _save_args((0, ()), (1, ()), role="linear_input"),
    "aten.div_": _binary_div,  # in place: the quotient's storage is the dividend's
    "aten.mul_": _binary_mul,
    "aten.add_": _no_save,
    "aten.sub_": _no_save,
    "aten.mul": _binary_mul,
    "aten.div": _binary_div,
    "aten.gather": _save_args((0, (0,)), (2, (0,)), role="indices"),
    "aten.masked_fill": _save_args((1, (0, 2)), role="mask"),
    "aten.where": _where,
    "aten.index": _index,
}


def _input_requiring_grad(n: fx.Node) -> bool:
    """A graph input captured requiring grad: a block's hidden states (``slimfit_fx.blocks``)."""
    val = n.meta.get("val")
    return n.op == "placeholder" and isinstance(val, torch.Tensor) and val.requires_grad


def is_differentiable(n: fx.Node) -> bool:
    """Whether autograd may record the call node ``n`` (not a comparison, factory or no-grad region)."""
    key = op_key(n.target)
    return key not in NON_DIFFERENTIABLE and not (
        "wrap_with_set_grad_enabled" in key and n.args and n.args[0] is False)


def grad_reachable(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes that require grad under some frozen set: the parameters, inputs captured
    requiring grad, and the float results of differentiable ops that one of them reaches.  The
    analysis and the patterns ask this."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    reachable: set[str] = set()
    for n in gm.graph.nodes:
        if (n.op == "get_attr" and n.target in params) or _input_requiring_grad(n) or (
                n.op == "call_function" and is_differentiable(n) and has_float_value(n)
                and any(a.name in reachable for a in n.all_input_nodes)):
            reachable.add(n.name)
    return reachable
