"""The step-peak model: the high-water mark of one training step, predicted from the analysis.

Takes a ``GraphAnalysis``, a trainable set, its active saves and an optimizer; gives the terms of
the peak over forward, backward and ``optimizer.step()`` on top of what is always live
(``peak_terms``), and the device's kernel workspaces (``device_workspace_bytes``).  Pure
arithmetic over the inventory: nothing runs, nothing is measured, the analysis is not changed.
The analysis knows the bytes of what ops save, not of every op output, so an op's transients are
modelled from the sizes of what it saves; ``tests/test_peak_model.py`` states the accuracy.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..analysis import GraphAnalysis
from ..op_table import MASK_ROLES, VIEW_OPS
from .optimizer import optimizer_temporaries

__all__ = ["peak_terms", "device_workspace_bytes"]

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
_FLOATS = ("float64", "float32", "float16", "bfloat16")
_KEPT_MASKS = {MASK_ROLES["bits"], MASK_ROLES["replay"]}  # slimfit's attention core with dropout
_PARAM_VIEWS = VIEW_OPS | {"aten.detach", "aten._to_copy"}


def device_workspace_bytes(device_type: str) -> int:
    """What the device's allocator holds for the kernels' own use once a matmul has run: on CUDA, the
    cuBLAS and cuBLASLt workspaces of the current stream, which PyTorch allocates through its caching
    allocator (so ``max_memory_allocated`` counts them).  Sizes follow PyTorch's rules:
    ``CUBLAS_WORKSPACE_CONFIG`` (``:KiB:count`` pairs; default ``:4096:2:16:8``, 32 MiB on Hopper) and
    ``TORCH_CUBLASLT_WORKSPACE_SIZE`` in KiB (default 32 MiB on Hopper, 4 MiB before it).  0 elsewhere."""
    if device_type != "cuda":
        return 0
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        fields = [int(f) for f in config.split(":") if f.strip().isdigit()]
        cublas = sum(size * count for size, count in zip(fields[::2], fields[1::2])) * 1024
    else:
        cublas = 32 * 2**20 if major == 9 else (4096 * 2 + 16 * 8) * 1024
    lt_kib = os.environ.get("TORCH_CUBLASLT_WORKSPACE_SIZE")
    cublaslt = int(lt_kib) * 1024 if lt_kib and lt_kib.isdigit() else (32 if major >= 9 else 4) * 2**20
    return cublas + cublaslt


@dataclass
class _Step:
    """What every term of one prediction reads: the analysis, its op order and the active saves."""

    a: GraphAnalysis
    active: list
    pos: dict[str, int]  # node -> forward position
    target: dict[str, Any]  # node -> its op key
    all_by_node: dict[str, list]  # node -> what it saves under any frozen set
    active_sids: set[int]
    n: int  # ops in the graph

    @classmethod
    def of(cls, a: GraphAnalysis, active: list) -> "_Step":
        all_by_node: dict[str, list] = {}
        for u in a.uses:
            all_by_node.setdefault(u.node, []).append(u)
        return cls(a=a, active=active, pos={n: i for i, n in enumerate(a.nodes)},
                   target={name[3:]: d.get("target") for name, d in a.graph.nodes(data=True) if name.startswith("op:")},
                   all_by_node=all_by_node, active_sids={u.storage for u in active}, n=len(a.nodes))


def peak_terms(a: GraphAnalysis, trainable: set[str], active: list, optimizer: str, impl: str) -> dict[str, Any]:
    """Terms of the predicted peak (bytes on top of parameters, buffers and optimizer state):
    ``forward``, ``backward`` and ``optimizer`` (see ``_forward_term``, ``_backward_term``,
    ``_optimizer_term``), the ``phase`` whose term is largest, and ``inputs``: input-batch bytes
    that are not saved (saved ones are activations)."""
    step = _Step.of(a, active)
    rg = a.requires_grad(trainable)
    forward, forward_ws, inputs, logits = _forward_term(step)
    backward, where, grad_bytes = _backward_term(step, trainable, rg)
    optim, opt_tmp = _optimizer_term(optimizer, impl, grad_bytes)
    terms = {"forward": forward, "backward": backward, "optimizer": optim}
    phase = max(terms, key=terms.get)
    return {**terms, "phase": phase, "backward_at": where, "inputs": inputs, "forward_working_set": forward_ws,
            "logits": logits, "optimizer_temporaries": opt_tmp, "optimizer_impl": impl}


# ------------------------------------------------------------------ forward


def _forward_term(step: _Step) -> tuple[int, int, int, int]:
    """(forward, its working set, unsaved input bytes, logits bytes).  ``forward``: every saved
    activation made so far plus the forward working set (the transients of two neighbouring layers,
    e.g. the GELU between the FFN's two Linears, plus a hidden state), a fusion's declared forward
    working memory, or, at the loss, every saved activation plus the logits and their log-softmax."""
    a = step.a
    inputs, logits, hidden, transient, region_end = _forward_transients(step)
    born = _saved_born(step)
    forward = forward_ws = 0
    for r in set(transient) | {r - 1 for r in transient}:
        ws = transient.get(r, 0) + transient.get(r + 1, 0)
        at = max(region_end.get(r, 0), region_end.get(r + 1, 0))
        if ws and born[at] + ws + hidden > forward:
            forward, forward_ws = born[at] + ws + hidden, ws + hidden
    for node, (fwd, _) in a.transients.items():  # a fusion's declared forward working memory
        if fwd is not None and node in step.pos:
            forward = max(forward, born[step.pos[node]] + fwd)
    acts = sum(a.storages[sid].nbytes for sid in step.active_sids)
    # At the loss: the logits and their log-softmax (kept when the logits need a gradient).
    forward = max(forward, acts + logits * (1 if any(u.role == "logprobs" for u in step.active) else 2))
    return forward, forward_ws, inputs, logits


def _forward_transients(step: _Step) -> tuple[int, int, int, dict[int, int], dict[int, int]]:
    """(unsaved input bytes, logits, largest hidden state, transient bytes per layer region, last
    forward position per region).  The tensors any op may keep under any frozen set are the
    forward's large tensors; those not kept at full precision under this frozen set are transient,
    grouped by layer (the op's nearest preceding weight)."""
    a = step.a
    inputs = logits = hidden = 0
    layer_index = {name: i for i, name in enumerate(a.layers)}
    transient: dict[int, int] = {}
    region_end: dict[int, int] = {}
    for st in a.storages:
        if a.nodes[st.producer].kind == "input":
            if st.index not in step.active_sids:
                inputs += st.nbytes
            continue
        if st.dtype not in _FLOATS:
            continue
        roles = {a.uses[i].role for i in st.uses}
        full = _full_bytes(st)
        if "logprobs" in roles:
            logits = max(logits, full)
            continue
        if "layernorm_input" in roles:
            hidden = max(hidden, full)
        if "attn_probs" in roles and not st.shape:
            full = max(full, _attention_forward_maps(step, st))
        if st.index in step.active_sids and full <= st.nbytes:
            continue  # kept for backward: counted with the saved activations
        if any(a.uses[i].role == "gelu_input" and step.target.get(a.uses[i].node) not in ("aten.gelu", None)
               for i in st.uses):
            full *= 3  # a tanh GELU spelled out in ops (GPT-2), fused by slimfit: its inner temporaries
        region = layer_index.get(a.nodes[st.producer].layer, -1) + 1
        transient[region] = transient.get(region, 0) + full
        region_end[region] = max(region_end.get(region, 0), step.pos[st.producer])
    return inputs, logits, hidden, transient, region_end


def _attention_forward_maps(step: _Step, st) -> int:
    """Bytes of the probability-sized maps slimfit's attention core makes in forward: SDPA itself
    (the math kernel, with dropout: scores, softmax, mask; without, a fused kernel: none) and, when
    it keeps P, the softmax recomputed."""
    node_uses = step.all_by_node[st.producer]
    dropout = any(u.role in _KEPT_MASKS for u in node_uses)
    maps = 3 if dropout else (2 if st.index in step.active_sids else 0)
    return maps * _probs_bytes(step.a, node_uses, {})


def _saved_born(step: _Step) -> list[int]:
    """born[i]: saved bytes made up to forward position i."""
    a = step.a
    born = [0] * (step.n + 1)
    for sid in step.active_sids:
        born[step.pos[a.storages[sid].producer]] += a.storages[sid].nbytes
    for i in range(1, step.n + 1):
        born[i] += born[i - 1]
    return born


# ------------------------------------------------------------------ backward


def _backward_term(step: _Step, trainable: set[str], rg: dict[str, bool]) -> tuple[int, str, dict[str, int]]:
    """(backward, the node where it peaks, gradient bytes per trainable parameter).  ``backward``:
    the maximum over the ops that keep tensors, walked in reverse graph order, of the saved tensors
    not yet released + the parameter gradients already accumulated + the op's transients (incoming
    gradient and the gradient it produces, about 2 x its largest saved tensor; dequantized copies of
    quantized ones; slimfit's attention core replayed by ``_attention_backward``)."""
    a = step.a
    by_node, saved_upto = _saved_until(step)
    grad_bytes, grads_from = _gradients_from(step, trainable)
    backward, where = 0, ""
    for node, uses in by_node.items():
        i = step.pos[node]
        declared = a.transients.get(node, (None, None))[1]
        w = declared if declared is not None else _backward_transients(
            a, node, uses, step.all_by_node[node], step.target.get(node), rg)
        here = saved_upto[i] + grads_from[i] + w
        if here > backward:
            backward, where = here, node
    return backward, where, grad_bytes


def _saved_until(step: _Step) -> tuple[dict[str, list], list[int]]:
    """(active saves by node, saved_upto): saved_upto[i] is the bytes of the storages whose earliest
    user is at or before forward position i; a storage is released once the backward of its
    earliest user (in forward order) has run."""
    a, n = step.a, step.n
    by_node: dict[str, list] = {}
    first_use: dict[int, int] = {}
    for u in step.active:
        by_node.setdefault(u.node, []).append(u)
        first_use[u.storage] = min(first_use.get(u.storage, n), step.pos[u.node])
    saved_from = [0] * (n + 1)
    for sid, p in first_use.items():
        saved_from[p] += a.storages[sid].nbytes
    saved_upto = [0] * n
    run = 0
    for i in range(n):
        run += saved_from[i]
        saved_upto[i] = run
    return by_node, saved_upto


def _gradients_from(step: _Step, trainable: set[str]) -> tuple[dict[str, int], list[int]]:
    """(gradient bytes per trainable parameter, grads_from): grads_from[i] is the bytes of the
    gradients of parameters last used at or after forward position i, since a parameter's gradient
    exists once the backward of its last consumer (looking through views of it) has run."""
    a, n = step.a, step.n
    alias: dict[str, str] = {}
    last_use: dict[str, int] = {}
    for name, info in a.nodes.items():
        param = info.param
        if param is not None:
            alias[name] = param
            continue
        ins = info.inputs
        if ins and ins[0] in alias and step.target.get(name) in _PARAM_VIEWS:
            alias[name] = alias[ins[0]]
            continue
        for i in ins:
            if i in alias:
                last_use[alias[i]] = step.pos[name]
    grad_bytes = {p: a.parameters[p][0] for p in trainable if p in a.parameters}
    grads_at = [0] * (n + 1)
    for p, nbytes in grad_bytes.items():
        grads_at[last_use.get(p, 0)] += nbytes
    grads_from = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        grads_from[i] = grads_from[i + 1] + grads_at[i]
    return grad_bytes, grads_from


def _backward_transients(a: GraphAnalysis, node: str, uses: list, all_uses: list, op: str | None,
                         rg: dict[str, bool]) -> int:
    """Transient bytes while the backward of ``node`` runs (see ``_backward_term``): ``uses`` are its
    saves under this frozen set, ``all_uses`` under any."""
    sts = {u.storage: a.storages[u.storage] for u in uses}
    roles = {u.role for u in uses}
    if op == "aten.scaled_dot_product_attention" and "attn_probs" in roles and (
            roles & _KEPT_MASKS or any(u.fmt == "q" for u in uses)):
        return _attention_core_backward(a, node, all_uses, sts, bool(roles & _KEPT_MASKS), rg)
    deq = 0
    top = 0
    for sid, st in sts.items():
        if a.nodes[st.producer].kind == "input" or st.dtype not in _FLOATS:
            continue
        full = _full_bytes(st)
        if full == st.nbytes and any(u.fmt in ("ln_pruned", "norm_pruned") for u in uses if u.storage == sid):
            full = _node_full(a, all_uses)  # pruned LayerNorm: x_hat is rebuilt at the input's size
        if full > st.nbytes:
            deq += full
        top = max(top, full)
    return deq + 2 * top


def _attention_core_backward(a: GraphAnalysis, node: str, all_uses: list, sts: dict, dropout: bool,
                             rg: dict[str, bool]) -> int:
    """Transients of slimfit's attention core: Q, K, V and P kept (maybe quantized), P recomputed."""
    full = {}
    for u in all_uses:
        if u.role in ("attn_qk", "attn_v"):
            st = a.storages[u.storage]
            full.setdefault(u.role, []).append(_full_bytes(st))
    qk = max(full.get("attn_qk", [0]))
    v = max(full.get("attn_v", [qk]))
    qk = qk or v
    ins = a.nodes[node].inputs if node in a.nodes else ()
    need = [rg.get(x, False) for x in ins[:3]] + [False] * (3 - len(ins[:3]))
    probs = _probs_bytes(a, all_uses, sts)
    return _attention_backward(qk, qk, v, probs, dropout, *need)


def _attention_backward(q: int, k: int, v: int, probs: int, dropout: bool, need_q: bool, need_k: bool,
                        need_v: bool) -> int:
    """Peak transient bytes of ``ops.attention._Attention.backward`` (slimfit's attention core),
    replayed statement by statement: q, k, v: bytes of Q, K, V (the incoming gradient and dQ,
    dK, dV are the size of Q); probs: bytes of the softmax output at full precision."""
    live = q  # incoming gradient
    live += (q if need_k else 0) + (k if need_q else 0) + (v if (need_q or need_k) else 0) + probs  # dequantized
    best = live + probs  # the row sums' quotient, made in place
    if dropout:
        best = max(best, live + probs + probs // 4)  # the mask's bytes, then as floats
        live += probs + q  # the 0/1 mask, dO scaled
    if need_v:
        best = max(best, live + (probs if dropout else 0) + v)  # dropped probabilities, dV
        live += v
    if need_q or need_k:
        best = max(best, live + 2 * probs)  # dP (the mask applied in place), then dS made from it
        live += probs  # dS; dP is freed
        if need_q:
            best = max(best, live + 2 * q)  # dS @ K, then * scale
            live += q
        if need_k:
            best = max(best, live + 2 * k)
            live += k
    return max(best, live)


# ------------------------------------------------------------------ optimizer


def _optimizer_term(optimizer: str, impl: str, grad_bytes: dict[str, int]) -> tuple[int, int]:
    """(optimizer, its temporaries): every gradient plus the step's temporaries
    (``optimizer_temporaries``); 0 when nothing trains."""
    grads = sum(grad_bytes.values())
    opt_tmp = optimizer_temporaries(optimizer, impl, list(grad_bytes.values()))
    return (grads + opt_tmp if grads else 0), opt_tmp


# ------------------------------------------------------------------ sizes


def _full_bytes(st) -> int:
    """Bytes of a saved storage once materialized at its dtype: a quantized or pruned copy is
    dequantized in backward.  A copy with no recorded shape counts as its stored bytes."""
    if not st.shape:
        return st.nbytes
    return max(st.nbytes, math.prod(st.shape) * _ITEMSIZE.get(st.dtype, 4))


def _node_full(a: GraphAnalysis, all_uses: list) -> int:
    """The largest tensor a node may keep under any frozen set, at full precision."""
    return max((_full_bytes(a.storages[u.storage]) for u in all_uses), default=0)


def _probs_bytes(a: GraphAnalysis, all_uses: list, sts: dict) -> int:
    """Softmax-output bytes of an attention node at full precision: batch x heads x queries x keys."""
    q = k = None
    item = 4
    for u in all_uses:
        if u.role == "attn_qk":
            st = a.storages[u.storage]
            if len(st.shape) >= 2:
                q = st.shape if q is None else q
                k = st.shape
                item = _ITEMSIZE.get(st.dtype, 4)
    if q is None:
        return max((st.nbytes for st in sts.values()), default=0)
    return math.prod(q[:-1]) * k[-2] * item
