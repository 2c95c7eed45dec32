"""Capture time against depth: the whole-model capture (``blocks=None``) and the per-block capture
(``blocks="auto"``) of BERT-base widths at 2, 12 and 24 layers.

Measured per row, in one process after a warm-up capture (so torch's one-time start-up is in neither):
``capture + first step``, the wall time of ``slimfit_fx.compile(model, inputs, blocks=...)`` plus one
forward and backward; the ratio of that to the 2-layer row of the same mode; the step time (median of
``--steps`` forward + backward, the two modes interleaved) as a ratio of per-block to whole; and
whether the per-block module's predicted saved bytes equal the measured ones.  The random 90% frozen
set is the same for both modes.

    python tools/bench_capture.py                  # 2, 12, 24 layers, batch 2, seq 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import BertConfig, BertForSequenceClassification

import slimfit_fx
from slimfit_fx.analysis import layer_parameters
from slimfit_fx.cli import frozen_layers
from slimfit_fx.measure import saved_bytes

ROOT = Path(__file__).resolve().parents[1]
from common import log  # noqa: E402

MODES = {"whole": None, "per-block": "auto"}


def build(layers: int, batch: int, seq: int):
    """BERT-base widths cut to ``layers`` layers, and a batch."""
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=layers)  # BERT-base widths: hidden 768, 12 heads, FFN 3072
    model = BertForSequenceClassification(cfg).train()
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": torch.tensor([0, 1] * (batch // 2))}
    return model, inputs


def freeze_random(model, fraction: float = 0.9) -> set[str]:
    """The seeded draw `slimfit-fx report` freezes (``cli.frozen_layers``)."""
    frozen = frozen_layers(layer_parameters(model.named_parameters()), fraction)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return frozen


def step(module, inputs) -> float:
    """Seconds of one forward and backward."""
    start = time.perf_counter()
    module(**inputs).loss.backward()
    return time.perf_counter() - start


def measure_depth(layers: int, batch: int, seq: int, steps: int) -> dict:
    """Capture and step times of both modes at one depth, and the per-block prediction against the measure."""
    model, inputs = build(layers, batch, seq)
    frozen = freeze_random(model)
    row = {"layers": layers}
    modules = {}
    for mode, blocks in MODES.items():
        start = time.perf_counter()
        modules[mode] = slimfit_fx.compile(model, inputs, blocks=blocks)
        step(modules[mode], inputs)
        row[f"{mode}_capture_s"] = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    times = {mode: [] for mode in MODES}
    for _ in range(steps):
        for mode in MODES:
            times[mode].append(step(modules[mode], inputs))
            model.zero_grad(set_to_none=True)
    row["step_ratio"] = statistics.median(times["per-block"]) / statistics.median(times["whole"])
    per_block = modules["per-block"]
    row["blocks_captured"] = [n for _, n in per_block.graph_module.meta.get("slimfit_blocks", [])]
    row["predicted"] = per_block.plan.predict(frozen).activations
    row["measured"] = saved_bytes(lambda: per_block(**inputs).loss, params=model)
    return row


def main(argv=None) -> int:
    """Every requested depth after a warm-up capture; prints the table and writes the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 12, 24])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16, help="short: the capture, not the step, is what is timed")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_capture.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log("warm-up capture (torch's one-time start-up)")
    measure_depth(1, args.batch, 16, 1)
    rows = []
    for layers in args.layers:
        log(f"{layers} layers")
        rows.append(measure_depth(layers, args.batch, args.seq, args.steps))
    base = rows[0]
    table = [[r["layers"], f"{r['whole_capture_s']:.1f} s", f"{r['whole_capture_s'] / base['whole_capture_s']:.2f}x",
              f"{r['per-block_capture_s']:.1f} s", f"{r['per-block_capture_s'] / base['per-block_capture_s']:.2f}x",
              f"{r['step_ratio']:.2f}", r["blocks_captured"], "exact" if r["predicted"] == r["measured"] else
              f"{r['predicted']} vs {r['measured']}"] for r in rows]
    print(tabulate(table, headers=["layers", "whole: capture + 1st step", f"vs {base['layers']} layers",
                                   "per-block: capture + 1st step", f"vs {base['layers']} layers",
                                   "step time per-block / whole", "blocks per captured graph",
                                   "per-block prediction"], tablefmt="github"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
