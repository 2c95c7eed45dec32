"""Packing what an op keeps for backward into ``ctx.save_for_backward``.

Takes items (a tensor, a ``quant.Quantized`` or None) and formats as graph-printable tuples; gives
them back in backward, dequantized or not.  Never keeps anything as a bare attribute of ctx: saved
tensor hooks, and so the measurement, must see every byte the analysis predicts.
"""
from __future__ import annotations

import torch

from ..config import QuantFormat
from ..quant import Quantized, dequantize, quantize


def cast(t, dtype):
    """``t`` in ``dtype`` (None: as it is; a tensor of None stays None): the ops cast parameters to
    autocast's dtype, and gradients back to the parameters' own."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def fmt_from_args(args: tuple | None) -> QuantFormat | None:
    """Formats travel through FX graphs as plain tuples (printable in generated code)."""
    return None if args is None else QuantFormat(*args)


def fmt_to_args(fmt: QuantFormat | None) -> tuple | None:
    """Inverse of ``fmt_from_args``: the tuple a pass puts in the graph."""
    if fmt is None:
        return None
    return (fmt.bits, fmt.kind, fmt.step, fmt.signed, fmt.group_size, fmt.stochastic)


_GENERATORS: dict[str, torch.Generator] = {}


def _rounding_generator(device: torch.device) -> torch.Generator:
    """A private RNG for stochastic rounding: drawing from the global one would shift
    every later dropout mask away from eager PyTorch's."""
    key = str(device)
    if key not in _GENERATORS:
        _GENERATORS[key] = torch.Generator(device=device).manual_seed(0x51F17)
    return _GENERATORS[key]


def keep(x: torch.Tensor, fmt: QuantFormat | None):
    """What to keep of ``x``: itself, or its quantized copy."""
    if fmt is None:
        return x
    # minmax kernels take a seed drawn on the host; fixed-point draws its noise on x's device
    device = x.device if fmt.kind == "fixed" else torch.device("cpu")
    generator = _rounding_generator(device) if fmt.stochastic else None
    return quantize(x.detach(), fmt, generator=generator)


def save(ctx, *items) -> None:
    """Keep ``items`` (tensors, ``Quantized`` or None) for backward, every tensor through ``save_for_backward``."""
    tensors, layout = [], []
    for item in items:
        if item is None:
            layout.append(("none", 0, None))
        elif isinstance(item, Quantized):
            parts = item.tensors()
            layout.append(("quant", len(parts), item.meta))
            tensors.extend(parts)
        else:
            layout.append(("tensor", 1, None))
            tensors.append(item)
    ctx._slimfit_layout = layout
    ctx.save_for_backward(*tensors)


def load(ctx, dequantized: bool = True) -> list:
    """The items passed to ``save``; quantized ones dequantized, or as ``Quantized`` for an op
    that fuses dequantizing into its backward."""
    tensors = list(ctx.saved_tensors)
    out, i = [], 0
    for kind, n, meta in ctx._slimfit_layout:
        if kind == "none":
            out.append(None)
        elif kind == "tensor":
            out.append(tensors[i])
        else:
            q = Quantized.from_tensors(tensors[i:i + n], meta)
            out.append(dequantize(q) if dequantized else q)
        i += n
    return out
