"""MemoryPlan: what a training step keeps in memory, predicted for any frozen set.

Reads a ``GraphAnalysis`` (analysis.py) and prices it: parameters, gradients,
optimizer state, static and dynamic saved activations, per layer.  Pure
arithmetic over the inventory: nothing runs, nothing is measured here.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from .analysis import _VIEW_OPS, MASK_ROLES, GraphAnalysis
from .measure import fmt_bytes

__all__ = ["OPTIMIZERS", "OPTIMIZER_IMPLS", "LayerEstimate", "MemoryEstimate", "MemoryPlan", "PlanError",
           "MemoryReport", "ReportColumn", "fmt_bytes"]

# Bytes of optimizer state per byte of trainable parameter, and per-parameter extras.
# AdamW keeps exp_avg and exp_avg_sq (2x) plus a 0-d float32 ``step`` tensor per parameter.
OPTIMIZERS = {
    "adamw": (2, 4),
    "adam": (2, 4),
    "sgd-momentum": (1, 0),
    "sgd": (0, 0),
}

# How ``optimizer.step()`` runs, which decides its temporaries (see ``_optimizer_temporaries``):
# "for-loop" (PyTorch's default for CPU parameters), "foreach" (its default for CUDA ones), "fused".
OPTIMIZER_IMPLS = ("for-loop", "foreach", "fused")


class PlanError(ValueError):
    """Bad argument to a plan query (unknown parameter name, unknown optimizer)."""


@dataclass
class LayerEstimate:
    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    static_activations: int = 0
    dynamic_activations: int = 0

    @property
    def activations(self) -> int:
        return self.static_activations + self.dynamic_activations

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


@dataclass
class MemoryEstimate:
    """Predicted bytes of one training step with a given frozen set (all integers).

    ``total`` = parameters + buffers + gradients + optimizer_state + activations, the
    sum of the categories (gradients and all saved activations never coexist in
    full, so a step's real high-water mark is lower); ``peak`` models that
    high-water mark over forward, backward and ``optimizer.step()``, input batch
    included (see ``MemoryPlan.predict``); ``peak_detail`` gives its terms.
    """

    parameters: int
    buffers: int
    gradients: int
    optimizer_state: int
    static_activations: int
    dynamic_activations: int
    activations: int
    total: int
    peak: int
    frozen_parameters: int
    trainable_parameters: int
    per_layer: dict[str, LayerEstimate] = field(default_factory=dict)
    by_role: dict[str, int] = field(default_factory=dict)  # saved bytes per activation class
    peak_detail: dict[str, Any] = field(default_factory=dict)  # terms of ``peak`` (MemoryPlan.predict)

    def to_dict(self, per_layer: bool = True) -> dict:
        d = asdict(self)
        if per_layer:
            d["per_layer"] = {k: {**asdict(v), "activations": v.activations} for k, v in self.per_layer.items()}
        else:
            d.pop("per_layer")
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


class MemoryPlan:
    """Memory of a captured model, predicted for any frozen set before anything runs.

    Build it with ``slimfit_fx.analyze``.  ``predict(frozen=..., optimizer=...)``
    gives a ``MemoryEstimate``; ``analysis`` holds the saved-tensor inventory
    (``analysis.graph`` is the networkx dependency graph).
    """

    def __init__(self, analysis: GraphAnalysis, *, buffers_bytes: int = 0, description: str = ""):
        self.analysis = analysis
        self.buffers_bytes = buffers_bytes
        self.description = description

    # -- queries -------------------------------------------------------------------
    @property
    def parameter_names(self) -> list[str]:
        return list(self.analysis.parameters)

    @property
    def layers(self) -> list[str]:
        """SlimFit layers: the weight tensors the scheduler may freeze (the SlimFit paper's definition)."""
        return list(self.analysis.layers)

    @property
    def unknown_ops(self) -> dict[str, int]:
        """Ops not in the table, counted as saving every tensor argument in full."""
        return dict(self.analysis.unknown_ops)

    @property
    def config(self):
        return self.analysis.config

    def _check_names(self, names: Iterable[str]) -> set[str]:
        if isinstance(names, str):
            raise PlanError("frozen must be a collection of parameter names, not a single string")
        aliases = self.analysis.aliases
        names = {aliases.get(n, n) for n in names}
        known = self.analysis.parameters
        bad = sorted(n for n in names if n not in known)
        if bad:
            close = difflib.get_close_matches(bad[0], list(known), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise PlanError(
                f"unknown parameter name(s) {bad[:5]} in frozen set: use names from model.named_parameters(){hint}"
            )
        return names

    def trainable(self, frozen: Iterable[str]) -> set[str]:
        return set(self.analysis.parameters) - self._check_names(frozen)

    def predict(self, frozen: Iterable[str] = (), optimizer: "str | torch.optim.Optimizer" = "adamw", *,
                optimizer_impl: str | None = None) -> MemoryEstimate:
        """Bytes of a training step when the parameters named in ``frozen`` are frozen.

        ``optimizer``: one of ``OPTIMIZERS``, or a ``torch.optim`` optimizer
        (AdamW, Adam or SGD; its kind and implementation are read from it, its
        parameters and state are not); state is counted for trainable parameters
        only (the steady state of a fixed frozen set).  ``optimizer_impl``: how its
        step runs, one of ``OPTIMIZER_IMPLS``; it changes only ``peak`` (the step's
        temporaries).  Default: what PyTorch picks for CPU parameters, "for-loop"
        (for CUDA parameters PyTorch picks "foreach": say so, or pass the optimizer).
        """
        optimizer, impl = _resolve_optimizer(optimizer, optimizer_impl)
        state_factor, state_extra = OPTIMIZERS[optimizer]
        trainable = self.trainable(frozen)
        a = self.analysis

        per_layer = {name: LayerEstimate() for name in a.parameters}
        seen_storage: set[int] = set()
        for name, (nbytes, storage) in a.parameters.items():
            layer = per_layer[name]
            # Tied parameters share one storage: count its bytes once.
            if storage not in seen_storage:
                layer.parameters = nbytes
                seen_storage.add(storage)
            if name in trainable:
                layer.gradients = nbytes
                layer.optimizer_state = state_factor * nbytes + (state_extra if state_factor else 0)

        active = a.active_uses(trainable)
        by_storage: dict[int, list] = {}
        for use in active:
            by_storage.setdefault(use.storage, []).append(use)
        static = dynamic = 0
        by_role: dict[str, int] = {}
        for sid, uses in by_storage.items():
            nbytes = a.storages[sid].nbytes
            role = uses[0].role
            by_role[role] = by_role.get(role, 0) + nbytes
            statics = [u for u in uses if not u.dynamic]
            if statics:
                static += nbytes
                owner = a.layer_op.get(statics[0].node) or (a.layers[0] if a.layers else None)
                if owner is not None:
                    per_layer[owner].static_activations += nbytes
                continue
            dynamic += nbytes
            # A shared input (Q/K/V) is split evenly among the trainable layers that need it.
            owners = sorted({o for u in uses for o in u.owners if o in trainable})
            # Eager PyTorch keeps a frozen conv's input anyway (its bias is trainable):
            # the bytes still belong to that layer.
            owners = owners or sorted({o for u in uses for o in u.owners})
            share, rest = divmod(nbytes, len(owners))
            for i, o in enumerate(owners):
                per_layer[o].dynamic_activations += share + (rest if i == 0 else 0)

        params = sum(l.parameters for l in per_layer.values())
        grads = sum(l.gradients for l in per_layer.values())
        state = sum(l.optimizer_state for l in per_layer.values())
        acts = static + dynamic
        total = params + self.buffers_bytes + grads + state + acts
        detail = _peak(a, trainable, active, optimizer, impl)
        detail["device_workspaces"] = device_workspace_bytes(a.device)
        detail["fixed"] = params + self.buffers_bytes + state + detail["inputs"] + detail["device_workspaces"]
        peak = detail["fixed"] + detail[detail["phase"]]
        return MemoryEstimate(
            parameters=params, buffers=self.buffers_bytes, gradients=grads, optimizer_state=state,
            static_activations=static, dynamic_activations=dynamic, activations=acts, total=total, peak=peak,
            frozen_parameters=len(a.parameters) - len(trainable), trainable_parameters=len(trainable),
            per_layer=per_layer, by_role=dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
            peak_detail=detail,
        )

    def saved_tensors(self, frozen: Iterable[str] = ()) -> list[dict]:
        """Every storage saved for backward under this frozen set: producer, consumers,
        static/dynamic, owner layers, bytes, dtype (what ``slimfit-fx report`` lists)."""
        a = self.analysis
        trainable = self.trainable(frozen)
        by_storage: dict[int, list] = {}
        for use in a.active_uses(trainable):
            by_storage.setdefault(use.storage, []).append(use)
        rows = []
        for sid, uses in sorted(by_storage.items()):
            st = a.storages[sid]
            static = any(not u.dynamic for u in uses)
            rows.append({
                "producer": st.producer,
                "consumers": sorted({f"{u.node} ({u.op}: {u.role})" for u in uses}),
                "kind": "static" if static else "dynamic",
                "layers": sorted({o for u in uses for o in u.owners}),
                "bytes": st.nbytes,
                "dtype": st.dtype,
                "shape": list(st.shape),
            })
        return rows

    def layer_costs(self, frozen: Iterable[str] = (), optimizer: str = "adamw") -> dict[str, int]:
        """Bytes each SlimFit layer adds when trained (gradient, optimizer state, dynamic activations),
        for the scheduler's budget policy."""
        est = self.predict(frozen, optimizer)
        return {
            name: est.per_layer[name].gradients + est.per_layer[name].optimizer_state
            + est.per_layer[name].dynamic_activations
            for name in self.layers
        }


# ------------------------------------------------------------------ the peak of a step
#
# A step's peak is predicted by walking the analysis: what is live in forward, at
# each backward op and in ``optimizer.step()``, on top of what is always live
# (parameters, buffers, optimizer state, the input batch).  The analysis knows
# the bytes of every tensor some op may save (under any frozen set) and the
# order of the graph's ops, not the size of every op output, so the transients
# of an op (incoming gradient, the gradient it produces, dequantized copies, the
# temporaries of slimfit_fx's own backward formulas) are modelled from the
# sizes of what it saves.  ``tests/test_peak_model.py`` states the accuracy.


def device_workspace_bytes(device_type: str) -> int:
    """What the device's allocator holds for the kernels' own use once a matmul has run: on CUDA, the
    cuBLAS and cuBLASLt workspaces of the current stream, which PyTorch allocates through its caching
    allocator (so ``max_memory_allocated`` counts them).  Sizes follow PyTorch's rules:
    ``CUBLAS_WORKSPACE_CONFIG`` (``:KiB:count`` pairs; default ``:4096:2:16:8``, 32 MiB on Hopper) and
    ``TORCH_CUBLASLT_WORKSPACE_SIZE`` in KiB (default 32 MiB on Hopper, 4 MiB before it).  0 elsewhere."""
    import os

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


def _resolve_optimizer(optimizer, impl: str | None) -> tuple[str, str]:
    """(name in OPTIMIZERS, implementation in OPTIMIZER_IMPLS) from a name or a torch optimizer."""
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
        kinds = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam"}
        name = kinds.get(type(opt))
        if name is None and isinstance(opt, torch.optim.SGD):
            name = "sgd-momentum" if any(g.get("momentum", 0) for g in opt.param_groups) else "sgd"
        if name is None:
            raise PlanError(f"unknown optimizer {type(opt).__name__}: the plan knows AdamW, Adam and SGD; "
                            f"or pass one of {sorted(OPTIMIZERS)} by name")
        if impl is None:
            if opt.defaults.get("fused"):
                impl = "fused"
            elif opt.defaults.get("foreach") is not None:
                impl = "foreach" if opt.defaults["foreach"] else "for-loop"
            else:  # PyTorch's own choice for these parameters
                params = [p for g in opt.param_groups for p in g["params"]]
                try:
                    from torch.optim.optimizer import _default_to_fused_or_foreach

                    _, foreach = _default_to_fused_or_foreach(params, bool(opt.defaults.get("differentiable")),
                                                              False)
                except (ImportError, TypeError):
                    foreach = bool(params) and all(p.is_cuda for p in params)
                impl = "foreach" if foreach else "for-loop"
        optimizer = name
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
    impl = "for-loop" if impl is None else impl
    if impl not in OPTIMIZER_IMPLS:
        raise PlanError(f"unknown optimizer implementation {impl!r}: choose one of {list(OPTIMIZER_IMPLS)}")
    return optimizer, impl


def _optimizer_temporaries(optimizer: str, impl: str, trainable_bytes: list[int]) -> int:
    """Bytes ``optimizer.step()`` allocates and frees (AdamW/Adam: the denominator
    ``sqrt(exp_avg_sq) / bias_correction + eps``).  for-loop: a sqrt and a quotient of one
    parameter at a time (2 x the largest trainable parameter); foreach: the sqrt of every
    ``exp_avg_sq`` at once (1 x the trainable parameters), then updated in place; fused:
    none.  SGD, with or without momentum, updates in place."""
    if not trainable_bytes or optimizer not in ("adam", "adamw"):
        return 0
    if impl == "for-loop":
        return 2 * max(trainable_bytes)
    if impl == "foreach":
        return sum(trainable_bytes)
    return 0


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
_FLOATS = ("float64", "float32", "float16", "bfloat16")
_KEPT_MASKS = {MASK_ROLES["bits"], MASK_ROLES["replay"]}  # slimfit's attention core with dropout
_PARAM_VIEWS = _VIEW_OPS - {"aten.dropout"} | {"aten.detach", "aten._to_copy"}


def _full_bytes(st) -> int:
    """Bytes of a saved storage once materialized at its dtype: a quantized or pruned copy is
    dequantized in backward.  A copy with no recorded shape counts as its stored bytes."""
    if not st.shape:
        return st.nbytes
    return max(st.nbytes, math.prod(st.shape) * _ITEMSIZE.get(st.dtype, 4))


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


def _peak(a: GraphAnalysis, trainable: set[str], active: list, optimizer: str, impl: str) -> dict[str, Any]:
    """Terms of the predicted peak (bytes on top of parameters, buffers and optimizer state):

    * ``forward``: every saved activation plus the forward working set: 3 x the largest
      activation (its producer's input, itself and its consumer's output; eager code keeps a
      few more hidden states alive) when nothing is saved, 2 x otherwise, or, at the loss,
      the logits and their log-softmax;
    * ``backward``: the maximum over the ops that keep tensors, walked in reverse graph order,
      of the saved tensors not yet released + the parameter gradients already accumulated +
      the op's transients (incoming gradient and the gradient it produces, about 2 x its
      largest saved tensor; dequantized copies of quantized ones; slimfit's attention core
      replayed by ``_attention_backward``);
    * ``optimizer``: every gradient plus the step's temporaries (``_optimizer_temporaries``);
    * ``inputs``: input-batch bytes that are not saved (saved ones are activations).
    """
    order = a.order
    pos = {n: i for i, n in enumerate(order)}
    n = len(order)
    target = {name[3:]: d.get("target") for name, d in a.graph.nodes(data=True) if name.startswith("op:")}
    rg = a.requires_grad(trainable)

    # Forward: the tensors any op may keep under any frozen set are the forward's large
    # tensors.  Those not kept at full precision under this frozen set are transient; they are
    # grouped by layer (the op's nearest preceding weight) and a working set spans two
    # neighbouring layers (e.g. the GELU between the FFN's two Linears).
    active_sids = {u.storage for u in active}
    all_by_node: dict[str, list] = {}
    for u in a.uses:
        all_by_node.setdefault(u.node, []).append(u)
    inputs = logits = hidden = 0
    layer_index = {name: i for i, name in enumerate(a.layers)}
    transient: dict[int, int] = {}
    region_end: dict[int, int] = {}
    for st in a.storages:
        kind = a.node_kind.get(st.producer)
        if kind == "input":
            if st.index not in active_sids:
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
            # slimfit's attention core: SDPA itself (the math kernel, with dropout: scores, softmax,
            # mask; without, a fused kernel: none) and, when it keeps P, the softmax recomputed
            node_uses = all_by_node[st.producer]
            dropout = any(u.role in _KEPT_MASKS for u in node_uses)
            maps = 3 if dropout else (2 if st.index in active_sids else 0)
            full = max(full, maps * _probs_bytes(a, node_uses, {}))
        if st.index in active_sids and full <= st.nbytes:
            continue  # kept for backward: counted with the saved activations
        if any(a.uses[i].role == "gelu_input" and target.get(a.uses[i].node) not in ("aten.gelu", None)
               for i in st.uses):
            full *= 3  # a tanh GELU spelled out in ops (GPT-2), fused by slimfit: its inner temporaries
        region = layer_index.get(a.layer_op.get(st.producer), -1) + 1
        transient[region] = transient.get(region, 0) + full
        region_end[region] = max(region_end.get(region, 0), pos[st.producer])
    # Saved bytes made up to each forward position.
    born = [0] * (n + 1)
    for sid in active_sids:
        born[pos[a.storages[sid].producer]] += a.storages[sid].nbytes
    for i in range(1, n + 1):
        born[i] += born[i - 1]
    forward = forward_ws = 0
    for r in set(transient) | {r - 1 for r in transient}:
        ws = transient.get(r, 0) + transient.get(r + 1, 0)
        at = max(region_end.get(r, 0), region_end.get(r + 1, 0))
        if ws and born[at] + ws + hidden > forward:
            forward, forward_ws = born[at] + ws + hidden, ws + hidden

    # Saved bytes live at each backward position: a storage is released once the backward
    # of its earliest user (in forward order) has run.
    by_node: dict[str, list] = {}
    first_use: dict[int, int] = {}
    for u in active:
        by_node.setdefault(u.node, []).append(u)
        first_use[u.storage] = min(first_use.get(u.storage, n), pos[u.node])
    saved_from = [0] * (n + 1)
    acts = 0
    for sid, p in first_use.items():
        saved_from[p] += a.storages[sid].nbytes
        acts += a.storages[sid].nbytes
    saved_upto = [0] * n  # saved_upto[i]: bytes of storages whose earliest user is at or before i
    run = 0
    for i in range(n):
        run += saved_from[i]
        saved_upto[i] = run

    # Gradients live at each backward position: a parameter's gradient exists once the backward
    # of its last consumer (looking through views of it) has run.
    alias: dict[str, str] = {}
    last_use: dict[str, int] = {}
    for name in order:
        kind = a.node_kind.get(name, "")
        if kind.startswith("param:"):
            alias[name] = kind[6:]
            continue
        ins = a.node_inputs.get(name, ())
        if ins and ins[0] in alias and target.get(name) in _PARAM_VIEWS:
            alias[name] = alias[ins[0]]
            continue
        for i in ins:
            if i in alias:
                last_use[alias[i]] = pos[name]
    grad_bytes = {p: a.parameters[p][0] for p in trainable if p in a.parameters}
    grads_at = [0] * (n + 1)
    for p, nbytes in grad_bytes.items():
        grads_at[last_use.get(p, 0)] += nbytes
    grads_from = [0] * (n + 1)  # grads_from[i]: gradients of parameters last used at or after i
    for i in range(n - 1, -1, -1):
        grads_from[i] = grads_from[i + 1] + grads_at[i]
    grads = grads_from[0]

    for node, (fwd, _) in a.transients.items():  # a fusion's declared forward working memory
        if fwd is not None and node in pos:
            forward = max(forward, born[pos[node]] + fwd)
    backward, where = 0, ""
    for node, uses in by_node.items():
        i = pos[node]
        declared = a.transients.get(node, (None, None))[1]
        w = declared if declared is not None else _backward_transients(a, node, uses, all_by_node[node],
                                                                         target.get(node), rg)
        here = saved_upto[i] + grads_from[i] + w
        if here > backward:
            backward, where = here, node

    # At the loss: the logits and their log-softmax (kept when the logits need a gradient).
    forward = max(forward, acts + logits * (1 if any(u.role == "logprobs" for u in active) else 2))
    opt_tmp = _optimizer_temporaries(optimizer, impl, list(grad_bytes.values()))
    optim = grads + opt_tmp if grads else 0
    terms = {"forward": forward, "backward": backward, "optimizer": optim}
    phase = max(terms, key=terms.get)
    return {**terms, "phase": phase, "backward_at": where, "inputs": inputs, "forward_working_set": forward_ws,
            "logits": logits, "optimizer_temporaries": opt_tmp, "optimizer_impl": impl}


def _backward_transients(a: GraphAnalysis, node: str, uses: list, all_uses: list, op: str | None,
                         rg: dict[str, bool]) -> int:
    """Transient bytes while the backward of ``node`` runs (see ``_peak``): ``uses`` are its
    saves under this frozen set, ``all_uses`` under any."""
    sts = {u.storage: a.storages[u.storage] for u in uses}
    roles = {u.role for u in uses}
    if op == "aten.scaled_dot_product_attention" and "attn_probs" in roles and (
            roles & _KEPT_MASKS or any(u.fmt == "q" for u in uses)):
        # slimfit's attention core: Q, K, V and P kept (maybe quantized), P recomputed in backward.
        full = {}
        for u in all_uses:
            if u.role in ("attn_qk", "attn_v"):
                st = a.storages[u.storage]
                full.setdefault(u.role, []).append(_full_bytes(st))
        qk = max(full.get("attn_qk", [0]))
        v = max(full.get("attn_v", [qk]))
        qk = qk or v
        ins = a.node_inputs.get(node, ())
        need = [rg.get(x, False) for x in ins[:3]] + [False] * (3 - len(ins[:3]))
        probs = _probs_bytes(a, all_uses, sts)
        return _attention_backward(qk, qk, v, probs, bool(roles & _KEPT_MASKS), *need)
    deq = 0
    top = 0
    for sid, st in sts.items():
        kind = a.node_kind.get(st.producer)
        if kind == "input" or st.dtype not in _FLOATS:
            continue
        full = _full_bytes(st)
        if full == st.nbytes and any(u.fmt in ("ln_pruned", "norm_pruned") for u in uses if u.storage == sid):
            full = _node_full(a, all_uses)  # pruned LayerNorm: x_hat is rebuilt at the input's size
        if full > st.nbytes:
            deq += full
        top = max(top, full)
    return deq + 2 * top


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


# ------------------------------------------------------------------ the report


@dataclass
class ReportColumn:
    """One setting in a report: its prediction and, when a step was run, its measurement.

    ``measured`` keys: ``saved_activations`` and ``peak`` (bytes), optionally
    ``parameters``, ``gradients``, ``optimizer_state``, ``other`` at the peak.
    """

    name: str
    estimate: MemoryEstimate
    measured: dict[str, int] | None = None
    note: str = ""


_ROWS = [
    ("parameters", "parameters"),
    ("buffers", "buffers"),
    ("gradients", "gradients"),
    ("optimizer state", "optimizer_state"),
    ("static activations", "static_activations"),
    ("dynamic activations", "dynamic_activations"),
    ("saved activations", "activations"),
    ("sum of the above", "total"),
    ("peak of a step", "peak"),
]
# Measured rows: saved activations from saved_bytes; the rest is the breakdown of the
# step's peak (gradients at that moment may be partial, so they are not shown).
_MEASURED_ROW = {"activations": "saved_activations", "peak": "peak", "parameters": "parameters",
                 "optimizer_state": "optimizer_state"}


@dataclass
class MemoryReport:
    """Plain PyTorch vs SlimFit, predicted (and measured where a step ran), per layer.

    Every figure is labelled predicted or measured; ``render`` gives ``table``,
    ``markdown`` or ``json``.
    """

    title: str
    settings: dict
    columns: list[ReportColumn]
    notes: list[str] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    frozen: set[str] = field(default_factory=set)

    def totals_rows(self) -> tuple[list[str], list[list[str]]]:
        headers = ["bytes"]
        for col in self.columns:
            headers.append(f"{col.name}\npredicted")
            if col.measured is not None:
                headers += [f"{col.name}\nmeasured", "error"]
        base = self.columns[0].estimate
        if len(self.columns) > 1:
            headers.append(f"{self.columns[-1].name}\n/ {self.columns[0].name}")
        rows = []
        for label, attr in _ROWS:
            row = [label]
            for col in self.columns:
                pred = getattr(col.estimate, attr)
                row.append(fmt_bytes(pred))
                if col.measured is not None:
                    meas = col.measured.get(_MEASURED_ROW.get(attr, ""))
                    row.append(fmt_bytes(meas))
                    row.append(f"{(pred - meas) / meas * 100:+.1f}%" if meas else "-")
            if len(self.columns) > 1:
                last = getattr(self.columns[-1].estimate, attr)
                first = getattr(base, attr)
                row.append(f"{last / first:.2f}x" if first else "-")
            rows.append(row)
        return headers, rows

    def layer_rows(self) -> tuple[list[str], list[list[str]]]:
        plain, slim = self.columns[0].estimate, self.columns[-1].estimate
        headers = ["layer", "state", "parameters", "gradients", "optimizer", "static act.",
                   f"dynamic act.\n{self.columns[0].name}", f"dynamic act.\n{self.columns[-1].name}"]
        rows = []
        for name in self.layer_names:
            p, s = plain.per_layer[name], slim.per_layer[name]
            rows.append([name, "frozen" if name in self.frozen else "trained", fmt_bytes(p.parameters),
                         fmt_bytes(s.gradients), fmt_bytes(s.optimizer_state), fmt_bytes(s.static_activations),
                         fmt_bytes(p.dynamic_activations), fmt_bytes(s.dynamic_activations)])
        return headers, rows

    def to_dict(self, per_layer: bool = False) -> dict:
        return {
            "title": self.title,
            "settings": self.settings,
            "columns": [
                {"name": c.name, "note": c.note, "predicted": c.estimate.to_dict(per_layer=per_layer),
                 "measured": c.measured}
                for c in self.columns
            ],
            "frozen": sorted(self.frozen),
            "notes": self.notes,
        }

    def render(self, fmt: str = "table", per_layer: bool = False) -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(per_layer=per_layer), indent=2)
        from tabulate import tabulate

        tablefmt = {"table": "simple", "markdown": "github"}.get(fmt)
        if tablefmt is None:
            raise ValueError(f"unknown report format {fmt!r}: use table, markdown or json")
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        heading = f"## {self.title}" if fmt == "markdown" else self.title
        out = [heading, settings, ""]
        headers, rows = self.totals_rows()
        if fmt == "markdown":
            headers = [h.replace("\n", " ") for h in headers]
        out.append(tabulate(rows, headers=headers, tablefmt=tablefmt, colalign=("left",) + ("right",) * (len(headers) - 1)))
        col_notes = [f"{col.name}: {col.note}" for col in self.columns if col.note]
        if col_notes:
            out += [""] + [f"* {n}" for n in col_notes]
        if per_layer:
            headers, rows = self.layer_rows()
            if fmt == "markdown":
                headers = [h.replace("\n", " ") for h in headers]
            out += ["", tabulate(rows, headers=headers, tablefmt=tablefmt)]
        if self.notes:
            out += [""] + [f"* {n}" for n in self.notes]
        return "\n".join(out)
