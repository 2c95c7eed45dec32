"""Compile time, step time and saved bytes: slimfit_fx.compile's eager mode against mode="compiled".

Settings (each a row), on one model whose parameters they all share:
  pytorch            plain eager PyTorch (frozen layers: requires_grad=False)
  slimfit-eager      slimfit_fx.compile(model, inputs, config): torch.export capture, passes, run
  slimfit-compiled   slimfit_fx.compile(model, config=config, mode="compiled"): torch.compile with
                     the "slimfit" backend and its guard filter

Measured: the capture/compile time (eager: building the module; compiled: its first training
call, which is where dynamo traces, minus one steady step; "backend" is the part spent in
the slimfit backend: lowering to ATen, analysis, passes), saved-activation bytes at a random
90% frozen set (slimfit_fx.measure.saved_bytes), and the step time (forward + backward, no
optimizer) as a ratio to slimfit-eager (per round, median over interleaved rounds) in which the frozen set
changes at random before every step.  The compiled setting's graph count
(torch._dynamo.utils.counters["stats"]["unique_graphs"]) is recorded before and after the
timed steps: the frozen set changing every step must not add graphs.

    python tools/bench_compile.py --model bert-small --batch 16 --seq 128
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
from common import log  # noqa: E402
from tabulate import tabulate

import slimfit_fx
from slimfit_fx import SlimFitConfig
from slimfit_fx.analysis import layer_parameters
from slimfit_fx.measure import fmt_bytes, saved_bytes

CONFIGS = {"paper": SlimFitConfig, "minmax": SlimFitConfig.minmax}


def build(name: str, batch: int, seq: int):
    """``bert-small`` (hidden 256, 4 layers, 4 heads: a small BERT that still runs in seconds on
    2 cores) or any name slimfit_fx.models knows (bert-tiny, bert-base, ...)."""
    if name == "bert-small":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, num_labels=2)
        model = BertForSequenceClassification(cfg).train()
        g = torch.Generator().manual_seed(0)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -seq // 4:] = 0
        inputs = {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=g), "attention_mask": mask,
                  "labels": torch.randint(0, 2, (batch,), generator=g)}
        return model, inputs
    from slimfit_fx.models import build as build_named

    return build_named(name, batch=batch, seq=seq)


class _BackendTimer:
    """Seconds spent inside the slimfit backend (lowering, analysis, passes)."""

    def __init__(self):
        from slimfit_fx.integrations import dynamo

        self.total = 0.0
        self._cls = dynamo.SlimFitBackend
        self._orig = self._cls.__call__
        timer = self

        def timed(backend, gm, example_inputs):
            t0 = time.perf_counter()
            try:
                return timer._orig(backend, gm, example_inputs)
            finally:
                timer.total += time.perf_counter() - t0

        self._cls.__call__ = timed

    def close(self):
        """Restore the backend's own ``__call__``."""
        self._cls.__call__ = self._orig


