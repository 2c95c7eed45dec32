"""Memory and step time of one training step, side by side in one run.

Settings (each a row), on one model whose parameters they all share:
  pytorch           plain eager PyTorch, every layer trained
  pytorch+freeze    plain eager PyTorch with the frozen set (what requires_grad=False gives for free)
  slimfit           slimfit_fx.compile with SlimFitConfig() (the paper's formats), same frozen set
  slimfit-minmax    slimfit_fx.compile with SlimFitConfig.minmax(), same frozen set

Measured: saved-activation bytes (slimfit_fx.measure.saved_bytes of a forward), the
peak of a whole AdamW step after a warm-up step (measure.peak_bytes), and the step
time as a ratio to plain PyTorch from interleaved runs (median of --repeats).
Predicted: the MemoryPlan's figures for the same frozen set.

    python tools/bench_memory.py --model bert-base --batch 32 --seq 128 --freeze-ratio 0.9
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from tabulate import tabulate

import slimfit_fx
from slimfit_fx import SlimFitConfig
from slimfit_fx.measure import fmt_bytes, peak_bytes, saved_bytes
from slimfit_fx.models import build

SETTINGS = {
    "pytorch": (None, False),
    "pytorch+freeze": (None, True),
    "slimfit": (SlimFitConfig(), True),
    "slimfit-minmax": (SlimFitConfig.minmax(), True),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Setting:
    """A module to step, its frozen set, its optimizer and its plan."""

    def __init__(self, name, model, inputs, config, frozen, plain_plan):
        self.name, self.model, self.inputs, self.frozen = name, model, inputs, frozen
        self.module = model if config is None else slimfit_fx.compile(model, inputs, config)
        self.plan = plain_plan if config is None else self.module.plan
        self.optimizer = None

    def activate(self):
        for n, p in self.model.named_parameters():
            p.requires_grad_(n not in self.frozen)
        self.model.zero_grad(set_to_none=True)
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)

    def step(self):
        loss = self.module(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def release(self):
        self.optimizer = None  # its state is large; measured settings re-create it


def run(args):
    torch.manual_seed(0)
    model, inputs = build(args.model, batch=args.batch, seq=args.seq, image_size=args.image_size)
    model.train()
    plain_plan = slimfit_fx.analyze(model, inputs)
    layers = plain_plan.layers
    frozen = set(random.Random(args.seed).sample(layers, int(round(args.freeze_ratio * len(layers), 9))))
    settings = [Setting(name, model, inputs, cfg, frozen if freeze else set(), plain_plan)
                for name, (cfg, freeze) in SETTINGS.items() if name in args.settings]

    rows = {}
    for s in settings:
        log(f"{s.name}: saved bytes and peak")
        s.activate()
        torch.manual_seed(1)
        saved = saved_bytes(lambda: s.module(**inputs).loss, params=model)
        s.step()  # warm-up: optimizer state exists from now on, as in a real run
        peak = peak_bytes(s.step, model=model, optimizer=s.optimizer, tensors=list(inputs.values()))
        est = s.plan.predict(s.frozen, optimizer="adamw")
        rows[s.name] = {
            "saved_measured": saved, "saved_predicted": est.activations,
            "peak_measured": peak.peak, "peak_predicted": est.peak,
            "peak_parameters": peak.parameters, "peak_gradients": peak.gradients,
            "peak_optimizer_state": peak.optimizer_state, "peak_other": peak.other,
            "dropout_mask_bytes": est.by_role.get("dropout_mask", 0), "times": [],
        }
        s.release()

    log(f"step times: {args.repeats} interleaved rounds")
    for r in range(args.repeats):
        for s in settings:
            s.activate()
            s.step()  # warm the optimizer state of this setting
            t0 = time.perf_counter()
            s.step()
            rows[s.name]["times"].append(time.perf_counter() - t0)
            s.release()
        log(f"round {r + 1}: " + ", ".join(f"{s.name} {rows[s.name]['times'][-1]:.1f}s" for s in settings))
    for p in model.parameters():
        p.requires_grad_(True)
    return rows, frozen, layers


def summarize(rows, args):
    base = rows["pytorch"]
    item = 4  # fp32 masks on CPU; CUDA keeps 1-byte masks
    base_saved_1byte_masks = base["saved_measured"] - base["dropout_mask_bytes"] + base["dropout_mask_bytes"] // item
    base_time = statistics.median(base["times"])
    table = []
    for name, r in rows.items():
        r["time_median_s"] = statistics.median(r["times"])
        r["time_ratio"] = r["time_median_s"] / base_time
        r["saved_ratio"] = base["saved_measured"] / r["saved_measured"]
        r["saved_ratio_vs_1byte_masks"] = base_saved_1byte_masks / r["saved_measured"]
        r["peak_ratio"] = base["peak_measured"] / r["peak_measured"]
        r["saved_error_pct"] = 100 * (r["saved_predicted"] - r["saved_measured"]) / r["saved_measured"]
        r["peak_error_pct"] = 100 * (r["peak_predicted"] - r["peak_measured"]) / r["peak_measured"]
        table.append([
            name, fmt_bytes(r["saved_measured"]), f"{r['saved_error_pct']:+.1f}%", f"{r['saved_ratio']:.2f}x",
            f"{r['saved_ratio_vs_1byte_masks']:.2f}x", fmt_bytes(r["peak_measured"]), f"{r['peak_error_pct']:+.1f}%",
            fmt_bytes(r["peak_parameters"]), fmt_bytes(r["peak_gradients"]), fmt_bytes(r["peak_optimizer_state"]),
            fmt_bytes(r["peak_other"]), f"{r['peak_ratio']:.2f}x", f"{r['time_ratio']:.2f}x",
        ])
    headers = ["setting", "saved act.", "pred. err", "saved vs\npytorch", "vs pytorch,\n1-byte masks",
               "peak", "pred. err", "params", "grads", "optimizer", "act.+temp.", "peak vs\npytorch",
               "step time\nvs pytorch"]
    return table, headers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--freeze-ratio", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random frozen set")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ",".join(SETTINGS))
    ap.add_argument("--json", default="results/bench_memory.json")
    args = ap.parse_args(argv)
    args.settings = args.settings.split(",")
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown or "pytorch" not in args.settings:
        ap.error(f"--settings must include pytorch and only {sorted(SETTINGS)}; got {args.settings}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.time()
    rows, frozen, layers = run(args)
    table, headers = summarize(rows, args)
    print(f"{args.model}, batch {args.batch}, seq {args.seq}, fp32, AdamW, {len(frozen)}/{len(layers)} layers "
          f"frozen (random, seed {args.seed}); device cpu; measured with slimfit_fx.measure")
    print(tabulate(table, headers=headers, tablefmt="github"))
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "args": {k: v for k, v in vars(args).items()},
        "frozen": sorted(frozen),
        "rows": rows,
        "wall_s": round(time.time() - started, 1),
    }
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
