"""Time of the formats' kernels on one device, against a plain copy of the same tensor.

    python tools/bench_kernels.py                      # CPU: the reference kernels and inductor-compiled ones
    python tools/bench_kernels.py --device cuda        # CUDA: the Triton kernels and the torch reference

Rows: quantize and dequantize of the per-group min/max format (8 and 4 bits, groups of 128) and the
bit-mask packing, on the shapes of BERT-base at batch 8 and seq 128 (a hidden state, the FFN
activation, the attention probabilities).  Columns: milliseconds per call (median of ``--repeats``
after a warm-up) and the ratio to ``x.clone()``, which reads and writes the input once.  On the CPU a
``torch.compile``d copy of the reference is timed too (when inductor can compile here): the figure
behind keeping the vectorised reference as the CPU kernel.  Writes ``results/bench_kernels_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from slimfit_fx.kernels import reference, triton_kernels  # noqa: E402

SHAPES = {"hidden 8x128x768": (8, 128, 768), "ffn 8x128x3072": (8, 128, 3072),
          "attention probs 8x12x128x128": (8, 12, 128, 128)}


def timed(fn, repeats: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after a warm-up (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def candidates(device: str) -> dict:
    """name -> (quantize, dequantize) implementations to time."""
    out = {"reference": (reference.quantize_minmax, reference.dequantize_minmax)}
    if device == "cuda" and triton_kernels() is not None:
        out["triton"] = (triton_kernels().quantize, triton_kernels().dequantize)
    if device == "cpu":
        try:
            q = torch.compile(reference.quantize_minmax, dynamic=True)
            d = torch.compile(reference.dequantize_minmax, dynamic=True)
            q(torch.randn(256), 8, 128, -1)  # compile now, or fail now
            out["inductor"] = (q, d)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, say
            print(f"inductor: not available here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return out


def main(argv=None) -> int:
    """Time every kernel on every shape, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = candidates(args.device)
    rows = []
    for label, shape in SHAPES.items():
        x = torch.randn(shape, device=args.device)
        n = x.numel()
        copy = timed(partial(x.clone), args.repeats, args.device)
        rows.append({"shape": label, "kernel": "x.clone()", "ms": copy, "vs_copy": 1.0})
        for name, (quantize, dequantize) in impls.items():
            for bits in (8, 4):
                packed = quantize(x, bits, 128, -1)
                ms = timed(partial(quantize, x, bits, 128, -1), args.repeats, args.device)
                rows.append({"shape": label, "kernel": f"{name} quantize {bits}-bit", "ms": ms, "vs_copy": ms / copy})
                ms = timed(partial(dequantize, *packed, bits, 128, n, torch.float32), args.repeats, args.device)
                rows.append({"shape": label, "kernel": f"{name} dequantize {bits}-bit", "ms": ms,
                             "vs_copy": ms / copy})
        mask = torch.rand(shape, device=args.device) < 0.9
        bits = reference.pack_bits(mask)
        for kernel, fn in (("pack_bits", partial(reference.pack_bits, mask)),
                           ("unpack_bits", partial(reference.unpack_bits, bits, n))):
            ms = timed(fn, args.repeats, args.device)
            rows.append({"shape": label, "kernel": kernel, "ms": ms, "vs_copy": ms / copy})
    from tabulate import tabulate

    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(tabulate([[r["shape"], r["kernel"], f"{r['ms']:.2f}", f"{r['vs_copy']:.1f}x"] for r in rows],
                   headers=["shape", "kernel", "ms", "vs copy"], tablefmt="github"))
    out = Path(f"results/bench_kernels_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
