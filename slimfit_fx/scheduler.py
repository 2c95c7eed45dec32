"""The inter-layer scheduler (ILS): which weight tensors train in each iteration.

SlimFit (the paper's inter-layer scheduling) freezes, every iteration, the layers whose
weights have been changing least.  The scheduler plugs into any
``torch.optim.Optimizer`` through its step hooks, so a normal loop
(``loss.backward(); optimizer.step(); optimizer.zero_grad()``) needs one extra
line::

    sched = slimfit_fx.Scheduler(model, optimizer, policy=slimfit_fx.Ratio(0.9))

* pre-step hook: snapshot the weights about to be updated (only those: the
  extra memory is the trained fraction, not a copy of the model);
* post-step hook: score each trained layer by the mean relative change
  ``|dW| / (|W| + eps)``, choose the next frozen set, flip ``requires_grad`` and
  drop the gradients of newly frozen layers (``grad = None``, so no momentum or
  weight decay moves them), and optionally move their optimizer state off the
  device (``frozen_state="offload"`` or ``"compress"``).

The scheduler never touches graphs: the modules made by ``slimfit_fx.compile``
read ``requires_grad`` at run time, so a frozen layer stores nothing and
computes no weight gradient.  On a plain ``nn.Module`` freezing saves only what
PyTorch saves by itself (Linear inputs and weight gradients); ``summary()``
says which of the two is in effect.

Policies: :class:`Ratio` (the paper's ILS) and :class:`Budget` (train the
highest-scoring layers whose bytes fit, priced by the static analysis for the
current batch shape).  Both honour a staleness bound: no layer stays frozen for
more than ``max_frozen_steps`` iterations.  Under ``Ratio`` an infeasible bound is a
``ConfigError`` at construction; under ``Budget`` a layer that alone costs more than
the budget is a ``SchedulerError`` when it is priced, and when several layers go
stale at once and only some fit, the rest wait (most stale first), with a warning
and an entry in ``staleness_overruns``.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .analysis import layer_parameters
from .config import ConfigError
from .precision import autocast_enabled
from .trace import shape_signature as _shape_signature

__all__ = ["Ratio", "Budget", "Scheduler", "SchedulerError"]


logger = logging.getLogger("slimfit_fx")


class SchedulerError(ValueError):
    """The scheduler cannot honour its policy; the message says why and what to change."""


@dataclass(frozen=True)
class Ratio:
    """Freeze ``floor(ratio * t)`` of the ``t`` scheduled layers every iteration (the paper's ILS)."""

    ratio: float

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) < 1.0:
            raise ConfigError(f"Ratio(ratio={self.ratio!r}): the freezing ratio must be in [0, 1) "
                              "(the paper uses 0.75-0.95); 1.0 would train nothing")


