"""The ``slimfit-fx`` command: how much memory fine-tuning a model takes, and what SlimFit saves.

Takes a command line: ``report`` (a model built offline and captured once; PyTorch, PyTorch + freezing
and SlimFit columns, predicted, and with ``--measure`` run and measured too), ``report --meta`` (an
estimate per GPU from the config alone: ``slimfit_fx.estimate``) or ``demo`` (``report --model
bert-base --batch 32 --seq 128 --measure``).  Gives the report on stdout, progress on stderr, and an
exit code: 0 done, 1 the library failed (e.g. the model cannot be captured), 2 a bad command line.
Never downloads anything, nor prints anything but the report on stdout.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from . import measure
from .compiler import compile, plan_for_graph
from .config import ConfigError, SlimFitConfig
from .estimate import DEVICES, PRECISIONS, EstimateError, estimate, plot
from .memory import OPTIMIZERS, MemoryPlan, MemoryReport, PlanError, ReportColumn, fmt_bytes
from .models import DEFAULT_SEQ, FREEZE_SEED, KNOWN_MODELS, ModelError, build, frozen_layers
from .trace import TraceError, trace

__all__ = ["main", "make_report", "frozen_layers"]

# Errors that mean "this model or setting cannot be analysed", not a bug: shown without a traceback.
_LIBRARY_ERRORS = (TraceError, PlanError, ConfigError, MemoryError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``slimfit-fx: error: ...``, exit code 2)."""

    def error(self, message: str):
        """Exit with code 2 and one line naming the problem."""
        self.exit(2, f"slimfit-fx: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _freeze_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bert-base", metavar="NAME|DIR",
                   help=f"one of {', '.join(KNOWN_MODELS)}, or a directory with a HuggingFace config.json "
                        "(built from the config with random weights, nothing downloaded; llama-1b needs "
                        "about 6 GB of RAM and half a minute to build) (default: %(default)s)")
    p.add_argument("--batch", type=_positive_int, default=32, help="rows per batch (default: %(default)s)")
    p.add_argument("--seq", type=_positive_int, default=DEFAULT_SEQ,
                   help="tokens per row, text models (default: %(default)s)")
    p.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                   help="pixels per side, vision models; a multiple of the patch size "
                        "(default: the model's, 224 for vit-base and vit-large)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                   help="optimizer whose state is counted and, with --measure, run (default: %(default)s)")
    p.add_argument("--freeze-ratio", type=_freeze_ratio, default=0.9, metavar="R",
                   help="fraction of layers (weight tensors) frozen: floor(R x layers), a random subset "
                        "drawn with seed 0 (default: %(default)s)")
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table",
                   help="output format (default: %(default)s)")
    p.add_argument("--measure", action="store_true",
                   help="also run and measure a training step of the PyTorch columns (seconds to minutes on CPU)")
    p.add_argument("--per-layer", action="store_true", help="add a row per layer")
    p.add_argument("--output", metavar="FILE", help="also write the report to FILE")


def _add_estimate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--meta", action="store_true",
                   help="estimate from the config alone, per GPU: the model built with 1 and 2 blocks on fake "
                        "tensors (nothing allocated) and extrapolated to its depth; seconds for a 70B config")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None,
                   help="with --meta: fp32, torch.autocast to bf16 or fp16 around fp32 parameters, or a bf16 "
                        "model (default: fp32)")
    p.add_argument("--device", choices=list(DEVICES), default=None,
                   help="with --meta: whose kernels, masks and workspaces are priced (default: cpu)")
    p.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                   help="with --meta: GPUs FSDP2 shards parameters, gradients and optimizer state over; "
                        "--batch is then per GPU (default: 1)")
    p.add_argument("--plot", metavar="FILE",
                   help="with --meta: also draw the estimate as a PNG (needs pip install slimfit-fx[plot])")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimfit-fx", description="Training-memory reports for SlimFit fine-tuning.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser("report", help="predict (and optionally measure) the memory of a training step",
                            description="Memory of one fp32 training step on CPU: plain PyTorch, PyTorch with "
                                        "frozen layers, and SlimFit (predicted). With --meta: an estimate per GPU "
                                        "from the config alone, in the precision, device and FSDP2 world size "
                                        "given, with and without activation checkpointing.")
    _add_report_options(report)
    _add_estimate_options(report)
    report.set_defaults(subparser=report)
    demo = sub.add_parser("demo", help="report --model bert-base --batch 32 --seq 128 --measure",
                          description="The report on BERT-base, batch 32, seq 128, measured (a few minutes on "
                                      "2 CPU cores); takes the options of 'report'.")
    _add_report_options(demo)
    demo.set_defaults(measure=True, subparser=demo)
    return parser


