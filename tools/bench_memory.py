"""Memory and step time of one training step under each memory-saving setting, side by side.

Workloads (HF configs, random init, AdamW; ``--model``; ``--device cpu|cuda``; ``--precision``
fp32, bf16-autocast, fp16-autocast (``torch.autocast`` around the forward) or bf16 (the model cast)):
  bert-base   BertForSequenceClassification, batch 32, seq 128
  vit-base    ViTForImageClassification, batch 32, 224 px
  gpt2        GPT2LMHeadModel (small), batch 8, seq 512
(any other ``slimfit_fx.models`` name, e.g. bert-tiny, runs too; ``--batch``/``--seq`` shrink a run).

Settings (rows, ``--settings``), all on one model whose parameters they share:
  pytorch           plain eager PyTorch (sdpa attention), every parameter trained
  checkpointing     HF gradient checkpointing, non-reentrant
  selective-checkpointing  the same with torch's selective policy (create_selective_checkpoint_contexts:
                    matmuls and attention kept, the rest recomputed)
  torch.compile     torch.compile(model) with torch._functorch.config.activation_memory_budget=0.5
  pytorch+freeze    plain eager PyTorch, 90% of the SlimFit layers frozen at random (seed 0)
  slimfit-off       slimfit_fx.compile(model, inputs, SlimFitConfig.off()), same frozen set: the
                    rewrites off, the reference of the formats' step-time overhead
  slimfit           slimfit_fx.compile(model, inputs, SlimFitConfig()), same frozen set
  slimfit-paper     the same with SlimFitConfig.paper() (the paper's fixed-point formats)
  slimfit+offload   "slimfit_fx, everything on": slimfit as above, and the optimizer state of the
                    frozen parameters held by slimfit_fx.optim_state.FrozenStateStore (--offload-mode)
  slimfit+checkpoint  slimfit_fx.compile(model, inputs, checkpoint="all"): per-block capture, every
                    block recomputed in backward from its inputs, same frozen set
  slimfit+torch.compile  slimfit_fx.compile(model, inputs, mode="compiled"): the "slimfit" torch.compile
                    backend, same frozen set; compile time and step time against the eager slimfit row

Measured (slimfit_fx.measure): saved-activation bytes (``saved_bytes`` of a forward) and the peak of
a whole AdamW step (forward, backward, step, zero_grad) after a warm-up step (``peak_bytes``), split
into parameters / gradients / optimizer state / activations+temporaries (plus what is host-resident
at the peak: ``offloaded``).  Predicted: ``MemoryPlan.predict(frozen, optimizer).peak`` for the rows
with a plan.  Step time: ``--repeats`` interleaved rounds, one timed step per setting per round
(round-robin); a row's ratio to plain eager PyTorch (and to ``slimfit-off``) is the median over rounds of
its time over that row's in the same round; on CUDA each timed
step is bracketed by ``torch.cuda.synchronize()`` and the peak of ``torch.cuda.max_memory_allocated``
is reported beside the tracker's (other rows' optimizer state freed first).  A setting that fails (e.g. no C++
compiler for inductor) gets a row that says why; the others go on.

Writes ``<out>.json`` and ``<out>.md`` (default ``results/bench_memory_<model>``) with the machine,
versions, date and command line, and prints the markdown.

    python tools/bench_memory.py --model bert-base --batch 32 --repeats 3 --docs docs/BENCHMARKS.md
    python tools/bench_memory.py --model bert-tiny --batch 2 --repeats 1 --settings pytorch,slimfit
    python tools/bench_memory.py --model bert-base --batch 8 --repeats 7 \
        --settings pytorch,pytorch+freeze,slimfit-off,slimfit,slimfit-paper       # the formats' overhead
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from common import log  # noqa: E402

import slimfit_fx  # noqa: E402
from slimfit_fx import SlimFitConfig  # noqa: E402
from slimfit_fx.measure import fmt_bytes, peak_bytes, saved_bytes  # noqa: E402
from slimfit_fx.models import build  # noqa: E402
from slimfit_fx.optim_state import FrozenStateStore  # noqa: E402

WORKLOADS = {  # model -> (batch, seq): the configurations
    "bert-base": (32, 128),
    "vit-base": (32, None),
    "gpt2": (8, 512),
}
SETTINGS = {
    "pytorch": "plain eager PyTorch",
    "checkpointing": "HF gradient checkpointing",
    "selective-checkpointing": "torch selective checkpointing (matmuls and attention kept)",
    "torch.compile": "torch.compile, activation budget 0.5",
    "pytorch+freeze": "PyTorch + 90% frozen",
    "slimfit-off": "slimfit_fx off(), same frozen set",
    "slimfit": "slimfit_fx (default formats)",
    "slimfit-paper": "slimfit_fx (paper formats)",
    "slimfit+offload": "slimfit_fx, everything on",
    "slimfit+checkpoint": "slimfit_fx + checkpointing (--checkpoint)",
    "slimfit+torch.compile": "slimfit_fx through torch.compile",
}
ACTIVATION_MEMORY_BUDGET = 0.5
PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast", "bf16")
CONFIGS = {"slimfit-off": SlimFitConfig.off, "slimfit": SlimFitConfig, "slimfit-paper": SlimFitConfig.paper,
           "slimfit+checkpoint": SlimFitConfig}
# torch's selective activation checkpointing: keep what is costly to recompute, recompute the rest.
SELECTIVE_SAVE = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.linear.default",
                  "aten._scaled_dot_product_flash_attention_for_cpu.default",
                  "aten._scaled_dot_product_flash_attention.default",
                  "aten._scaled_dot_product_efficient_attention.default")


def _checkpoint(text: str):
    return "all" if text == "all" else int(float(text) * 2**20)


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    ops = []
    for qualified in SELECTIVE_SAVE:
        ns, name, overload = qualified.split(".")
        packet = getattr(getattr(torch.ops, ns), name, None)
        if packet is not None and hasattr(packet, overload):
            ops.append(getattr(packet, overload))
    return create_selective_checkpoint_contexts(ops)


class SettingFailed(Exception):
    """A setting cannot run here; the message says why (it becomes the row's note)."""


class Setting:
    """One row: how a step runs (module, frozen set, optimizer) and what was measured."""

    name = ""
    has_plan = False

    def __init__(self, bench: "Bench"):
        self.bench = bench
        self.frozen: set[str] = set()
        self.module = bench.model
        self.plan = None
        self.optimizer = None
        self.row: dict = {"setting": self.name, "label": SETTINGS[self.name], "status": "ok", "note": "",
                          "times": []}

    # what a setting changes; undone by the next setting's activate()
    def activate(self) -> None:
        """Apply this row's frozen set (gradients cleared) and turn HF checkpointing off."""
        b = self.bench
        for n, p in b.model.named_parameters():
            p.requires_grad_(n not in self.frozen)
        b.model.zero_grad(set_to_none=True)
        b.checkpointing(False)

    def context(self):
        """The context the forward runs in (none by default)."""
        return contextlib.nullcontext()

    def forward_loss(self):
        """The loss of one forward of this row's module on the bench's inputs."""
        with self.context(), self.bench.precision():
            return self.module(**self.bench.inputs).loss

    def step(self) -> None:
        """One training step: forward, backward, optimizer step, zero_grad(set_to_none=True)."""
        loss = self.forward_loss()
        loss.backward()
        del loss
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def setup(self) -> None:
        """Build what the setting needs (after activate()); raise SettingFailed to skip it."""
        self.optimizer = self.bench.optimizer_for(self.frozen)

    def after_warmup(self) -> None:
        """What the row changes once the warm-up step made the optimizer state (nothing by default)."""


class Plain(Setting):
    """Plain eager PyTorch, every parameter trained."""

    name, has_plan = "pytorch", True

    def setup(self):
        """The AdamW of every parameter and the plain model's plan."""
        super().setup()
        self.plan = self.bench.plain_plan


class Checkpointing(Setting):
    """HF gradient checkpointing, non-reentrant."""

    name, mode = "checkpointing", "full"

    def activate(self):
        """As Setting.activate, then HF checkpointing on in this row's mode."""
        super().activate()
        self.bench.checkpointing(self.mode)

    def setup(self):
        """Refuse a model without HF gradient checkpointing; else the AdamW."""
        if not getattr(self.bench.model, "supports_gradient_checkpointing", False):
            raise SettingFailed(f"{type(self.bench.model).__name__} does not support HF gradient checkpointing")
        super().setup()


class SelectiveCheckpointing(Checkpointing):
    """HF's checkpointing with torch's selective policy (``create_selective_checkpoint_contexts``)."""

    name, mode = "selective-checkpointing", "selective"


class Compiled(Setting):
    """torch.compile(model) under an activation memory budget."""

    name = "torch.compile"

    def context(self):
        """functorch's activation_memory_budget patched for the forward."""
        import torch._functorch.config as functorch_config

        return functorch_config.patch(activation_memory_budget=ACTIVATION_MEMORY_BUDGET)

    def setup(self):
        """The AdamW and the torch.compile'd model (compiled on the warm-up step)."""
        super().setup()
        self.module = torch.compile(self.bench.model)  # compiles on the warm-up step


class Freeze(Setting):
    """Plain eager PyTorch with the bench's random frozen set."""

    name, has_plan = "pytorch+freeze", True

    def __init__(self, bench):
        super().__init__(bench)
        self.frozen = bench.frozen

    def setup(self):
        """The AdamW of the trained parameters and the plain model's plan."""
        super().setup()
        self.plan = self.bench.plain_plan


class SlimFit(Freeze):
    """The same frozen set as ``pytorch+freeze``, through ``slimfit_fx.compile`` (``CONFIGS[name]``)."""

    name, has_plan = "slimfit", True

    def setup(self):
        """The AdamW and the slimfit_fx module of ``CONFIGS[name]`` with its plan."""
        Setting.setup(self)
        self.module = self.bench.slimfit_module(self.name)
        self.plan = self.module.plan


class SlimFitOff(SlimFit):
    """slimfit_fx with SlimFitConfig.off(): the rewrites off, same frozen set."""

    name = "slimfit-off"


class SlimFitPaper(SlimFit):
    """slimfit_fx with SlimFitConfig.paper(): the paper's formats, same frozen set."""

    name = "slimfit-paper"


class EverythingOn(SlimFit):
    """slimfit_fx with every memory feature on: SlimFit formats and freezing (as ``slimfit``)
    plus the optimizer state of the frozen parameters held off the device by
    ``slimfit_fx.optim_state.FrozenStateStore`` (``--offload-mode``).

    The extension point for features added later: build them in ``setup`` (before the warm-up
    step) or ``after_warmup`` (once optimizer state exists), and undo anything that outlives a
    step in ``activate`` of the other settings.
    """

    name = "slimfit+offload"

    def setup(self):
        """The slimfit module, an AdamW over every parameter and the FrozenStateStore."""
        self.module = self.bench.slimfit_module("slimfit")
        self.plan = self.module.plan
        # Its own optimizer over every parameter: the warm-up step trains all of them, so that
        # state exists for the frozen ones too, as after a scheduler has frozen them.
        model = self.bench.model
        self.optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-5)
        self.store = FrozenStateStore(self.optimizer, mode=self.bench.args.offload_mode)
        self._frozen_later = self.frozen
        self.frozen = set()

    def after_warmup(self):
        """Freeze the frozen set now and hand its optimizer state to the store."""
        self.frozen = self._frozen_later
        self.activate()  # requires_grad False and grad None on the frozen parameters
        params = dict(self.bench.model.named_parameters())
        self.store.freeze([params[n] for n in sorted(self.frozen)])
        self.row["store_bytes"] = self.store.nbytes()