@dataclass(frozen=True)
class Budget:
    """Train the highest-scoring layers while the predicted training memory fits ``bytes``.

    The memory is ``MemoryEstimate.total`` of the static analysis: parameters,
    buffers, gradients, optimizer state (of trained layers) and saved
    activations, for the batch shape of the latest forward.  What one more
    trained layer costs is its gradient, its optimizer state and the dynamic
    activations it keeps (a shared input, e.g. of Q/K/V, counted once; a
    trained LayerNorm keeps its full input instead of the pruned output).
    """

    bytes: int

    def __post_init__(self):
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, (int, float)) or not self.bytes > 0 \
                or not math.isfinite(self.bytes):
            raise ConfigError(f"Budget(bytes={self.bytes!r}): give a positive number of bytes, "
                              "e.g. Budget(int(plan.predict(frozen).total))")


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """Name of the optimizer in memory.OPTIMIZERS terms, for the budget's state bytes."""
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        return "adamw"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd-momentum" if any(g.get("momentum", 0) for g in optimizer.param_groups) else "sgd"
    # Most other optimizers (Adamax, NAdam, RAdam, ...) keep two moments per weight.
    return "adamw"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class _BudgetPricing:
    """Exact marginal bytes of training one more layer, for one MemoryPlan.

    ``base`` is the predicted total with every scheduled layer frozen.  A layer
    alone adds ``alone[name]``; when another trained layer already keeps the
    same dynamic input (Q/K/V), that input is subtracted (``shared``).
    """

    plan: Any
    base: int
    alone: dict[str, int]
    shared: dict[str, list[tuple[int, frozenset]]] = field(default_factory=dict)

    fixed_frozen: frozenset = frozenset()

    @classmethod
    def build(cls, plan, layers: list[str], fixed_frozen: set[str], optimizer: str) -> "_BudgetPricing":
        """``fixed_frozen``: parameters frozen by the user (never scheduled, never trained)."""
        known = plan.analysis.parameters
        fixed_frozen = frozenset(n for n in fixed_frozen if n in known)
        all_frozen = {n for n in layers if n in known} | fixed_frozen
        base = plan.predict(frozen=all_frozen, optimizer=optimizer).total
        alone = {}
        for name in layers:  # a layer outside the plan (a head run eagerly around a captured backbone): unpriced
            alone[name] = plan.predict(frozen=all_frozen - {name}, optimizer=optimizer).total - base \
                if name in known else 0
        a = plan.analysis
        shared: dict[str, list[tuple[int, frozenset]]] = {name: [] for name in layers}
        by_storage: dict[int, set[str]] = {}
        static_storage: set[int] = set()
        for use in a.uses:
            if use.owners:
                by_storage.setdefault(use.storage, set()).update(use.owners)
            else:
                static_storage.add(use.storage)
        for sid, owners in by_storage.items():
            if sid in static_storage:
                continue  # kept whatever is frozen: already in base
            if any(o not in shared and o not in fixed_frozen for o in owners):
                continue  # an always-trained layer keeps it: already in base
            owners = {o for o in owners if o in shared}
            if len(owners) > 1:
                for o in owners:
                    shared[o].append((a.storages[sid].nbytes, frozenset(owners - {o})))
        return cls(plan=plan, base=base, alone=alone, shared=shared, fixed_frozen=fixed_frozen)

    def marginal(self, name: str, trained: set[str]) -> int:
        cost = self.alone[name]
        for nbytes, others in self.shared[name]:
            if others & trained:
                cost -= nbytes
        return cost

    def total(self, frozen: set[str], optimizer: str) -> int:
        known = self.plan.analysis.parameters
        return self.plan.predict(frozen={n for n in frozen if n in known} | self.fixed_frozen,
                                 optimizer=optimizer).total


def _newly_initialised(model: nn.Module, names: list[str], params: list) -> list[str]:
    """The layers a pretrained HuggingFace model initialised itself when it loaded (a new head): the
    ones without ``_is_hf_initialized`` when others have it.  Under PEFT, whose adapters are all new
    alike, only the trainable copies (``modules_to_save``) of such a head.  A model built from its
    config (nothing flagged) says nothing about what is new: none then."""
    if not any(getattr(p, "_is_hf_initialized", False) for p in model.parameters()):
        return []
    if any(hasattr(m, "peft_config") for m in model.modules()):
        new_heads = tuple(f"{name}.modules_to_save." for name, m in model.named_modules()
                          if type(m).__name__ == "ModulesToSaveWrapper"  # by name: PEFT need not be installed
                          and not any(getattr(p, "_is_hf_initialized", False)
                                      for p in m.original_module.parameters()))
        return [n for n in names if new_heads and n.startswith(new_heads)]
    new = [n for n, p in zip(names, params) if not getattr(p, "_is_hf_initialized", False)]
    return new if len(new) < len(names) else []  # only layers the user added train: none is "new"


def relative_change(before, after, grad, eps) -> torch.Tensor:
    """The paper's score: the mean relative change ``|dW| / (|W| + eps)``."""
    return (after - before).abs_().div_(before.abs_().add_(eps)).mean(dtype=torch.float64)


def loss_drop(before, after, grad, eps) -> torch.Tensor:
    """The first-order loss decrease the step bought: ``-sum(grad * dW)``.  Under Adam every weight
    moves by about the learning rate, so the relative change ranks layers by ``1 / |W|``; this ranks
    them by what their update did to the loss."""
    g = grad.detach()
    g = g.to_dense() if g.is_sparse else g
    return -(g.to(after.dtype) * (after - before)).sum(dtype=torch.float64)


CAPPED_ELEMENTS = 2**20


def capped_loss_drop(before, after, grad, eps) -> torch.Tensor:
    """The default score: ``loss_drop``, a tensor of more than ``CAPPED_ELEMENTS`` (2**20) elements scored
    as if it had that many (its sum scaled down).  The sum over elements is what lets a layer's score
    not reduce to ``1 / |W|`` under Adam; the cap keeps it from reducing to the layer's size, so a word
    embedding trains when its step pays like a big layer's, not every step."""
    return loss_drop(before, after, grad, eps) * min(1.0, CAPPED_ELEMENTS / after.numel())