def run(args):
    """Build the three settings, measure saved bytes and time interleaved steps; rows and dynamo's counts."""
    from torch._dynamo.utils import counters

    model, inputs = build(args.model, args.batch, args.seq)
    if hasattr(model, "config") and getattr(model.config, "problem_type", "x") is None:
        model.config.problem_type = "single_label_classification"  # HF sets it on the first call otherwise
    config = CONFIGS[args.config]()
    layers = layer_parameters(model.named_parameters())
    k = int(round(args.freeze_ratio * len(layers), 9))
    rng = random.Random(args.seed)
    fixed = set(rng.sample(layers, k))

    def freeze(frozen):
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
            p.grad = None

    def step(module):
        module(**inputs).loss.backward()
        for p in model.parameters():
            p.grad = None

    rows = {}
    freeze(fixed)
    # plain PyTorch: nothing to build
    rows["pytorch"] = {"module": model, "capture_s": 0.0, "backend_s": None}

    log("slimfit-eager: capture (torch.export, analysis, passes)")
    t0 = time.perf_counter()
    eager = slimfit_fx.compile(model, inputs, config)
    rows["slimfit-eager"] = {"module": eager, "capture_s": time.perf_counter() - t0, "backend_s": None}

    log("slimfit-compiled: first training call (dynamo + slimfit backend)")
    torch._dynamo.reset()
    counters.clear()
    timer = _BackendTimer()
    compiled = slimfit_fx.compile(model, config=config, mode="compiled")
    t0 = time.perf_counter()
    step(compiled)
    first = time.perf_counter() - t0
    timer.close()
    t0 = time.perf_counter()
    step(compiled)
    steady = time.perf_counter() - t0
    rows["slimfit-compiled"] = {"module": compiled, "capture_s": first - steady, "backend_s": timer.total}
    graphs_before = counters["stats"]["unique_graphs"]

    log("saved bytes at the fixed frozen set")
    freeze(fixed)
    for name, r in rows.items():
        step(r["module"])  # warm
        torch.manual_seed(1)
        r["saved"] = saved_bytes(lambda r=r: r["module"](**inputs).loss, params=model)
        r["predicted"] = None if name == "pytorch" else r["module"].plan.predict(fixed).activations
        r["times"] = []

    log(f"step times: {args.repeats} interleaved rounds of {args.steps} steps, a new random frozen set each step")
    for rnd in range(args.repeats):
        sets = [set(rng.sample(layers, k)) for _ in range(args.steps)]
        for r in rows.values():
            t_total = 0.0
            for frozen in sets:
                freeze(frozen)
                t0 = time.perf_counter()
                step(r["module"])
                t_total += time.perf_counter() - t0
            r["times"].append(t_total / args.steps)
        log(f"round {rnd + 1}: " + ", ".join(f"{n} {r['times'][-1] * 1e3:.1f} ms" for n, r in rows.items()))
    graphs_after = counters["stats"]["unique_graphs"]
    for p in model.parameters():
        p.requires_grad_(True)
    recompile_limit_hit = any("recompile limit" in key.lower() for key in counters["unimplemented"])
    return rows, fixed, layers, {"unique_graphs_after_first_steps": graphs_before,
                                 "unique_graphs_after_timing": graphs_after,
                                 "random_frozen_sets_timed": args.repeats * args.steps,
                                 "recompile_limit_hit": recompile_limit_hit,
                                 "fallbacks": list(compiled.backend.fallbacks)}


def summarize(rows):
    """Median step times and per-round ratios to slimfit-eager; the table rows and headers."""
    base = rows["slimfit-eager"]["times"]
    table = []
    for name, r in rows.items():
        r["step_ms"] = 1e3 * statistics.median(r["times"])
        # Ratio within each round (the settings ran back to back), then the median over rounds:
        # steadier than a ratio of medians when the machine's load changes between rounds.
        r["round_ratios"] = [t / b for t, b in zip(r["times"], base)]
        r["step_ratio_vs_slimfit_eager"] = statistics.median(r["round_ratios"])
        table.append([name, f"{r['capture_s']:.2f} s" if name != "pytorch" else "-",
                      f"{r['backend_s']:.2f} s" if r["backend_s"] is not None else "-",
                      fmt_bytes(r["saved"]), fmt_bytes(r["predicted"]) if r["predicted"] is not None else "-",
                      f"{r['step_ms']:.1f} ms", f"{r['step_ratio_vs_slimfit_eager']:.2f}x"])
    headers = ["setting", "capture /\ncompile", "in slimfit\nbackend", "saved act.", "predicted", "step\n(fwd+bwd)",
               "step vs\nslimfit-eager"]
    return table, headers


def main(argv=None):
    """Run the comparison, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    ap.add_argument("--freeze-ratio", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median)")
    ap.add_argument("--steps", type=int, default=5, help="steps per round and setting")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default="results/bench_compile.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.time()
    rows, fixed, layers, dynamo_info = run(args)
    table, headers = summarize(rows)
    print(f"{args.model}, batch {args.batch}, seq {args.seq}, fp32, SlimFitConfig {args.config}, {len(fixed)}/"
          f"{len(layers)} layers frozen (random; a new set every timed step); cpu, {torch.get_num_threads()} threads")
    print(tabulate(table, headers=headers, tablefmt="github"))
    print(f"torch.compile graphs: {dynamo_info['unique_graphs_after_first_steps']} after the first steps, "
          f"{dynamo_info['unique_graphs_after_timing']} after {dynamo_info['random_frozen_sets_timed']} steps with "
          f"random frozen sets; recompile limit hit: {dynamo_info['recompile_limit_hit']}")
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "args": vars(args),
        "rows": {n: {k: v for k, v in r.items() if k != "module"} for n, r in rows.items()},
        "dynamo": dynamo_info,
        "wall_s": round(time.time() - started, 1),
    }
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
