"""The table of docs/BENCHMARKS.md "Estimates for models that do not fit": LLaMA 1B, 8B and 70B per GPU.

    python tools/estimate_table.py                    # bf16-autocast, FSDP2 over 8, batch 1 per GPU, seq 4096
    python tools/estimate_table.py --world-size 1 --precision fp32

For each config, ``slimfit_fx.estimate.estimate`` (what ``slimfit-fx report --meta`` prints): plain
PyTorch, PyTorch with checkpointing, slimfit_fx and slimfit_fx with checkpointing, per GPU.  Beside it,
what ``accelerate estimate-memory`` would report for the same config, computed from its rule (accelerate
is not installed here): it builds ``AutoModel`` (the base model: no LM head unless tied) in float32 on the
meta device, "Total Size" = its parameter and buffer bytes, and "Training using Adam" = the largest of its
stages (``estimate_training_usage`` in accelerate/commands/estimate.py): 4x the float32 size for float32,
2x it for float16/bfloat16 mixed precision; one device, no activations, no world size.

Writes ``results/estimate_table.json`` (``--out``) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from slimfit_fx.estimate import SETTINGS, estimate
from slimfit_fx.memory import fmt_bytes

ROOT = Path(__file__).resolve().parents[1]
_LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=8, vocab_size=128256,
               rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16")
# The public checkpoints' shapes (config.json values), random weights: nothing is downloaded.
CONFIGS = {
    "llama-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                     num_hidden_layers=16, max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_hidden_layers=32, max_position_embeddings=8192, tie_word_embeddings=False),
    "llama-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                      num_hidden_layers=80, max_position_embeddings=131072, tie_word_embeddings=False),
}
SHAPES = {"llama-1b": "LLaMA-3.2-1B", "llama-8b": "LLaMA-3-8B", "llama-70b": "LLaMA-3-70B"}


def write_config(directory: Path, name: str) -> str:
    """A model directory holding ``CONFIGS[name]`` as its config.json."""
    path = directory / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIGS[name], indent=1))
    return str(path)


def accelerate_figures(config_dir: str) -> dict[str, int]:
    """``accelerate estimate-memory``'s Total Size and Training using Adam for the config, by its rule:
    the base ``AutoModel`` in float32 (built with 1 and 2 blocks on the meta device, extrapolated:
    every block has the same bytes)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
    depth, sizes = config.num_hidden_layers, []
    for blocks in (1, 2):
        config.num_hidden_layers = blocks
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config, dtype=torch.float32)
        sizes.append(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    fp32 = sizes[0] + (depth - 1) * (sizes[1] - sizes[0])
    return {"total_size_float32": fp32, "total_size_float16": fp32 // 2,
            "training_adam_float32": 4 * fp32, "training_adam_float16": 2 * fp32}


def run(args) -> list[dict]:
    """Estimate every requested config and work out accelerate's figures for it."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = write_config(Path(tmp), name)
            est = estimate(path, batch=args.batch, seq=args.seq, precision=args.precision, device=args.device,
                           world_size=args.world_size, freeze_ratio=args.freeze_ratio)
            print(f"{name}: {est.seconds:.1f} s", file=sys.stderr)
            rows.append({"model": name, "shape": SHAPES[name], "estimate": {**est.to_dict(), "model": name},
                         "accelerate": accelerate_figures(path), "config": CONFIGS[name]})
    return rows


def estimate_table(rows: list[dict]) -> str:
    """The per-setting estimate table in markdown."""
    headers = ["model", "setting", "parameters", "gradients", "optimizer state", "activations",
               "FSDP2 working set", "peak per GPU"]
    lines = []
    for row in rows:
        est = row["estimate"]
        for col in est["columns"]:
            acts = col["static_activations"] + col["dynamic_activations"]
            lines.append([f"{row['shape']} ({est['parameter_count'] / 1e9:.2f} B)", col["name"],
                          *(fmt_bytes(col[k]) for k in ("parameters", "gradients", "optimizer_state")),
                          fmt_bytes(acts), fmt_bytes(col["fsdp_working_set"]), fmt_bytes(col["peak"])])
    return tabulate(lines, headers=headers, tablefmt="github", colalign=("left", "left") + ("right",) * 6)


def accelerate_table(rows: list[dict], world_size: int) -> str:
    """accelerate's figures beside this estimate's peaks, in markdown."""
    headers = ["model", "accelerate: Total Size (float32)", "accelerate: Training using Adam (float16)",
               f"the same / {world_size}", "this estimate: PyTorch peak per GPU",
               "slimfit_fx + checkpointing peak per GPU"]
    lines = []
    for row in rows:
        acc, cols = row["accelerate"], {c["name"]: c for c in row["estimate"]["columns"]}
        lines.append([row["shape"], fmt_bytes(acc["total_size_float32"]), fmt_bytes(acc["training_adam_float16"]),
                      fmt_bytes(acc["training_adam_float16"] // world_size), fmt_bytes(cols[SETTINGS[0]]["peak"]),
                      fmt_bytes(cols[SETTINGS[-1]]["peak"])])
    return tabulate(lines, headers=headers, tablefmt="github", colalign=("left",) + ("right",) * 5)


def main(argv: list[str] | None = None) -> None:
    """Estimate every config, print both tables and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--batch", type=int, default=1, help="per GPU")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--precision", default="bf16-autocast")
    p.add_argument("--device", default="cuda")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--freeze-ratio", type=float, default=0.9)
    p.add_argument("--out", default=str(ROOT / "results" / "estimate_table.json"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows = run(args)
    print(estimate_table(rows) + "\n\n" + accelerate_table(rows, args.world_size))
    command = "python tools/estimate_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - started, 1), "machine": f"{platform.machine()}, "
            f"torch {torch.__version__}", "options": {k: v for k, v in vars(args).items() if k != "out"}}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
