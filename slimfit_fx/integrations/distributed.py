"""SlimFit under ``torch.distributed``: DistributedDataParallel with per-iteration freezing.

Takes a module (plain or ``slimfit_fx.compile``'d) and its ``Scheduler``s.  Gives ``wrap_ddp``: DDP
built so that it averages every scheduled layer whenever it trains (``find_unused_parameters=True``,
``static_graph=False``, built while every scheduled layer requires grad; optionally the
``allreduce_trained`` hook), ``check_ddp`` for a DDP built by hand, and ``ddp_kwargs``.
docs/DISTRIBUTED.md has the evidence and the usage.
Never leaves a layer's ``requires_grad`` changed, nor accepts a DDP under which ranks would drift apart
or fail: ``DistributedConfigError`` names the fix.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ConfigError

__all__ = ["DDP_KWARGS", "DistributedConfigError", "ddp_kwargs", "wrap_ddp", "check_ddp", "allreduce_trained"]

#: The DDP keyword arguments that per-iteration freezing needs (``wrap_ddp`` passes them).
DDP_KWARGS = {"find_unused_parameters": True, "static_graph": False}


class DistributedConfigError(ConfigError):
    """DDP is set up in a way that breaks with per-iteration freezing; the message names the fix."""


_FUP = ("find_unused_parameters=False: DDP then waits for a gradient of every parameter it manages, and a "
        "frozen layer gets none (the run fails at the next forward with 'Expected to have finished reduction "
        "in the prior iteration'); pass find_unused_parameters=True (slimfit_fx.integrations.distributed."
        "wrap_ddp does)")
_STATIC = ("static_graph=True: DDP then fixes at the first iteration which parameters get gradients, and "
           "the scheduler changes them every iteration; leave static_graph=False (slimfit_fx.integrations."
           "distributed.wrap_ddp does)")


def ddp_kwargs(**kwargs: Any) -> dict:
    """Keyword arguments for ``DistributedDataParallel`` that work with per-iteration freezing.

    ``find_unused_parameters=True``, ``static_graph=False`` and, unless given,
    ``gradient_as_bucket_view=True`` (gradients live in DDP's communication
    buckets instead of in a second full-size copy).  Other arguments pass
    through; a conflicting ``find_unused_parameters`` or ``static_graph``
    raises :class:`DistributedConfigError`.
    """
    if "find_unused_parameters" in kwargs and not kwargs["find_unused_parameters"]:
        raise DistributedConfigError(_FUP)
    if kwargs.get("static_graph"):
        raise DistributedConfigError(_STATIC)
    out = {"gradient_as_bucket_view": True}
    out.update(kwargs)
    out.update(DDP_KWARGS)
    return out


def _schedulers_of(module: nn.Module) -> list:
    """Schedulers attached to ``module`` or its submodules (found through their forward pre-hook)."""
    from ..scheduler import Scheduler

    found = []
    for m in module.modules():
        for hook in list(m._forward_pre_hooks.values()):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Scheduler) and all(owner is not s for s in found):
                found.append(owner)
    return found


class _Traffic:
    """The hook's state: DDP's process group, and what :func:`allreduce_trained` sent and what DDP's
    own all-reduce would have (bytes, this rank)."""

    def __init__(self, group=None):
        self.group = group
        self.sent = self.buckets = 0


def allreduce_trained(state: _Traffic, bucket):
    """A DDP communication hook: all-reduce (mean) only the gradients of parameters that require grad
    this iteration.  DDP's buckets are sized for every parameter it manages and a frozen layer's slice
    is zeros; the Scheduler's decisions are rank 0's on every rank, so each rank sends the same trained
    slices.  The frozen slices stay zero, as DDP leaves them."""
    import torch
    import torch.distributed as dist

    buffer = bucket.buffer()
    state.buckets += buffer.numel() * buffer.element_size()
    grads = [g for p, g in zip(bucket.parameters(), bucket.gradients()) if p.requires_grad]
    if not grads:
        done = torch.futures.Future()
        done.set_result(buffer)
        return done
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(dist.get_world_size(state.group))
    state.sent += flat.numel() * flat.element_size()

    def unpack(fut):
        reduced, offset = fut.value()[0], 0
        for g in grads:  # views into the bucket's buffer
            g.copy_(reduced[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return buffer

    return dist.all_reduce(flat, group=state.group, async_op=True).get_future().then(unpack)


def wrap_ddp(module: nn.Module, scheduler=None, *, trained_only: bool = True, **kwargs: Any):
    """``DistributedDataParallel(module, **ddp_kwargs(**kwargs))``, built so every scheduled layer is synced.

    ``module``: the model, plain or ``slimfit_fx.compile``'d.  ``scheduler``:
    the ``slimfit_fx.Scheduler`` of ``module`` if it exists already (one
    attached to ``module`` is found by itself); its frozen layers are made
    trainable while DDP is built, then frozen again, so DDP averages their
    gradients whenever they train.  Parameters frozen by the user and not
    scheduled stay outside DDP, as usual.  Build the scheduler on ``module``
    (``ddp.module``), not on the returned wrapper.  ``trained_only``: all-reduce only the
    gradients of the layers that train this iteration (:func:`allreduce_trained`;
    ``ddp.slimfit_traffic`` counts the bytes), rather than DDP's whole buckets.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        raise TypeError("wrap_ddp got a DistributedDataParallel already; pass the inner module, or check this "
                        "one with slimfit_fx.integrations.distributed.check_ddp(ddp, scheduler)")
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap_ddp needs an nn.Module, got {type(module).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedConfigError("torch.distributed is not initialized: call "
                                     "torch.distributed.init_process_group(...) in every process first")
    kw = ddp_kwargs(**kwargs)
    schedulers = _schedulers_of(module)
    if scheduler is not None and all(scheduler is not s for s in schedulers):
        schedulers.append(scheduler)
    thaw, seen = [], set()
    for s in schedulers:
        for p in s.params:
            if not p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                thaw.append(p)
    for p in thaw:
        p.requires_grad_(True)
    try:
        synced = frozenset(id(p) for p in module.parameters() if p.requires_grad)
        ddp = DistributedDataParallel(module, **kw)
    finally:
        for p in thaw:
            p.requires_grad_(False)
    ddp._slimfit_synced = synced  # what DDP's reducer averages, for check_ddp
    check_ddp(ddp, *schedulers)
    if trained_only:
        ddp.slimfit_traffic = _Traffic(ddp.process_group)
        ddp.register_comm_hook(ddp.slimfit_traffic, allreduce_trained)
    return ddp


def check_ddp(ddp, *schedulers) -> None:
    """Raise :class:`DistributedConfigError` if ``ddp`` cannot train with per-iteration freezing.

    Checks ``find_unused_parameters=True``, ``static_graph=False`` and, for
    each given ``slimfit_fx.Scheduler`` (and any attached to ``ddp.module``),
    that DDP averages the gradients of every scheduled layer.  Call it once
    after building DDP by hand; ``wrap_ddp`` calls it for you.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"check_ddp needs a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
    problems = []
    if not ddp.find_unused_parameters:
        problems.append(_FUP)
    if ddp.static_graph:
        problems.append(_STATIC)
    all_schedulers = list(schedulers)
    for s in _schedulers_of(ddp):
        if all(s is not t for t in all_schedulers):
            all_schedulers.append(s)
    missing = _unsynced_layers(ddp, all_schedulers)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        problems.append(
            f"DDP does not average the gradients of scheduled layers ({shown}): they were frozen when DDP was "
            "built, so whenever they train the ranks drift apart silently; build DDP before the Scheduler, or "
            "use slimfit_fx.integrations.distributed.wrap_ddp(module, scheduler=sched)")
    if problems:
        raise DistributedConfigError("DistributedDataParallel is set up wrongly for slimfit_fx's per-iteration "
                                     "freezing:\n- " + "\n- ".join(problems))


def _unsynced_layers(ddp, schedulers) -> list[str]:
    """Names of scheduled layers whose gradients DDP's reducer does not average."""
    ignored = getattr(ddp, "parameters_to_ignore", set())
    params = {id(p): (n, p) for n, p in ddp.module.named_parameters() if n not in ignored}
    scheduled = {id(p): params[id(p)][0] for s in schedulers for p in s.params if id(p) in params}
    if not scheduled:
        return []
    synced = getattr(ddp, "_slimfit_synced", None)
    if synced is not None:
        return [n for i, n in scheduled.items() if i not in synced]
    # Built by hand: DDP records how many parameter tensors its reducer took at construction.
    try:
        taken = int(ddp._get_ddp_logging_data()["num_parameter_tensors"])
    except Exception:  # noqa: BLE001 - a private API; without it this check is skipped
        return []
    need = {i for i, (_, p) in params.items() if p.requires_grad} | set(scheduled)
    if len(need) <= taken:
        return []
    # More tensors need averaging than DDP took: the layers frozen now are the likely ones.
    frozen_now = [n for i, n in scheduled.items() if not params[i][1].requires_grad]
    return frozen_now or list(scheduled.values())
