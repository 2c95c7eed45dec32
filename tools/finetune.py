"""Fine-tune the packaged pretrained MiniLM on the VADER sentence task three ways, side by side.

Settings, all from the same pretrained weights, the same new head (initialised under
the seed), the same batches, the same dropout stream and the same number of steps:

  full     plain PyTorch, every parameter trained (AdamW)
  ratio    slimfit_fx.compile(model, example) + Scheduler(Ratio(0.9)): every
           iteration the 90% of layers whose weights changed least are frozen
  budget   slimfit_fx.compile(model, example) + Scheduler(Budget(B)) with B the bytes
           of a Ratio(0.9)-sized frozen set (below)
  ratio-plain  the plain model (no compile) + Scheduler(Ratio(0.9)): what freezing alone does
  lora         PEFT LoRA (r 8 on query and value, the head trained as PEFT's modules_to_save),
               plain PyTorch
  lora-compile the same LoRA model through slimfit_fx.compile, no scheduler (the formats alone)
  lora-ratio   the same LoRA model through slimfit_fx.compile + Scheduler(Ratio(0.9)) over its
               adapter tensors (PEFT's copy of the new head always trains: keep_new)

The budget B: ``module.plan.predict(frozen=F).total`` (parameters + buffers +
gradients and AdamW state of the trained layers + saved activations, for the
measuring batch's shape: ``--batch`` x ``--seq``), taken as the median over 64 frozen
sets F of ``floor(ratio * t)`` of the ``t`` scheduled layers drawn uniformly at random
with the seed: the bytes of a typical Ratio(0.9) iteration.  The JSON also records the
same prediction's median over the frozen sets the ratio run actually used.

The steps of the settings are interleaved (step i of each, then step i+1), so their
step times are measured under the same machine load; each keeps its own batch order
and RNG stream (``tasks.TrainRun``, tools/tasks.py).  Batches are padded to ``--seq``
(fixed shapes: the budget is priced for exactly the shape that runs; ``--trim``
drops all-padding columns instead).

Measured after training, per setting: accuracy on held-out words; saved-activation
bytes (``measure.saved_bytes`` of one forward on the measuring batch, under the frozen
set in effect); the peak of one whole training step (``measure.peak_bytes``: forward,
backward, AdamW step with its state, scheduler hooks); the step-time ratio to full
fine-tuning (median per-step time, and sum); the mean fraction of SlimFit layers
frozen per iteration.

    python tools/finetune.py                     # 300 steps, seeds 0 1 2, about 1 h on 2 busy cores
    python tools/finetune.py --steps 30 --seeds 0 --settings full ratio   # smoke run

Writes ``results/finetune_<tag>.json`` (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import tasks  # noqa: E402
import torch
from common import log, progress_bar  # noqa: E402
from tabulate import tabulate

import slimfit_fx
from slimfit_fx.measure import peak_bytes, saved_bytes

SETTINGS = ("full", "ratio", "budget", "ratio-plain", "lora", "lora-compile", "lora-ratio")
PLAIN = ("full", "ratio-plain", "lora")  # not compiled
SCHEDULED = ("ratio", "budget", "ratio-plain", "lora-ratio")
# The new classification head is the only layer with nothing pretrained in it; left to the ILS it
# trains in about 10% of the iterations (its relative weight change ranks low), which cost the tiny
# ViT 18 points and MiniLM spread across seeds.  It is 0.003% of MiniLM's weights: keep it trainable.
DEFAULT_EXCLUDE = ("classifier.*",)
FORMATS = {"default": slimfit_fx.SlimFitConfig, "paper": slimfit_fx.SlimFitConfig.paper,
           "off": slimfit_fx.SlimFitConfig.off,
           "no-ln-pruning": lambda: slimfit_fx.SlimFitConfig(prune_layernorm=False)}
MiB = 2 ** 20


@dataclass
class Task:
    """What run_seed needs to know about a task."""

    name: str
    data: dict  # train_* / test_* tensors (tasks.vader_sentiment or one half of tasks.digits_transfer)
    make_model: Callable[[int], torch.nn.Module]  # seed -> fresh model (new head initialised under seed)
    config: Any = None  # SlimFitConfig for compile (None: SlimFitConfig(), the default formats)


def vader_task(seed: int, seq: int = 16) -> Task:
    """The MiniLM-on-VADER task of ``seed``, sentences padded to ``seq`` tokens."""
    return Task(name="minilm-vader", data=tasks.vader_sentiment(seq_len=seq, seed=seed),
                make_model=lambda s: tasks.load_minilm_classifier(seed=s))


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT LoRA on a sequence classifier: r 8 on the attention query and value projections."""
    import peft  # the test extra

    config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                             target_modules=["query", "value"])
    return peft.get_peft_model(model, config)


