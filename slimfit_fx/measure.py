"""What a fine-tuning step really holds in memory, measured by watching tensors (no GPU needed).

Takes a callable (a forward, or a whole training step) and, for the peak, the model, optimizer
and tensors alive before it. Gives the bytes autograd saved for backward (:func:`saved_bytes`,
:func:`measure_saved`), the peak of live tensor storages over one step with its breakdown
(:func:`peak_bytes`), and marks for storages kept in host memory on the device's behalf
(:func:`mark_host_resident`). Counts each storage once and never changes what the callable
computes; a tensor without a storage it can size is left uncounted, never an error.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_leaves

__all__ = [
    "SavedRecord",
    "SavedMeasurement",
    "PeakMeasurement",
    "TrackedStorage",
    "StorageTracker",
    "measure_saved",
    "saved_tensors",
    "saved_bytes",
    "peak_bytes",
    "running_tracker",
    "fmt_bytes",
    "mark_host_resident",
    "unmark_host_resident",
    "is_host_resident",
]


# --------------------------------------------------------------------------
# Storage helpers shared by both measurements
# --------------------------------------------------------------------------


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """Real storages behind ``t``; [] where there is no real memory.

    Wrapper subclasses are flattened to their inner tensors. Meta and fake
    tensors hold no memory; sparse/nested tensors have no single storage:
    all are skipped instead of raising, so a measurement never crashes on an
    exotic tensor (it just does not count it).
    """
    if type(t) in (torch.Tensor, nn.Parameter):
        pass  # fast path: the dispatch mode calls this for every op output
    elif is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        inner = (getattr(t, a) for a in attrs)
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    elif is_fake(t):
        return []
    if t.device.type == "meta":
        return []
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError, TypeError):
        return []


def _tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in any nesting of dicts/lists/tuples (e.g. optimizer state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_of(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors_of(v)


def fmt_bytes(n: int | float | None) -> str:
    """Human-readable binary size: ``fmt_bytes(12_900_000) == '12.3 MiB'``."""
    if n is None:
        return "n/a"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------
# Saved-for-backward bytes
#
# ``fn`` runs inside torch.autograd.graph.saved_tensors_hooks: the pack hook
# sees every tensor a node saves for backward and counts each storage once
# (``untyped_storage().nbytes()``), leaving out parameters' storages, which are
# alive anyway and are not activations.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedRecord:
    """One tensor that autograd saved for backward.

    ``storage_ids`` number distinct storages in order of first sighting (a
    plain tensor has one, a wrapper subclass one per inner tensor, a tensor
    without real memory none). ``nbytes`` is the size of those storages,
    whole, not just the viewed part; ``new_bytes`` the part counted here:
    storages not seen before and not parameters. The saved bytes are the sum
    of ``new_bytes``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    nbytes: int
    new_bytes: int
    storage_ids: tuple[int, ...]
    is_parameter: bool


@dataclass
class SavedMeasurement:
    """``bytes`` saved for backward, ``fn``'s ``result`` (which holds the
    graph, so a backward can follow) and one record per saved tensor."""

    bytes: int
    result: Any
    records: list[SavedRecord] = field(default_factory=list)


