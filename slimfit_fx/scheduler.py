"""The inter-layer scheduler (SlimFit's ILS): which weight tensors train in each iteration.

Takes the model being trained (``slimfit_fx.compile``'s result or a plain ``nn.Module``), its
``torch.optim.Optimizer`` and a :class:`FreezePolicy` (:class:`Ratio`, :class:`Budget` or one of
your own), and hooks into the optimizer's step:
``sched = slimfit_fx.Scheduler(model, optimizer, policy=slimfit_fx.Ratio(0.9))``.
Gives, after every ``optimizer.step()``, the frozen set of the next iteration (``requires_grad``
flipped, newly frozen layers' gradients dropped, their optimizer state optionally moved off the
device), its history, and the predicted bytes of the current set.
Never touches a graph, never writes a weight, and never lets the ranks of a distributed run freeze
different layers.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from .analysis import layer_parameters
from .config import ConfigError
from .memory import BudgetPricing, PlanError, resolve_optimizer
from .precision import autocast_enabled
from .trace import IN_PLACE_ATTRIBUTE, input_signature, training_mode

__all__ = ["FreezePolicy", "Ratio", "Budget", "Scheduler", "SchedulerError"]


logger = logging.getLogger("slimfit_fx")


class SchedulerError(ValueError):
    """The scheduler cannot honour its policy; the message says why and what to change."""


class FreezePolicy:
    """How a :class:`Scheduler` chooses the layers it freezes; subclass it to write your own policy.

    The contract a policy keeps:

    * ``choose(scheduler)`` returns the set of indices into ``scheduler.layers`` to freeze for the
      next iteration.  It reads what the scheduler knows: ``scores`` (a layer's latest score; higher
      means its training paid more), ``measured``, ``frozen_for`` (consecutive iterations frozen),
      ``iteration``, ``max_frozen_steps``, ``ranked_layers()`` (highest score first) and
      ``stale_layers()`` (the layers the staleness bound says must train next, most stale first),
      and changes none of them.  It runs when the scheduler starts and after every optimizer step,
      under ``torch.distributed`` on rank 0 alone (the other ranks take its answer).
    * ``frozen_count(t)``: how many of ``t`` layers every choice freezes, or None when that varies;
      it sets ``scheduler.k`` and the default ``max_frozen_steps``.
    * ``check(scheduler)``: raise, when the scheduler is built, for what the policy can never honour.
    * ``priced``: True when ``choose`` prices layers for the batch shape of the latest forward: the
      first choice then waits for a batch shape and is made again at the first forward.

    A policy is an immutable value (a frozen dataclass): its ``repr`` names it in ``summary()`` and
    ``state_dict()``.
    """

    priced: ClassVar[bool] = False

    def frozen_count(self, t: int) -> int | None:
        """How many of ``t`` scheduled layers every choice freezes; None when the number varies."""
        return None

    def check(self, scheduler: "Scheduler") -> None:
        """Raise ``ConfigError`` or ``SchedulerError`` for what this policy can never honour with ``scheduler``."""

    def choose(self, scheduler: "Scheduler") -> set[int]:
        """The indices into ``scheduler.layers`` to freeze for the next iteration."""
        raise NotImplementedError(f"{type(self).__name__} must define choose(scheduler)")


@dataclass(frozen=True)
class Ratio(FreezePolicy):
    """Freeze ``floor(ratio * t)`` of the ``t`` scheduled layers every iteration (the paper's ILS).

    The stale layers train first, then the highest scores fill the remaining slots.  A staleness
    bound the ratio cannot keep is a ``ConfigError`` when the scheduler is built.
    """

    ratio: float

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) < 1.0:
            raise ConfigError(f"Ratio(ratio={self.ratio!r}): the freezing ratio must be in [0, 1) "
                              "(the paper uses 0.75-0.95); 1.0 would train nothing")

    def frozen_count(self, t: int) -> int:
        """``floor(ratio * t)``."""
        return math.floor(float(self.ratio) * t)

    def check(self, scheduler: "Scheduler") -> None:
        """Refuse a ``max_frozen_steps`` that this ratio cannot keep for every layer."""
        bound = scheduler.max_frozen_steps
        if bound is None:
            return
        t = len(scheduler.layers)
        slots = t - self.frozen_count(t)
        if slots == 0 or (bound + 1) * slots < t:
            need = math.ceil(t / max(slots, 1)) - 1
            raise ConfigError(
                f"max_frozen_steps={bound} cannot hold with {slots} of {t} layers trained per "
                f"iteration: every layer must train once in {bound + 1} iterations; "
                f"use max_frozen_steps >= {need} or a lower ratio")

    def choose(self, scheduler: "Scheduler") -> set[int]:
        """Train the stale layers, then the highest scores, ``t - floor(ratio * t)`` in all; freeze the rest."""
        t = len(scheduler.layers)
        trained_slots = t - self.frozen_count(t)
        trained: list[int] = scheduler.stale_layers()[:trained_slots]
        for i in scheduler.ranked_layers():
            if len(trained) >= trained_slots:
                break
            if i not in trained:
                trained.append(i)
        return set(range(t)) - set(trained)


@dataclass(frozen=True)
class Budget(FreezePolicy):
    """Train the highest-scoring layers while the predicted training memory fits ``bytes``.

    The memory is ``MemoryEstimate.total`` of the static analysis: parameters,
    buffers, gradients, optimizer state (of trained layers) and saved
    activations, for the batch shape of the latest forward.  What one more
    trained layer costs is its gradient, its optimizer state and the dynamic
    activations it keeps (a shared input, e.g. of Q/K/V, counted once; a
    trained LayerNorm keeps its full input instead of the pruned output).
    A layer that alone costs more than the budget is a ``SchedulerError`` when it is
    priced; when several layers go stale at once and only some fit, the rest wait (most
    stale first), with a warning and an entry in ``Scheduler.staleness_overruns``.
    """

    bytes: int
    priced: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, (int, float)) or not self.bytes > 0 \
                or not math.isfinite(self.bytes):
            raise ConfigError(f"Budget(bytes={self.bytes!r}): give a positive number of bytes, "
                              "e.g. Budget(int(plan.predict(frozen).total))")

    def check(self, scheduler: "Scheduler") -> None:
        """Refuse an optimizer whose state the memory model cannot price."""
        scheduler.priced_optimizer()

    def choose(self, scheduler: "Scheduler") -> set[int]:
        """Stale layers first, then by score: every layer whose exact marginal bytes still fit trains."""
        pricing = scheduler._budget_pricing()
        budget = int(self.bytes)
        self._check_affordable(scheduler, pricing, budget)
        t = len(scheduler.layers)
        stale = scheduler.stale_layers()
        chosen = self._fill(scheduler, pricing, budget, stale)
        late = [scheduler.layers[i] for i in stale if i not in set(chosen)]
        if late:
            self._record_overrun(scheduler, budget, stale, late)
        return set(range(t)) - set(chosen)

    def _check_affordable(self, scheduler: "Scheduler", pricing: BudgetPricing, budget: int) -> None:
        if pricing.base > budget:
            raise SchedulerError(
                f"Budget({budget}) is below the {pricing.base} bytes this model needs for this batch shape with "
                f"every scheduled layer frozen; raise the budget to at least that, or shrink the batch")
        if scheduler.max_frozen_steps is None:
            return
        unaffordable = [n for n in scheduler.layers if pricing.base + pricing.alone[n] > budget]
        if unaffordable:
            need = pricing.base + max(pricing.alone[n] for n in unaffordable)
            more = len(unaffordable) - 4
            shown = ", ".join(unaffordable[:4]) + (f" and {more} more" if more > 0 else "")
            raise SchedulerError(
                f"Budget({budget}) can never train {shown}: each alone needs more than the budget for this batch "
                f"shape, so max_frozen_steps={scheduler.max_frozen_steps} cannot hold for it. Raise the budget to "
                f"at least {need}, freeze those layers yourself before creating the Scheduler "
                f"(param.requires_grad_(False)), or pass max_frozen_steps=None")

    def _fill(self, scheduler: "Scheduler", pricing: BudgetPricing, budget: int, stale: list[int]) -> list[int]:
        """The trained layers, in the order they were taken: greedy in rank order, then checked whole."""
        layers = scheduler.layers
        used = pricing.base
        trained: set[str] = set()
        order = stale + [i for i in scheduler.ranked_layers() if i not in set(stale)]
        chosen: list[int] = []
        for i in order:
            name = layers[i]
            cost = pricing.marginal(name, trained)
            if used + cost <= budget:
                used += cost
                trained.add(name)
                chosen.append(i)
        # The marginal costs are exact for the plan's accounting except where training a
        # layer changes which ops autograd records at all (a frozen prefix of the network):
        # check the whole set once and drop the lowest-ranked layers until it fits.
        frozen_names = set(layers) - trained
        while chosen and pricing.total(frozen_names, scheduler.priced_optimizer()) > budget:
            drop = chosen.pop()
            trained.discard(layers[drop])
            frozen_names.add(layers[drop])
        return chosen

    def _record_overrun(self, scheduler: "Scheduler", budget: int, stale: list[int], late: list[str]) -> None:
        # Each stale layer fits alone, but not all of them at once: the most stale go first and the rest
        # wait an iteration or more, past the bound.  Recorded, and said once.
        scheduler.staleness_overruns.append((scheduler.iteration, tuple(late)))
        if len(scheduler.staleness_overruns) == 1:
            warnings.warn(
                f"slimfit_fx.Scheduler: Budget({budget}) cannot train all {len(stale)} layers frozen for "
                f"{scheduler.max_frozen_steps} iterations at once; {len(late)} wait longer (most stale first). "
                "Raise the budget or max_frozen_steps; Scheduler.staleness_overruns lists every such iteration",
                RuntimeWarning, stacklevel=4)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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
    Ratio schedule needs to train every layer once), at least 8 and at most 100 iterations; 100 when
    the policy freezes no fixed number ``k`` (a Budget).  The relative-change metric ranks a freshly
    initialised tensor (a LoRA ``B`` leaving zero) far above a pretrained one whatever either learns;
    the bound keeps the others training."""
    if k is None or t - k <= 0:
        return 100
    sweep = math.ceil(t / (t - k))
    return max(sweep - 1, min(100, max(8, 4 * sweep)))  # never below what the schedule can keep



def _module_to_schedule(model) -> nn.Module:
    """The module whose parameters are scheduled: ``model``, or the module a DDP/DataParallel wrapper holds."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Scheduler needs the nn.Module being trained, got {type(model).__name__}")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _check_arguments(optimizer, policy, max_frozen_steps, eps, metric, nonfinite, include, exclude,
                     frozen_state) -> None:
    """Raise ``TypeError``/``ConfigError`` for a Scheduler argument that is wrong on its own."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Scheduler needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(policy, FreezePolicy):
        raise ConfigError(f"policy must be slimfit_fx.Ratio(r) or slimfit_fx.Budget(bytes), got {policy!r} "
                          "(or a subclass of slimfit_fx.scheduler.FreezePolicy)")
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
    if frozen_state not in ("keep", "offload", "compress"):
        raise ConfigError(f"frozen_state={frozen_state!r}: choose 'keep', 'offload' or 'compress'")


class Scheduler:
    """Freeze and unfreeze weight tensors every iteration by their training dynamics.

    ``model``: the module being trained (``slimfit_fx.compile``'s result or a
    plain ``nn.Module``; a DDP/DataParallel wrapper schedules the module it wraps); ``optimizer``:
    any ``torch.optim.Optimizer`` over its parameters.  ``policy``: :class:`Ratio`, :class:`Budget`
    or a :class:`FreezePolicy` of your own.

    Which tensors take part: the SlimFit layers (every parameter of 2+ dims and
    every norm weight, as the paper defines them) that the optimizer updates and that
    require grad when the scheduler starts, minus ``exclude`` (fnmatch patterns
    on parameter names, e.g. ``"classifier.*"``: always trained) and, when
    ``include`` is given, restricted to names matching it.  Biases always train.
    Parameters frozen before the scheduler starts stay frozen (``fixed_frozen``).

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
    paper's mean ``|dW| / (|W| + eps)``, which under Adam ranks layers by ``1 / |W|``); docs/ACCURACY.md
    compares them.  ``eps``: added to ``|W|`` in the paper's metric.  ``seed``: the
    random initial scores (the first iterations sweep all layers in random
    order).  ``record``: keep the frozen set of every iteration in ``history``.
    ``nonfinite``: ``"warn"`` (keep the layer's last score) or ``"raise"`` when a
    layer's change is not finite (its weights became inf/NaN).  ``keep_new``: layers a
    pretrained HuggingFace model initialised itself when loading (a new classification
    head, which nothing pretrained is in) always train, and are named in the log and in
    ``new_layers``; ``keep_new=False`` schedules them like any layer.

    The policy's bytes, ``price()`` and ``predicted_bytes()`` price the optimizer's state: they need
    an optimizer the memory model knows (AdamW, Adam, SGD); a Ratio policy alone prices nothing.
    Under ``torch.distributed`` rank 0 makes every decision and broadcasts it with
    its scores, so every rank freezes the same layers whatever its local seed or
    batch shape (see docs/DISTRIBUTED.md).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: FreezePolicy = Ratio(0.9),
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
        model = _module_to_schedule(model)
        _check_arguments(optimizer, policy, max_frozen_steps, eps, metric, nonfinite, include, exclude, frozen_state)
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
        self.frozen_state = frozen_state
        self._optimizer_name: str | None = None  # resolved when bytes are first priced
        self._select(include, tuple(exclude))
        self._bound_staleness()
        self._set_up_state(seed)
        self._start()

    # ------------------------------------------------------------------ set-up
    def _select(self, include, exclude) -> None:
        """The scheduled layers, the layers kept trainable as new, and the parameters the user froze."""
        from .compiler import SlimFitModule  # late: compiler imports the passes and ops

        # The SlimFit module: the model itself, or one installed into it in place
        # (slimfit_fx.integrations.huggingface.compile_in_place).
        model = self.model
        self._slim = model if isinstance(model, SlimFitModule) else getattr(model, IN_PLACE_ATTRIBUTE, None)
        self.compiled = self._slim is not None
        self.layers, self.params = self._select_layers(include, exclude)
        # Frozen by the user before the scheduler started: never scheduled, and frozen in every prediction.
        self._fixed_frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if not self.layers:
            raise SchedulerError("no layer to schedule: no 2+-dim or norm weight of the model is in the "
                                 "optimizer with requires_grad=True (check include/exclude)")

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

    def _bound_staleness(self) -> None:
        """``k`` and the staleness bound for this policy and these layers; the policy refuses what it cannot keep."""
        self.k = self.policy.frozen_count(len(self.layers))
        if self.max_frozen_steps == "auto":
            self.max_frozen_steps = _auto_bound(len(self.layers), self.k)
        self.policy.check(self)

    def _set_up_state(self, seed: int) -> None:
        """Scores, counters and records of a scheduler that has made no decision yet."""
        self._state_store = None
        if self.frozen_state != "keep":
            from .optim_state import FrozenStateStore

            self._state_store = FrozenStateStore(self.optimizer, mode=self.frozen_state)
        t = len(self.layers)
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
        self._pricing: "OrderedDict[Any, BudgetPricing]" = OrderedDict()
        self._last_inputs: tuple | None = None
        self._last_signature = None
        self._redecided = False

    def _start(self) -> None:
        """Hook into the model and optimizer and make the first choice; unhooked again if that fails."""
        # The batch shape prices layers (Budget) and feeds predicted_bytes() (any policy).
        self._handles = [self.model.register_forward_pre_hook(self._remember_inputs, with_kwargs=True),
                         self.optimizer.register_step_pre_hook(self._pre_step),
                         self.optimizer.register_step_post_hook(self._post_step)]
        try:
            if not self.policy.priced:
                self._apply(self._decide())
            elif self.compiled and self._slim.plan is not None:
                # Priced for the example inputs until the first forward shows the real batch shape.
                # Keyed by their shapes: a first batch shaped like them is not analysed again.
                key = getattr(self._slim, "plan_signature", None) or "example inputs"
                self._pricing[key] = BudgetPricing.build(
                    self._slim.plan, self.layers, self._fixed_frozen, self.priced_optimizer())
                self._last_signature = key
                self._apply(self._decide())
        except BaseException:
            self.remove()  # a scheduler that failed to start must not stay hooked into the model and optimizer
            raise
        # Otherwise a priced policy's first frozen set needs the batch shape: it is chosen at the first forward.

    # ----------------------------------------------------------------- policy
    def stale_layers(self) -> list[int]:
        """Indices of the layers that must train next iteration to keep ``max_frozen_steps``, most stale first."""
        if self.max_frozen_steps is None:
            return []
        stale = [i for i in range(len(self.layers)) if self.frozen_for[i] >= self.max_frozen_steps]
        return sorted(stale, key=lambda i: (-int(self.frozen_for[i]), i))

    def ranked_layers(self) -> list[int]:
        """Layer indices, highest score first (ties by index: deterministic)."""
        return sorted(range(len(self.layers)), key=lambda i: (-float(self.scores[i]), i))

    def priced_optimizer(self) -> str:
        """The optimizer's name in ``memory.OPTIMIZERS``, which prices its state; ``SchedulerError`` if it has none."""
        if self._optimizer_name is None:
            try:
                self._optimizer_name = resolve_optimizer(self.optimizer)[0]
            except PlanError as e:
                raise SchedulerError(
                    f"slimfit_fx.Scheduler cannot price the state of {type(self.optimizer).__name__} ({e}); a "
                    "Budget policy, price() and predicted_bytes() need it. Train with torch.optim.AdamW, Adam or "
                    "SGD, or use a Ratio policy, which prices nothing") from e
        return self._optimizer_name

    def _budget_pricing(self) -> BudgetPricing:
        if self._last_inputs is None and self._last_signature not in self._pricing:
            raise SchedulerError("Budget needs the batch shape: run a forward pass of the model before the "
                                 "first optimizer step")
        key = self._last_signature
        pricing = self._pricing.get(key)
        if pricing is None:
            optimizer = self.priced_optimizer()  # before the analysis: an optimizer it cannot price fails fast
            plan = self._plan_for(*self._last_inputs)
            pricing = BudgetPricing.build(plan, self.layers, self._fixed_frozen, optimizer)
            self._pricing[key] = pricing
            while len(self._pricing) > 8:  # variable shapes: keep the latest few
                self._pricing.popitem(last=False)
        else:
            self._pricing.move_to_end(key)
        return pricing

    def _plan_for(self, args: tuple, kwargs: dict):
        """The MemoryPlan for a batch shaped like ``args``/``kwargs``, captured with every layer trainable."""
        from .compiler import analyze

        model = self._slim.original if self.compiled else self.model
        config = self._slim.slimfit_config if self.compiled else None
        example = dict(kwargs) if not args else (tuple(args) if not kwargs else (tuple(args), dict(kwargs)))
        sig = self._last_signature
        precision = sig[-1] if isinstance(sig, tuple) else ()
        if self.compiled:
            precision = self._slim.__dict__.get("last_autocast", precision)
        requires = [p.requires_grad for p in self.params]
        with training_mode(model), autocast_enabled(precision):  # the batch's precision
            for p in self.params:  # the analysis prices every layer: capture with all of them trainable
                p.requires_grad_(True)
            try:
                if self.compiled:
                    return self._slim.plan_for_call(tuple(args), dict(kwargs))
                return analyze(model, example, config)
            finally:
                for p, r in zip(self.params, requires):
                    p.requires_grad_(r)

    def plan(self):
        """The MemoryPlan the budget policy prices layers with (latest batch shape), or None."""
        if not self._pricing:
            return None
        return next(reversed(self._pricing.values())).plan

    # ------------------------------------------------------------------ hooks
    def _remember_inputs(self, module, args, kwargs):
        if not module.training or not torch.is_grad_enabled():
            return None
        sig = input_signature(args, kwargs)
        if sig != self._last_signature:
            self._last_signature = sig
            self._last_inputs = (tuple(args), dict(kwargs))
            if self.iteration == 0 and self.policy.priced and not (
                    self._redecided and _distributed()):  # ranks must agree on how many decisions they make
                # The first decision, now for the real batch shape (replaces one made for the example).
                self._redecided = True
                self.history.clear()
                self.frozen_for.zero_()
                self._apply(self._decide())  # first priced decision, before this forward records anything
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
            return self.policy.choose(self)
        import torch.distributed as dist

        t = len(self.layers)
        frozen = self.policy.choose(self) if dist.get_rank() == 0 else set()
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
        """Names of the layers trained in the next forward/backward."""
        return [self.layers[i] for i in range(len(self.layers)) if i not in self._frozen]

    @property
    def frozen_fraction(self) -> float:
        """The fraction of the scheduled layers frozen now."""
        return len(self._frozen) / len(self.layers)

    @property
    def fixed_frozen(self) -> frozenset[str]:
        """Names of the parameters the user froze before the scheduler started: never scheduled, and
        frozen in every prediction."""
        return frozenset(self._fixed_frozen)

    def predicted_bytes(self):
        """MemoryEstimate of the current frozen set for the latest batch shape; None before any
        forward (or ``price(inputs)``).  A new batch shape is analysed once (a graph capture)."""
        if self._last_signature is None:
            return None
        plan = self._budget_pricing().plan
        return plan.predict(frozen=(set(self.frozen) | self._fixed_frozen) & set(plan.parameter_names),
                            optimizer=self.priced_optimizer())

    def price(self, example_inputs) -> None:
        """Analyse the model for inputs shaped like ``example_inputs`` so ``predicted_bytes()`` works
        under any policy (the Budget policy does this by itself)."""
        from .trace import normalize_inputs

        inputs = normalize_inputs(example_inputs)
        self._last_inputs = (inputs.args, inputs.kwargs)
        self._last_signature = input_signature(inputs.args, inputs.kwargs)
        self._budget_pricing()

    def summary(self) -> str:
        """One line: the policy, how many layers are frozen, the bound, and what freezing saves on this model."""
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
        """What ``load_state_dict`` needs to continue the schedule exactly: scores, counters, history, RNG state."""
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
        """Continue from ``state_dict()``'s result and re-apply its frozen set; ``SchedulerError`` if it
        was saved for other layers."""
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
