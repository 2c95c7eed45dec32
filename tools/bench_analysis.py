#!/usr/bin/env python
"""Predicted vs measured memory of fine-tuning BERT-base and ViT-base (CPU, fp32).

For each model, ``slimfit_fx.analyze`` predicts the bytes saved for backward
under five frozen sets (nothing; the first half of ``plan.layers``; every other
layer; every parameter; a seeded random 90% of the layers), and each set is
measured on the real model in train mode (``measure.saved_bytes``: unique
non-parameter storages; one worker process per set, see
``saved_bytes_isolated``).  Acceptance bar: 2% on every set.

For ``--peak-sets`` (default: nothing frozen and random 90%) a real AdamW step
is measured too (``measure.peak_bytes`` of the second step: forward, backward,
step, ``zero_grad(set_to_none=True)``) and compared with
``MemoryEstimate.peak`` and with the formula proposed in ``proposed_peak``.
The step is instrumented (a watcher on the peak tracker, plus
saved-tensor and gradient hooks) to say where the peak happens and what is
live then: saved activations, gradients, transients (incoming gradients and op
outputs that are not saved), with the ops that made the largest transients.

    PYTHONPATH=. .venv/bin/python tools/bench_analysis.py                    # full run, ~6 min on 2 cores
    PYTHONPATH=. .venv/bin/python tools/bench_analysis.py --tiny --batch 8   # ~30 s
    PYTHONPATH=. .venv/bin/python tools/bench_analysis.py --skip-saved \
        --peak-sets none,bottom-half,every-other,random-90%,all --timeline   # the peak investigation

Prints tables and writes ``--json`` (default results/bench_analysis.json) with
versions, machine and command line; ``--timeline`` writes each instrumented
step's op-by-op timeline next to it.  Exit status 1 if a saved-bytes set fails.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from common import log  # noqa: E402
from tabulate import tabulate

from slimfit_fx import analyze
from slimfit_fx.measure import fmt_bytes, peak_bytes, running_tracker, saved_bytes

TOLERANCE = 0.02  # acceptance bar of the foundation issue: |predicted - measured| <= 2% of measured
SET_ORDER = ("none", "bottom-half", "every-other", "all", "random-90%")
MiB = 1 << 20


# ----------------------------------------------------------------------------- models


def build_bert(batch: int, seq: int, tiny: bool, seed: int):
    """BertForSequenceClassification (tiny or bert-base dimensions), a padded batch and its description."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if tiny:
        cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                         num_labels=2)
    else:
        cfg = BertConfig(num_labels=2)  # bert-base-uncased dimensions
    model = BertForSequenceClassification(cfg).train()
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):  # padding in some rows: row i has its last (i % 4) * 8 tokens masked
        k = min((i % 4) * 8, seq - 1)
        if k:
            attention_mask[i, seq - k:] = 0
    labels = torch.randint(0, 2, (batch,), generator=g)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    desc = f"BertForSequenceClassification({'tiny h128 L2' if tiny else 'bert-base'}), batch {batch}, seq {seq}"
    return model, inputs, desc


