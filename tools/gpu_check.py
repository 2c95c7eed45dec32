"""The GPU acceptance run in one command: kernels against the reference, then the GPU table.

    python tools/gpu_check.py                         # on a CUDA machine: under 10 minutes on an H200
    python tools/gpu_check.py --device cpu --quick    # the same run on the CPU at small sizes, when no GPU is lent

1. Kernels: every Triton kernel of ``slimfit_fx.kernels`` on CUDA tensors against the torch reference
   on the same tensors (codes may differ by one where the GPU fuses a multiply-add; values must agree
   to one quantization step), fp32/bf16/fp16, odd sizes.  Skipped on the CPU (tests/test_kernels.py
   checks them there under TRITON_INTERPRET=1).
2. The table: ``tools/bench_memory.py`` for BERT-base (batch 32, seq 128) and GPT-2 small (batch 8,
   seq 512) in fp32 and bf16 autocast, and LLaMA-1B (batch 4, seq 1024) in fp32, 90% of the layers
   frozen at random, rows plain eager PyTorch,
   PyTorch + freezing, ``SlimFitConfig.off()`` and ``SlimFitConfig()`` with the same frozen set.
3. Checks (the issues' acceptance): SlimFitConfig() step time <= 0.85x plain eager in fp32 and
   <= 0.90x in bf16 autocast, peak >= 3x below plain (BERT, GPT-2); step time <= 0.75x and peak
   >= 2.5x below plain (LLaMA-1B); predicted peak within 3% of
   ``torch.cuda.max_memory_allocated`` (CUDA) or of the tracker's peak (CPU).

Writes ``results/gpu_check_<device>.json`` and ``.md`` (the bench runs' own files beside them) and
prints the table.  Exit status 0 when every check holds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from common import log  # noqa: E402

# (model, batch, seq, [(precision, step-time limit)], peak limit as a fraction of plain eager's)
PRECISIONS = [("fp32", 0.85), ("bf16-autocast", 0.90)]
WORKLOADS = [("bert-base", 32, 128, PRECISIONS, 1 / 3), ("gpt2", 8, 512, PRECISIONS, 1 / 3),
             ("llama-1b", 4, 1024, [("fp32", 0.75)], 1 / 2.5)]
QUICK = [("bert-base", 2, 32, PRECISIONS, 1 / 3), ("gpt2", 1, 64, PRECISIONS, 1 / 3),
         ("llama-tiny", 2, 64, [("fp32", 0.75)], 1 / 2.5)]  # --quick: the CPU runs bf16 matmuls slowly
SETTINGS = "pytorch,pytorch+freeze,slimfit-off,slimfit"


def check_kernels(device: str) -> list[str]:
    """Triton against the reference on ``device``; returns the failures."""
    from slimfit_fx.kernels import reference, triton_kernels

    kernels = triton_kernels()
    if kernels is None:
        return ["triton is not installed: the CUDA formats fall back to the torch reference"]
    failures = []
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 7, 127, 4099, 3 * 2**20 + 5):
            x = (torch.randn(n, generator=g, device=device) * 3).to(dtype)
            for bits in (4, 8):
                got = kernels.quantize(x, bits, 128, -1)
                want = reference.quantize_minmax(x, bits, 128, -1)
                if not (torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])):
                    failures.append(f"quantize {dtype} n={n} bits={bits}: scales differ")
                    continue
                a = reference.dequantize_minmax(*got, bits, 128, n, torch.float32)
                b = reference.dequantize_minmax(*want, bits, 128, n, torch.float32)
                step = want[1].repeat_interleave(128)[:n]
                if ((a - b).abs() > step * 1.001 + 1e-30).any():
                    failures.append(f"quantize {dtype} n={n} bits={bits}: codes differ by more than one step")
                deq = kernels.dequantize(*want, bits, 128, n, dtype)
                ref = reference.dequantize_minmax(*want, bits, 128, n, dtype)
                if not torch.allclose(deq.float(), ref.float(), rtol=torch.finfo(dtype).eps, atol=0):
                    failures.append(f"dequantize {dtype} n={n} bits={bits}")
            codes = reference.quantize_minmax(x, 4, 128, -1)
            grad = torch.randn(n, generator=g, device=device).to(dtype)
            for approximate in ("none", "tanh"):
                got = kernels.dequantize_gelu_backward(grad, *codes, 4, 128, approximate)
                want = reference.dequantize_gelu_backward(grad, *codes, 4, 128, approximate)
                tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
                if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
                    failures.append(f"gelu backward {approximate} {dtype} n={n}")
    return failures


def run_bench(model: str, batch: int, seq: int, precision: str, device: str, repeats: int, out: Path) -> dict:
    """Run tools/bench_memory.py on one workload; its JSON result."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--model", model, "--batch", str(batch),
           "--seq", str(seq), "--precision", precision, "--device", device, "--settings", SETTINGS,
           "--repeats", str(repeats), "--out", str(out)]
    log(" ".join(cmd[1:]), stream=sys.stdout)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.with_suffix(".json").read_text())


