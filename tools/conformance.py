"""The conformance table: every model family of the test suite, tiny configs, against eager PyTorch.

    python tools/conformance.py                  # every family (a few minutes on 2 cores)
    python tools/conformance.py --families t5 swin

Per family: whether ``compile`` works (or its error), whether ``SlimFitConfig.off()`` equals eager
exactly (loss and every gradient), the worst per-parameter gradient cosine of ``SlimFitConfig()`` to
eager (parameters carrying >= 1e-6 of the gradient norm), the worst prediction error of saved bytes
(off(), three frozen patterns, a tiny and an odd shape), and the compiled module's saved bytes over
eager's with nothing frozen and with 90% frozen at random.  The figures come from
``tests/conformance.py``, the same code tests/test_families.py asserts on.

Writes ``results/conformance.json`` and ``.md`` (``--out``) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conformance import measure  # noqa: E402
from families import FAMILIES  # noqa: E402


def row(name: str, blocks: str | None = None) -> dict:
    """One family's conformance figures, or the error that stopped it."""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = measure(name, blocks=blocks)
    except Exception as exc:  # noqa: BLE001 - the table reports any family that fails
        return {"family": name, "compile": f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200],
                "traceback": traceback.format_exc()}
    worst, cosine = c.worst_cosine
    whole = blocks is not None and any("blocks='auto'" in str(w.message) for w in caught)
    how = " (backbone)" if c.slim.backbone is not None else ""
    how += " (whole: " + _fallback_reason(caught) + ")" if whole else ""
    return {"family": name, "compile": "ok" + how,
            "off_exact": c.off_loss_diff == 0 and c.off_grad_diff == 0, "worst_cosine": cosine,
            "worst_cosine_parameter": worst, "prediction_error": c.worst_prediction_error,
            "predictions": c.predictions, "against_eager": c.against_eager,
            "saved_vs_eager": {k: a / e for k, (a, e) in c.against_eager.items()},
            "seconds": round(time.perf_counter() - started, 1)}


def _fallback_reason(caught) -> str:
    text = next(str(w.message) for w in caught if "blocks='auto'" in str(w.message))
    return text.split(": ", 2)[-1].split(";")[0].split(" (an nn.ModuleList")[0]


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    headers = ["family", "compile", "off() exact", "worst cosine", "prediction error",
               "saved vs eager (none / 90% frozen)"]
    out = []
    for r in rows:
        if "off_exact" not in r:
            out.append([r["family"], r["compile"], "-", "-", "-", "-"])
            continue
        v = r["saved_vs_eager"]
        out.append([r["family"], r["compile"], "yes" if r["off_exact"] else "NO", f"{r['worst_cosine']:.4f}",
                    "exact" if r["prediction_error"] == 0 else f"{100 * r['prediction_error']:.2f}%",
                    f"{v['none']:.2f}x / {v['random 90%']:.2f}x"])
    return tabulate(out, headers, tablefmt="github", disable_numparse=True)


def main(argv=None) -> int:
    """Every requested family; prints the table, writes JSON and markdown; 0 when every family conforms."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    p.add_argument("--out", default="results/conformance")
    p.add_argument("--blocks", choices=["auto"], default=None,
                   help="compile with per-block capture (a family without repeated blocks says why it fell back)")
    args = p.parse_args(argv)
    rows = []
    for name in args.families:
        rows.append(row(name, args.blocks))
        print(f"{name}: {rows[-1]['compile']}", file=sys.stderr, flush=True)
    md = table(rows)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    out.with_suffix(".md").write_text(md + "\n")
    ok = all(r.get("off_exact") and r["prediction_error"] == 0 and r["worst_cosine"] >= 0.99
             and all(a <= e for a, e in r["against_eager"].values()) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