def build_vit(batch: int, image_size: int, tiny: bool, seed: int):
    """ViTForImageClassification (tiny or vit-base dimensions), a batch of images and its description."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if tiny:
        cfg = ViTConfig(image_size=image_size, patch_size=16, num_labels=10, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=512)
    else:
        cfg = ViTConfig(image_size=image_size, patch_size=16, num_labels=10)  # vit-base dimensions
    model = ViTForImageClassification(cfg).train()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g),
        "labels": torch.randint(0, 10, (batch,), generator=g),
    }
    desc = f"ViTForImageClassification({'tiny h128 L2' if tiny else 'vit-base'}), batch {batch}, {image_size} px"
    return model, inputs, desc


def frozen_sets(model, plan, seed: int) -> dict[str, set[str]]:
    """The five frozen sets, by name (SET_ORDER), over ``plan.layers``."""
    layers = plan.layers
    rng = random.Random(seed)
    return {
        "none": set(),
        "bottom-half": set(layers[: len(layers) // 2]),
        "every-other": set(layers[::2]),
        "all": {n for n, _ in model.named_parameters()},
        "random-90%": set(rng.sample(layers, round(0.9 * len(layers)))),
    }


def saved_bytes_isolated(key: str, args, frozen: set[str]) -> int:
    """``measure.saved_bytes`` of one forward, in a fresh worker process.

    ``measure.saved_bytes``'s pack hook returns the saved tensor itself; for an
    op that saves its own output (softmax, tanh, sigmoid) that makes a cycle
    tensor -> grad_fn -> SavedVariable -> tensor that Python's GC cannot see, so
    without a backward the whole graph leaks (about 1x the saved bytes per
    call: BERT-base batch 32 ran out of 24 GiB after four sets).  A worker
    takes the leak with it when it exits.  (Not a fork: libgomp hangs in a
    forked child once the parent has used OpenMP.)  The worker rebuilds the
    model from the same seed and gets the frozen names on stdin.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--saved-worker", key, "--batch", str(args.batch),
           "--seq", str(args.seq), "--image-size", str(args.image_size), "--seed", str(args.seed)]
    if args.tiny:
        cmd.append("--tiny")
    proc = subprocess.run(cmd, input=json.dumps(sorted(frozen)), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"saved-bytes worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["bytes"]


def saved_worker(key: str, args) -> int:
    """--saved-worker: saved bytes of one forward under the frozen names read on stdin, as JSON on stdout."""
    frozen = set(json.loads(sys.stdin.read()))
    model, inputs, _ = build(key, args)
    names = {n for n, _ in model.named_parameters()}
    if not frozen <= names:
        raise SystemExit(f"unknown parameter names {sorted(frozen - names)[:5]}")
    set_frozen(model, frozen)
    n = saved_bytes(lambda: model(**inputs).loss, params=model)
    print(json.dumps({"bytes": n}))
    return 0


def build(key: str, args):
    """The model, inputs and description of ``key`` (bert-base or vit-base) under ``args``."""
    if key == "bert-base":
        return build_bert(args.batch, args.seq, args.tiny, args.seed)
    return build_vit(args.batch, args.image_size, args.tiny, args.seed)


def set_frozen(model, frozen: set[str]) -> None:
    """requires_grad False on exactly the parameters named in ``frozen``."""
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


def error_pct(pred: int, meas: int) -> float | None:
    """(pred - meas) / meas in percent; None where it is undefined."""
    if meas == 0:
        return 0.0 if pred == 0 else None  # None: undefined (JSON has no infinity)
    return (pred - meas) / meas * 100


def pct(x: float | None, digits: int = 2) -> str:
    """A signed percentage with ``digits`` decimals, or n/a."""
    return "n/a" if x is None else f"{x:+.{digits}f}%"


def mb(n) -> str:
    """Bytes as MiB with one decimal: peak errors of ~1% need more digits than fmt_bytes gives."""
    return "n/a" if n is None else f"{n / MiB:,.1f} MiB"


# ----------------------------------------------------------------------------- peak anatomy


class StepAnatomy:
    """Watches ``measure.peak_bytes``'s tracker (``on_op``) and reads its live total after every op.

    Keeps, per op: phase, live bytes, saved activations still alive, parameter
    gradients alive.  Saved storages are those a pack hook saw during this step
    (role "other" in the tracker, i.e. not parameters); gradients those a
    post-accumulate-grad hook saw.
    """

    def __init__(self, live, keep_timeline: bool):
        self.live = live
        self.phase = "start"
        self.ops = Counter()
        self.phase_max: dict[str, int] = {}
        self.phase_end: dict[str, int] = {}
        self.saved: dict[int, object] = {}  # id(entry) -> entry
        self.saved_peak_total = 0
        self.largest_saved = 0
        self.grads: dict[int, object] = {}
        self.best = -1
        self.at_peak: dict = {}
        self.keep_timeline = keep_timeline
        self.timeline: list[tuple] = []
        self.producer: dict[int, tuple] = {}  # id(entry) -> (entry, phase, op index, op, shape)

    def pack(self, t):
        """Saved-tensor hook: the storages of ``t`` not live before the step are saved activations."""
        for e in self.live.entries(t):
            if e.role == "other" and id(e) not in self.saved and id(e) not in self.base_other:
                self.saved[id(e)] = e
                self.saved_peak_total += e.nbytes
                self.largest_saved = max(self.largest_saved, e.nbytes)
        return t.detach()  # not t itself: see saved_bytes_isolated (same storage, no cycle)

    def grad_hook(self, p):
        """Post-accumulate-grad hook: ``p.grad``'s storages are gradients."""
        if p.grad is not None:
            for e in self.live.entries(p.grad):
                self.grads[id(e)] = e

    def set_phase(self, phase: str) -> None:
        """The step enters ``phase`` (forward, backward, ...); the previous one ends here."""
        self.phase_end[self.phase] = self.live.current
        self.phase = phase

    def start(self):
        """Record the baseline: what is live before the step (inputs and buffers are its "other")."""
        self.base_other = {id(e) for e in self.live.live_entries() if e.role == "other"}
        self.base_other_bytes = sum(e.nbytes for e in self.live.live_entries() if e.role == "other")
        self.fixed = self.live.current  # params + state + inputs + buffers (grads are None after zero_grad)

    def on_op(self, func, outputs) -> None:
        """After each ATen op of the step, its outputs already counted by the tracker."""
        cur = self.live.current
        ph = self.phase
        if func is not torch.ops.aten.detach.default:  # pack's own detach is not an op of the step
            self.ops[ph] += 1
        if cur > self.phase_max.get(ph, -1):
            self.phase_max[ph] = cur
        for t in outputs:
            for e in self.live.entries(t):
                if id(e) not in self.producer:
                    self.producer[id(e)] = (e, ph, self.ops[ph], str(func).replace("aten.", ""), tuple(t.shape))
        if self.keep_timeline or cur > self.best:
            saved = sum(e.nbytes for e in self.saved.values())  # a freed entry's nbytes drops to 0
            grads = sum(e.nbytes for e in self.grads.values())
            if cur > self.best:
                self.best = cur
                self.at_peak = {"phase": ph, "op": str(func), "op_index_in_phase": self.ops[ph],
                                "live": cur, "saved_alive": saved, "gradients": grads,
                                "transient": cur - self.fixed - saved - grads}
            if self.keep_timeline:
                self.timeline.append((ph, str(func), cur, saved, grads))

    def summary(self, peak: int) -> dict:
        """Where and in which phase the step peaked, and what was live then (``peak``: peak_bytes's figure)."""
        at = dict(self.at_peak)
        if at.get("live") != peak:  # the watcher should see the very peak, right after the op that made it
            log(f"warning: anatomy saw a peak of {at.get('live')} B, peak_bytes {peak} B", rss=True)
        return {
            "at_peak": at,
            "baseline_other": self.base_other_bytes,
            "saved_in_step": self.saved_peak_total,
            "largest_saved": self.largest_saved,
            "phase_max": self.phase_max,
            "phase_end": self.phase_end,
            "ops_per_phase": dict(self.ops),
            "peak_set": self.peak_detail,
        }

    def peak_set(self) -> dict:
        """What was live at the peak (the tracker's lazily copied peak set), by kind; the
        largest transients with the op that made them."""
        kinds = Counter()
        transients = []
        for e, nbytes in self.live.peak_set():
            if e.role != "other":
                kinds[e.role] += nbytes
            elif id(e) in self.base_other:
                kinds["inputs+buffers"] += nbytes
            elif id(e) in self.saved:
                kinds["saved"] += nbytes
            else:
                kinds["transient"] += nbytes
                info = self.producer.get(id(e))
                info = info[1:] if info is not None and info[0] is e else ("?", 0, "?", ())
                transients.append((nbytes, *info))
        transients.sort(key=lambda x: -x[0])
        return {"by_kind": dict(kinds), "count": len(transients),
                "largest_transients": [{"bytes": b, "phase": ph, "op_index": i, "op": op, "shape": list(sh)}
                                       for b, ph, i, op, sh in transients[:12]]}


def measure_peak(model, inputs, anatomy: bool, keep_timeline: bool, adamw_impl: str = "default") -> dict:
    """peak_bytes of one AdamW step after a warm-up step, with the step's anatomy when ``anatomy``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}
    opt = torch.optim.AdamW(trainable, lr=1e-5, **impl[adamw_impl]) if trainable else None
    holder: dict = {}

    def step(an: StepAnatomy | None = None):
        def phase(name):
            if an is not None:
                an.set_phase(name)

        phase("forward")
        loss = model(**inputs).loss
        if loss.requires_grad:
            phase("backward")
            loss.backward()
        del loss
        if opt is not None:
            phase("optimizer.step")
            opt.step()
            phase("zero_grad")
            opt.zero_grad(set_to_none=True)
        phase("end")

    def instrumented():
        if not anatomy:
            return step()
        an = StepAnatomy(running_tracker(), keep_timeline)
        handles = [p.register_post_accumulate_grad_hook(an.grad_hook) for p in trainable]
        an.start()
        try:
            with torch.autograd.graph.saved_tensors_hooks(an.pack, lambda t: t), an.live.watch(an.on_op):
                step(an)
            an.peak_detail = an.peak_set()
        finally:
            for h in handles:
                h.remove()
        holder["an"] = an

    t0 = time.perf_counter()
    step()  # warm-up: creates the optimizer state
    gc.collect()
    t1 = time.perf_counter()
    pm = peak_bytes(instrumented, model=model, optimizer=opt, tensors=list(inputs.values()))
    t2 = time.perf_counter()
    out = {
        "peak": pm.peak, "baseline": pm.baseline, "end": pm.end, "parameters": pm.parameters,
        "gradients": pm.gradients, "optimizer_state": pm.optimizer_state, "other": pm.other,
        "inputs": sum(t.untyped_storage().nbytes() for t in inputs.values()),
        "buffers": sum(b.untyped_storage().nbytes() for b in model.buffers()),
        "warmup_step_s": round(t1 - t0, 2), "measured_step_s": round(t2 - t1, 2),
    }
    an = holder.get("an")
    if an is not None:
        out["anatomy"] = an.summary(pm.peak)
        if keep_timeline:
            out["timeline"] = an.timeline
    return out


# ----------------------------------------------------------------------------- proposed peak formula


def graph_facts(model, inputs) -> dict:
    """Sizes the proposed peak formula needs that a MemoryPlan does not expose: the largest op
    output of the forward graph, and which graph inputs are placeholders (by name)."""
    from slimfit_fx import trace

    gm = trace(model, inputs, dynamic=False)
    largest_out = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        for v in _tensors(n.meta.get("val")):
            largest_out = max(largest_out, v.numel() * v.element_size())
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    return {"largest_output": largest_out, "placeholders": sorted(placeholders)}


def _tensors(value):
    """The tensors in a node's value: a tensor, or a (nested) tuple or list of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def optimizer_transient(est, model, adamw_impl: str) -> tuple[int, str]:
    """Temporaries of one AdamW step, as measured: the for-loop version (PyTorch's default for
    CPU tensors) makes sqrt and div temporaries of one parameter at a time (2 x the largest
    trainable parameter); foreach (the default for CUDA) a sqrt of every exp_avg_sq of a group
    at once (1 x the gradients); fused none."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return 0, "none"
    if adamw_impl == "default":
        adamw_impl = "foreach" if all(p.is_cuda for p in trainable) else "for-loop"
    if adamw_impl == "foreach":
        return est.gradients, adamw_impl
    if adamw_impl == "fused":
        return 0, adamw_impl
    return 2 * max(p.numel() * p.element_size() for p in trainable), adamw_impl


def proposed_peak(plan, est, frozen: set[str], model, inputs, facts: dict, adamw_impl: str = "default") -> dict:
    """Peak of a step as proposed in the report (computed here only; not memory.py's formula):

        fixed    = parameters + buffers + optimizer state + input bytes not already saved
        backward = max over k of (saved bytes of layers 1..k + gradients of layers k+1..n) + 2 * L_act
                   (backward runs from layer n down: by the time it reaches layer k the gradients
                   above are complete and the activations above released; k = n is the start of
                   backward, A + 2 * L_act, k = 0 its end, G + 2 * L_act)
        forward  = 3 * L_out                        forward transients (what is left when little is saved)
        optim    = gradients + optimizer temporaries (optimizer_transient)
        peak     = fixed + max(backward, forward, optim)

    Layers in ``est.per_layer`` order (the model's parameter order, which is forward order for
    the HF models here).  L_act: largest saved tensor that is not a graph input (its gradient is
    computed); L_out: largest op output of the forward graph.
    """
    rows = plan.saved_tensors(frozen)
    placeholders = set(facts["placeholders"])
    saved_inputs = {r["producer"] for r in rows if r["producer"] in placeholders}
    inputs_unsaved = sum(t.untyped_storage().nbytes() for k, t in inputs.items() if k not in saved_inputs)
    l_act = max((r["bytes"] for r in rows if r["producer"] not in placeholders), default=0)
    fixed = est.parameters + est.buffers + est.optimizer_state + inputs_unsaved
    layers = list(est.per_layer.values())
    acts_below, grads_above = 0, sum(layer.gradients for layer in layers)
    envelope, at = grads_above, 0
    for k, layer in enumerate(layers, 1):
        acts_below += layer.activations
        grads_above -= layer.gradients
        if acts_below + grads_above > envelope:
            envelope, at = acts_below + grads_above, k
    backward = envelope + 2 * l_act if (est.activations or est.gradients) else 0
    forward = 3 * facts["largest_output"]
    opt_tmp, impl = optimizer_transient(est, model, adamw_impl)
    optim = est.gradients + opt_tmp if est.gradients else 0
    terms = {"backward": backward, "forward": forward, "optim": optim}
    names = list(est.per_layer)
    return {"peak": fixed + max(terms.values()), "fixed": fixed, **terms, "term": max(terms, key=terms.get),
            "envelope_boundary": names[at - 1] if at else "(end of backward)",
            "inputs_unsaved": inputs_unsaved, "largest_saved_activation": l_act,
            "largest_output": facts["largest_output"], "optimizer_transient": opt_tmp, "adamw_impl": impl}


# ----------------------------------------------------------------------------- one model


def run_model(key: str, args) -> dict:
    """Analyse one model, then measure and predict every requested frozen set."""
    t_model = time.perf_counter()
    model, inputs, desc = build(key, args)
    log(f"{key}: {desc}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"attn_implementation={model.config._attn_implementation}", rss=True)
    set_frozen(model, set())
    t0 = time.perf_counter()
    plan = analyze(model, inputs)
    analyze_s = time.perf_counter() - t0
    log(f"{key}: analyze {analyze_s:.1f} s, {len(plan.layers)} layers, unknown ops {plan.unknown_ops or 'none'}",
        rss=True)
    sets = frozen_sets(model, plan, args.seed)
    saved_rows = [saved_row(key, args, model, inputs, plan, name, sets[name])
                  for name in ([] if args.skip_saved else SET_ORDER)]
    peak_rows = []
    if not args.skip_peak:
        facts = graph_facts(model, inputs)
        peak_rows = [peak_row(key, args, model, inputs, plan, facts, name, sets[name]) for name in args.peak_sets]
    set_frozen(model, set())
    result = {
        "model": key, "description": desc, "parameters": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation, "layers": len(plan.layers),
        "unknown_ops": plan.unknown_ops, "analyze_s": round(analyze_s, 2),
        "saved": saved_rows, "peak": peak_rows, "wall_s": round(time.perf_counter() - t_model, 1),
    }
    del model, inputs, plan
    gc.collect()
    return result


def saved_row(key: str, args, model, inputs, plan, name: str, frozen: set[str]) -> dict:
    """Predicted and measured saved bytes of one frozen set (measured in a worker unless --in-process)."""
    set_frozen(model, frozen)
    est = plan.predict(frozen, optimizer="adamw")
    t0 = time.perf_counter()
    if args.in_process:
        meas = saved_bytes(lambda: model(**inputs).loss, params=model)
    else:
        meas = saved_bytes_isolated(key, args, frozen)
    dt = time.perf_counter() - t0
    gc.collect()
    err = error_pct(est.activations, meas)
    ok = abs(est.activations - meas) <= TOLERANCE * meas if meas else est.activations == 0
    n_layers = sum(1 for layer in plan.layers if layer in frozen)
    log(f"{key} {name}: predicted {fmt_bytes(est.activations)}, measured {fmt_bytes(meas)} "
        f"({pct(err, 3)}) in {dt:.1f} s (worker included)", rss=True)
    return {
        "set": name, "frozen_layers": n_layers, "frozen_parameters": est.frozen_parameters,
        "predicted": est.activations, "predicted_static": est.static_activations,
        "predicted_dynamic": est.dynamic_activations, "measured": meas, "error_pct": err,
        "pass": ok, "measure_s": round(dt, 2), "predicted_by_role": est.by_role,
    }


def peak_row(key: str, args, model, inputs, plan, facts: dict, name: str, frozen: set[str]) -> dict:
    """One frozen set's measured step peak (with its anatomy) against the predicted and the proposed."""
    set_frozen(model, frozen)
    est = plan.predict(frozen, optimizer="adamw")
    largest = max((r["bytes"] for r in plan.saved_tensors(frozen)), default=0)
    m = measure_peak(model, inputs, anatomy=not args.no_anatomy, keep_timeline=bool(args.timeline),
                     adamw_impl=args.adamw_impl)
    gc.collect()
    timeline = m.pop("timeline", None)
    if timeline is not None:
        path = Path(args.json).with_name(f"bench_timeline_{key}_{name.replace('%', 'pct')}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fixed": m["baseline"], "columns": ["phase", "op", "live", "saved_alive",
                                                                       "gradients"], "rows": timeline}))
        m["timeline_file"] = str(path)
    prop = proposed_peak(plan, est, frozen, model, inputs, facts, args.adamw_impl)
    row = {
        "set": name, "measured": m, "proposed": prop,
        "proposed_error_pct": error_pct(prop["peak"], m["peak"]),
        "predicted": {"peak": est.peak, "parameters": est.parameters, "buffers": est.buffers,
                      "gradients": est.gradients, "optimizer_state": est.optimizer_state,
                      "activations": est.activations, "largest_saved": largest},
        "error_pct": error_pct(est.peak, m["peak"]),
    }
    at = m.get("anatomy", {}).get("at_peak", {})
    log(f"{key} {name}: peak predicted {fmt_bytes(est.peak)}, measured {fmt_bytes(m['peak'])} "
        f"({pct(row['error_pct'])}), proposed {fmt_bytes(prop['peak'])} ({pct(row['proposed_error_pct'])}), "
        f"at {at.get('phase')} op #{at.get('op_index_in_phase')} "
        f"{at.get('op')}; step {m['measured_step_s']} s", rss=True)
    return row