def judge(result: dict, limit: float, device: str, peak_limit: float = 1 / 3) -> tuple[list[str], dict]:
    """The failures of one bench result against its limits, and the figures judged."""
    rows = result["rows"]
    plain, slim = rows["pytorch"], rows["slimfit"]
    measured = slim.get("cuda_max_allocated") if device == "cuda" else slim.get("peak")
    base = plain.get("cuda_max_allocated") if device == "cuda" else plain.get("peak")
    figures = {
        "step_vs_plain": slim.get("time_ratio"),
        "step_vs_off": slim.get("time_ratio_to_off"),
        "peak_vs_plain": measured / base if measured and base else None,
        "predicted_peak_error_pct": 100 * (slim["predicted_peak"] - measured) / measured if measured else None,
    }
    failures = []
    if figures["step_vs_plain"] is None or figures["step_vs_plain"] > limit:
        failures.append(f"step time {figures['step_vs_plain']} x plain, limit {limit}")
    if figures["peak_vs_plain"] is None or figures["peak_vs_plain"] > peak_limit:
        failures.append(f"peak {figures['peak_vs_plain']} x plain, limit {peak_limit:.2f}")
    if figures["predicted_peak_error_pct"] is None or abs(figures["predicted_peak_error_pct"]) > 3:
        failures.append(f"predicted peak off by {figures['predicted_peak_error_pct']}%")
    return failures, figures


def main(argv=None) -> int:
    """Kernels (on CUDA), then every workload; print the table, write JSON and markdown; 0 when all hold."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 on CUDA, 3 on the CPU)")
    ap.add_argument("--quick", action="store_true", help=f"small batches: {QUICK} (a CPU run of the script)")
    ap.add_argument("--out", default=None, help="default results/gpu_check_<device>")
    args = ap.parse_args(argv)
    repeats = args.repeats or (10 if args.device == "cuda" else 3)
    out = Path(args.out or f"results/gpu_check_{args.device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"device": args.device, "quick": args.quick,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "torch": torch.__version__, "runs": [], "failures": []}
    if args.device == "cuda":
        log("kernels against the reference", stream=sys.stdout)
        report["kernel_failures"] = check_kernels("cuda")
        report["failures"] += report["kernel_failures"]
    for model, batch, seq, precisions, peak_limit in (QUICK if args.quick else WORKLOADS):
        for precision, limit in precisions:
            result = run_bench(model, batch, seq, precision, args.device, repeats,
                               out.parent / f"{out.name}_{model}_{precision}")
            failures, figures = judge(result, limit, args.device, peak_limit)
            report["runs"].append({"model": model, "batch": batch, "seq": seq, "precision": precision,
                                   "limit": limit, "figures": figures, "failures": failures})
            report["failures"] += [f"{model} {precision}: {f}" for f in failures]
    report["wall_s"] = round(time.time() - started, 1)
    lines = [f"## gpu_check on {report['gpu'] or args.device} (torch {report['torch']}, {report['wall_s']} s)", "",
             "| model | precision | step vs plain | limit | step vs off() | peak vs plain | predicted peak error |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        f = r["figures"]

        def x(v, fmt="{:.2f}x"):
            return "-" if v is None else fmt.format(v)

        lines.append(f"| {r['model']} b{r['batch']} s{r['seq']} | {r['precision']} | {x(f['step_vs_plain'])} | "
                     f"{r['limit']:.2f}x | {x(f['step_vs_off'])} | {x(f['peak_vs_plain'])} | "
                     f"{x(f['predicted_peak_error_pct'], '{:+.1f}%')} |")
    lines += ["", "failures: " + ("none" if not report["failures"] else "; ".join(report["failures"]))]
    md = "\n".join(lines) + "\n"
    print(md)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(md)
    return 0 if not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
