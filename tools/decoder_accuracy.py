"""The offline decoder task: a byte-level LLaMA pre-trained on Python's own source, fine-tuned on its docs.

No pretrained decoder ships in a package, so one is made here, from text every Python install has:

  pre-training  a LlamaForCausalLM (byte vocabulary, hidden 128, 4 layers, 4 heads, 2 KV heads,
                SwiGLU, RMSNorm, rotary) trained on the standard library's ``.py`` sources
                (``--pretrain-steps`` steps of random 128-byte windows), cached in
                ``$SLIMFIT_FX_CACHE`` (default ``~/.cache/slimfit_fx``) under a key of its recipe
  fine-tuning   ``pydoc_data.topics`` (the text of ``help()``'s topics), split by topic: every
                fifth topic (sorted by name) is held out, and training topics that repeat a passage
                of a held-out one are left out

Settings, trained side by side from the same checkpoint with the same batches: ``full`` (plain
PyTorch, every parameter), ``ratio`` (``slimfit_fx.compile`` + ``Scheduler(Ratio(0.9))``),
``budget`` (``compile`` + ``Scheduler(Budget(B))``, B the median predicted bytes of 64 random
Ratio(0.9)-sized frozen sets) and, on request, ``ratio-plain`` (the plain model under the same
scheduler: what freezing alone does).  Measured: bits per byte on every 128-byte window of the held-out
topics (lower is better), before fine-tuning and after, and the saved activations of one training
batch under the frozen set in effect at the end.

    python tools/decoder_accuracy.py --threads 1        # seeds 0 1 2: 13 min (checkpoint cached), 6 more to pre-train
    python tools/decoder_accuracy.py --seeds 0 --steps 50

Writes ``results/decoder_accuracy.json`` (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tabulate import tabulate

import slimfit_fx
from slimfit_fx.measure import saved_bytes

ROOT = Path(__file__).resolve().parents[1]
from common import log  # noqa: E402

MODEL = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, use_cache=False)
PRETRAIN = dict(steps=600, batch=32, seq=128, lr=2e-3, corpus_bytes=4_000_000, seed=0)
SETTINGS = ("full", "ratio", "budget", "ratio-plain")
DEFAULT_SETTINGS = ("full", "ratio", "budget")
METRIC = "relative_change"  # the figures in docs/ACCURACY.md were measured with the paper's score


def stdlib_corpus(limit: int) -> bytes:
    """The first ``limit`` bytes of the standard library's ``.py`` files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"\n".join(out)[:limit]


def pydoc_split(every: int = 5) -> tuple[bytes, bytes, list[str]]:
    """(train text, held-out text, held-out topic names): every ``every``-th topic by name is held out,
    and a training topic that shares a passage with a held-out one is dropped (the ``compound`` topic
    repeats the ``if``, ``while`` ... topics word for word)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = names[::every]

    def overlaps(a: str, b: str) -> bool:
        return any(p and p in b for p in (a[:200], a[-200:])) or any(p and p in a for p in (b[:200], b[-200:]))

    train = [n for n in names if n not in held and not any(overlaps(topics[n], topics[h]) for h in held)]
    return ("\n".join(topics[n] for n in train).encode(), "\n".join(topics[n] for n in held).encode(), held)


def as_ids(text: bytes) -> torch.Tensor:
    """Bytes as a 1-d tensor of token ids (0-255)."""
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def windows(ids: torch.Tensor, seq: int) -> torch.Tensor:
    """Every whole ``seq``-byte window, back to back (evaluation)."""
    n = ids.numel() // seq
    return ids[: n * seq].view(n, seq)


def random_batch(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> dict:
    """``batch`` random ``seq``-byte windows of ``ids`` drawn with ``gen``, as inputs and labels."""
    start = torch.randint(ids.numel() - seq, (batch,), generator=gen)
    x = torch.stack([ids[s:s + seq] for s in start.tolist()])
    return {"input_ids": x, "labels": x}


def build_model(seed: int = 0):
    """The byte-level LLaMA of MODEL, initialised under ``seed``, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL)).train()