class SlimFitCheckpoint(SlimFit):
    """slimfit_fx with per-block capture and blocks recomputed in backward (``--checkpoint``: every
    block, or the fewest that bring the saved activations within a budget), same frozen set."""

    name = "slimfit+checkpoint"

    def setup(self):
        """As SlimFit.setup; the note says how many blocks are recomputed."""
        super().setup()
        meta = self.module.graph_module.meta
        recomputed, blocks = meta.get("slimfit_recomputed", []), sum(n for _, n in meta.get("slimfit_blocks", []))
        args = self.bench.args
        self.row["note"] = (f"checkpoint={args.checkpoint}: {len(recomputed)} of {blocks} blocks recomputed, "
                            f"their inputs kept {args.checkpoint_input}")


class SlimFitCompiled(SlimFit):
    """``slimfit_fx.compile(model, inputs, mode="compiled")``: the same passes on the graph dynamo
    captures (the ``"slimfit"`` backend), same frozen set.  Its warm-up step includes dynamo's
    capture and the passes: the compile time, reported against the eager module's capture."""

    name = "slimfit+torch.compile"

    def setup(self):
        """The module slimfit_fx.compile(mode="compiled") makes, and its build time."""
        Setting.setup(self)
        t0 = time.perf_counter()
        with self.bench.precision():
            self.module = slimfit_fx.compile(self.bench.model, self.bench.inputs, SlimFitConfig(), mode="compiled")
        self.row["build_s"] = round(time.perf_counter() - t0, 2)
        self.plan = self.module.plan


