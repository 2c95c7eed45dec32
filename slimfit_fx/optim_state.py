"""Optimizer state of frozen layers, moved off the device while a layer is frozen.

Takes an optimizer and, from a scheduler, the parameters it has frozen (``freeze``), will train soon
(``prefetch``) and trains again (``thaw``).  Gives ``FrozenStateStore`` in one of ``MODES``: keep,
offload to host memory, or compress to 8-bit blockwise codes (``quantize_state``); state dicts stay
complete while layers are frozen.  docs/DESIGN.md, "Frozen optimizer state", has the details.
Never moves a step count or a 0-d tensor, lets a step run on a frozen parameter's moved state, or
changes ``optimizer.state`` when a state dict is taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor

from . import measure

__all__ = [
    "MODES",
    "SECOND_MOMENT_KEYS",
    "Blockwise8bit",
    "FrozenStateStore",
    "quantize_state",
    "dequantize_state",
    "quantize_linear",
    "quantize_log",
]

MODES = ("keep", "offload", "compress")

# Non-negative statistics of squared gradients (Adam/AdamW, AMSGrad, RMSprop,
# Adadelta, Adagrad, Adamax): coded in the log domain when no value is negative.
SECOND_MOMENT_KEYS = frozenset(
    {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "sum", "exp_inf"}
)

# Blocks quantized per chunk: bounds the temporaries (4096 blocks of 256
# fp32 elements = 4 MiB per full-size temporary).
CHUNK_BLOCKS = 4096

_LOG_CODES = 254  # codes 1..255 span [log2(min_pos), log2(max)] in 254 steps


# --------------------------------------------------------------------------
# 8-bit blockwise codes for optimizer state
# --------------------------------------------------------------------------


class Blockwise8bit(NamedTuple):
    """A compressed state tensor (what ``optimizer.state[p][key]`` holds
    while ``p`` is frozen with ``mode="compress"``).

    A tuple, so code that walks containers of tensors (e.g.
    :func:`slimfit_fx.measure.peak_bytes` over ``optimizer.state``) sees and
    counts its tensors. ``codes``: one byte per element of the flattened
    tensor (int8 for "linear", uint8 for "log"); ``scale``: fp32 per block
    (absmax / 127, or the log2 step); ``offset``: fp32 ``log2`` of the
    block's smallest positive value ("log" only, else None).
    """

    codes: Tensor
    scale: Tensor
    offset: Tensor | None
    shape: tuple
    dtype: torch.dtype
    kind: str
    block_size: int

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, scales and offsets."""
        return sum(_nbytes(t) for t in (self.codes, self.scale, self.offset) if t is not None)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _chunks(n: int, block_size: int) -> Iterable[tuple[int, int, int, int]]:
    """(start, end, first block, block count) of each chunk of ``n`` elements."""
    step = block_size * CHUNK_BLOCKS
    for start in range(0, n, step):
        end = min(n, start + step)
        yield start, end, start // block_size, -(-(end - start) // block_size)


def _blocks(x: Tensor, nblocks: int, block_size: int, fill: float) -> Tensor:
    """``x`` (1-D, fp32) as [nblocks, block_size], the tail padded with ``fill``."""
    pad = nblocks * block_size - x.numel()
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(nblocks, block_size)


