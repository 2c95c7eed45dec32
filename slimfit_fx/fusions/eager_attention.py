"""Pattern: attention written out in ops keeps Q, K, V and the probabilities quantized.

Matches ``matmul(P, v)`` where ``P`` is, through dtype casts and a ``p=0`` dropout,
``softmax(S [+ mask], -1)`` with ``S = matmul(q, transpose(k)) * scaling``, optionally soft-capped
as ``tanh(S / cap) * cap`` (Gemma2), and a mask that never requires grad.  Emits
``ops.attention_eager.eager_attention_quantized`` with the attention formats of the config
(Q/K in ``attn_qk_format``, V in ``attn_v_format``, P in ``attn_probs_format``).
"""
from __future__ import annotations

from slimfit_fx.extend import Fusion, register_pattern
from slimfit_fx.nodes import arg, cast_source, is_op, numel, value
from slimfit_fx.op_table import Save, format_for
from slimfit_fx.ops.attention_eager import eager_attention_quantized
from slimfit_fx.ops.saved import fmt_to_args


def _scalar_op(node, key):
    """``(tensor, scalar)`` of ``aten.<key>(tensor, scalar)``."""
    if is_op(node, key) and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1])
    return None


def _probs(p):
    """``(softmax node, inner nodes)`` behind ``p`` through casts and p=0 dropout."""
    inner = []
    while True:
        if cast_source(p) is not None:
            inner.append(p)
            p = cast_source(p)
        elif is_op(p, "aten.dropout") and (arg(p, 1, "p", 0.5) == 0 or not arg(p, 2, "train", True)):
            inner.append(p)
            p = p.args[0]
        else:
            break
    if not (is_op(p, "aten.softmax", "aten._softmax") and arg(p, 1, "dim") in (-1, value(p).dim() - 1)):
        return None
    return p, inner + [p]


def _softcap(s):
    """``(scores, cap, inner nodes)`` when ``s`` is ``tanh(scores / cap) * cap`` (Gemma2), else None."""
    capped = _scalar_op(s, "aten.mul")
    if capped is None or not is_op(capped[0], "aten.tanh") or not _scalar_op(capped[0].args[0], "aten.div"):
        return None
    tanh, cap = capped
    div = tanh.args[0]
    if _scalar_op(div, "aten.div")[1] != cap:
        return None
    return div.args[0], cap, [s, tanh, div]


def match(node, ctx):
    """The fusion of a written-out attention ending at ``node`` (``matmul(P, v)``), or None."""
    config = ctx.config
    if not (config.quantizes_attention and is_op(node, "aten.matmul") and len(node.args) == 2):
        return None
    found = _probs(node.args[0])
    if found is None:
        return None
    softmax, inner = found
    s, mask = softmax.args[0], None
    if is_op(s, "aten.add") and isinstance(s.args[1], type(s)) and not ctx.may_require_grad(s.args[1]):
        inner.append(s)
        s, mask = s.args
    softcap = None
    capped = _softcap(s)
    if capped is not None:
        s, softcap, cap_nodes = capped
        inner += cap_nodes
    scaled = _scalar_op(s, "aten.mul")
    if scaled is None or not is_op(scaled[0], "aten.matmul"):
        return None
    inner.append(s)
    scores, scaling = scaled
    q, kt = scores.args
    if not (is_op(kt, "aten.transpose") and len(kt.users) == 1):
        return None
    dims = sorted(d % value(kt).dim() for d in kt.args[1:3])
    if dims != [value(kt).dim() - 2, value(kt).dim() - 1]:
        return None
    inner += [scores, kt]
    k, v = kt.args[0], node.args[1]
    if value(q).dim() != 4 or value(k).shape != value(v).shape:
        return None
    qk_fmt, v_fmt = format_for(config.attn_qk_format, q), format_for(config.attn_v_format, v)
    p_fmt = format_for(config.attn_probs_format, softmax)
    probs_numel = numel(softmax)
    probs_item = value(node.args[0]).dtype.itemsize

    def kept(i, fmt, node_, role, when):
        if fmt is None:
            return Save("arg", i, when, role)
        return Save("arg", i, when, role, copy_bytes=fmt.nbytes(numel(node_)), fmt="q")

    def saves(ctx):
        probs = p_fmt.nbytes(probs_numel) if p_fmt is not None else probs_numel * probs_item
        return [kept(0, qk_fmt, q, "attn_qk", (0, 1)), kept(1, qk_fmt, k, "attn_qk", (0, 1)),
                kept(2, v_fmt, v, "attn_v", (0, 1)),
                Save("new", 0, (), "attn_probs", copy_bytes=probs, share="probs")]

    args = (q, k, v, mask, scaling, softcap, fmt_to_args(qk_fmt), fmt_to_args(v_fmt), fmt_to_args(p_fmt))
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return Fusion(node, tuple(sorted(set(inner), key=order.get)), eager_attention_quantized, args, saves,
                  note="eager attention core quantized" + (f", soft cap {softcap:g}" if softcap else ""))


register_pattern("eager_attention", match)