SETTING_CLASSES = {cls.name: cls for cls in (Plain, Checkpointing, SelectiveCheckpointing, Compiled, Freeze,
                                             SlimFitOff, SlimFit, SlimFitPaper, EverythingOn, SlimFitCheckpoint,
                                             SlimFitCompiled)}
assert list(SETTING_CLASSES) == list(SETTINGS)


class Bench:
    """The model, inputs, plain plan and frozen set every row shares, and what rows build on them."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model, self.inputs = build(args.model, batch=args.batch, seq=args.seq, image_size=args.image_size)
        self.model.to(self.device).train()
        self.inputs = {k: v.to(self.device) for k, v in self.inputs.items()}
        if args.precision == "bf16":
            self.model.to(torch.bfloat16)
            self.inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in self.inputs.items()}
        with self.precision():
            self.plain_plan = slimfit_fx.analyze(self.model, self.inputs)
        layers = self.plain_plan.layers
        k = int(round(args.freeze_ratio * len(layers), 9))
        self.frozen = set(random.Random(args.seed).sample(layers, k))
        self.layers = layers
        self._optimizers: dict[frozenset, torch.optim.Optimizer] = {}
        self._slimfit: dict = {}
        self._checkpointing = False

    def checkpointing(self, mode) -> None:
        """HF gradient checkpointing off (False), ``"full"`` or ``"selective"`` (torch's policy, through
        HF's ``gradient_checkpointing_kwargs``).  transformers 5 calls it activation checkpointing and
        warns about the old names; the issue names the old call, which is the one used."""
        if mode == self._checkpointing:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model.gradient_checkpointing_disable()
            if mode:
                kwargs = {"use_reentrant": False}
                if mode == "selective":
                    kwargs["context_fn"] = _selective_context
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._checkpointing = mode

    def optimizer_for(self, frozen: set[str]) -> torch.optim.Optimizer:
        """One AdamW (PyTorch's default implementation) per frozen set, shared by the settings
        that train the same parameters: the state is the same, and memory is spared."""
        key = frozenset(frozen)
        if key not in self._optimizers:
            params = [p for n, p in self.model.named_parameters() if n not in frozen]
            self._optimizers[key] = torch.optim.AdamW(params, lr=1e-5)
        return self._optimizers[key]

    def precision(self):
        """``torch.autocast`` for the autocast precisions (around forwards and analyses), else nothing."""
        dtypes = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}
        if self.args.precision in dtypes:
            return torch.autocast(self.device.type, dtype=dtypes[self.args.precision])
        return contextlib.nullcontext()

    def slimfit_module(self, name: str):
        """The module ``slimfit_fx.compile`` makes with ``CONFIGS[name]`` (one per config, shared by rows)."""
        if name not in self._slimfit:
            t0 = time.perf_counter()
            with self.precision():
                config, kwargs = CONFIGS[name](), {}
                if name == "slimfit+checkpoint":
                    kwargs["checkpoint"] = self.args.checkpoint
                    if self.args.checkpoint_input == "exact":
                        config = dataclasses.replace(config, checkpoint_input_format=None)
                self._slimfit[name] = slimfit_fx.compile(self.model, self.inputs, config, **kwargs)
            if name == "slimfit":
                self.slimfit_capture_s = round(time.perf_counter() - t0, 2)
        return self._slimfit[name]

    def release_optimizers(self) -> None:
        """Free every optimizer's state (CUDA: so one row's state does not sit in the next row's
        ``max_memory_allocated``); the timed rounds make them again in their untimed round."""
        self._optimizers.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure(self, s: Setting) -> None:
        """Saved bytes, peak and prediction of setting ``s`` (warm-up step first)."""
        row, model = s.row, self.model
        s.activate()
        s.setup()
        s.activate()
        torch.manual_seed(1)
        t0 = time.perf_counter()
        s.step()  # warm-up: compiles (torch.compile) and creates the optimizer state
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        s.after_warmup()
        gc.collect()
        torch.manual_seed(1)
        row["saved"] = saved_bytes(s.forward_loss, params=model)
        gc.collect()
        torch.manual_seed(1)
        pm = peak_bytes(s.step, model=model, optimizer=s.optimizer, tensors=list(self.inputs.values()))
        row.update(peak=pm.peak, parameters=pm.parameters, gradients=pm.gradients,
                   optimizer_state=pm.optimizer_state, activations_temporaries=pm.other,
                   offloaded=pm.offloaded, baseline=pm.baseline,
                   cuda_max_allocated=pm.cuda_max_allocated)
        if s.name in ("torch.compile", "slimfit+torch.compile"):
            row["note"] = ("peak not measurable: under peak_bytes' TorchDispatchMode dynamo runs the model "
                           "eagerly (the original forward, unrewritten), so the figure would be eager PyTorch's"
                           + (" with the same frozen set" if s.name != "torch.compile" else ""))
            row["peak_is_eager"] = row.pop("peak")
            row["peak"] = None
        if s.name in ("checkpointing", "selective-checkpointing"):
            row["note"] = ("saved bytes: what autograd keeps outside the checkpointed blocks and their "
                           "boundaries as seen by saved-tensor hooks; the peak includes the recomputation")
        if s.name == "slimfit+checkpoint":
            row["note"] += ("; saved bytes: the blocks' inputs, as predicted; the predicted peak leaves out the "
                            "recomputed block's activations and temporaries in its backward")
        if s.plan is not None:
            est = s.plan.predict(s.frozen, s.optimizer)
            row["predicted_peak"] = est.peak
            row["predicted_saved"] = est.activations
            if row.get("cuda_max_allocated"):
                row["cuda_error_pct"] = 100 * (est.peak - row["cuda_max_allocated"]) / row["cuda_max_allocated"]
            row["predicted_phase"] = est.peak_detail.get("phase")
            row["dropout_mask_bytes"] = est.by_role.get("dropout_mask", 0)
            if row.get("peak"):
                row["peak_error_pct"] = 100 * (est.peak - row["peak"]) / row["peak"]
        row["frozen_layers"] = sum(1 for n in self.layers if n in s.frozen)


def _measure_rows(bench: "Bench", names: list[str], rows: dict) -> list:
    settings = []
    for name in names:
        s = SETTING_CLASSES[name](bench)
        rows[name] = s.row
        log(f"{name}: warm-up step, saved bytes, peak")
        try:
            bench.measure(s)
        except SettingFailed as e:
            s.row.update(status="skipped", note=str(e))
            print(f"{name}: skipped: {e}", flush=True)
        except Exception as e:  # noqa: BLE001  (e.g. inductor without a C++ compiler)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            s.row.update(status="failed", note=f"{type(e).__name__}: {first}")
            print(f"{name}: failed: {type(e).__name__}: {first}", flush=True)
        else:
            settings.append(s)
        if bench.device.type == "cuda" and name != "slimfit+offload":
            s.optimizer = None  # made again for the timed rounds
            bench.release_optimizers()
        gc.collect()
    return settings


def run(args) -> tuple[dict, Bench]:
    """Measure every row (the slimfit torch.compile row last), then time them; the rows and the bench."""
    bench = Bench(args)
    rows: dict = {}
    # Two torch.compile rows on one forward code object (inductor's and the slimfit backend's) make
    # dynamo recompile when they alternate (and once traced for minutes under saved_bytes' hooks):
    # the slimfit-backend row is built, measured and timed last, after a torch._dynamo.reset(),
    # interleaved with the eager slimfit row only.
    late = "slimfit+torch.compile"
    settings = _measure_rows(bench, [n for n in args.settings if n != late], rows)
    timed = [s for s in settings if not args.time_settings or s.name in args.time_settings]
    _timed_rounds(timed, args.repeats, "times")
    if late in args.settings:
        torch._dynamo.reset()
        compiled = _measure_rows(bench, [late], rows)
        eager = [s for s in settings if s.name == "slimfit"]
        if compiled and eager:
            _timed_rounds(eager + compiled, args.repeats, "times_vs_compiled")
        settings += compiled
    rows = {name: rows[name] for name in args.settings}  # the order asked for
    for p in bench.model.parameters():
        p.requires_grad_(True)
    bench.checkpointing(False)
    for s in settings:
        store = getattr(s, "store", None)
        if store is not None:
            store.close()
    return rows, bench


def _timed_rounds(settings: list, repeats: int, key: str) -> None:
    """One untimed round (recompiles after a torch._dynamo.reset()), then ``repeats`` interleaved
    rounds of one step per setting; the times go to ``row[key]``."""
    log(f"step times: an untimed round, then {repeats} interleaved rounds over {[s.name for s in settings]}")
    sync = torch.cuda.synchronize if any(s.bench.device.type == "cuda" for s in settings) else (lambda: None)
    for r in range(-1, repeats):
        for s in settings:
            s.activate()
            if s.optimizer is None:
                s.optimizer = s.bench.optimizer_for(s.frozen)
            gc.collect()
            sync()
            t0 = time.perf_counter()
            s.step()
            sync()
            if r >= 0:
                s.row.setdefault(key, []).append(time.perf_counter() - t0)
        if r >= 0:
            log(f"round {r + 1}: " + ", ".join(f"{s.name} {s.row[key][-1]:.2f}s" for s in settings))


def _paired_ratio(times: list, reference: list) -> float | None:
    """Median over rounds of this row's step time over the reference row's in the same round: pairs
    steps taken moments apart, so a machine that slows down or speeds up between rounds cancels out."""
    pairs = [t / r for t, r in zip(times, reference) if r]
    return statistics.median(pairs) if pairs else None


def summarize(rows: dict) -> None:
    """Add medians and the ratios to plain PyTorch (and to slimfit-off) to every row."""
    base = rows.get("pytorch", {})
    off = rows.get("slimfit-off", {})
    for r in rows.values():
        if r["times"]:
            r["time_median_s"] = statistics.median(r["times"])
            r["time_ratio"] = _paired_ratio(r["times"], base.get("times") or [])
            if off.get("times"):
                r["time_ratio_to_off"] = _paired_ratio(r["times"], off["times"])
        if r.get("peak") and base.get("peak"):
            r["peak_ratio"] = r["peak"] / base["peak"]
        if r.get("saved") is not None and base.get("saved"):
            r["saved_ratio"] = r["saved"] / base["saved"]
    eager, compiled = rows.get("slimfit", {}), rows.get("slimfit+torch.compile", {})
    if eager.get("times_vs_compiled") and compiled.get("times_vs_compiled"):
        ratio = _paired_ratio(compiled["times_vs_compiled"], eager["times_vs_compiled"])
        compiled["time_ratio_to_slimfit"] = ratio
        if eager.get("time_ratio") is not None:
            compiled["time_ratio"] = ratio * eager["time_ratio"]  # its own phase: via the eager slimfit row


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mib(n) -> str:
    """MiB with one decimal from 1 MiB up (peak errors of ~1% need the digits), else fmt_bytes."""
    if n is None:
        return "-"
    return f"{n / 2**20:,.1f} MiB" if abs(n) >= 2**20 else fmt_bytes(n)


def markdown(result: dict) -> str:
    """The result as a markdown section: facts, the table and notes."""
    a, m, v = result["args"], result["machine"], result["versions"]
    device, precision = a.get("device", "cpu"), a.get("precision", "fp32")
    where = f"device {result['gpu']}" if result.get("gpu") else f"device {device}"
    lines = [
        f"## bench_memory: {a['model']}, batch {a['batch']}"
        + (f", seq {a['seq']}" if a.get("seq") else "") + f", {precision}, {device}, AdamW (PyTorch default "
        "implementation)",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; machine: {m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch "
        f"threads), {where}; python {m['python']}, torch {v['torch']}, transformers {v['transformers']}",
        f"- frozen: {result['frozen_layers']}/{result['layers']} SlimFit layers at random (seed {a['seed']}) in "
        f"the freeze and slimfit rows; measured with slimfit_fx.measure (saved_bytes, peak_bytes of the second "
        f"step); step time: median over {a['repeats']} interleaved rounds of the ratio to the reference row's step "
        "in the same round" + (f" (rows timed: {', '.join(a['time_settings'])})" if a.get("time_settings") else ""),
        "",
    ]
    headers = ["setting", "saved act.", "peak", "params", "grads", "optimizer", "act.+temp.", "offloaded",
               "predicted peak", "pred. error", "peak vs pytorch", "saved vs pytorch", "step time vs pytorch"]
    cuda = any(r.get("cuda_max_allocated") for r in result["rows"].values())
    off = "slimfit-off" in result["rows"]
    if cuda:
        headers += ["CUDA max allocated", "pred. vs CUDA"]
    if off:
        headers.append("step time vs off()")
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    notes = []
    for name, r in result["rows"].items():
        if r["status"] != "ok":
            cells = [r["label"]] + ["-"] * (len(headers) - 1)
            cells[1] = f"{r['status']}: see note"
        else:
            err = r.get("peak_error_pct")
            cells = [
                r["label"], _mib(r.get("saved")), _mib(r.get("peak")),
                _mib(r.get("parameters")), _mib(r.get("gradients")), _mib(r.get("optimizer_state")),
                _mib(r.get("activations_temporaries")), _mib(r.get("offloaded") or 0),
                _mib(r.get("predicted_peak")),
                f"{err:+.1f}%" if err is not None else "-",
                _x(r.get("peak_ratio")), _x(r.get("saved_ratio")), _x(r.get("time_ratio")),
            ]
            if r.get("peak") is None:
                cells[3:8] = ["-"] * 5
            if cuda:
                err = r.get("cuda_error_pct")
                cells += [_mib(r.get("cuda_max_allocated")), f"{err:+.1f}%" if err is not None else "-"]
            if off:
                cells.append(_x(r.get("time_ratio_to_off")))
        lines.append("| " + " | ".join(cells) + " |")
        if r.get("note"):
            notes.append(f"- {r['label']}: {r['note']}")
        if name == "slimfit+offload" and r["status"] == "ok":
            notes.append(f"- {r['label']}: its AdamW holds state for every parameter (the warm-up step trained "
                         f"all of them); FrozenStateStore(mode={result['args'].get('offload_mode')!r}) keeps the "
                         f"frozen ones' ({_mib(r.get('offloaded'))} at the peak) host-resident, out of the device "
                         "peak; the other rows' optimizers never had state for frozen parameters.")
        if name == "slimfit+torch.compile" and r["status"] == "ok":
            eager = result["rows"].get("slimfit", {})
            compile_s = r.get("build_s", 0) + r.get("warmup_s", 0)
            capture_s = (result.get("slimfit_capture_s") or 0) + eager.get("warmup_s", 0)
            ratio = r.get("time_ratio_to_slimfit")
            notes.append(f"- {r['label']}: compile (build + first step, dynamo capture and the passes) "
                         f"{compile_s:.1f} s vs the eager module's capture + first step {capture_s:.1f} s; "
                         f"step time {_x(ratio)} the eager slimfit module's (interleaved rounds of those two after the "
                         f"others; its ratio to pytorch goes through slimfit's); saved "
                         f"bytes {_x(r['saved'] / eager['saved']) if eager.get('saved') else '-'} of it.")
    base = result["rows"].get("pytorch", {})
    if base.get("dropout_mask_bytes") and device == "cpu":
        notes.append(f"- CPU dropout keeps float32 masks ({_mib(base['dropout_mask_bytes'])} of plain "
                     "PyTorch's saved bytes; CUDA keeps 1-byte masks): savings on masks are CPU figures.")
    notes.append("- peak columns: live tensor storages at the step's peak (params + grads + optimizer + "
                 "act.+temp. = peak); offloaded: host-resident optimizer state live then, not in the peak.")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    """Measure every requested row (or only re-render a saved result) and write the JSON and markdown."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.render:
        return _render(args)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    _check_args(ap, args)
    out = Path(args.out or f"results/bench_memory_{_docs_key(vars(args)).replace(' ', '_')}")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.time()
    rows, bench = run(args)
    summarize(rows)
    result = _result(args, argv_used, rows, bench, started)
    md = markdown(result)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if args.docs:
        update_docs(Path(args.docs), _docs_key(vars(args)), md)
    return 0


def _parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring for the rows and workloads)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-base", help="bert-base, vit-base, gpt2 (or any slimfit_fx.models name)")
    ap.add_argument("--batch", type=int, default=None, help="default: the workload's (32, 32, 8)")
    ap.add_argument("--seq", type=int, default=None, help="text models; default: the workload's (128, 512)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--freeze-ratio", type=float, default=0.9)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random frozen set")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="comma-separated rows, of: " + ", ".join(SETTINGS))
    ap.add_argument("--time-settings", default=None,
                    help="comma-separated rows to time (default: every row); e.g. slimfit-off,slimfit,slimfit-paper "
                         "times the formats' overhead without a full-training step in the rounds")
    ap.add_argument("--offload-mode", choices=["offload", "compress"], default="offload",
                    help="FrozenStateStore mode of the slimfit+offload row")
    ap.add_argument("--checkpoint", default="all", type=_checkpoint,
                    help="slimfit+checkpoint row: 'all' blocks recomputed, or a budget in MiB for the saved "
                         "activations (the fewest blocks recomputed that meet it)")
    ap.add_argument("--checkpoint-input", choices=["int8", "exact"], default="int8",
                    help="slimfit+checkpoint row: the recomputed blocks' inputs kept in SlimFitConfig()'s int8 "
                         "format (the default) or exact (checkpoint_input_format=None)")
    ap.add_argument("--out", default=None, help="output path without suffix (default results/bench_memory_<model>)")
    ap.add_argument("--render", metavar="JSON", help="only re-render the markdown of a saved result (next to it)")
    ap.add_argument("--docs", default=None, metavar="MD",
                    help="also put the table into this page (e.g. docs/BENCHMARKS.md), between the markers "
                         "<!-- BEGIN bench_memory <model> --> and <!-- END bench_memory <model> -->")
    return ap


