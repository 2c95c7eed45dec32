"""Estimates for models that do not fit: a fine-tune's memory per GPU, from the model's config alone.

Takes a model (a ``models.KNOWN_MODELS`` name or a directory with the HuggingFace ``config.json`` of a
text model with one stack of repeated blocks), the batch per GPU, the sequence length, a precision
(``PRECISIONS``), a device type (``DEVICES``), an FSDP2 world size, a freeze ratio and an optimizer
(``memory.OPTIMIZERS``).  Gives an ``Estimate``: for the four ``SETTINGS`` (PyTorch and slimfit_fx,
each with and without checkpointing) the bytes per GPU by category, the peak of a step, one block's
share and notes on how each figure was modelled.  The model is built on fake tensors with 1 and with 2
blocks, each captured and priced: one block = (2) - (1), the model = (1) + (N - 1) x one block, term by
term; ``predict_at_depth`` captures any depth, to check that.
Never allocates the model's tensors, runs a step, reads weights, downloads anything, builds more than
two blocks, or silently applies one device's rules to another (the notes name what it cannot apply).
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

from .compiler import plan_for_graph
from .config import SlimFitConfig
from .memory import OPTIMIZERS, LayerEstimate, MemoryEstimate, device_workspace_bytes, fmt_bytes
from .models import CAUSAL_LM, DEFAULT_SEQ, SEQ_CLS, ModelError, frozen_layers, model_factory, text_inputs
from .trace import trace

__all__ = ["PRECISIONS", "DEVICES", "SETTINGS", "CATEGORIES", "EstimateError", "SettingEstimate", "Estimate",
           "DepthCapture", "estimate", "predict_at_depth", "check_world_size", "sharded_bytes", "plot"]

# precision -> (dtype of the parameters, autocast dtype or None)
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
    "fp16-autocast": (torch.float32, torch.float16),
    "bf16": (torch.bfloat16, None),
}
DEVICES = ("cpu", "cuda")
PLAIN, PLAIN_CKPT, SLIM, SLIM_CKPT = "PyTorch", "PyTorch + checkpointing", "slimfit_fx", "slimfit_fx + checkpointing"
SETTINGS = (PLAIN, PLAIN_CKPT, SLIM, SLIM_CKPT)
CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "static_activations", "dynamic_activations",
              "fsdp_working_set")
_SETTING_NOTES = {
    PLAIN: "eager PyTorch, every parameter trained",
    PLAIN_CKPT: "the same, every block checkpointed as HF's gradient_checkpointing_enable() does",
    SLIM: "slimfit_fx.compile(model, inputs, SlimFitConfig()), the frozen layers below",
    SLIM_CKPT: "the same, every block checkpointed",
}


class EstimateError(ValueError):
    """A model or setting the estimate cannot take; the message says what it can."""


@dataclass(frozen=True)
class _Options:
    batch: int
    seq: int
    precision: str
    device: str
    world_size: int
    freeze_ratio: float
    optimizer: str


@dataclass
class SettingEstimate(LayerEstimate):
    """One setting's predicted bytes per GPU (integers): ``LayerEstimate``'s categories for the whole
    model, plus buffers, FSDP2's unsharded working set and the peak; ``per_block``: one block's."""

    name: str = ""
    buffers: int = 0
    fsdp_working_set: int = 0
    peak: int = 0
    per_block: LayerEstimate = field(default_factory=LayerEstimate)
    note: str = ""

    @property
    def total(self) -> int:
        """The sum of the categories (a step's real high-water mark is ``peak``)."""
        return super().total + self.buffers + self.fsdp_working_set


@dataclass
class Estimate:
    """Four settings of one fine-tune, per GPU; ``render`` prints them, ``plot`` draws them."""

    model: str
    settings: dict
    depth: int
    parameter_count: int
    columns: list[SettingEstimate]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def column(self, name: str) -> SettingEstimate:
        """The setting called ``name``."""
        return next(c for c in self.columns if c.name == name)

    def to_dict(self) -> dict:
        """Everything, JSON-ready (``render("json")``)."""
        return {"model": self.model, "settings": self.settings, "depth": self.depth,
                "parameter_count": self.parameter_count, "seconds": round(self.seconds, 2),
                "columns": [{**asdict(c), "activations": c.activations, "total": c.total} for c in self.columns],
                "notes": self.notes}

    def render(self, fmt: str = "table") -> str:
        """The estimate as ``"table"``, ``"markdown"`` or ``"json"`` text."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2)
        from tabulate import tabulate

        tablefmt = {"table": "simple", "markdown": "github"}.get(fmt)
        if tablefmt is None:
            raise ValueError(f"unknown format {fmt!r}: use table, markdown or json")
        heading = f"slimfit-fx memory estimate: {self.model}, per GPU"
        out = [f"## {heading}" if fmt == "markdown" else heading,
               ", ".join(f"{k}={v}" for k, v in self.settings.items()), ""]
        align = ("left",) + ("right",) * len(self.columns)
        for title, rows in (("whole model", self._rows(False)), ("one block", self._rows(True))):
            out += [tabulate(rows, headers=[title] + [c.name for c in self.columns], tablefmt=tablefmt,
                             colalign=align), ""]
        out += [f"* {c.name}: {c.note}" for c in self.columns] + [f"* {n}" for n in self.notes]
        out.append(f"* Predicted, not measured, in {self.seconds:.1f} s.")
        return "\n".join(out)

    def _rows(self, per_block: bool) -> list[list[str]]:
        keys = list(CATEGORIES)
        if per_block:  # a block has no buffers of note and no working set of its own
            keys = [k for k in keys if k not in ("buffers", "fsdp_working_set")]
        elif self.settings.get("world size", 1) == 1:
            keys.remove("fsdp_working_set")
        rows = [[key.replace("_", " ")] + [fmt_bytes(getattr(c.per_block if per_block else c, key))
                                           for c in self.columns] for key in keys]
        if not per_block:
            rows.append(["sum of the above"] + [fmt_bytes(c.total) for c in self.columns])
            rows.append(["peak of a step"] + [fmt_bytes(c.peak) for c in self.columns])
        return rows


# ------------------------------------------------------------------ capture at a given depth


@dataclass
class DepthCapture:
    """The model at one depth, priced: ``estimates`` for PLAIN (nothing frozen) and SLIM (``frozen``)."""

    depth: int
    block_prefix: str  # e.g. "model.layers.": the repeated blocks are "<prefix><i>."
    estimates: dict[str, MemoryEstimate]
    frozen: set[str]
    trainable: dict[str, set[str]]  # setting -> trainable parameter names
    shapes: dict[str, tuple[tuple[int, ...], int]]  # parameter -> (shape, bytes), tied ones once
    parameter_count: int
    notes: list[str] = field(default_factory=list)


def predict_at_depth(model: str, depth: int | None = None, *, batch: int = 1, seq: int = DEFAULT_SEQ,
                     precision: str = "fp32", device: str = "cpu", freeze_ratio: float = 0.9,
                     optimizer: str = "adamw") -> DepthCapture:
    """``model`` with ``depth`` blocks (default: its config's), captured and priced on fake tensors."""
    options = _check_options(batch, seq, precision, device, 1, freeze_ratio, optimizer)
    config, make_model, task = _model_spec(model)
    return _capture(config, make_model, task, depth or _depth(config), options)


def _capture(config, make_model, task: str, depth: int, options: _Options) -> DepthCapture:
    device, notes = _capture_device(options.device)
    model, inputs = _build_fake(config, make_model, task, depth, options, device)
    prefix = _block_prefix(model, depth)
    _, autocast_dtype = PRECISIONS[options.precision]
    with torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
        gm = trace(model, inputs, dynamic=False)
    plans = {PLAIN: plan_for_graph(gm, None, model), SLIM: plan_for_graph(gm, SlimFitConfig(), model)}
    frozen = frozen_per_block(plans[PLAIN].layers, prefix, options.freeze_ratio)
    impl = "foreach" if options.device == "cuda" else "for-loop"  # what PyTorch picks on that device
    estimates = {PLAIN: plans[PLAIN].predict(set(), options.optimizer, optimizer_impl=impl),
                 SLIM: plans[SLIM].predict(frozen, options.optimizer, optimizer_impl=impl)}
    if options.device == "cuda" and device != "cuda":
        for e in estimates.values():  # CUDA's cuBLAS workspaces, which a CPU capture leaves out
            e.peak += device_workspace_bytes("cuda") - e.peak_detail["device_workspaces"]
            e.peak_detail["device_workspaces"] = device_workspace_bytes("cuda")
    shapes = {n: (tuple(p.shape), p.numel() * p.element_size()) for n, p in model.named_parameters()}
    return DepthCapture(
        depth=depth, block_prefix=prefix, estimates=estimates, frozen=frozen,
        trainable={PLAIN: set(plans[PLAIN].parameter_names), SLIM: plans[SLIM].trainable(frozen)},
        shapes=shapes, parameter_count=sum(p.numel() for p in model.parameters()), notes=notes)


def _model_spec(model: str):
    """(config, config -> model, task) of a text model with one stack of blocks, or ``EstimateError``."""
    try:
        config, make_model, task = model_factory(model)
    except ModelError as exc:
        raise EstimateError(str(exc)) from exc
    if task not in (CAUSAL_LM, SEQ_CLS):
        raise EstimateError(f"{model}: the estimate takes text models with one stack of repeated blocks "
                            f"(decoders and encoders), not a model with a {task} head")
    _depth(config)
    return config, make_model, task


def _depth(config) -> int:
    """The config's number of blocks (``num_hidden_layers``; GPT-2's ``n_layer`` maps onto it)."""
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 1:
        raise EstimateError(f"{type(config).__name__} has no num_hidden_layers: the estimate needs the "
                            "number of repeated blocks")
    return depth


def _at_depth(config, depth: int, dtype: torch.dtype):
    """A copy of ``config`` with ``depth`` blocks whose model is built in ``dtype``."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = depth
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):  # per-block attention kinds (sliding / full)
        config.layer_types = list(layer_types)[:depth]
    # transformers 5 builds in ``config.dtype`` (4.x: ``torch_dtype``), which a config.json may set to
    # its checkpoint's dtype: the precision asked for decides instead.
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    return config


def _build_fake(config, make_model, task: str, depth: int, options: _Options, device: str):
    """The model with ``depth`` blocks and its inputs, as fake tensors on ``device``: nothing allocated, but
    the device's own dispatch, so autocast's casts and the attention kernel are the device's (plain meta
    tensors get neither)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype, _ = PRECISIONS[options.precision]
    config = _at_depth(config, depth, dtype)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, _default_dtype(dtype), torch.device(device):
        model = make_model(config).train()
    with mode:
        try:
            inputs = text_inputs(config, task, options.batch, options.seq)
        except ModelError as exc:
            raise EstimateError(str(exc)) from exc
        inputs = {k: v.to(device) for k, v in inputs.items()}
    built = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if built != {dtype}:
        raise EstimateError(f"the model was built in {sorted(map(str, built))}, not {dtype}: its config sets "
                            "the dtype of some modules itself")
    return model, inputs


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _capture_device(device: str) -> tuple[str, list[str]]:
    """The device type the fake tensors claim, and what of ``device`` that leaves unmodelled."""
    if device != "cuda" or torch.cuda.is_available():
        return device, []
    return "cpu", [
        "--device cuda on a machine without CUDA: fake CUDA tensors need a CUDA build of torch, so the graph "
        "was captured with the CPU's rules (its autocast op lists, its attention kernel for these shapes, "
        "dropout masks at the activations' dtype where CUDA keeps 1 byte). CUDA's cuBLAS/cuBLASLt "
        f"workspaces ({fmt_bytes(device_workspace_bytes('cuda'))}, PyTorch's defaults for a Hopper GPU) and "
        "its default foreach AdamW are applied. Run the same command where torch.cuda.is_available() for "
        "CUDA's own kernel choices."]


def _block_prefix(model: nn.Module, depth: int) -> str:
    """``"model.layers."``: the ModuleList of ``depth`` blocks of one class holding the most parameters."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and name \
                and len({type(m) for m in module}) == 1:
            candidates.append((sum(p.numel() for p in module.parameters()), name))
    if not candidates:
        raise EstimateError(f"{type(model).__name__} has no ModuleList of {depth} blocks of one class: the "
                            "estimate extrapolates one repeated block")
    return max(candidates)[1] + "."


def frozen_per_block(layers: list[str], prefix: str, ratio: float) -> set[str]:
    """The CLI's frozen set (``models.frozen_layers``: floor(ratio x layers), seed 0), drawn once over one
    block's layers and applied to every block, and once over the layers outside the blocks.

    One draw over the whole model (the CLI's rule) could not be extrapolated from one block: the
    block would stand for whichever of its layers the draw happened to hit.  Drawn per block, every
    depth freezes the same share of the same kinds of layer.
    """
    in_block = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    matches = [(layer, in_block.match(layer)) for layer in layers]
    block = [m.group(2) for _, m in matches if m and m.group(1) == "0"]
    blocks = sorted({m.group(1) for _, m in matches if m})
    outside = [layer for layer, m in matches if not m]
    frozen_in_block = frozen_layers(block, ratio)
    return {f"{prefix}{i}.{rest}" for i in blocks for rest in frozen_in_block} | frozen_layers(outside, ratio)


# ------------------------------------------------------------------ extrapolation


def estimate(model: str, *, batch: int = 1, seq: int = DEFAULT_SEQ, precision: str = "fp32",
             device: str = "cpu", world_size: int = 1, freeze_ratio: float = 0.9,
             optimizer: str = "adamw") -> Estimate:
    """Per-GPU memory of fine-tuning ``model`` under the four ``SETTINGS``, from two captures."""
    start = time.perf_counter()
    options = _check_options(batch, seq, precision, device, world_size, freeze_ratio, optimizer)
    config, make_model, task = _model_spec(model)
    depth = _depth(config)
    one, two = (_capture(config, make_model, task, k, options) for k in (1, 2))
    block_shapes = {_any_block(name, two.block_prefix): shape for name, (shape, _) in two.shapes.items()
                    if name not in one.shapes}
    check_world_size(world_size, block_shapes)
    kept = batch * seq * config.hidden_size * PRECISIONS[precision][0].itemsize  # one block's input
    columns = []
    for name in SETTINGS:
        base = PLAIN if name in (PLAIN, PLAIN_CKPT) else SLIM
        t1, t2 = _terms(one, base, world_size), _terms(two, base, world_size)
        columns.append(_column(name, t1, t2, depth, kept if name in (PLAIN_CKPT, SLIM_CKPT) else None,
                               world_size))
    count = one.parameter_count + (depth - 1) * (two.parameter_count - one.parameter_count)
    return Estimate(
        model=model, settings=_settings(options, count, depth), depth=depth, parameter_count=count,
        columns=columns, seconds=time.perf_counter() - start,
        notes=one.notes + _notes(one, options, depth, kept) + _mixed_blocks_note(config))


def _any_block(name: str, prefix: str) -> str:
    """``model.layers.1.mlp.up_proj.weight`` -> ``model.layers.<i>.mlp.up_proj.weight``: every block's name."""
    return re.sub("^" + re.escape(prefix) + r"\d+\.", prefix + "<i>.", name)


def _check_options(batch, seq, precision, device, world_size, freeze_ratio, optimizer) -> _Options:
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"{name} must be a positive integer, got {value!r}")
    if precision not in PRECISIONS:
        raise EstimateError(f"unknown precision {precision!r}: choose one of {list(PRECISIONS)}")
    if device not in DEVICES:
        raise EstimateError(f"unknown device {device!r}: choose one of {list(DEVICES)}")
    if not 0.0 <= freeze_ratio < 1.0:
        raise EstimateError(f"freeze ratio must be in [0, 1), got {freeze_ratio!r}")
    if optimizer not in OPTIMIZERS:
        raise EstimateError(f"unknown optimizer {optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
    check_world_size(world_size, {})
    return _Options(batch, seq, precision, device, world_size, freeze_ratio, optimizer)


def check_world_size(world_size: int, block_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a world size FSDP2 cannot spread one block over.

    FSDP2 chunks each parameter on dim 0 (``torch.chunk``) and pads every rank's shard to the
    first chunk's ceil(dim0 / world size) rows, so a world size that does not divide dim 0 costs
    only padding (priced, and listed in the notes).  But when ceil-sized chunks run out before the
    ranks do, some ranks hold an empty shard of that parameter: for a block's parameters, that is
    a world size too large for the model, and the estimate says so rather than price it.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise EstimateError(f"world size must be a positive integer (the number of GPUs FSDP2 shards over), "
                            f"got {world_size!r}")
    short = []
    for name, shape in block_shapes.items():
        filled = _filled_ranks(shape[0], world_size) if shape else world_size
        if filled < world_size:
            short.append((filled, shape[0], name, shape))
    if short:
        filled, rows, name, shape = min(short)  # the fewest ranks filled; of those, the smallest dim 0
        limit = min(shape[0] for shape in block_shapes.values() if shape)
        raise EstimateError(
            f"world size {world_size} does not divide the block parameter {name} of shape {tuple(shape)} "
            f"among its ranks: FSDP2 shards dim 0 in chunks of ceil({rows}/{world_size}) = "
            f"{-(-rows // world_size)} rows, which fill only {filled} of the {world_size} ranks, so the others "
            f"would hold empty shards of every block. Use a world size of at most {limit} (the smallest dim 0 "
            "in a block) that leaves no rank empty, e.g. a divisor of it, or shard over fewer ranks (HSDP) "
            "and replicate across the rest")


def _filled_ranks(rows: int, world_size: int) -> int:
    """How many ranks ``torch.chunk(rows, world_size)`` gives a non-empty chunk, as FSDP2 shards dim 0."""
    size = -(-rows // world_size)
    return -(-rows // size) if rows else 0


def sharded_bytes(shapes: dict, names: set[str], world_size: int) -> int:
    """Bytes of the named parameters on FSDP2's fullest rank: each padded to ceil(dim0 / world) rows."""
    total = 0
    for name, (shape, nbytes) in shapes.items():
        if name in names:
            rows = max(shape[0], 1) if shape else 1
            total += nbytes * (-(-rows // world_size)) // rows
    return total


def _terms(capture: DepthCapture, setting: str, world_size: int) -> dict[str, int]:
    """What a plan predicts at one depth, as the terms its peak is made of (``MemoryPlan.predict``)."""
    e, d = capture.estimates[setting], capture.estimates[setting].peak_detail
    trainable = {n for n in capture.trainable[setting] if n in capture.shapes}
    return {
        "parameters": e.parameters, "buffers": e.buffers, "gradients": e.gradients,
        "optimizer_state": e.optimizer_state, "static_activations": e.static_activations,
        "dynamic_activations": e.dynamic_activations, "forward": d["forward"], "backward": d["backward"],
        "optimizer": d["optimizer"], "inputs": d["inputs"], "workspaces": d["device_workspaces"],
        "parameters_sharded": sharded_bytes(capture.shapes, set(capture.shapes), world_size),
        "gradients_sharded": sharded_bytes(capture.shapes, trainable, world_size),
    }


def _peak(t: dict[str, float]) -> int:
    """``MemoryPlan.predict``'s peak: what is always live, plus the largest phase."""
    fixed = t["parameters"] + t["buffers"] + t["optimizer_state"] + t["inputs"] + t["workspaces"]
    return round(fixed + max(t["forward"], t["backward"], t["optimizer"]))


def _column(name: str, t1: dict, t2: dict, depth: int, kept: int | None, world_size: int) -> SettingEstimate:
    """One setting at full depth from its depth-1 and depth-2 terms; ``kept``: bytes of a block's
    input when every block is checkpointed (None: no checkpointing)."""
    block = {k: t2[k] - t1[k] for k in t1}
    full = {k: t1[k] + (depth - 1) * block[k] for k in t1}
    if kept is not None:
        full = _checkpointed(full, t1, block, depth, kept)
    if world_size > 1:
        full = _fsdp2(full, t1, block)
    return SettingEstimate(
        name=name, **{c: round(full.get(c, 0)) for c in CATEGORIES}, peak=_peak(full),
        per_block=_per_block(block, kept, world_size), note=_SETTING_NOTES[name])


def _checkpointed(full: dict, t1: dict, block: dict, depth: int, kept: int) -> dict:
    """HF-style checkpointing of every block: a block keeps only its input, and in backward one block at
    a time is recomputed with its own saved activations (the depth-1 model's, outside activations
    included).  Upper bounds where the order of events matters:

    * forward: the depth-1 model's forward plus the other blocks' inputs;
    * backward: the depth-1 model's backward plus, for the other blocks, the larger of a kept input
      and a block's gradients (while block k is recomputed, the inputs of the blocks before it are
      still kept and the gradients of the blocks after it exist already).
    """
    out = dict(full)
    out["static_activations"] = t1["static_activations"] + depth * kept
    out["dynamic_activations"] = t1["dynamic_activations"]
    out["forward"] = t1["forward"] + (depth - 1) * kept
    out["backward"] = t1["backward"] + (depth - 1) * max(kept, block["gradients"])
    return out


def _fsdp2(full: dict, t1: dict, block: dict) -> dict:
    """Per GPU under FSDP2, ``fully_shard`` on each block and on the root (the documented recipe):
    parameters, gradients and optimizer state sharded (padded shards, the fullest rank); buffers and
    activations per GPU as they are.  The unsharded working set: the root group's parameters, which
    the root keeps from forward to the end of backward (``reshard_after_forward=False``), two blocks'
    (the one computing and the one prefetched), and the unsharded gradients waiting for their
    reduce-scatter (the root's until the end of backward, one block's at a time)."""
    outside = {k: t1[k] - block[k] for k in t1}
    gathered = outside["parameters"] + 2 * block["parameters"]
    unreduced = outside["gradients"] + block["gradients"]
    share = full["gradients_sharded"] / full["gradients"] if full["gradients"] else 0.0
    out = dict(full)
    out["parameters"] = full["parameters_sharded"]
    out["gradients"] = full["gradients_sharded"]
    out["optimizer_state"] = full["optimizer_state"] * share
    out["optimizer"] = full["optimizer"] * share  # sharded gradients and the step's temporaries
    out["forward"] = full["forward"] + gathered
    out["backward"] = full["backward"] - full["gradients"] + out["gradients"] + gathered + unreduced
    out["fsdp_working_set"] = gathered + unreduced
    return out


def _per_block(block: dict, kept: int | None, world_size: int) -> LayerEstimate:
    """One block's categories per GPU (under checkpointing it keeps only its input)."""
    sharded = world_size > 1
    share = block["gradients_sharded"] / block["gradients"] if sharded and block["gradients"] else 1.0
    return LayerEstimate(
        parameters=round(block["parameters_sharded"] if sharded else block["parameters"]),
        gradients=round(block["gradients_sharded"] if sharded else block["gradients"]),
        optimizer_state=round(block["optimizer_state"] * share),
        static_activations=round(block["static_activations"] if kept is None else kept),
        dynamic_activations=round(block["dynamic_activations"] if kept is None else 0),
    )


def _settings(options: _Options, count: int, depth: int) -> dict:
    return {"parameters": f"{count / 1e9:.2f} B", "blocks": depth, "batch per GPU": options.batch,
            "seq": options.seq, "precision": options.precision, "device": options.device,
            "world size": options.world_size, "optimizer": options.optimizer,
            "freeze ratio": options.freeze_ratio}


def _notes(one: DepthCapture, options: _Options, depth: int, kept: int) -> list[str]:
    prefix = one.block_prefix
    trained = sorted(n[len(prefix) + 2:] for n in one.trainable[SLIM]
                     if n.startswith(prefix + "0.") and n in one.shapes)
    outside = sorted(n for n in one.trainable[SLIM] if not n.startswith(prefix) and n in one.shapes)
    notes = [
        f"Extrapolated: the model built with 1 and 2 of its {depth} blocks on fake tensors (nothing "
        f"allocated), each captured and priced; one block = (2 blocks) - (1 block), the model = (1 block) + "
        f"{depth - 1} x one block, for each category and each phase of the peak.",
        f"Frozen in the slimfit_fx columns: floor({options.freeze_ratio} x layers) of one block's layers, "
        f"drawn with seed 0 and the same in every block, and of the layers outside the blocks. Trained in "
        f"every block: {', '.join(trained) or 'nothing'}; outside them: {', '.join(outside) or 'nothing'} "
        "(biases always train, as in slimfit-fx report). Optimizer state is counted for these only: with the "
        "Scheduler layers take turns, so that holds with Scheduler(frozen_state='offload'), which keeps the "
        "frozen layers' state on the host; with 'keep' it stays on the device.",
        f"Checkpointing: each block keeps its input ({fmt_bytes(kept)}, batch x seq x hidden at the "
        "parameters' dtype) and one block is recomputed at a time with its own saved activations; "
        "its peak is an upper bound (see slimfit_fx.estimate._checkpointed).",
    ]
    if options.world_size > 1:
        notes.append(_fsdp2_note(one, options.world_size))
    return notes


def _mixed_blocks_note(config) -> list[str]:
    """Blocks of different kinds (sliding and full attention) break the one-block premise: say so."""
    kinds = list(getattr(config, "layer_types", None) or [])
    if len(set(kinds)) <= 1:
        return []
    return [f"The config's blocks are not all alike ({', '.join(sorted(set(kinds)))}): every block "
            f"after the first was priced as the second, a {kinds[1]} one."]


def _fsdp2_note(one: DepthCapture, world_size: int) -> str:
    uneven = sorted(n for n, (shape, _) in one.shapes.items() if shape and shape[0] % world_size)
    note = (f"FSDP2 over {world_size} GPUs (fully_shard on each block and on the root): parameters, gradients "
            "and optimizer state sharded on dim 0; the working set is the root's unsharded parameters (kept "
            "from forward to the end of backward), two blocks' (computing and prefetched) and the unsharded "
            "gradients before their reduce-scatter. Activations are per GPU at the batch per GPU.")
    if uneven:
        note += (f" {len(uneven)} parameters have a dim 0 that {world_size} does not divide (e.g. {uneven[0]}): "
                 "FSDP2 pads their shards to ceil(dim0 / world size) rows, counted here.")
    return note


# ------------------------------------------------------------------ plot

_COLORS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer_state": "#c44e52",
           "static_activations": "#55a868", "dynamic_activations": "#8de5a1", "fsdp_working_set": "#937860"}
_PLOTTED = tuple(_COLORS)  # buffers (a few KiB) are drawn with the parameters


def _plotted_bytes(categories: LayerEstimate, category: str) -> int:
    if category == "parameters":
        return categories.parameters + getattr(categories, "buffers", 0)
    return getattr(categories, category, 0)


def plot(est: Estimate, path: str) -> None:
    """A PNG: memory by category per setting (stacked bars, the peak marked), and for one block."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install slimfit-fx[plot]") from None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    names = [c.name.replace(" + ", "\n+ ") for c in est.columns]
    for ax, per_block in zip(axes, (False, True)):
        bottom = [0.0] * len(est.columns)
        for cat in _PLOTTED:
            values = [_plotted_bytes(c.per_block if per_block else c, cat) / 2**30 for c in est.columns]
            if any(values):
                ax.bar(names, values, bottom=bottom, label=cat.replace("_", " "), color=_COLORS[cat])
                bottom = [b + v for b, v in zip(bottom, values)]
        if not per_block:
            ax.scatter(names, [c.peak / 2**30 for c in est.columns], marker="_", s=900, color="black",
                       label="peak of a step", zorder=3)
        ax.set_ylabel("GiB per GPU")
        ax.set_title("one block" if per_block else f"whole model ({est.depth} blocks)")
        ax.tick_params(axis="x", labelsize=8)
    axes[0].legend(fontsize=8)
    s = est.settings
    fig.suptitle(f"{est.model}: {s['parameters']} parameters, batch {s['batch per GPU']} x seq {s['seq']}, "
                 f"{s['precision']}, {s['device']}, world size {s['world size']}, {s['optimizer']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