def _version() -> str:
    import transformers

    from . import __version__

    return f"slimfit-fx {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "meta", False):
            return _meta_report(args)
        _refuse_estimate_options(args)
        model, inputs = _build(args.subparser, args)
    except SystemExit as exc:  # argparse: --help (0) or a bad command line (2)
        return exc.code if isinstance(exc.code, int) else 1
    try:
        report = make_report(args.model, model, inputs, optimizer=args.optimizer,
                             freeze_ratio=args.freeze_ratio, run_steps=args.measure)
        text = report.render(args.format, per_layer=args.per_layer)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
    except _LIBRARY_ERRORS as exc:
        print(f"slimfit-fx: error: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _refuse_estimate_options(args) -> None:
    """The setting options speak only to --meta: the built report is one fp32 step on the CPU."""
    given = [f"--{name.replace('_', '-')}" for name in ("precision", "device", "world_size", "plot")
             if getattr(args, name, None) is not None]
    if given:
        args.subparser.error(f"{', '.join(given)} need(s) --meta (without it the report builds the model and "
                             "prices one fp32 step on the CPU)")


def _meta_report(args) -> int:
    """``report --meta``: the estimate of ``slimfit_fx.estimate``, printed, written and drawn."""
    if args.measure or args.per_layer or args.image_size:
        args.subparser.error("--meta estimates text models without building them: it takes neither --measure, "
                             "--per-layer nor --image-size")
    _progress(f"estimating {args.model} from its config (1 and 2 blocks on fake tensors) ...")
    try:
        est = estimate(args.model, batch=args.batch, seq=args.seq, precision=args.precision or "fp32",
                       device=args.device or "cpu", world_size=args.world_size or 1,
                       freeze_ratio=args.freeze_ratio, optimizer=args.optimizer)
    except EstimateError as exc:  # a model or setting it cannot take: the command line's fault
        args.subparser.error(str(exc))
    try:
        text = est.render(args.format)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        if args.plot:
            plot(est, args.plot)
    except (*_LIBRARY_ERRORS, ImportError) as exc:
        print(f"slimfit-fx: error: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _build(parser: argparse.ArgumentParser, args) -> tuple[nn.Module, dict]:
    """The model and inputs the options name; a name or size it cannot take is a command-line error."""
    import transformers

    transformers.logging.set_verbosity_error()  # config chatter would bury the report
    _progress(f"building {args.model} ...")
    try:
        return build(args.model, args.batch, seq=args.seq, image_size=args.image_size)
    except ModelError as exc:
        parser.error(str(exc))


def make_report(name: str, model: nn.Module, inputs: dict, *, optimizer: str = "adamw",
                freeze_ratio: float = 0.9, run_steps: bool = False) -> MemoryReport:
    """PyTorch / PyTorch + freezing / SlimFit report of ``model`` on ``inputs``."""
    _progress(f"capturing {type(model).__name__} ...")
    gm = trace(model, inputs, dynamic=False)
    plain = plan_for_graph(gm, None, model)
    compiled = compile(model, inputs, SlimFitConfig())
    slim = compiled.plan
    frozen = frozen_layers(plain.layers, freeze_ratio)
    k, t = len(frozen), len(plain.layers)
    columns = [
        ReportColumn("PyTorch", plain.predict(set(), optimizer), note="plain model, every parameter trained"),
        ReportColumn("PyTorch + freezing", plain.predict(frozen, optimizer),
                     note=f"{k} of {t} layers frozen with requires_grad=False"),
        ReportColumn("SlimFit", slim.predict(frozen, optimizer),
                     note="same frozen layers, slimfit_fx.compile(model, inputs, SlimFitConfig())"),
    ]
    if run_steps:
        for col, module, col_frozen in zip(columns, (model, model, compiled), (set(), frozen, frozen)):
            _progress(f"measuring {col.name} step (warm-up + measured step) ...")
            col.measured = measure_step(model, inputs, col_frozen, optimizer, module=module)
    return MemoryReport(
        title=f"slimfit-fx memory report: {name} ({type(model).__name__})",
        settings=_settings(model, inputs, optimizer, freeze_ratio, k, t),
        columns=columns,
        notes=_notes(plain, columns[0], model, freeze_ratio, k, t, run_steps) + _rewrite_notes(compiled),
        layer_names=plain.layers,
        frozen=frozen,
    )


def _settings(model: nn.Module, inputs: dict, optimizer: str, ratio: float, k: int, t: int) -> dict:
    param = next(model.parameters())
    if "pixel_values" in inputs:
        batch, _, size, _ = inputs["pixel_values"].shape
        shape = {"batch": batch, "image size": size}
    else:
        batch, seq = inputs["input_ids"].shape
        shape = {"batch": batch, "seq": seq}
    return {
        "parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M",
        **shape,
        "optimizer": optimizer,
        "freeze ratio": ratio,
        "frozen layers": f"{k}/{t}",
        "device": f"{param.device.type}, {str(param.dtype).removeprefix('torch.')}",
    }


def _notes(plain: MemoryPlan, base: ReportColumn, model: nn.Module, ratio: float, k: int, t: int,
           measured: bool) -> list[str]:
    notes = [
        f"Frozen: {k} of {t} layers (weight tensors), floor({ratio} x {t}), a random subset drawn with seed "
        f"{FREEZE_SEED}; SlimFit's scheduler picks them by training dynamics every iteration.",
        "SlimFit formats: int8 attention Q/K/V, uint8 softmax output, 4-bit GELU input, int8 FFN-out input "
        "while trainable, frozen LayerNorms keep the top 10% of |x_hat|, dropout masks replayed from the RNG "
        "state (5,056 B per call on CPU).",
    ]
    mask = base.estimate.by_role.get("dropout_mask", 0)
    if mask:
        size = next(model.parameters()).element_size()
        notes.append(
            f"Dropout masks: on CPU PyTorch keeps them in the activations' dtype ({fmt_bytes(mask)} of the "
            f"PyTorch column's saved activations); CUDA keeps 1-byte masks, {fmt_bytes(mask // size)}.")
    if plain.unknown_ops:
        notes.append(f"Ops not in the op table, counted as saving their inputs in full: {plain.unknown_ops}.")
    if measured:
        notes.append("Measured: unique storages saved for backward by a forward pass, and the peak of live "
                     "tensor storages over one training step after a warm-up step (slimfit_fx.measure).")
    return notes


def _rewrite_notes(compiled) -> list[str]:
    """What the passes did, counted by kind (e.g. where attention stayed on a fused kernel)."""
    counts = compiled.rewrite_notes()
    if not counts:
        return ["SlimFit rewrote nothing in this graph."]
    return ["SlimFit rewrites: " + "; ".join(f"{n} x {note}" for note, n in sorted(counts.items())) + "."]


# ------------------------------------------------------------------ measurement


def measure_step(model: nn.Module, inputs: dict, frozen: set[str], optimizer: str,
                 module: nn.Module | None = None) -> dict[str, int]:
    """Saved activations and step peak of ``model`` trained with ``frozen`` parameters frozen.

    ``module`` is what runs the step (``model`` itself, or its compiled form, which
    shares its parameters).  One warm-up step first, so the optimizer state exists
    and the measured step is a steady-state one; ``requires_grad`` is restored
    afterwards.
    """
    module = model if module is None else module
    with _frozen(model, frozen):
        opt = _optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])

        def step():
            module(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        peak = measure.peak_bytes(step, model=model, optimizer=opt, tensors=inputs.values())
        saved = measure.saved_bytes(lambda: module(**inputs).loss, params=model)
    return {"saved_activations": saved, "peak": peak.peak, "parameters": peak.parameters,
            "gradients": peak.gradients, "optimizer_state": peak.optimizer_state, "other": peak.other}


@contextmanager
def _frozen(model: nn.Module, frozen: set[str]) -> Iterator[None]:
    """``requires_grad=False`` on the parameters named in ``frozen``, True elsewhere, then restored."""
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {name: p.requires_grad for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for name in frozen:
            params[name].requires_grad_(False)
        yield
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])


def _optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``--optimizer`` names (the learning rate does not change memory)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-5)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9 if name == "sgd-momentum" else 0.0)


def _progress(message: str) -> None:
    """Progress on stderr, so stdout holds only the report (JSON stays parseable)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