def _render(args) -> int:
    """--render: the markdown of a saved result, written next to it (and into --docs)."""
    path = Path(args.render)
    result = json.loads(path.read_text())
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    print(md)
    if args.docs:
        update_docs(Path(args.docs), _docs_key(result["args"]), md)
    return 0


def _check_args(ap: argparse.ArgumentParser, args) -> None:
    """Parse the row lists and fill the workload's batch and seq; ``ap.error`` on what cannot run."""
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown or not args.settings:
        ap.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    if "pytorch" not in args.settings:
        args.settings.insert(0, "pytorch")  # the reference of every ratio
    args.time_settings = [s.strip() for s in args.time_settings.split(",")] if args.time_settings else None
    if args.time_settings and set(args.time_settings) - set(args.settings):
        ap.error(f"--time-settings: {sorted(set(args.time_settings) - set(args.settings))} are not in --settings")
    batch, seq = WORKLOADS.get(args.model, (8, 128))
    args.batch = batch if args.batch is None else args.batch
    if "vit" not in args.model:
        args.seq = seq if args.seq is None else args.seq
    if args.repeats < 1 or args.batch < 1:
        ap.error("--repeats and --batch must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")


def _result(args, argv_used: list[str], rows: dict, bench: "Bench", started: float) -> dict:
    """The run's JSON document: command, date, machine, versions, frozen set and rows."""
    import transformers

    return {
        "command": "python tools/bench_memory.py " + shlex.join(argv_used),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "slimfit_fx": slimfit_fx.__version__},
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "args": vars(args),
        "layers": len(bench.layers),
        "frozen_layers": len(bench.frozen),
        "frozen": sorted(bench.frozen),
        "rows": rows,
        "slimfit_capture_s": getattr(bench, "slimfit_capture_s", None),
        "wall_s": round(time.time() - started, 1),
    }


def _docs_key(a: dict) -> str:
    """The marker name of a run's section: the model, then device and precision when not cpu/fp32,
    then the batch when it is not the workload's."""
    key = a["model"]
    if (a.get("device", "cpu"), a.get("precision", "fp32")) != ("cpu", "fp32"):
        key += f" {a['device']} {a['precision']}"
    if a.get("batch") != WORKLOADS.get(a["model"], (8, 128))[0]:
        key += f" batch {a['batch']}"
    return key


def update_docs(page: Path, model: str, md: str) -> None:
    """Replace (or append) the section of ``model`` in ``page`` between its markers."""
    begin, end = f"<!-- BEGIN bench_memory {model} -->", f"<!-- END bench_memory {model} -->"
    text = page.read_text() if page.exists() else ""
    block = f"{begin}\n{md.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    page.write_text(text)
    print(f"updated {page} ({model})")


if __name__ == "__main__":
    sys.exit(main())
