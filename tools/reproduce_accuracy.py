"""The offline accuracy study: does SlimFit keep accuracy while it cuts memory?

Two real transfer tasks, built offline from installed packages (nothing is downloaded):

  minilm-vader   the packaged pretrained all-MiniLM-L6-v2 fine-tuned to tell positive from
                 negative VADER-lexicon words in short sentences, tested on held-out words
                 (tools/tasks.py: vader_sentiment; the settings of tools/finetune.py)
  pydoc-lm       a byte-level LLaMA pre-trained on the standard library's sources, fine-tuned on
                 pydoc_data.topics, bits per byte on held-out topics (tools/decoder_accuracy.py)
  vit-digits     a tiny ViT (1 channel, 8x8 images in 2x2 patches, hidden 64, 4 layers)
                 pre-trained here on scikit-learn's digits 0-4, then fine-tuned on digits 5-9
                 (labels 0-4, a new head), tested on held-out images
                 (tools/tasks.py: digits_transfer)

For each task and seed, three settings are trained side by side (interleaved steps, same
batches, same steps): full fine-tuning (plain PyTorch), slimfit_fx.compile +
Scheduler(Ratio(0.9)), and slimfit_fx.compile + Scheduler(Budget(B)) with B the predicted
bytes of a typical Ratio(0.9)-sized frozen set (see tools/finetune.py).  Reported: accuracy
mean ± std over seeds (and per seed), saved activations and step peak as ratios to full
fine-tuning, step-time ratio (median per step, same run).

    python tools/reproduce_accuracy.py                  # both tasks, seeds 0 1 2
    python tools/reproduce_accuracy.py --tasks vit-digits --seeds 0

Writes results/accuracy.json and results/accuracy.md, and (unless --docs '') replaces the
generated part of docs/ACCURACY.md (between its BEGIN/END GENERATED markers; the notes
around them are kept) with the table, the machine, versions, date and the exact command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import decoder_accuracy  # noqa: E402  (tools/decoder_accuracy.py: the pydoc-lm task)
import finetune  # noqa: E402  (tools/finetune.py: run_seed, summarize, table, environment)
import tasks  # noqa: E402  (tools/tasks.py: the digits task and the tiny ViT)
import torch
from common import log, progress_bar  # noqa: E402
from finetune import MiB, Task  # noqa: E402
from tabulate import tabulate

TASKS = ("minilm-vader", "vit-digits", "pydoc-lm")

# Per-task training settings (steps, batch, lr, weight decay); see docs/ACCURACY.md for how they were chosen.
DEFAULTS = {
    "minilm-vader": {"steps": 300, "batch": 16, "lr": 2e-4, "weight_decay": 0.01},
    "vit-digits": {"steps": 1000, "batch": 32, "lr": 1e-3, "weight_decay": 0.01},
}
VIT_PRETRAIN = {"steps": 400, "batch": 32, "lr": 1e-3, "weight_decay": 0.05, "seed": 0}


def pretrain_digits_vit(digits: dict, steps: int, batch: int, lr: float, weight_decay: float, seed: int,
                        progress: bool = True) -> tuple[dict, dict]:
    """Pre-train the tiny ViT on digits 0-4 (full training from random init); returns its state_dict and
    a record (accuracy on held-out 0-4 images, seconds)."""
    model = tasks.tiny_vit_classifier(num_labels=5, seed=seed)
    run = tasks.TrainRun(model, digits["pretrain"], batch=batch, lr=lr, seed=seed, weight_decay=weight_decay)
    bar = progress_bar(steps, "vit pre-training on digits 0-4") if progress else None
    start = time.perf_counter()
    for _ in range(steps):
        run.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    acc = tasks.evaluate(model, digits["pretrain"])
    return model.state_dict(), {"accuracy_digits_0_4": acc, "seconds": seconds, "steps": steps, "batch": batch,
                                "lr": lr, "weight_decay": weight_decay, "seed": seed}


def vit_task(digits: dict, pretrained: dict | None) -> Task:
    """Fine-tuning on digits 5-9: the pre-trained ViT with a new 5-way head initialised under the seed
    (``pretrained=None``: from random init, the no-transfer baseline)."""

    def make(seed: int) -> torch.nn.Module:
        model = tasks.tiny_vit_classifier(num_labels=5, seed=seed)
        if pretrained is not None:
            body = {k: v for k, v in pretrained.items() if not k.startswith("classifier.")}
            missing, unexpected = model.load_state_dict(body, strict=False)
            assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
        return model

    return Task(name="vit-digits" if pretrained is not None else "vit-digits-scratch",
                data=digits["finetune"], make_model=make)


def study_table(results: dict, fmt: str = "github") -> str:
    """The summary of every task and setting as a table in ``fmt``."""
    headers = ["task", "setting", "accuracy % (mean ± std)", "per seed", "Δ to full", "saved act. vs full",
               "peak step vs full", "step time vs full", "frozen"]
    rows = []
    for task, res in results.items():
        for name, s in res["summary"].items():
            rows.append([task, name, f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}",
                         " ".join(f"{100 * a:.1f}" for a in s["accuracy_per_seed"]),
                         f"{100 * s.get('accuracy_delta_to_full', 0):+.1f}",
                         f"{s.get('saved_ratio_to_full', float('nan')):.3f} ({s['saved_bytes_mean'] / MiB:.2f} MiB)",
                         f"{s.get('peak_ratio_to_full', float('nan')):.3f} ({s['peak_bytes_mean'] / MiB:.1f} MiB)",
                         f"{s.get('time_ratio_median', float('nan')):.2f}",
                         f"{s['frozen_fraction_mean']:.2f}"])
    return tabulate(rows, headers, tablefmt=fmt, disable_numparse=True)


def main(argv=None) -> int:
    """Run every requested task and seed, print the tables, write the results and the docs page."""
    args = _parser().parse_args(argv)
    finetune.apply_common_args(args)
    results: dict[str, dict] = {}
    extra: dict[str, object] = {}
    shared = dict(settings=args.settings, ratio=args.ratio, exclude=args.exclude, frozen_state=args.frozen_state,
                  progress=not args.no_progress)
    for task_name in args.tasks:
        if task_name == "pydoc-lm":  # a language-modelling task: bits per byte, its own table
            extra["pydoc_lm"] = decoder_accuracy.run(args.seeds)
            print("\npydoc-lm\n" + decoder_accuracy.markdown(extra["pydoc_lm"]))
            continue
        results[task_name] = run_task(task_name, args, shared, extra)
    _write_results(results, extra, args)
    return 0


def _parser() -> argparse.ArgumentParser:
    """The command line: the tasks and their settings, plus finetune.py's common options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--steps", type=int, default=None, help="override every task's steps")
    p.add_argument("--vader-lr", type=float, default=DEFAULTS["minilm-vader"]["lr"])
    p.add_argument("--vit-lr", type=float, default=DEFAULTS["vit-digits"]["lr"])
    p.add_argument("--vit-pretrain-steps", type=int, default=VIT_PRETRAIN["steps"])
    p.add_argument("--vit-scratch", action="store_true",
                   help="also fine-tune the ViT from random init (full fine-tuning only): what pre-training adds")
    p.add_argument("--md", default="results/accuracy.md")
    p.add_argument("--docs", default="docs/ACCURACY.md", help="markdown page to rewrite ('' to skip)")
    finetune.add_common_args(p)
    return p