def cache_path(recipe: dict) -> Path:
    """Where the checkpoint of a pre-training recipe is cached (keyed by recipe, model and torch)."""
    key = hashlib.sha256(json.dumps({"model": MODEL, "pretrain": recipe, "torch": torch.__version__.split("+")[0]},
                                    sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("SLIMFIT_FX_CACHE", Path.home() / ".cache" / "slimfit_fx"))
    return root / f"pydoc_llama_{key}.pt"


def pretrained(recipe: dict = PRETRAIN) -> tuple[dict, dict]:
    """(state_dict, info) of the pre-trained model, from the cache or trained now and cached."""
    path = cache_path(recipe)
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return blob["state"], {**blob["info"], "cached": str(path)}
    log(f"pre-training the byte-level LLaMA ({recipe['steps']} steps); cache: {path}")
    model, ids = build_model(recipe["seed"]), as_ids(stdlib_corpus(recipe["corpus_bytes"]))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=recipe["steps"], pct_start=0.1)
    gen, started = torch.Generator().manual_seed(recipe["seed"]), time.perf_counter()
    for step in range(recipe["steps"]):
        loss = model(**random_batch(ids, recipe["batch"], recipe["seq"], gen)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 100 == 0 or step == recipe["steps"] - 1:
            log(f"pre-train step {step}: {loss.item() / math.log(2):.3f} bits/byte")
    info = {"seconds": round(time.perf_counter() - started, 1), "final_train_bpb": loss.item() / math.log(2),
            "corpus_bytes": int(ids.numel())}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "info": info}, path)
    return model.state_dict(), info


@torch.no_grad()
def bits_per_byte(model, ids: torch.Tensor, seq: int = 128, batch: int = 64) -> float:
    """Mean bits per byte of ``model`` on every ``seq``-byte window of ``ids`` (mode restored)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    data = windows(ids, seq)
    for i in range(0, data.shape[0], batch):
        x = data[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                   reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was)
    return total / count / math.log(2)


def _budget(plan, layers: list[str], ratio: float, seed: int) -> int:
    rng = random.Random(seed)
    k = math.floor(ratio * len(layers))
    return int(statistics.median(plan.predict(frozen=rng.sample(layers, k)).total for _ in range(64)))


def fine_tune(state: dict, train_ids, test_ids, seed: int, steps: int, batch: int, seq: int, lr: float,
              config=None, settings=DEFAULT_SETTINGS) -> dict:
    """Every setting from ``state`` on the same batches; bits per byte on the held-out topics after."""
    runs = {}
    example = random_batch(train_ids, batch, seq, torch.Generator().manual_seed(1234))
    for name in settings:
        model = build_model()
        model.load_state_dict(state)
        module, sched = model, None
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        if name == "ratio-plain":  # freezing alone: the plain model under the same scheduler
            sched = slimfit_fx.Scheduler(model, opt, slimfit_fx.Ratio(0.9), seed=seed, metric=METRIC)
        elif name != "full":
            module = slimfit_fx.compile(model, example, config)
            layers = module.plan.layers
            policy = (slimfit_fx.Ratio(0.9) if name == "ratio"
                      else slimfit_fx.Budget(_budget(module.plan, layers, 0.9, seed)))
            sched = slimfit_fx.Scheduler(module, opt, policy, seed=seed, metric=METRIC,
                                         **({"max_frozen_steps": None} if name == "budget" else {}))
        runs[name] = {"model": model, "module": module, "opt": opt, "sched": sched, "seconds": 0.0,
                      "gen": torch.Generator().manual_seed(seed)}
    for _ in range(steps):
        for r in runs.values():
            inputs = random_batch(train_ids, batch, seq, r["gen"])
            started = time.perf_counter()
            torch.manual_seed(seed)
            r["module"](**inputs).loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["seconds"] += time.perf_counter() - started
    out = {}
    for name, r in runs.items():
        saved = saved_bytes(lambda r=r: r["module"](**example).loss)
        out[name] = {"bpb": bits_per_byte(r["model"], test_ids, seq), "saved_bytes": saved,
                     "seconds": round(r["seconds"], 1),
                     "frozen_fraction": None if r["sched"] is None else r["sched"].frozen_fraction}
        if r["sched"] is not None:
            r["sched"].remove()
    return out


def reference(per_seed: dict) -> str:
    """The setting the others are compared with: full fine-tuning, else the first one trained."""
    first = next(iter(per_seed.values()))
    return "full" if "full" in first else next(iter(first))


def summarize(per_seed: dict) -> list[list]:
    """One table row per setting: bits per byte over seeds, delta and saved bytes against the reference."""
    rows = []
    first = next(iter(per_seed.values()))
    ref = reference(per_seed)
    full = statistics.mean(per_seed[s][ref]["bpb"] for s in per_seed)
    for name in [n for n in SETTINGS if n in first]:
        vals = [per_seed[s][name]["bpb"] for s in per_seed]
        saved = statistics.mean(per_seed[s][name]["saved_bytes"] for s in per_seed)
        full_saved = statistics.mean(per_seed[s][ref]["saved_bytes"] for s in per_seed)
        rows.append([name, f"{statistics.mean(vals):.4f} ± {statistics.pstdev(vals):.4f}",
                     " ".join(f"{v:.4f}" for v in vals), f"{statistics.mean(vals) - full:+.4f}",
                     f"{saved / full_saved:.3f} ({saved / 2 ** 20:.2f} MiB)"])
    return rows


def headers(ref: str) -> list[str]:
    """The table's headers, against the reference setting ``ref``."""
    return ["setting", "held-out bits/byte (mean ± std)", "per seed", f"Δ to {ref}", f"saved act. vs {ref}"]