METRICS = {"capped_loss_drop": capped_loss_drop, "relative_change": relative_change, "loss_drop": loss_drop}


def _auto_bound(t: int, k: int | None) -> int:
    """The default staleness bound: four sweeps (a sweep is the ``ceil(t / (t - k))`` iterations a
    Ratio schedule needs to train every layer once), at least 8 and at most 100 iterations; 100 under
    a Budget.  The relative-change metric ranks a freshly initialised tensor (a LoRA ``B`` leaving zero)
    far above a pretrained one whatever either learns; the bound keeps the others training."""
    if k is None or t - k <= 0:
        return 100
    sweep = math.ceil(t / (t - k))
    return max(sweep - 1, min(100, max(8, 4 * sweep)))  # never below what the schedule can keep


class Scheduler:
    """Freeze and unfreeze weight tensors every iteration by their training dynamics.

    ``model``: the module being trained (``slimfit_fx.compile``'s result or a
    plain ``nn.Module``); ``optimizer``: any ``torch.optim.Optimizer`` over its
    parameters.  ``policy``: :class:`Ratio` or :class:`Budget`.

    Which tensors take part: the SlimFit layers (every parameter of 2+ dims and
    every norm weight, as the paper defines them) that the optimizer updates and that
    require grad when the scheduler starts, minus ``exclude`` (fnmatch patterns
    on parameter names, e.g. ``"classifier.*"``: always trained) and, when
    ``include`` is given, restricted to names matching it.  Biases always train.

    ``max_frozen_steps``: no layer stays frozen for more than this many
    consecutive iterations (None turns the bound off; ``"auto"``, the default: four sweeps of the
    schedule, between 8 and 100 iterations, 100 under a Budget).  A layer trained with a gradient
    that is zero everywhere (a LoRA ``A`` beside a zero-initialised ``B``) is scored as unmeasured,
    so it trains again soon, rather than as unchanged.  ``frozen_state``:
    ``"keep"`` (optimizer state stays where it is), ``"offload"`` (frozen layers'
    state moves to host memory, exact) or ``"compress"`` (8-bit blockwise while
    frozen, lossy).  ``metric``: how a trained layer is scored: ``"capped_loss_drop"`` (the default:
    ``-sum(grad * dW)``, the first-order loss decrease the step bought, a tensor of more than 2**20
    elements counted as that many), ``"loss_drop"`` (the same, uncapped) or ``"relative_change"`` (the
    paper's mean ``|dW| / (|W| + eps)``, which under Adam ranks layers by ``1 / |W|``).  The default
    holds full fine-tuning's accuracy at lr 5e-5 and 2e-4 where the paper's loses a point at 5e-5; it
    trains a word embedding now and then, and the step peaks higher in those steps (docs/ACCURACY.md).
    ``eps``: added to ``|W|`` in the paper's metric.  ``seed``: the
    random initial scores (the first iterations sweep all layers in random
    order).  ``record``: keep the frozen set of every iteration in ``history``.
    ``nonfinite``: ``"warn"`` (keep the layer's last score) or ``"raise"`` when a
    layer's change is not finite (its weights became inf/NaN).  ``keep_new``: layers a
    pretrained HuggingFace model initialised itself when loading (a new classification
    head, which nothing pretrained is in) always train, and are named in the log and in
    ``new_layers``; ``keep_new=False`` schedules them like any layer.

    Under ``torch.distributed`` rank 0 makes every decision and broadcasts it with
    its scores, so every rank freezes the same layers whatever its local seed or
    batch shape (see docs/DISTRIBUTED.md).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: Ratio | Budget = Ratio(0.9),
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        max_frozen_steps: int | str | None = "auto",
        frozen_state: str = "keep",
        eps: float = 1e-8,
        metric: str = "capped_loss_drop",
        seed: int = 0,
        record: bool = True,
        nonfinite: str = "warn",
        keep_new: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Scheduler needs the nn.Module being trained, got {type(model).__name__}")
        # DDP/DataParallel wrappers: schedule the module they wrap (same parameters).
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Scheduler needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(policy, (Ratio, Budget)):
            raise ConfigError(f"policy must be slimfit_fx.Ratio(r) or slimfit_fx.Budget(bytes), got {policy!r}")
        if max_frozen_steps not in (None, "auto") and (isinstance(max_frozen_steps, bool)
                                                       or not isinstance(max_frozen_steps, int) or max_frozen_steps < 1):
            raise ConfigError(f"max_frozen_steps={max_frozen_steps!r}: give a positive int, 'auto', or None for no bound")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ConfigError(f"eps={eps!r}: give a small positive float such as 1e-8")
        if metric not in METRICS:
            raise ConfigError(f"metric={metric!r}: choose one of {sorted(METRICS)}")
        if nonfinite not in ("warn", "raise"):
            raise ConfigError(f"nonfinite={nonfinite!r}: choose 'warn' or 'raise'")
        if isinstance(include, str) or isinstance(exclude, str):
            raise ConfigError("include/exclude take a list of name patterns, e.g. exclude=['classifier.*']")
        self.model = model
        self.optimizer = optimizer
        self.policy = policy
        self.max_frozen_steps = max_frozen_steps
        self.eps = float(eps)
        self.metric = metric
        self.nonfinite = nonfinite
        self.record = record
        self.seed = seed
        self.keep_new = keep_new

        from .compiler import SlimFitModule  # late: compiler imports the passes and ops

        # The SlimFit module: the model itself, or one installed into it in place
        # (slimfit_fx.integrations.huggingface.compile_in_place).
        self._slim = model if isinstance(model, SlimFitModule) else getattr(model, "_slimfit_module", None)
        self.compiled = self._slim is not None
        self.layers, self.params = self._select_layers(include, tuple(exclude))
        # Frozen by the user before the scheduler started: never scheduled, and frozen in every prediction.
        self._fixed_frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if not self.layers:
            raise SchedulerError("no layer to schedule: no 2+-dim or norm weight of the model is in the "
                                 "optimizer with requires_grad=True (check include/exclude)")
        t = len(self.layers)
        self.k = math.floor(float(policy.ratio) * t) if isinstance(policy, Ratio) else None
        if max_frozen_steps == "auto":
            max_frozen_steps = self.max_frozen_steps = _auto_bound(t, self.k)
        if isinstance(policy, Ratio) and max_frozen_steps is not None:
            slots = t - self.k
            if slots == 0 or (max_frozen_steps + 1) * slots < t:
                need = math.ceil(t / max(slots, 1)) - 1
                raise ConfigError(
                    f"max_frozen_steps={max_frozen_steps} cannot hold with {t - self.k} of {t} layers trained per "
                    f"iteration: every layer must train once in {max_frozen_steps + 1} iterations; "
                    f"use max_frozen_steps >= {need} or a lower ratio")
        if frozen_state not in ("keep", "offload", "compress"):
            raise ConfigError(f"frozen_state={frozen_state!r}: choose 'keep', 'offload' or 'compress'")
        self._state_store = None
        if frozen_state != "keep":
            from .optim_state import FrozenStateStore

            self._state_store = FrozenStateStore(optimizer, mode=frozen_state)
        self.frozen_state = frozen_state

        self._gen = torch.Generator().manual_seed(seed)
        # Large random initial scores: untrained layers rank above any measured change,
        # so the first iterations sweep through every layer in random order.
        self.scores = 1e6 * (1.0 + torch.rand(t, generator=self._gen, dtype=torch.float64))
        self.measured = torch.zeros(t, dtype=torch.bool)
        self.frozen_for = torch.zeros(t, dtype=torch.long)  # consecutive iterations frozen
        self.iteration = 0
        self.history: list[tuple[int, tuple[str, ...]]] = []
        self.nonfinite_events: list[tuple[int, str]] = []
        self.unmeasured_events: list[tuple[int, str]] = []  # trained with a zero gradient: scored as unmeasured
        self._zero_grad: set[int] = set()
        self.staleness_overruns: list[tuple[int, tuple[str, ...]]] = []  # Budget: stale layers that had to wait
        self._snapshots: dict[int, torch.Tensor] = {}
        self._frozen: set[int] = set()
        self._pricing: "OrderedDict[Any, _BudgetPricing]" = OrderedDict()
        self._last_inputs: tuple | None = None
        self._last_signature = None
        self._redecided = False
        self._optimizer_kind = _optimizer_kind(optimizer)
        self._handles = []
        # The batch shape prices layers (Budget) and feeds predicted_bytes() (any policy).
        self._handles.append(model.register_forward_pre_hook(self._remember_inputs, with_kwargs=True))
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        try:
            if isinstance(policy, Ratio):
                self._apply(self._decide())
            elif self.compiled and self._slim.plan is not None:
                # Priced for the example inputs until the first forward shows the real batch shape.
                # Keyed by their shapes: a first batch shaped like them is not analysed again.
                key = getattr(self._slim, "plan_signature", None) or "example inputs"
                self._pricing[key] = _BudgetPricing.build(
                    self._slim.plan, self.layers, self._fixed_frozen, self._optimizer_kind)
                self._last_signature = key
                self._apply(self._decide())
        except BaseException:
            self.remove()  # a scheduler that failed to start must not stay hooked into the model and optimizer
            raise
        # Otherwise a Budget's first frozen set needs the batch shape: it is chosen at the first forward.

    # ------------------------------------------------------------------ set-up
    def _select_layers(self, include, exclude) -> tuple[list[str], list[nn.Parameter]]:
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        named = dict(self.model.named_parameters())
        names, params = [], []
        for name in layer_parameters(named.items()):
            p = named[name]
            if id(p) not in in_optimizer or not p.requires_grad:
                continue
            if include is not None and not _matches(name, include):
                continue
            if _matches(name, exclude):
                continue
            names.append(name)
            params.append(p)
        self.new_layers = _newly_initialised(self.model, names, params) if self.keep_new else []
        if self.new_layers:
            logger.info("slimfit_fx.Scheduler: %s were initialised by the model, not loaded from its checkpoint "
                        "(a new head): they always train (Scheduler(keep_new=False) schedules them too)",
                        ", ".join(self.new_layers))
        keep = [i for i, n in enumerate(names) if n not in set(self.new_layers)]
        return [names[i] for i in keep], [params[i] for i in keep]

    # ----------------------------------------------------------------- policy
    def _stale(self) -> list[int]:
        """Layers that must train next iteration, most stale first."""
        if self.max_frozen_steps is None:
            return []
        stale = [i for i in range(len(self.layers)) if self.frozen_for[i] >= self.max_frozen_steps]
        return sorted(stale, key=lambda i: (-int(self.frozen_for[i]), i))

    def _by_score(self) -> list[int]:
        """Layer indices, highest score first (ties by index: deterministic)."""
        order = sorted(range(len(self.layers)), key=lambda i: (-float(self.scores[i]), i))
        return order

    def _choose(self) -> set[int]:
        """The next frozen set (indices)."""
        t = len(self.layers)
        if isinstance(self.policy, Ratio):
            trained_slots = t - self.k
            trained: list[int] = self._stale()[:trained_slots]
            for i in self._by_score():
                if len(trained) >= trained_slots:
                    break
                if i not in trained:
                    trained.append(i)
            return set(range(t)) - set(trained)
        return self._choose_budget()

    def _choose_budget(self) -> set[int]:
        pricing = self._budget_pricing()
        budget = int(self.policy.bytes)
        if pricing.base > budget:
            raise SchedulerError(
                f"Budget({budget}) is below the {pricing.base} bytes this model needs for this batch shape with "
                f"every scheduled layer frozen; raise the budget to at least that, or shrink the batch")
        t = len(self.layers)
        if self.max_frozen_steps is not None:
            unaffordable = [n for n in self.layers if pricing.base + pricing.alone[n] > budget]
            if unaffordable:
                need = pricing.base + max(pricing.alone[n] for n in unaffordable)
                shown = ", ".join(unaffordable[:4]) + (f" and {len(unaffordable) - 4} more" if len(unaffordable) > 4 else "")
                raise SchedulerError(
                    f"Budget({budget}) can never train {shown}: each alone needs more than the budget for this batch "
                    f"shape, so max_frozen_steps={self.max_frozen_steps} cannot hold for it. Raise the budget to at "
                    f"least {need}, freeze those layers yourself before creating the Scheduler "
                    f"(param.requires_grad_(False)), or pass max_frozen_steps=None")
        used = pricing.base
        trained: set[str] = set()
        stale = self._stale()
        order = stale + [i for i in self._by_score() if i not in set(stale)]
        chosen: list[int] = []
        for i in order:
            name = self.layers[i]
            cost = pricing.marginal(name, trained)
            if used + cost <= budget:
                used += cost
                trained.add(name)
                chosen.append(i)
        # The marginal costs are exact for the plan's accounting except where training a
        # layer changes which ops autograd records at all (a frozen prefix of the network):
        # check the whole set once and drop the lowest-ranked layers until it fits.
        frozen_names = {self.layers[i] for i in range(t)} - trained
        while chosen and pricing.total(frozen_names, self._optimizer_kind) > budget:
            drop = chosen.pop()
            trained.discard(self.layers[drop])
            frozen_names.add(self.layers[drop])
        late = [self.layers[i] for i in stale if i not in set(chosen)]
        if late:
            # Each stale layer fits alone, but not all of them at once: the most stale go first and the rest
            # wait an iteration or more, past the bound.  Recorded, and said once.
            self.staleness_overruns.append((self.iteration, tuple(late)))
            if len(self.staleness_overruns) == 1:
                warnings.warn(
                    f"slimfit_fx.Scheduler: Budget({budget}) cannot train all {len(stale)} layers frozen for "
                    f"{self.max_frozen_steps} iterations at once; {len(late)} wait longer (most stale first). "
                    "Raise the budget or max_frozen_steps; Scheduler.staleness_overruns lists every such iteration",
                    RuntimeWarning, stacklevel=4)
        return set(range(t)) - set(chosen)

    def _budget_pricing(self) -> _BudgetPricing:
        if self._last_inputs is None and self._last_signature not in self._pricing:
            raise SchedulerError("Budget needs the batch shape: run a forward pass of the model before the "
                                 "first optimizer step")
        key = self._last_signature
        pricing = self._pricing.get(key)
        if pricing is None:
            plan = self._plan_for(*self._last_inputs)
            pricing = _BudgetPricing.build(plan, self.layers, self._fixed_frozen, self._optimizer_kind)
            self._pricing[key] = pricing
            while len(self._pricing) > 8:  # variable shapes: keep the latest few
                self._pricing.popitem(last=False)
        else:
            self._pricing.move_to_end(key)
        return pricing

    def _plan_for(self, args: tuple, kwargs: dict):
        from .compiler import analyze

        model = self._slim.original if self.compiled else self.model
        config = self._slim.slimfit_config if self.compiled else None
        was_training = model.training
        model.train()
        try:
            example = dict(kwargs) if not args else (tuple(args) if not kwargs else (tuple(args), dict(kwargs)))
            requires = [p.requires_grad for p in self.params]
            for p in self.params:  # the analysis prices every layer: capture with all of them trainable
                p.requires_grad_(True)
            try:
                sig = self._last_signature
                precision = sig[-1] if isinstance(sig, tuple) else ()
                if self.compiled:
                    precision = self._slim.__dict__.get("last_autocast", precision)
                with autocast_enabled(precision):  # the batch's precision
                    if self.compiled:
                        return self._slim.plan_for_call(tuple(args), dict(kwargs))
                    return analyze(model, example, config)
            finally:
                for p, r in zip(self.params, requires):
                    p.requires_grad_(r)
        finally:
            model.train(was_training)

    def plan(self):
        """The MemoryPlan the budget policy prices layers with (latest batch shape), or None."""
        if not self._pricing:
            return None
        return next(reversed(self._pricing.values())).plan

    # ------------------------------------------------------------------ hooks
    def _remember_inputs(self, module, args, kwargs):
        if not module.training or not torch.is_grad_enabled():
            return None
        sig = _shape_signature(args, kwargs)
        if sig != self._last_signature:
            self._last_signature = sig
            self._last_inputs = (tuple(args), dict(kwargs))
            if self.iteration == 0 and isinstance(self.policy, Budget) and not (
                    self._redecided and _distributed()):  # ranks must agree on how many decisions they make
                # The first decision, now for the real batch shape (replaces one made for the example).
                self._redecided = True
                self.history.clear()
                self.frozen_for.zero_()
                self._apply(self._decide())  # first Budget decision, before this forward records anything
        return None

    def _pre_step(self, optimizer, args, kwargs):
        self._snapshots = {}
        for i, p in enumerate(self.params):
            if i not in self._frozen and p.grad is not None:
                self._snapshots[i] = p.detach().clone()
        self._zero_grad = self._without_gradient(sorted(self._snapshots))

    def _without_gradient(self, trained: list[int]) -> set[int]:
        """The trained layers whose gradient is zero everywhere this step (one host sync for all): a
        LoRA ``A`` next to a zero-initialised ``B``.  What their weights do then (weight decay) says
        nothing of how they learn, so they are scored as unmeasured, not as unchanged."""
        if not trained:
            return set()
        zeros = []
        for i in trained:
            g = self.params[i].grad.detach()
            if g.is_sparse:  # nn.Embedding(sparse=True): the rows it touched
                g = g.coalesce().values()
            zero = ~(g != 0).any()
            zeros.append(zero.full_tensor() if hasattr(zero, "full_tensor") else zero)
        if len({z.device for z in zeros}) == 1:
            flags = torch.stack(zeros).tolist()
        else:  # parameters on several devices: one copy each
            flags = [bool(z) for z in zeros]
        return {i for i, zero in zip(trained, flags) if zero}

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs):
        changes = torch.full((len(self.layers),), float("nan"), dtype=torch.float64)
        for i, before in self._snapshots.items():
            # Low-precision weights are compared in float32; temporaries are two copies of one layer.
            wide = torch.float32 if before.element_size() < 4 else before.dtype
            after, before = self.params[i].detach().to(wide), before.to(wide)
            d = METRICS[self.metric](before, after, self.params[i].grad, self.eps)
            if hasattr(d, "full_tensor"):  # a DTensor (FSDP2-sharded weight): the mean over every shard
                d = d.full_tensor()
            changes[i] = d
        updated = sorted(self._snapshots)
        self._snapshots = {}
        for i in updated:
            d = float(changes[i])
            if i in self._zero_grad:
                self._unmeasure(i)
                continue
            if not math.isfinite(d):
                self._on_nonfinite(i, d)
                continue
            self.scores[i] = d
            self.measured[i] = True
        self.iteration += 1
        self._apply(self._decide())

    def _unmeasure(self, i: int) -> None:
        """Back to an initial-size score: trained again soon, measured then."""
        self.scores[i] = 1e6 * (1.0 + torch.rand((), generator=self._gen, dtype=torch.float64))
        self.measured[i] = False
        self.unmeasured_events.append((self.iteration, self.layers[i]))

    def _on_nonfinite(self, i: int, d: float) -> None:
        name = self.layers[i]
        self.nonfinite_events.append((self.iteration, name))
        msg = (f"slimfit_fx.Scheduler: the relative change of {name!r} at iteration {self.iteration} is {d} "
               "(its weights or their update are not finite); its score keeps its last value. Lower the "
               "learning rate or clip gradients.")
        if self.nonfinite == "raise":
            raise FloatingPointError(msg)
        if len(self.nonfinite_events) == 1:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _decide(self) -> set[int]:
        """The next frozen set.  Under torch.distributed rank 0 decides, and every rank takes its scores and
        its frozen set: a rank's own seed, or a Budget priced for the rank's own batch shape (dynamic
        padding), must not make the ranks train different layers (DDP would average a layer's gradient
        into the ranks that froze it, and move it)."""
        if not _distributed():
            return self._choose()
        import torch.distributed as dist

        t = len(self.layers)
        frozen = self._choose() if dist.get_rank() == 0 else set()
        mask = torch.zeros(t, dtype=torch.float64)
        mask[sorted(frozen)] = 1.0
        buf = torch.cat([self.scores, self.measured.to(torch.float64), mask])
        if dist.get_backend() == "nccl":
            buf = buf.cuda()
        dist.broadcast(buf, src=0)
        buf = buf.cpu()
        self.scores = buf[:t].clone()
        self.measured = buf[t:2 * t].bool()
        return {i for i in range(t) if buf[2 * t + i] > 0}

    def _apply(self, frozen: set[int], record: bool = True) -> None:
        newly_frozen = [self.params[i] for i in frozen - self._frozen]
        thawed = [self.params[i] for i in self._frozen - frozen]
        for i, p in enumerate(self.params):
            f = i in frozen
            p.requires_grad_(not f)
            if f:
                p.grad = None  # frozen: no gradient, so no momentum or weight decay moves it
        if self._state_store is not None:
            if newly_frozen:
                self._state_store.freeze(newly_frozen)
            if thawed:
                self._state_store.thaw(thawed)
        if record:
            for i in range(len(self.layers)):
                self.frozen_for[i] = self.frozen_for[i] + 1 if i in frozen else 0
        self._frozen = set(frozen)
        if record and self.record:
            self.history.append((self.iteration, tuple(self.layers[i] for i in sorted(frozen))))

    # ------------------------------------------------------------------ queries
    @property
    def frozen(self) -> list[str]:
        """Names of the layers frozen for the next forward/backward."""
        return [self.layers[i] for i in sorted(self._frozen)]

    @property
    def trained(self) -> list[str]:
        return [self.layers[i] for i in range(len(self.layers)) if i not in self._frozen]

    @property
    def frozen_fraction(self) -> float:
        return len(self._frozen) / len(self.layers)

    def predicted_bytes(self):
        """MemoryEstimate of the current frozen set for the latest batch shape; None before any
        forward (or ``price(inputs)``).  A new batch shape is analysed once (a graph capture)."""
        if self._last_signature is None:
            return None
        plan = self._budget_pricing().plan
        return plan.predict(frozen=(set(self.frozen) | self._fixed_frozen) & set(plan.parameter_names),
                            optimizer=self._optimizer_kind)

    def price(self, example_inputs) -> None:
        """Analyse the model for inputs shaped like ``example_inputs`` so ``predicted_bytes()`` works
        under any policy (the Budget policy does this by itself)."""
        from .trace import normalize_inputs

        inputs = normalize_inputs(example_inputs)
        self._last_inputs = (inputs.args, inputs.kwargs)
        self._last_signature = _shape_signature(inputs.args, inputs.kwargs)
        self._budget_pricing()

    def summary(self) -> str:
        mode = ("slimfit_fx.compile: frozen layers keep no dynamic activations and pruned LayerNorm outputs"
                if self.compiled else
                "plain nn.Module: freezing saves only what PyTorch saves by itself (Linear inputs and weight "
                "gradients); use slimfit_fx.compile(model) for the rest")
        new = f"; always trained, new in the model: {', '.join(self.new_layers)}" if self.new_layers else ""
        return (f"Scheduler({self.policy}, {len(self._frozen)}/{len(self.layers)} layers frozen at iteration "
                f"{self.iteration}, max_frozen_steps={self.max_frozen_steps}, frozen_state={self.frozen_state}); "
                f"{mode}{new}")

    def __repr__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "policy": repr(self.policy),
            "scores": self.scores.clone(),
            "measured": self.measured.clone(),
            "frozen_for": self.frozen_for.clone(),
            "iteration": self.iteration,
            "frozen": sorted(self._frozen),
            "history": list(self.history),
            "nonfinite_events": list(self.nonfinite_events),
            "unmeasured_events": list(self.unmeasured_events),
            "generator": self._gen.get_state(),
            "new_layers": list(self.new_layers),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["layers"]) != self.layers:
            saved_new = list(state.get("new_layers", []))
            hint = "use the same model, include and exclude"
            if set(state["layers"]) | set(saved_new) == set(self.layers) | set(self.new_layers):
                # A model reloaded from its fine-tuned checkpoint has every layer loaded: nothing is new.
                hint = (f"it was saved with {saved_new or 'no layers'} kept trainable as new and this one "
                        f"keeps {self.new_layers or 'none'}: pass keep_new=False to both, or exclude=[...] "
                        "the head on both")
            raise SchedulerError("this scheduler state was saved for a different set of layers "
                                 f"({len(state['layers'])} vs {len(self.layers)}); {hint}")
        # Everything on the CPU, where the scheduler keeps it: a checkpoint loaded with map_location on a
        # GPU (the Trainer does so with several processes) brings the tensors back there.
        self.scores = state["scores"].detach().to("cpu", torch.float64).clone()
        self.measured = state["measured"].detach().cpu().clone()
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.nonfinite_events = list(state["nonfinite_events"])
        self.unmeasured_events = list(state.get("unmeasured_events", []))
        if "generator" in state:
            self._gen.set_state(state["generator"].cpu())
        frozen = set(state["frozen"])
        self._apply(frozen, record=False)
        self.frozen_for = state["frozen_for"].detach().cpu().clone()

    def remove(self) -> None:
        """Detach from the optimizer and model; every scheduled layer trains again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._state_store is not None and self._frozen:
            self._state_store.thaw([self.params[i] for i in self._frozen])
        for p in self.params:
            p.requires_grad_(True)
        self._frozen = set()

    # ------------------------------------------------------------------ plots
    def heatmap(self, path: str | None = None):
        """Layers x iterations heat map of the schedule (needs matplotlib: pip install matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("Scheduler.heatmap needs matplotlib: pip install matplotlib") from None
        grid = self.schedule_matrix()
        fig, ax = plt.subplots(figsize=(max(6, grid.shape[1] / 10), max(4, grid.shape[0] / 8)))
        ax.imshow(grid.numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set_xlabel("iteration")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(self.layers)))
        ax.set_yticklabels(self.layers, fontsize=4)
        ax.set_title("frozen (dark) per iteration")
        if path is not None:
            fig.savefig(path, dpi=150, bbox_inches="tight")
        return fig

    def schedule_matrix(self) -> torch.Tensor:
        """Bool tensor [layers, iterations]: True where the layer was frozen."""
        index = {n: i for i, n in enumerate(self.layers)}
        grid = torch.zeros(len(self.layers), len(self.history), dtype=torch.bool)
        for col, (_, frozen) in enumerate(self.history):
            for n in frozen:
                grid[index[n], col] = True
        return grid


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