# ----------------------------------------------------------------------------- printing


def print_tables(results: list[dict]) -> bool:
    """Print every model's tables; whether every saved-bytes set passed."""
    all_ok = True
    for r in results:
        print(f"\n== {r['description']}")
        rows = []
        for s in r["saved"]:
            all_ok &= s["pass"]
            rows.append([s["set"], s["frozen_layers"], s["frozen_parameters"], fmt_bytes(s["predicted_static"]),
                         fmt_bytes(s["predicted_dynamic"]), fmt_bytes(s["predicted"]), fmt_bytes(s["measured"]),
                         f"{s['measured']:,}", pct(s["error_pct"], 3), "PASS" if s["pass"] else "FAIL"])
        if rows:
            print("-- saved-for-backward bytes (activations), CPU fp32, train mode")
            print(tabulate(rows, headers=["frozen set", f"layers\nfrozen/{r['layers']}", "params\nfrozen",
                                          "predicted\nstatic", "predicted\ndynamic", "predicted\nsaved",
                                          "measured\nsaved", "measured\nbytes", "error", "2% bar"],
                           colalign=("left",) + ("right",) * 9))
        if not r["peak"]:
            continue
        print("\n-- peak of one AdamW step (forward, backward, step, zero_grad(set_to_none=True)), second step")
        rows = []
        for p in r["peak"]:
            m, e = p["measured"], p["predicted"]
            rows.append([p["set"], mb(e["peak"]), mb(m["peak"]), pct(p["error_pct"]),
                         mb(p["proposed"]["peak"]), pct(p["proposed_error_pct"]), p["proposed"]["term"],
                         mb(m["parameters"]), mb(m["gradients"]), mb(m["optimizer_state"]), mb(m["other"]),
                         mb(e["parameters"] + e["buffers"]), mb(e["gradients"]), mb(e["optimizer_state"]),
                         mb(e["activations"]), mb(e["largest_saved"])])
        print(tabulate(rows, headers=["frozen set", "predicted\npeak", "measured\npeak", "error",
                                      "proposed\npeak (*)", "proposed\nerror", "proposed\nterm",
                                      "meas. at peak\nparameters", "meas. at peak\ngradients",
                                      "meas. at peak\noptim. state", "meas. at peak\nother",
                                      "pred.\nparams+buffers", "pred.\ngradients", "pred.\noptim. state",
                                      "pred.\nactivations", "pred. largest\nsaved tensor"],
                       colalign=("left",) + ("right",) * 5 + ("left",) + ("right",) * 9))
        print("   (*) proposed formula, computed here only (see proposed_peak); predicted = MemoryPlan.predict().peak")
        rows = []
        for p in r["peak"]:
            an = p["measured"].get("anatomy")
            if not an:
                continue
            at, kinds, pm = an["at_peak"], an["peak_set"]["by_kind"], an["phase_max"]
            top = ", ".join(f"{t['op']}{tuple(t['shape'])} {mb(t['bytes'])}"
                            for t in an["peak_set"]["largest_transients"][:3])
            where = f"{at['phase']} op #{at['op_index_in_phase']}/{an['ops_per_phase'].get(at['phase'])}"
            rows.append([p["set"], where,
                         at["op"].replace("aten.", ""), mb(kinds.get("saved", 0)), mb(an["saved_in_step"]),
                         mb(kinds.get("gradients", 0)), mb(kinds.get("transient", 0)),
                         mb(kinds.get("inputs+buffers", 0)),
                         " / ".join(mb(pm.get(k)) for k in ("forward", "backward", "optimizer.step")), top])
        if rows:
            print("\n   where the peak happens (instrumented second step; ATen ops counted without detach)")
            print(tabulate(rows, headers=["frozen set", "peak at", "op", "saved alive\nat peak",
                                          "saved in\nstep", "grads alive\nat peak", "transient\nat peak",
                                          "inputs +\nbuffers", "max live in\nfwd / bwd / optim",
                                          "largest transients at peak"],
                           colalign=("left",) * 3 + ("right",) * 6 + ("left",)))
    return all_ok


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    """Run the requested models (or a saved-bytes worker), print the tables and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["bert-base", "vit-base", "all"], default="all")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128, help="BERT sequence length")
    ap.add_argument("--image-size", type=int, default=224, help="ViT image size (px)")
    ap.add_argument("--tiny", action="store_true", help="hidden 128, 2 layers instead of the base configs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peak", action="store_true", help="saved bytes only, no optimizer step")
    ap.add_argument("--skip-saved", action="store_true", help="peak only (for the peak investigation)")
    ap.add_argument("--peak-sets", default="none,random-90%",
                    help=f"comma-separated frozen sets to run a step on (of {', '.join(SET_ORDER).replace('%', '%%')})")
    ap.add_argument("--in-process", action="store_true",
                    help="measure saved bytes in this process, not in a worker per set (leaks each graph: "
                         "see saved_bytes_isolated)")
    ap.add_argument("--adamw-impl", choices=["default", "for-loop", "foreach", "fused"], default="default",
                    help="AdamW implementation for the peak step (default: PyTorch's choice, for-loop on CPU)")
    ap.add_argument("--no-anatomy", action="store_true", help="plain peak_bytes, no instrumentation of the step")
    ap.add_argument("--timeline", action="store_true", help="write each instrumented step's op-by-op timeline")
    ap.add_argument("--json", default="results/bench_analysis.json")
    ap.add_argument("--saved-worker", choices=["bert-base", "vit-base"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.saved_worker:
        return saved_worker(args.saved_worker, args)
    args.peak_sets = [s.strip() for s in args.peak_sets.split(",") if s.strip()]
    bad = [s for s in args.peak_sets if s not in SET_ORDER]
    if bad:
        ap.error(f"unknown frozen set(s) {bad}: choose from {', '.join(SET_ORDER)}")

    t_start = time.perf_counter()
    models = ["bert-base", "vit-base"] if args.model == "all" else [args.model]
    results = [run_model(k, args) for k in models]
    wall = time.perf_counter() - t_start
    all_ok = print_tables(results)
    verdict = "not measured (--skip-saved)" if args.skip_saved else ("PASS" if all_ok else "FAIL")
    print(f"\nsaved-bytes acceptance (2%): {verdict}; wall time {wall:.0f} s")

    doc = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "argv": sys.argv,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor(), "machine": platform.machine(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {k: v for k, v in vars(args).items()},
        "tolerance": TOLERANCE,
        "acceptance_pass": all_ok,
        "wall_s": round(wall, 1),
        "results": results,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {path}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
