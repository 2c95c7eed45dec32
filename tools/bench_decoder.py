"""Decoder LLMs: saved activations of the compiled module against plain PyTorch with the same layers frozen.

    python tools/bench_decoder.py                         # LLaMA-1B widths, 2 layers, b1 s1024; tiny decoders
    python tools/bench_decoder.py --seq 4096 --no-families

Workloads: a LlamaForCausalLM with LLaMA-3.2-1B widths (hidden 2048, intermediate 8192, 32 heads,
8 KV heads, vocabulary 128256, tied embeddings) cut to ``--layers`` layers, fp32 on the CPU; and
the decoder families of tests/families.py (tiny configs).  For each, 90% of the SlimFit layers
are frozen at random (``--seed``), in plain PyTorch and in ``slimfit_fx.compile(model)``.  Measured:
bytes saved for backward (``measure.saved_bytes``) of one training forward; predicted:
``plan.predict(frozen=...).activations``.  The LLaMA row also lists what the compiled module keeps
by op and role (``plan.saved_tensors``), beside plain PyTorch's (``slimfit_fx.analyze``).

Writes ``results/bench_decoder.json`` (``--out``) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import slimfit_fx
from slimfit_fx.analysis import layer_parameters
from slimfit_fx.measure import saved_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MiB = 2 ** 20
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gpt2", "opt", "gpt-neox"]


def llama_1b_widths(layers: int, batch: int, seq: int):
    """A LlamaForCausalLM with LLaMA-3.2-1B widths cut to ``layers`` layers, and a batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=max(seq, 2048),
                      tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (batch, seq))
    return LlamaForCausalLM(cfg).train(), {"input_ids": ids, "labels": ids}


def _no_cache(model):
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False


def compare(model, inputs, seed: int, breakdown: bool = False) -> dict:
    """Saved bytes of plain PyTorch and of the compiled module with the same 90% frozen."""
    _no_cache(model)
    started = time.perf_counter()
    slim = slimfit_fx.compile(model.train(), inputs)
    capture = time.perf_counter() - started
    layers = layer_parameters(model.named_parameters())
    frozen = set(random.Random(seed).sample(layers, int(0.9 * len(layers))))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)

    def loss(module):
        torch.manual_seed(1)
        return module(**inputs).loss

    eager, measured = saved_bytes(lambda: loss(model)), saved_bytes(lambda: loss(slim))
    out = {"layers": len(layers), "frozen": len(frozen), "plain_freeze": eager, "slimfit": measured,
           "predicted": slim.plan.predict(frozen=frozen).activations, "capture_s": round(capture, 1)}
    if breakdown:
        plain = slimfit_fx.analyze(model, inputs)  # plain PyTorch's plan: what eager keeps, by op
        out["by_role"], out["by_role_plain"] = _roles(slim.plan, frozen), _roles(plain, frozen)
    for p in model.parameters():
        p.requires_grad_(True)
    return out


def _roles(plan, frozen) -> dict:
    """Saved bytes under ``frozen`` by the ops (and roles) that keep them."""
    roles = collections.Counter()
    for r in plan.saved_tensors(frozen):
        roles[", ".join(sorted({c.split("(")[1].rstrip(")") for c in r["consumers"]}))] += r["bytes"]
    return dict(roles.most_common())


def _size(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def _row(name: str, r: dict) -> list:
    exact = "exact" if r["predicted"] == r["slimfit"] else f"{100 * (r['predicted'] / r['slimfit'] - 1):+.2f}%"
    return [name, f"{r['frozen']}/{r['layers']}", _size(r["plain_freeze"]), _size(r["slimfit"]),
            f"{r['plain_freeze'] / r['slimfit']:.2f}x", exact]


HEADERS = ["model", "frozen", "plain + freezing", "slimfit_fx", "saved lower by", "prediction"]


def main(argv=None) -> int:
    """The LLaMA row and (unless --no-families) every decoder family; prints the tables, writes the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random frozen set")
    ap.add_argument("--no-families", action="store_true", help="only the LLaMA-1B-width model")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_decoder.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"argv": sys.argv[1:], "torch": torch.__version__, "rows": {}}
    model, inputs = llama_1b_widths(args.layers, args.batch, args.seq)
    name = f"LLaMA-1B widths, {args.layers} layers, b{args.batch} s{args.seq}"
    result["rows"][name] = compare(model, inputs, args.seed, breakdown=True)
    del model
    if not args.no_families:
        from families import FAMILIES as MAKERS

        for family in FAMILIES:
            model, inputs = MAKERS[family]()
            result["rows"][family] = compare(model, inputs, args.seed)
    print(tabulate([_row(n, r) for n, r in result["rows"].items()], HEADERS, tablefmt="github"))
    print()
    for key, title in (("by_role_plain", "plain PyTorch + freezing keeps"), ("by_role", "slimfit_fx keeps")):
        roles = result["rows"][name][key]
        print(f"{name}: {title}\n")
        print(tabulate([[k, f"{v / MiB:.2f}"] for k, v in roles.items() if v >= MiB / 100], ["op: role", "MiB"],
                       tablefmt="github"))
        print()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