def _param_iter(params: nn.Module | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    return params.parameters() if isinstance(params, nn.Module) else params


def _ids_allocator() -> Callable[[torch.UntypedStorage], tuple[int, bool]]:
    """Storage -> (stable id, first sighting), robust to address reuse.

    Keyed by ``id()`` of the storage's Python object (PyTorch keeps one
    Python object per live storage); a weak reference confirms the key still
    names the same storage, so a storage freed during ``fn`` and another one
    later allocated in its place are not merged.
    """
    seen: dict[int, tuple[weakref.ref, int]] = {}
    counter = iter(range(1 << 62))

    def get(st: torch.UntypedStorage) -> tuple[int, bool]:
        hit = seen.get(id(st))
        if hit is not None and hit[0]() is st:
            return hit[1], False
        sid = next(counter)
        seen[id(st)] = (weakref.ref(st), sid)
        return sid, True

    return get


def _is_param_by_type(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def _record(
    t: torch.Tensor,
    ids: Callable[[torch.UntypedStorage], tuple[int, bool]],
    param_ids: set[int],
    by_type: bool,
) -> SavedRecord:
    sts = _storages(t)
    is_param = _is_param_by_type(t) if by_type else any(id(s) in param_ids for s in sts)
    sids, new_bytes = [], 0
    for st in sts:
        sid, first = ids(st)
        sids.append(sid)
        new_bytes += st.nbytes() if first and not is_param else 0
    return SavedRecord(
        shape=tuple(t.shape),
        dtype=t.dtype,
        device=t.device.type,
        nbytes=sum(st.nbytes() for st in sts),
        new_bytes=new_bytes,
        storage_ids=tuple(sids),
        is_parameter=is_param,
    )


def measure_saved(
    fn: Callable[[], Any], params: nn.Module | Iterable[torch.Tensor] | None = None
) -> SavedMeasurement:
    """Run ``fn()`` and measure the unique storages autograd saved for backward.

    ``params`` selects what is excluded as "parameters": an ``nn.Module``
    (its parameters) or an iterable of tensors; any saved tensor sharing a
    storage with one of them is left out. With ``params=None`` a saved tensor
    is excluded only if it is an ``nn.Parameter`` or a view whose ``_base``
    is one (``weight.t()`` saved by ``addmm``); a detached alias of a
    parameter would then be counted, so pass ``params`` when it matters
    (e.g. for exported graphs whose parameters are plain tensors).

    Every storage saved while ``fn`` runs counts, including any whose graph
    was freed before ``fn`` returned (if ``fn`` also ran a backward, say).
    """
    # Hold the parameter storages themselves: keying on id() is only safe
    # while the objects are alive.
    param_storages = (
        [] if params is None else [s for t in _param_iter(params) for s in _storages(t)]
    )
    param_ids = {id(s) for s in param_storages}
    ids = _ids_allocator()
    records: list[SavedRecord] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        records.append(_record(t, ids, param_ids, by_type=params is None))
        # Same storage, so a later backward still works; detached, because an op that
        # saves its own output (softmax, tanh) would otherwise form a reference cycle
        # through its grad_fn that keeps the whole graph alive when no backward runs.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    total = sum(r.new_bytes for r in records)
    return SavedMeasurement(bytes=total, result=result, records=records)


def saved_tensors(
    fn: Callable[[], Any], params: nn.Module | Iterable[torch.Tensor] | None = None
) -> list[SavedRecord]:
    """The records of :func:`measure_saved` (one per saved tensor), for debugging."""
    return measure_saved(fn, params).records


def saved_bytes(
    fn: Callable[[], Any], params: nn.Module | Iterable[torch.Tensor] | None = None
) -> int:
    """Bytes of unique non-parameter storages saved for backward by ``fn()``."""
    return measure_saved(fn, params).bytes


# --------------------------------------------------------------------------
# Peak bytes of a whole training step
#
# A TorchDispatchMode sees the output of every ATen op, in forward, in the
# autograd engine's backward and in the optimizer; each new storage is
# registered with a weak reference whose callback subtracts its bytes when the
# storage dies (the technique of torch.distributed._tools.mem_tracker, not used
# directly because it crashes on partially frozen models).
# --------------------------------------------------------------------------

# Account name of host-resident storages in PeakMeasurement.by_device.
HOST = "host"

# Roles in priority order: a storage that is both (e.g. a gradient that an
# optimizer also keeps in its state) is reported under the first one.
_ROLES = ("parameters", "gradients", "optimizer_state", "other")


@dataclass
class PeakMeasurement:
    """Live-storage bytes over one training step (see :func:`peak_bytes`).

    ``parameters + gradients + optimizer_state + other == peak``: the
    breakdown is of the storages live at the moment of the peak.
    ``peak``, ``baseline``, ``end`` and the breakdown leave out host-resident
    storages (see :func:`mark_host_resident`); ``offloaded`` is the
    host-resident bytes live at the moment of the (device) peak, so
    ``peak + offloaded`` is everything the step held then.
    ``by_device`` is each device type's own peak (they need not coincide in
    time); it has a ``"host"`` key, the host-resident account's own peak,
    only when some host-resident storage was tracked. ``cuda_max_allocated``
    is the CUDA caching allocator's
    ``max_memory_allocated()`` for the current device over the step
    (absolute, not relative to the baseline; it includes kernel scratch
    space this tracker cannot see) when CUDA tensors were involved, else
    None.
    """

    peak: int
    baseline: int
    end: int
    parameters: int
    gradients: int
    optimizer_state: int
    other: int
    offloaded: int = 0
    by_device: dict[str, int] = field(default_factory=dict)
    cuda_max_allocated: int | None = None

    def __int__(self) -> int:
        return self.peak


@dataclass(eq=False)  # identity semantics: entries are compared with `is`
class TrackedStorage:
    """One storage a :class:`StorageTracker` counts. Holds no strong reference to it.

    ``nbytes``: its size now (0 once it died); ``role``: one of "parameters",
    "gradients", "optimizer_state", "other"; ``host``: the storage is
    host-resident (:func:`mark_host_resident`) and counted in the "host"
    account instead of ``device``'s.
    """

    nbytes: int
    device: str
    role: str = "other"
    ref: weakref.ref | None = None
    host: bool = False

    @property
    def account(self) -> str:
        """The account its bytes are counted in: ``"host"`` or its device type."""
        return HOST if self.host else self.device


def _promote(entry: TrackedStorage, role: str) -> None:
    if _ROLES.index(role) < _ROLES.index(entry.role):
        entry.role = role


class StorageTracker:
    """Live storages of one :func:`peak_bytes` call, the running total (``current``) and its ``peak``.

    Keyed by ``id()`` of the storage's Python object: PyTorch keeps that
    object alive exactly as long as the storage, and the weak reference's
    callback runs when the storage dies, before its id can be reused.
    Tools that instrument a step reach it through :func:`running_tracker`.
    """

    def __init__(self) -> None:
        self._live: dict[int, TrackedStorage] = {}
        self.current = 0
        self.peak = 0
        self.device_now: dict[str, int] = {}
        self.device_peak: dict[str, int] = {}
        # The live set at the peak is copied lazily: between a new peak and
        # the next decrease only additions happen, so copying just before the
        # first decrease captures the peak set (plus, at most, zero-byte
        # storages) without copying on every allocation. Sizes are copied
        # too, because an entry's own count drops to 0 when it dies.
        self._peak_entries: list[TrackedStorage] = []
        self._peak_sizes: list[int] = []
        self._peak_unsaved = False
        # Host-resident bytes: live now, and live when the device peak was set.
        self.host_now = 0
        self.host_at_peak = 0
        self._watchers: list[Callable[[Any, list[torch.Tensor]], None]] = []

    def track(self, t: torch.Tensor, role: str = "other") -> None:
        """Count ``t``'s storages if new; give them ``role`` if it ranks higher."""
        for st in _storages(t):
            entry = self._live.get(id(st))
            if entry is None or entry.ref() is not st:
                entry = self._add(st)
            elif st.nbytes() != entry.nbytes:  # resize_ or set_ grew/shrank it
                self._change(entry, st.nbytes() - entry.nbytes)
            _promote(entry, role)

    def tag(self, t: torch.Tensor, role: str) -> None:
        """Like :meth:`track` for storages already counted; others are left
        alone, since adding them now would misdate them (after the step)."""
        for entry in self.entries(t):
            _promote(entry, role)

    def entries(self, t: torch.Tensor) -> list[TrackedStorage]:
        """The counted entries of ``t``'s storages (a storage not counted has none)."""
        found = (self._entry_of(st) for st in _storages(t))
        return [e for e in found if e is not None]

    def live_entries(self) -> list[TrackedStorage]:
        """Every storage counted and alive now."""
        return list(self._live.values())

    def set_host(self, st: torch.UntypedStorage, host: bool) -> None:
        """Move a tracked storage between its device's account and the host
        account (a mark or unmark that arrives after allocation)."""
        entry = self._entry_of(st)
        if entry is None or entry.host == host:
            return
        nbytes = entry.nbytes
        self._change(entry, -nbytes)  # leaves the old account first: saves a pending peak set
        entry.host = host
        self._change(entry, nbytes)

    @contextlib.contextmanager
    def watch(self, callback: Callable[[Any, list[torch.Tensor]], None]) -> Iterator[None]:
        """Within the block, ``callback(op, output_tensors)`` runs after every ATen op of the
        step, once the op's outputs are counted (so ``current`` includes them)."""
        self._watchers.append(callback)
        try:
            yield
        finally:
            self._watchers.remove(callback)

    def _entry_of(self, st: torch.UntypedStorage) -> TrackedStorage | None:
        entry = self._live.get(id(st))
        return entry if entry is not None and entry.ref() is st else None

    def _add(self, st: torch.UntypedStorage) -> TrackedStorage:
        key = id(st)
        entry = TrackedStorage(nbytes=0, device=st.device.type, host=_registered_host(st))
        entry.ref = weakref.ref(st, lambda _, k=key, e=entry: self._on_free(k, e))
        self._live[key] = entry
        self._change(entry, st.nbytes())
        return entry

    def _on_free(self, key: int, entry: TrackedStorage) -> None:
        if self._live.get(key) is entry:
            self._change(entry, -entry.nbytes)
            del self._live[key]

    def _change(self, entry: TrackedStorage, delta: int) -> None:
        if delta < 0 and self._peak_unsaved and not entry.host:
            self._save_peak_set()
        acc = entry.account
        entry.nbytes += delta
        self.device_now[acc] = self.device_now.get(acc, 0) + delta
        self.device_peak[acc] = max(self.device_peak.get(acc, 0), self.device_now[acc])
        if entry.host:  # not device memory: outside current/peak and the peak set
            self.host_now += delta
            return
        self.current += delta
        if self.current > self.peak:
            self.peak = self.current
            self.host_at_peak = self.host_now
            self._peak_unsaved = True

    def restart_peak(self) -> None:
        """Make the current live set the starting peak (after the baseline)."""
        self.peak = self.current
        self.host_at_peak = self.host_now
        self.device_peak = dict(self.device_now)
        self._peak_unsaved = True

    def _save_peak_set(self) -> None:
        # No GC-tracked allocation while copying: a collection here could
        # free a storage and re-enter _on_free mid-copy. The filter runs on
        # the copied list, not on the dict, for the same reason.
        self._peak_unsaved = False
        entries = list(self._live.values())
        self._peak_entries = [e for e in entries if not e.host]
        self._peak_sizes = [e.nbytes for e in self._peak_entries]

    def peak_set(self) -> list[tuple[TrackedStorage, int]]:
        """The device storages live at the peak, each with its size then."""
        if self._peak_unsaved:
            self._save_peak_set()
        return list(zip(self._peak_entries, self._peak_sizes))

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes live at the peak, by role. Roles are read now, not at the
        peak, so a storage tagged later (a gradient) is classified as such."""
        out = dict.fromkeys(_ROLES, 0)
        for e, nbytes in self.peak_set():
            out[e.role] += nbytes
        return out

    def close(self) -> None:
        """Stop counting: cancel every death callback and forget every storage."""
        # Dropping the weak references cancels their callbacks and breaks the
        # tracker <-> callback cycle: nothing outlives the measurement.
        for e in list(self._live.values()):
            e.ref = None
        self._live.clear()
        self._peak_entries, self._peak_sizes = [], []


# --------------------------------------------------------------------------
# Host-resident (offloaded) storages
#
# On a machine without an accelerator an offloaded tensor (e.g. a frozen
# layer's optimizer state moved out by slimfit_fx.optim_state.FrozenStateStore)
# is in the same memory as everything else: only this mark tells it apart, so
# that an offload does not look like no saving at all.
# --------------------------------------------------------------------------

# id(storage) -> weak reference to it. Module-level, so a mark made before a
# measurement starts (optimizer state offloaded in an earlier step) is seen
# by it; weak, so a mark never keeps memory alive, and the callback drops the
# key when the storage dies, before its id can name another storage.
_HOST_RESIDENT: dict[int, weakref.ref] = {}
# Trackers of the peak_bytes calls running now, innermost last: a mark reaches them at once.
_ACTIVE: list[StorageTracker] = []


def _registered_host(st: torch.UntypedStorage) -> bool:
    ref = _HOST_RESIDENT.get(id(st))
    return ref is not None and ref() is st


def _forget(key: int, ref: weakref.ref) -> None:
    if _HOST_RESIDENT.get(key) is ref:
        del _HOST_RESIDENT[key]


def mark_host_resident(t: torch.Tensor) -> None:
    """Declare ``t``'s storages host-resident: memory moved out of the device.

    :func:`peak_bytes` then counts them in a separate "host" account
    (``PeakMeasurement.offloaded`` and ``by_device["host"]``), not in the
    device peak. Needed because on a machine without an accelerator an
    offloaded tensor is in the same memory as everything else: only this
    mark tells it apart. Call it on the host copy (on CUDA, the pinned CPU
    tensor; on CPU, the tensor that was kept). Takes effect at once in any
    running measurement (the storage leaves the device account now) and in
    later ones; it lasts until :func:`unmark_host_resident` or the storage's
    death. Idempotent.
    """
    for st in _storages(t):
        if not _registered_host(st):
            key = id(st)
            _HOST_RESIDENT[key] = weakref.ref(st, lambda r, k=key: _forget(k, r))
        for live in _ACTIVE:
            live.set_host(st, True)


def unmark_host_resident(t: torch.Tensor) -> None:
    """Undo :func:`mark_host_resident`: ``t`` is device memory again (e.g.
    the same CPU tensor handed back to the optimizer when a layer thaws)."""
    for st in _storages(t):
        if _registered_host(st):
            del _HOST_RESIDENT[id(st)]
        for live in _ACTIVE:
            live.set_host(st, False)


def is_host_resident(t: torch.Tensor) -> bool:
    """Whether every storage of ``t`` is marked host-resident (False if it has none)."""
    sts = _storages(t)
    return bool(sts) and all(_registered_host(st) for st in sts)


class _TrackingMode(TorchDispatchMode):
    """Registers the storage of every tensor an ATen op returns.

    Views and in-place ops return an already tracked storage, so they add
    nothing. The mode also sees the ops of the backward pass (on CPU the
    engine runs them on the calling thread; device threads inherit the mode
    stack with the rest of the thread-local state) and those of
    ``torch.autograd.Function`` forwards and backwards.
    """

    def __init__(self, live: StorageTracker) -> None:
        super().__init__()
        self.live = live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.live.track(t)
        if self.live._watchers:
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            for watcher in list(self.live._watchers):
                watcher(func, outputs)
        return out


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _parameters(model: nn.Module | None, optimizer: torch.optim.Optimizer | None):
    params = list(model.parameters()) if model is not None else []
    if optimizer is not None:
        params += [p for g in optimizer.param_groups for p in g["params"]]
    return _unique(params)


def _known_tensors(params, model, optimizer) -> Iterator[tuple[torch.Tensor, str]]:
    """(tensor, role) for parameters, their grads, buffers and optimizer state."""
    for p in params:
        yield p, "parameters"
        if p.grad is not None:
            yield p.grad, "gradients"
    if model is not None:
        for b in model.buffers():
            yield b, "other"
    if optimizer is not None:
        for t in _tensors_of(list(optimizer.state.values())):
            yield t, "optimizer_state"


def _grad_hooks(params, live) -> list:
    """Tag each gradient as it is accumulated, so gradients freed later in
    the step (``zero_grad(set_to_none=True)``) are still classified."""

    def tag_gradient(q: torch.Tensor) -> None:
        if q.grad is not None:
            live.track(q.grad, "gradients")

    return [p.register_post_accumulate_grad_hook(tag_gradient) for p in params if p.requires_grad and p.is_leaf]


def _cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def running_tracker() -> StorageTracker:
    """The :class:`StorageTracker` of the innermost :func:`peak_bytes` call running now, for a
    ``step_fn`` that instruments its own step; RuntimeError outside one."""
    if not _ACTIVE:
        raise RuntimeError("no peak_bytes measurement is running")
    return _ACTIVE[-1]


def _measurement(live: StorageTracker, baseline: int) -> PeakMeasurement:
    """The figures of a finished step."""
    breakdown = live.peak_breakdown()
    cuda_peak = (
        torch.cuda.max_memory_allocated()
        if "cuda" in live.device_peak and _cuda_active()
        else None
    )
    return PeakMeasurement(
        peak=live.peak,
        baseline=baseline,
        end=live.current,
        **breakdown,
        offloaded=live.host_at_peak,
        by_device=dict(live.device_peak),
        cuda_max_allocated=cuda_peak,
    )


def peak_bytes(
    step_fn: Callable[[], Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    tensors: Iterable[torch.Tensor] = (),
) -> PeakMeasurement:
    """Peak of live tensor-storage bytes over one call of ``step_fn()``.

    ``step_fn`` is a whole training step (forward, ``backward()``,
    ``optimizer.step()``, maybe ``zero_grad()``); its return value is dropped
    so that nothing of the step is kept alive. The baseline is what is live
    before the step: parameters, gradients and buffers of ``model``,
    parameters and state of ``optimizer``, and ``tensors`` (e.g. the input
    batch, if it was made outside ``step_fn``), each storage once; a tensor
    made before the step and only read by it is not counted otherwise.

    Classification at the peak: "parameters" are storages of the model's or
    optimizer's parameters; "gradients" are storages that were some
    parameter's ``.grad`` at the start, at the end, or right after autograd
    accumulated them (a post-accumulate-grad hook), so a gradient freed by
    ``zero_grad(set_to_none=True)`` inside the step is still a gradient;
    "optimizer_state" are storages in ``optimizer.state`` at the start or at
    the end; everything else (activations, temporaries, buffers, inputs) is
    "other". A gradient buffer an optimizer allocates and frees within the
    step without attaching it to ``.grad`` counts as "other".

    Host-resident storages (:func:`mark_host_resident`, before or during the
    step) are left out of ``peak``, ``baseline``, ``end`` and the breakdown;
    ``offloaded`` is what of them was live at the moment of the peak and
    ``by_device["host"]`` their own peak. A storage marked during the step
    counts as device memory until the mark.

    The figures count storages at ATen-op granularity: a kernel's internal
    scratch memory, allocator rounding and caching are invisible (hence
    ``cuda_max_allocated`` beside them on CUDA), and CPU and CUDA kernels keep
    different things (CPU dropout saves a float mask, CUDA a byte mask).
    """
    params = _parameters(model, optimizer)
    live = StorageTracker()
    handles: list = []
    _ACTIVE.append(live)
    try:
        for t, role in _known_tensors(params, model, optimizer):
            live.track(t, role)
        for t in tensors:
            live.track(t, "other")
        baseline = live.current
        live.restart_peak()
        handles = _grad_hooks(params, live)
        if _cuda_active():
            torch.cuda.reset_peak_memory_stats()
        with _TrackingMode(live):
            step_fn()  # result dropped on purpose: it may hold the graph
        for t, role in _known_tensors(params, model, optimizer):
            live.tag(t, role)  # grads and state made in the step
        return _measurement(live, baseline)
    finally:
        _ACTIVE.remove(live)
        for h in handles:
            h.remove()
        live.close()