def run(seeds, steps: int = 300, batch: int = 16, seq: int = 128, lr: float = 5e-4,
        pretrain_steps: int = PRETRAIN["steps"], config=None, settings=DEFAULT_SETTINGS) -> dict:
    """The whole study: pre-trained checkpoint (cached), held-out bits/byte before, every setting per seed."""
    recipe = {**PRETRAIN, "steps": pretrain_steps}
    state, info = pretrained(recipe)
    train_text, test_text, held = pydoc_split()
    train_ids, test_ids = as_ids(train_text), as_ids(test_text)
    base = build_model()
    base.load_state_dict(state)
    before = bits_per_byte(base, test_ids, seq)
    log(f"pre-trained: {before:.4f} bits/byte on the {len(held)} held-out topics ({len(test_text)} bytes)")
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = fine_tune(state, train_ids, test_ids, seed, steps, batch, seq, lr, config, settings)
        log(f"seed {seed}: " + ", ".join(f"{k} {v['bpb']:.4f}" for k, v in per_seed[seed].items()))
    return {"pretrain": {**recipe, **info}, "before_bpb": before, "held_out_topics": held,
            "held_out_bytes": len(test_text), "train_bytes": len(train_text),
            "fine_tune": dict(steps=steps, batch=batch, seq=seq, lr=lr), "config": repr(config or "SlimFitConfig()"),
            "per_seed": per_seed}


def markdown(result: dict) -> str:
    """The study's paragraph and table in markdown."""
    ft, pre = result["fine_tune"], result["pretrain"]
    return "\n".join([
        f"Byte-level LLaMA (hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
        f"{MODEL['num_attention_heads']} heads, {MODEL['num_key_value_heads']} KV heads) pre-trained for "
        f"{pre['steps']} steps on {pre['corpus_bytes']:,} bytes of the standard library's sources; fine-tuned "
        f"{ft['steps']} steps (batch {ft['batch']}, seq {ft['seq']}, lr {ft['lr']:g}) on {result['train_bytes']:,} "
        f"bytes of `pydoc_data.topics`; held out: {len(result['held_out_topics'])} topics, "
        f"{result['held_out_bytes']:,} bytes. Bits per byte on them before fine-tuning: "
        f"{result['before_bpb']:.4f} (lower is better).", "",
        tabulate(summarize(result["per_seed"]), headers(reference(result["per_seed"])), tablefmt="github",
                 disable_numparse=True)])


def main(argv=None) -> int:
    """Run the study, print its markdown and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    ap.add_argument("--prune-rmsnorm", action="store_true", help="SlimFitConfig(prune_rmsnorm=True)")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(DEFAULT_SETTINGS),
                    help="ratio-plain: the plain model under Scheduler(Ratio(0.9)), freezing alone")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "decoder_accuracy.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = slimfit_fx.SlimFitConfig(prune_rmsnorm=True) if args.prune_rmsnorm else None
    result = run(args.seeds, args.steps, args.batch, args.seq, args.lr, args.pretrain_steps, config, args.settings)
    print(markdown(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