def run_task(task_name: str, args, shared: dict, extra: dict) -> dict:
    """Every seed of one classification task (the ViT pre-trained first, its record into ``extra``);
    prints the task's table and returns its config, per-seed results and summary."""
    cfg = dict(DEFAULTS[task_name])
    if args.steps is not None:
        cfg["steps"] = args.steps
    cfg["lr"] = args.vader_lr if task_name == "minilm-vader" else args.vit_lr
    per_seed = {}
    if task_name == "vit-digits":
        digits, state = _pretrained_vit(args, shared, cfg, extra)
    for seed in args.seeds:
        log(f"{task_name} seed {seed}")
        if task_name == "minilm-vader":
            task = finetune.vader_task(seed)
        else:
            # The digits split is fixed (seed 0: the pre-training saw none of its test images);
            # the seed draws the head, batch order, dropout and the scheduler's initial scores.
            task = vit_task(digits, state)
        task.config = finetune.FORMATS[args.formats]()
        per_seed[seed] = finetune.run_seed(task, seed, **shared, **cfg)
        for name in args.settings:
            r = per_seed[seed][name]
            log(f"{task_name} seed {seed} {name}: {100 * r['accuracy']:.1f}%")
    summary = finetune.summarize(per_seed, args.settings)
    print(f"\n{task_name} ({cfg})\n" + finetune.table(per_seed, summary, args.settings))
    return {"config": cfg, "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary}


def _pretrained_vit(args, shared: dict, cfg: dict, extra: dict) -> tuple[dict, dict]:
    """The digits task and the tiny ViT pre-trained on digits 0-4 (and, with --vit-scratch, full
    fine-tuning from random init for comparison); the records go into ``extra``."""
    digits = tasks.digits_transfer(seed=0)
    log("pre-training the tiny ViT on digits 0-4")
    state, record = pretrain_digits_vit(digits, args.vit_pretrain_steps, VIT_PRETRAIN["batch"],
                                        VIT_PRETRAIN["lr"], VIT_PRETRAIN["weight_decay"], VIT_PRETRAIN["seed"],
                                        progress=not args.no_progress)
    log(f"pre-trained: {100 * record['accuracy_digits_0_4']:.1f}% on held-out digits 0-4 "
        f"in {record['seconds']:.0f} s")
    extra["vit_pretraining"] = record
    if args.vit_scratch:
        scratch = {}
        for seed in args.seeds:
            r = finetune.run_seed(vit_task(digits, None), seed, **{**shared, "settings": ["full"]}, **cfg)
            scratch[seed] = r["full"]["accuracy"]
        extra["vit_scratch_full_accuracy"] = scratch
        log(f"from random init (no pre-training), full fine-tuning: {scratch}")
    return digits, state


def _write_results(results: dict, extra: dict, args) -> None:
    """Print the study table; write results/accuracy.json, the markdown and (unless --docs '') the docs page."""
    env = finetune.environment()
    main_table = study_table(results)
    print("\n" + main_table)
    os.makedirs("results", exist_ok=True)
    with open("results/accuracy.json", "w") as f:
        json.dump({"args": vars(args), "environment": env, "results": results, "extra": extra}, f, indent=1,
                  default=str)
    per_seed_tables = "\n\n".join(
        f"#### {t} (steps {r['config']['steps']}, batch {r['config']['batch']}, lr {r['config']['lr']:g})\n\n"
        + finetune.table({int(k): v for k, v in r["per_seed"].items()}, r["summary"], list(r["summary"]))
        for t, r in results.items())
    md = render_markdown(main_table, per_seed_tables, env, extra, args)
    os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
    with open(args.md, "w") as f:
        f.write(md)
    log(f"wrote results/accuracy.json and {args.md}")
    if args.docs:
        write_docs(args.docs, md)
        log(f"updated {args.docs}")


BEGIN, END = "<!-- BEGIN GENERATED by tools/reproduce_accuracy.py -->", "<!-- END GENERATED -->"


def write_docs(path: str, md: str) -> None:
    """Put ``md`` between the BEGIN/END markers of ``path``, keeping the hand-written text around them
    (a new file gets a title and the markers)."""
    block = f"{BEGIN}\n{md.rstrip()}\n{END}\n"
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def render_markdown(main_table: str, per_seed_tables: str, env: dict, extra: dict, args) -> str:
    """The generated part of docs/ACCURACY.md: command, machine, settings and tables."""
    m, v = env["machine"], env["versions"]
    lines = [
        "## Latest run",
        "",
        f"Generated by `tools/reproduce_accuracy.py` on {env['date']}.",
        "",
        "```",
        f"{env['command']}",
        "```",
        "",
        f"Machine: {m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['platform']}; "
        f"load average at the end {m['load_average_at_end']} (shared machine: time ratios come from interleaved "
        "steps of one run, absolute times mean little).",
        f"Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"slimfit_fx {v['slimfit_fx']}.",
        "",
        f"Settings: `full` = plain PyTorch, every parameter trained; `ratio` = `slimfit_fx.compile` + "
        f"`Scheduler(Ratio({args.ratio}))`; `budget` = `slimfit_fx.compile` + `Scheduler(Budget(B))`, B = median "
        f"predicted step bytes (`plan.predict(frozen=F).total`) over 64 random frozen sets F of "
        f"floor({args.ratio} t) layers. Excluded from scheduling: {args.exclude or 'nothing'}; frozen optimizer "
        f"state: `{args.frozen_state}`. Memory is measured on one training batch after training: saved "
        "activations with `measure.saved_bytes` under the frozen set then in effect, the peak of one whole "
        "AdamW step with `measure.peak_bytes` (parameters, gradients, optimizer state, activations, "
        "temporaries). CPU figures: dropout masks are float32 here (1 byte on CUDA).",
        "",
        "### Summary",
        "",
        main_table,
        "",
    ]
    if extra.get("vit_pretraining"):
        r = extra["vit_pretraining"]
        lines += [f"ViT pre-training on digits 0-4: {r['steps']} steps, batch {r['batch']}, lr {r['lr']:g}: "
                  f"{100 * r['accuracy_digits_0_4']:.1f}% on held-out digits 0-4, {r['seconds']:.0f} s."]
    if extra.get("vit_scratch_full_accuracy"):
        accs = extra["vit_scratch_full_accuracy"]
        lines += ["ViT fine-tuned on 5-9 from random init instead (full fine-tuning, no pre-training): "
                  + ", ".join(f"seed {s}: {100 * a:.1f}%" for s, a in accs.items()) + "."]
    if extra.get("pydoc_lm"):
        lines += ["", "### pydoc-lm: a decoder LLM task (bits per byte)", "",
                  decoder_accuracy.markdown(extra["pydoc_lm"])]
    lines += ["", "### Per seed", "", per_seed_tables, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