def quantize_linear(x: Tensor, block_size: int = 256) -> Blockwise8bit:
    """int8 codes with a per-block absmax scale (signed state: ``exp_avg``).

    ``code = round(x / s)``, ``s = absmax / 127``: the error of an element is
    at most ``s / 2``, zeros are exact, nothing is clipped. Finite input only.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    nb = -(-n // block_size)
    codes = torch.empty(n, dtype=torch.int8, device=x.device)
    scale = torch.empty(nb, dtype=torch.float32, device=x.device)
    for start, end, b0, nbc in _chunks(n, block_size):
        xb = _blocks(flat[start:end].float(), nbc, block_size, 0.0)
        s = xb.abs().amax(dim=1) / 127
        q = torch.round(xb / torch.where(s > 0, s, 1.0)[:, None]).clamp_(-127, 127)
        codes[start:end] = q.view(-1)[: end - start].to(torch.int8)
        scale[b0 : b0 + nbc] = s
    return Blockwise8bit(codes, scale, None, tuple(x.shape), x.dtype, "linear", block_size)


def quantize_log(x: Tensor, block_size: int = 256) -> Blockwise8bit:
    """uint8 log-domain codes per block (non-negative state: ``exp_avg_sq``).

    Code 0 is exact zero; codes 1..255 are ``log2(x)`` rounded on a uniform
    grid from the block's smallest positive value to its largest, so the
    relative error of every nonzero element is at most ``2**(step/2) - 1``.
    Finite, non-negative input only.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    nb = -(-n // block_size)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    offset = torch.empty(nb, dtype=torch.float32, device=x.device)
    scale = torch.empty(nb, dtype=torch.float32, device=x.device)
    for start, end, b0, nbc in _chunks(n, block_size):
        xb = _blocks(flat[start:end].float(), nbc, block_size, 0.0)
        pos = xb > 0
        lg = torch.log2(torch.where(pos, xb, 1.0))
        lo = torch.where(pos, lg, math.inf).amin(dim=1)
        hi = torch.where(pos, lg, -math.inf).amax(dim=1)
        lo = torch.where(torch.isfinite(lo), lo, 0.0)  # a block without positives
        step = torch.where(hi > lo, (hi - lo) / _LOG_CODES, 0.0)
        q = torch.round((lg - lo[:, None]) / torch.where(step > 0, step, 1.0)[:, None])
        q = torch.where(pos, q.clamp_(0, _LOG_CODES) + 1, 0.0)
        codes[start:end] = q.view(-1)[: end - start].to(torch.uint8)
        offset[b0 : b0 + nbc] = lo
        scale[b0 : b0 + nbc] = step
    return Blockwise8bit(codes, scale, offset, tuple(x.shape), x.dtype, "log", block_size)


def _decode_chunk(q: Blockwise8bit, start: int, end: int, b0: int, nbc: int) -> Tensor:
    """fp32 values of elements ``start:end`` (blocks ``b0 .. b0+nbc-1``)."""
    c = _blocks(q.codes[start:end].float(), nbc, q.block_size, 0.0)
    s = q.scale[b0 : b0 + nbc, None]
    if q.kind == "linear":
        v = c * s
    else:
        v = torch.where(c > 0, torch.exp2(q.offset[b0 : b0 + nbc, None] + (c - 1) * s), 0.0)
    return v.view(-1)[: end - start]


def dequantize_state(q: Blockwise8bit, device: torch.device | str | None = None) -> Tensor:
    """The tensor ``q`` codes: ``q.shape``, ``q.dtype``, contiguous.

    Decoded chunk by chunk on the codes' device (so the values do not depend
    on ``device``) and written to ``device`` (default: the codes' device);
    a CPU ``device`` keeps the device-side temporaries to one chunk.
    """
    out = torch.empty(q.codes.numel(), dtype=q.dtype, device=device or q.codes.device)
    for start, end, b0, nbc in _chunks(q.codes.numel(), q.block_size):
        out[start:end] = _decode_chunk(q, start, end, b0, nbc)
    return out.view(q.shape)


def _finite_and_nonnegative(t: Tensor) -> tuple[bool, bool]:
    """One host sync and no full-size temporary: NaN and inf show in min/max."""
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    lo, hi = torch.stack([lo, hi]).float().tolist()
    return math.isfinite(lo) and math.isfinite(hi), lo >= 0


def quantize_state(key: str, t: Tensor, block_size: int = 256) -> Blockwise8bit | Tensor:
    """Code the state tensor ``optimizer.state[p][key]`` (docs/DESIGN.md, "Frozen optimizer state").

    Log domain for a :data:`SECOND_MOMENT_KEYS` key with no negative value,
    linear absmax int8 otherwise; a tensor that is empty or not finite is
    returned unchanged.
    """
    if t.numel() == 0:
        return t
    finite, nonneg = _finite_and_nonnegative(t)
    if not finite:
        return t
    if key in SECOND_MOMENT_KEYS and nonneg:
        return quantize_log(t, block_size)
    return quantize_linear(t, block_size)


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


def _movable(key: Any, value: Any) -> bool:
    """State entries that are moved: per-element tensors, not the step count."""
    return (
        key != "step"
        and isinstance(value, Tensor)
        and value.is_floating_point()
        and value.dim() > 0
    )


@dataclass
class _Record:
    """What the store knows about one frozen parameter's moved entries.

    ``devices``: key -> device the tensor came from (and returns to).
    ``offloaded``: CUDA event recorded after the device-to-host copies (host
    tensors are valid for CPU reads only once it completes). ``prefetched``:
    device copies already on their way back, ready when ``prefetch_done``
    completes.
    """

    devices: dict[str, torch.device] = field(default_factory=dict)
    offloaded: Any = None
    prefetched: dict[str, Tensor] | None = None
    prefetch_done: Any = None


def _to_host(t: Tensor) -> Tensor:
    """Host copy of ``t`` (pinned and asynchronous from CUDA); ``t`` itself on the CPU."""
    if t.device.type == "cpu":
        return t
    if t.device.type == "cuda":
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.to("cpu")


def _cuda_event(device: torch.device) -> Any:
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class FrozenStateStore:
    """Holds the optimizer state of frozen parameters off the device.

    ``FrozenStateStore(optimizer, mode="offload", block_size=256)`` with
    ``mode`` in :data:`MODES` (docs/DESIGN.md); ``block_size`` is the
    element count per block of ``"compress"``'s codes (a smaller block costs
    more scale bytes and adapts better to local magnitudes).

    The store registers three hooks on ``optimizer``: a step pre-hook (a
    frozen parameter with a gradient is an error), a state-dict post-hook
    (checkpoints hold the full state) and a load-state-dict post-hook (a
    loaded state of a frozen parameter is frozen again). ``close()`` thaws
    everything and removes them.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, mode: str = "offload", block_size: int = 256
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"FrozenStateStore mode must be one of {MODES}, got {mode!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.optimizer = optimizer
        self.mode = mode
        self.block_size = block_size
        self._frozen: dict[Tensor, _Record] = {}
        self._side_streams: dict[torch.device, Any] = {}
        self._hooks = [
            optimizer.register_step_pre_hook(self._check_step),
            optimizer.register_state_dict_post_hook(self._full_state_dict),
            optimizer.register_load_state_dict_post_hook(self._refreeze_after_load),
        ]

    # -- public API -------------------------------------------------------

    def freeze(self, params: Iterable[Tensor]) -> None:
        """Move the state of ``params`` off the device. Call after the
        parameters were frozen and their grads set to None; idempotent."""
        events: dict[torch.device, Any] = {}
        for p in params:
            if p not in self._frozen:
                self._frozen[p] = self._freeze_one(p, events)
        for device, records in events.items():
            event = _cuda_event(device)
            for rec in records:
                rec.offloaded = event

    def thaw(self, params: Iterable[Tensor]) -> None:
        """Put the state of ``params`` back on the device, before they train
        again: exact for ``"offload"``, dequantized for ``"compress"``.
        Parameters that are not frozen are skipped."""
        for p in params:
            rec = self._frozen.pop(p, None)
            if rec is not None:
                self._thaw_one(p, rec)

    def prefetch(self, params: Iterable[Tensor]) -> None:
        """Start copying the offloaded state of ``params`` back to its CUDA
        device on a side stream, so that ``thaw`` only waits for it. No-op
        off CUDA and for modes other than ``"offload"``."""
        if self.mode != "offload":
            return
        for p in params:
            rec = self._frozen.get(p)
            if rec is not None and rec.prefetched is None and self._on_cuda(rec):
                self._prefetch_one(p, rec)

    def nbytes(self) -> dict[str, int]:
        """Bytes the store holds now: ``"host"`` (offloaded tensors, in host
        memory; on a CPU-only machine the kept, marked tensors),
        ``"compressed"`` (8-bit codes and scales, on the parameters'
        devices), ``"device"`` (prefetched full-precision copies waiting for
        ``thaw``). The three are disjoint."""
        out = {"device": 0, "host": 0, "compressed": 0}
        for p, rec in self._frozen.items():
            state = self.optimizer.state.get(p, {})
            for key in rec.devices:
                value = state[key]
                if isinstance(value, Blockwise8bit):
                    out["compressed"] += value.nbytes
                else:
                    out["host"] += _nbytes(value)
            out["device"] += sum(_nbytes(t) for t in (rec.prefetched or {}).values())
        return out

    def __contains__(self, p: Tensor) -> bool:
        """Whether ``p`` is frozen in this store."""
        return p in self._frozen

    def close(self) -> None:
        """Thaw every frozen parameter and remove the optimizer hooks."""
        self.thaw(list(self._frozen))
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- freeze / thaw of one parameter ---------------------------------

    def _freeze_one(self, p: Tensor, events: dict[torch.device, list]) -> _Record:
        rec = _Record()
        state = self.optimizer.state.get(p)  # .get: no empty entry created
        if self.mode == "keep" or not state:
            return rec
        for key, value in list(state.items()):
            if not _movable(key, value):
                continue
            moved = self._move_out(key, value)
            if moved is value and self.mode == "compress":
                continue  # not compressible (non-finite): stays as it is
            rec.devices[key] = value.device
            state[key] = moved
            if value.device.type == "cuda" and self.mode == "offload":
                events.setdefault(value.device, []).append(rec)
        return rec

    def _move_out(self, key: str, value: Tensor) -> Tensor | Blockwise8bit:
        if self.mode == "compress":
            return quantize_state(key, value, self.block_size)
        host = _to_host(value)
        measure.mark_host_resident(host)
        return host

    def _thaw_one(self, p: Tensor, rec: _Record) -> None:
        if not rec.devices:
            return  # nothing moved ("keep", or no state yet)
        state = self.optimizer.state[p]
        if rec.prefetched is not None:
            self._take_prefetched(state, rec)
            return
        for key, device in rec.devices.items():
            value = state[key]
            if isinstance(value, Blockwise8bit):
                state[key] = dequantize_state(value)
            elif value.device == device:  # kept in place (CPU): only the mark goes
                measure.unmark_host_resident(value)
            else:  # same stream as the offload copy: ordered after it
                state[key] = value.to(device, non_blocking=True)

    # -- CUDA prefetch ----------------------------------------------------

    @staticmethod
    def _on_cuda(rec: _Record) -> bool:
        return any(d.type == "cuda" for d in rec.devices.values())

    def _side_stream(self, device: torch.device) -> Any:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]

    def _prefetch_one(self, p: Tensor, rec: _Record) -> None:
        """Copies allocated on the side stream (so the allocator does not
        hand out memory the main stream may still use), after the offload
        copies completed; an event marks their end."""
        state = self.optimizer.state[p]
        device = next(d for d in rec.devices.values() if d.type == "cuda")
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            if rec.offloaded is not None:
                stream.wait_event(rec.offloaded)
            rec.prefetched = {k: state[k].to(d, non_blocking=True) for k, d in rec.devices.items()}
            rec.prefetch_done = torch.cuda.Event()
            rec.prefetch_done.record(stream)

    def _take_prefetched(self, state: dict, rec: _Record) -> None:
        for key, t in rec.prefetched.items():
            if t.device.type == "cuda":
                main = torch.cuda.current_stream(t.device)
                main.wait_event(rec.prefetch_done)
                t.record_stream(main)  # freed later on the main stream, not the side one
            state[key] = t

    def _settle(self, rec: _Record) -> None:
        """Wait for pending copies (host reads of the offloaded tensors,
        prefetches about to be dropped)."""
        for event in (rec.offloaded, rec.prefetch_done):
            if event is not None:
                event.synchronize()

    # -- optimizer hooks ----------------------------------------------------

    def _check_step(self, optimizer, args, kwargs) -> None:
        """A frozen parameter with a gradient would be stepped on a state
        that is not there (host tensors or codes): refuse."""
        for p, rec in self._frozen.items():
            if rec.devices and p.grad is not None:
                raise RuntimeError(
                    "FrozenStateStore: a frozen parameter of shape "
                    f"{tuple(p.shape)} has a gradient; call store.thaw([p]) before it trains "
                    "again (or set its grad to None)"
                )

    def _full_state_dict(self, optimizer, state_dict: dict) -> dict:
        """Put full-precision copies of the frozen entries into a state dict.

        Each frozen parameter's entry is replaced by a new dict (the packed
        state shares its dicts with ``optimizer.state``, which must stay as
        it is)."""
        index = {}
        for group, packed in zip(optimizer.param_groups, state_dict["param_groups"]):
            index.update(zip(map(id, group["params"]), packed["params"]))
        for p, rec in self._frozen.items():
            if rec.devices and id(p) in index:
                self._settle(rec)
                entry = dict(optimizer.state[p])
                for key in rec.devices:
                    if isinstance(entry[key], Blockwise8bit):
                        entry[key] = dequantize_state(entry[key], device="cpu")
                state_dict["state"][index[id(p)]] = entry
        return state_dict

    def _refreeze_after_load(self, optimizer) -> None:
        """``load_state_dict`` replaced ``optimizer.state`` with full tensors
        on the parameters' devices: the frozen parameters' old records are
        void; freeze the loaded state again."""
        frozen = list(self._frozen.items())
        self._frozen.clear()
        for _, rec in frozen:
            self._settle(rec)
        self.freeze(p for p, _ in frozen)