def scheduled_layers(plan, exclude) -> list[str]:
    """The layers a Scheduler over every parameter would schedule (SlimFit layers minus ``exclude``)."""
    return [n for n in plan.layers if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def ratio_sized_budget(plan, layers: list[str], ratio: float, seed: int, samples: int = 64) -> dict:
    """Predicted step bytes (``MemoryEstimate.total``, AdamW) of ``samples`` random frozen sets of
    ``floor(ratio * len(layers))`` layers: median (the budget), min and max."""
    rng = random.Random(seed)
    k = math.floor(ratio * len(layers))
    totals = [plan.predict(frozen=rng.sample(layers, k), optimizer="adamw").total for _ in range(samples)]
    return {"bytes": int(statistics.median(totals)), "min": min(totals), "max": max(totals), "samples": samples,
            "k": k, "t": len(layers)}


def schedule_stats(plan, sched, n_layers: int) -> dict:
    """Mean frozen fraction (of all SlimFit layers) and predicted bytes over the frozen sets used
    (none without a plan: a plain model)."""
    fixed = set(sched.fixed_frozen) & set(plan.parameter_names) if plan is not None else set()
    cache: dict[frozenset, tuple[int, int]] = {}
    totals, acts, fracs = [], [], []
    for _, frozen in sched.history:
        key = frozenset(frozen)
        if key not in cache:
            est = plan.predict(frozen=key | fixed, optimizer="adamw") if plan is not None else None
            cache[key] = (est.total, est.activations) if est is not None else (0, 0)
        totals.append(cache[key][0])
        acts.append(cache[key][1])
        fracs.append(len(frozen) / n_layers)
    trained_count = {n: 0 for n in sched.layers}
    for _, frozen in sched.history:
        for n in set(sched.layers) - set(frozen):
            trained_count[n] += 1
    return {"frozen_fraction_mean": statistics.fmean(fracs), "frozen_fraction_min": min(fracs),
            "frozen_fraction_max": max(fracs), "predicted_total_median": int(statistics.median(totals)),
            "predicted_total_max": max(totals), "predicted_activations_median": int(statistics.median(acts)),
            "distinct_frozen_sets": len(cache), "iterations": len(sched.history),
            "trained_iterations_per_layer": dict(sorted(trained_count.items(), key=lambda kv: -kv[1]))}


def run_seed(task: Task, seed: int, *, settings=SETTINGS, steps=300, batch=16, lr=2e-4, ratio=0.9,
             exclude=DEFAULT_EXCLUDE, frozen_state="keep", trim=False, weight_decay=0.01, progress=True,
             max_frozen_steps="auto", metric="relative_change") -> dict:
    """Train every setting for ``steps`` interleaved steps under ``seed``; measure each. Returns
    ``{setting: result}`` plus ``"budget"`` details under ``"_budget"``."""
    data = task.data
    measure_batch = tasks.batch_inputs(data, "train", torch.arange(batch), trim)
    runs: dict[str, tasks.TrainRun] = {}
    modules: dict[str, torch.nn.Module] = {}
    info: dict[str, Any] = {}
    schedule = dict(ratio=ratio, exclude=exclude, frozen_state=frozen_state, max_frozen_steps=max_frozen_steps,
                    metric=metric)
    for name in settings:
        modules[name] = module = _setting_module(task, name, seed, measure_batch, info)
        factory = _scheduler_factory(name, module, seed, info, **schedule) if name in SCHEDULED else None
        runs[name] = tasks.TrainRun(modules[name], data, batch=batch, lr=lr, seed=seed,
                                    weight_decay=weight_decay, trim=trim, scheduler=factory)
    _train_interleaved(runs, steps, f"{task.name} seed {seed}" if progress else None)
    out: dict[str, Any] = {name: _measure_setting(modules[name], run, data, seed, measure_batch)
                           for name, run in runs.items()}
    for name, res in out.items():
        ref = out.get(reference_of(name))
        if ref is not None:
            res["time_ratio_median"] = res["step_seconds_median"] / ref["step_seconds_median"]
            res["time_ratio_sum"] = res["step_seconds_sum"] / ref["step_seconds_sum"]
    out["_info"] = info
    return out


def _setting_module(task: Task, name: str, seed: int, measure_batch: dict, info: dict) -> torch.nn.Module:
    """A fresh model of ``task`` for setting ``name``: with LoRA for the lora settings, compiled
    (its compile time into ``info``) for all but the plain ones."""
    model = task.make_model(seed)
    if name.startswith("lora"):
        model = with_lora(model)
    if name in PLAIN:
        return model
    t0 = time.perf_counter()
    module = slimfit_fx.compile(model, measure_batch, task.config)
    info.setdefault("compile_seconds", {})[name] = time.perf_counter() - t0
    return module


def _scheduler_factory(name: str, module, seed: int, info: dict, *, ratio, exclude, frozen_state,
                       max_frozen_steps, metric) -> Callable:
    """``(model, optimizer) -> Scheduler`` of a scheduled setting: Budget (priced as a Ratio-sized
    frozen set, the pricing into ``info``) for ``budget``, Ratio for the others."""
    if name == "budget":
        budget = ratio_sized_budget(module.plan, scheduled_layers(module.plan, exclude), ratio, seed)
        info["budget"] = budget
        policy = slimfit_fx.Budget(budget["bytes"])
    else:
        policy = slimfit_fx.Ratio(ratio)
    # Under a Budget a layer whose cost alone exceeds the budget (MiniLM's word embeddings) can never
    # train; the staleness bound cannot hold for it, and the Scheduler refuses a bound it cannot keep.
    bound = {"max_frozen_steps": None if name == "budget" else max_frozen_steps}

    def factory(m, o, policy=policy, bound=bound):
        return slimfit_fx.Scheduler(m, o, policy, exclude=list(exclude), frozen_state=frozen_state,
                                    seed=seed, metric=metric, **bound)

    return factory


def _train_interleaved(runs: dict, steps: int, progress: str | None) -> None:
    """Step i of every run, then step i + 1; ``progress``: the bar's title (None: no bar)."""
    bar = progress_bar(steps, progress) if progress is not None else None
    for step in range(steps):
        for run in runs.values():
            run.step()
        if bar is not None:
            bar.update(1)
            if step % 10 == 9 or step == steps - 1:
                bar.set_postfix_str(" ".join(f"{n} {statistics.fmean(r.losses[-20:]):.3f}" for n, r in runs.items()))
    if bar is not None:
        bar.close()


def _measure_setting(module, run, data: dict, seed: int, measure_batch: dict) -> dict:
    """Accuracy, schedule statistics, saved bytes and step peak of one trained setting."""
    sched = run.scheduler
    res: dict[str, Any] = {"accuracy": tasks.evaluate(module, data), "final_loss": statistics.fmean(run.losses[-20:]),
                           "step_seconds_median": statistics.median(run.step_seconds),
                           "step_seconds_sum": sum(run.step_seconds)}
    n_layers = len(slimfit_fx.analysis.layer_parameters(module.named_parameters()))
    if sched is not None:
        plan = getattr(module, "plan", None)
        res.update(schedule_stats(plan, sched, n_layers))
        res["frozen_at_end"] = len(sched.frozen)
        res["scheduled_layers"] = len(sched.layers)
        if plan is not None:
            res["predicted_activations_at_end"] = plan.predict(
                frozen=set(sched.frozen) | sched.fixed_frozen).activations
    else:
        res["frozen_fraction_mean"] = 0.0
    module.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        res["saved_bytes"] = saved_bytes(lambda: module(**measure_batch).loss, params=module)
        opt = run.optimizer
        opt.zero_grad(set_to_none=True)

        def step():
            module(**measure_batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        peak = peak_bytes(step, model=module, optimizer=opt, tensors=list(measure_batch.values()))
    res["peak_bytes"] = peak.peak
    res["peak_breakdown"] = {"parameters": peak.parameters, "gradients": peak.gradients,
                             "optimizer_state": peak.optimizer_state, "other": peak.other,
                             "offloaded": peak.offloaded}
    return res


def reference_of(setting: str) -> str:
    """What a setting is compared with: LoRA + slimfit_fx with LoRA alone, the others with full."""
    return "lora" if setting.startswith("lora") else "full"


def summarize(per_seed: dict[int, dict], settings) -> dict:
    """Mean and std over seeds of each setting's figures; accuracy delta, saved and peak ratios to
    the setting's reference (``reference_of``; the ``*_to_full`` keys name that reference too)."""
    summary = {}
    for name in settings:
        rows = [per_seed[s][name] for s in per_seed]
        accs = [r["accuracy"] for r in rows]
        entry = {"accuracy_mean": statistics.fmean(accs),
                 "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                 "accuracy_per_seed": accs,
                 "saved_bytes_mean": statistics.fmean(r["saved_bytes"] for r in rows),
                 "peak_bytes_mean": statistics.fmean(r["peak_bytes"] for r in rows),
                 "frozen_fraction_mean": statistics.fmean(r["frozen_fraction_mean"] for r in rows)}
        if "time_ratio_median" in rows[0]:
            entry["time_ratio_median"] = statistics.fmean(r["time_ratio_median"] for r in rows)
            entry["time_ratio_sum"] = statistics.fmean(r["time_ratio_sum"] for r in rows)
        summary[name] = entry
    for name, entry in summary.items():
        ref = summary.get(reference_of(name))
        if ref is None:
            continue
        entry["reference"] = reference_of(name)
        entry["accuracy_delta_to_full"] = entry["accuracy_mean"] - ref["accuracy_mean"]
        entry["saved_ratio_to_full"] = entry["saved_bytes_mean"] / ref["saved_bytes_mean"]
        entry["peak_ratio_to_full"] = entry["peak_bytes_mean"] / ref["peak_bytes_mean"]
    return summary


def table(per_seed: dict[int, dict], summary: dict, settings, fmt: str = "github") -> str:
    """Per-seed rows and the mean row of every setting, as a table in ``fmt``."""
    headers = ["setting", "seed", "accuracy (Δ to reference)", "saved act. MiB", "peak step MiB",
               "time ratio to reference (median / sum)", "frozen fraction"]
    rows = []
    for name in settings:
        for seed, res in per_seed.items():
            r = res[name]
            t = (f"{r['time_ratio_median']:.2f} / {r['time_ratio_sum']:.2f}" if "time_ratio_median" in r else "")
            rows.append([name, seed, f"{100 * r['accuracy']:.1f}", f"{r['saved_bytes'] / MiB:.2f}",
                         f"{r['peak_bytes'] / MiB:.1f}", t, f"{r['frozen_fraction_mean']:.3f}"])
        s = summary[name]
        t = f"{s['time_ratio_median']:.2f} / {s['time_ratio_sum']:.2f}" if "time_ratio_median" in s else ""
        delta = f" ({100 * s['accuracy_delta_to_full']:+.1f})" if "accuracy_delta_to_full" in s else ""
        rows.append([f"**{name}**", "mean", f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}{delta}",
                     f"{s['saved_bytes_mean'] / MiB:.2f}", f"{s['peak_bytes_mean'] / MiB:.1f}", t,
                     f"{s['frozen_fraction_mean']:.3f}"])
    return tabulate(rows, headers, tablefmt=fmt, disable_numparse=True)


def environment() -> dict:
    """Date, machine, versions and command line of this run."""
    import transformers

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "slimfit_fx": slimfit_fx.__version__},
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options finetune.py shares with reproduce_accuracy.py."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratio", type=float, default=0.9, help="freezing ratio of the ratio setting and of the "
                   "frozen sets that price the budget (default 0.9)")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE),
                   help="fnmatch patterns of layers the scheduler never freezes (always trained); default "
                        "'classifier.*', the new randomly initialised head; pass --exclude with no pattern for "
                        "the paper's pure ILS (docs/ACCURACY.md has the measurement behind the default)")
    p.add_argument("--frozen-state", choices=("keep", "offload", "compress"), default="keep",
                   help="where the scheduled settings keep frozen layers' AdamW state (compress is lossy)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=["full", "ratio", "budget"])
    p.add_argument("--max-frozen-steps", type=_bound, default="auto",
                   help="the Ratio schedulers' staleness bound: auto (the default), none, or a number of iterations")
    p.add_argument("--metric", choices=sorted(slimfit_fx.scheduler.METRICS), default="relative_change",
                   help="the Scheduler's layer score (ratio and budget settings); the tool's settings use the paper's "
                        "relative_change, the library's default is capped_loss_drop")
    p.add_argument("--formats", choices=sorted(FORMATS), default="default",
                   help="saved-activation formats of the compiled settings: SlimFitConfig() (per-group "
                        "min/max), SlimFitConfig.paper() (the paper's fixed-point formats), off() (no rewrite) "
                        "or the default without pruned frozen LayerNorms")
    p.add_argument("--out", default=None, help="JSON path (default results/<tool>_<tag>.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice); on a shared, busy machine 1 is several "
                        "times faster than oversubscribed OpenMP threads")


def _bound(text: str):
    return None if text == "none" else "auto" if text == "auto" else int(text)


def apply_common_args(args: argparse.Namespace) -> None:
    """Apply --threads and seed torch's global RNG."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def main(argv=None) -> int:
    """Train and measure every setting for every seed; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=16, help="padded sentence length, 16-32 (sentences are 7-12 tokens)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4,
                   help="AdamW learning rate of every setting (default 2e-4: 5e-5 leaves 90%%-frozen runs near "
                        "chance on this task)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--trim", action="store_true", help="drop all-padding columns of each batch (variable shapes)")
    add_common_args(p)
    args = p.parse_args(argv)
    if not 8 <= args.seq <= 64:
        p.error("--seq: give 16-32 (the sentences are 7 to 12 tokens; shorter truncates them)")
    apply_common_args(args)
    per_seed: dict[int, dict] = {}
    for seed in args.seeds:
        log(f"seed {seed}: building the task and {len(args.settings)} models")
        task = vader_task(seed, args.seq)
        task.config = FORMATS[args.formats]()
        per_seed[seed] = run_seed(task, seed, settings=args.settings, steps=args.steps, batch=args.batch, lr=args.lr,
                                  ratio=args.ratio, exclude=args.exclude, frozen_state=args.frozen_state,
                                  max_frozen_steps=args.max_frozen_steps, metric=args.metric,
                                  trim=args.trim, weight_decay=args.weight_decay, progress=not args.no_progress)
        for name in args.settings:
            r = per_seed[seed][name]
            log(f"seed {seed} {name}: accuracy {100 * r['accuracy']:.1f}%, saved {r['saved_bytes'] / MiB:.2f} MiB, "
                f"peak {r['peak_bytes'] / MiB:.1f} MiB, median step {r['step_seconds_median']:.3f} s")
    summary = summarize(per_seed, args.settings)
    print(table(per_seed, summary, args.settings))
    bar = None
    if "full" in summary and "ratio" in summary:
        delta = summary["ratio"]["accuracy_delta_to_full"]
        bar = {"ratio_minus_full_points": 100 * delta, "within_1_point": abs(delta) <= 0.01}
        print(f"\nacceptance bar (Ratio({args.ratio}) within 1 point of full, mean over seeds {args.seeds}): "
              f"{100 * delta:+.2f} points -> {'met' if bar['within_1_point'] else 'MISSED'}")
    out = args.out or os.path.join("results", f"finetune_{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "environment": environment(), "task": "minilm-vader",
                   "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary, "acceptance": bar},
                  f, indent=1, default=str)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
