"""HuggingFace Trainer integration: a callback that runs the SlimFit scheduler.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SlimFitCallback(policy=Ratio(0.9), compile=True)])

Takes the Trainer's model and optimizer.  Gives ``SlimFitCallback``: a ``Scheduler`` on the optimizer
(from ``on_train_begin``), ``slimfit/frozen_fraction`` and ``slimfit/predicted_activation_bytes`` in
every log, its state saved in every optimizer checkpoint and restored on resume; with ``compile=True``
the model compiled in place (``compile_in_place``) when the Trainer is built, before its accelerator
wraps ``forward`` for bf16/fp16, so the graph is captured in that precision.
Never replaces the Trainer's model object (the Trainer keeps using it for signatures, ``config``,
saving and evaluation) and never compiles unless asked.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..compiler import compile_in_place, in_place_module, uncompile
from ..config import SlimFitConfig
from ..scheduler import FreezePolicy, Ratio, Scheduler, SchedulerError

__all__ = ["SlimFitCallback", "compile_in_place", "uncompile"]

try:
    from transformers import TrainerCallback
except ImportError:  # transformers is a dependency, but keep the import error readable
    raise ImportError("slimfit_fx.integrations.huggingface needs transformers: pip install transformers") from None


def _refuse_late_mixed_precision(model: nn.Module, args) -> None:
    """A callback added after the Trainer was built finds ``model.forward`` already wrapped in the
    accelerator's autocast; compiling in place now would replace that wrapper and train in fp32."""
    if in_place_module(model) is not None:
        return
    mixed = getattr(args, "bf16", False) or getattr(args, "fp16", False)
    if mixed and "_original_forward" in model.__dict__:
        raise RuntimeError(
            "SlimFitCallback(compile=True) was added after the Trainer wrapped the model for "
            f"{'bf16' if args.bf16 else 'fp16'} mixed precision; compiling now would train in fp32. Pass the "
            "callback when building the Trainer (Trainer(..., callbacks=[SlimFitCallback(...)])), or call "
            "slimfit_fx.integrations.compile_in_place(model) before building it")


_GROUP_KEY = "slimfit_scheduler"
DEFAULT_POLICY = Ratio(0.9)


def _stash(state_dict: dict, scheduler: Scheduler) -> dict:
    if state_dict.get("param_groups"):
        state_dict["param_groups"][0][_GROUP_KEY] = scheduler.state_dict()
    return state_dict


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer (and similar wrappers) hold the torch optimizer in .optimizer
    # (a subclass of torch.optim.Optimizer that never ran its __init__, so it has no step hooks).
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"SlimFitCallback needs a torch.optim.Optimizer under the Trainer's optimizer, "
                        f"got {type(optimizer).__name__}")
    return inner


class SlimFitCallback(TrainerCallback):
    """Runs the SlimFit inter-layer scheduler inside a ``transformers.Trainer``.

    ``policy``: ``Ratio(r)`` or ``Budget(bytes)``.  ``compile``: also compile the
    Trainer's model in place with ``config`` (default ``SlimFitConfig()``), so
    frozen layers keep no activations; without it the scheduler freezes layers
    of the plain model (PyTorch's own savings only).  Other keyword arguments
    go to :class:`slimfit_fx.Scheduler` (``exclude``, ``max_frozen_steps``,
    ``frozen_state``, ``seed``, ...).  The scheduler is ``callback.scheduler``
    once training has begun; its state is saved with each checkpoint (in the
    optimizer's state) and restored when training resumes from one, whatever its path.
    """

    state_file = "slimfit_scheduler.pt"

    def __init__(self, policy: FreezePolicy = DEFAULT_POLICY, *, compile: bool = False,
                 config: SlimFitConfig | None = None, **scheduler_kwargs):
        if not isinstance(policy, FreezePolicy):
            raise TypeError(f"policy must be slimfit_fx.Ratio(r), slimfit_fx.Budget(bytes) or another "
                            f"slimfit_fx.FreezePolicy, got {policy!r}")
        self.policy = policy
        self.compile = compile
        self.config = config
        self.scheduler_kwargs = scheduler_kwargs
        self.scheduler: Scheduler | None = None
        self._resume_state: dict | None = None
        self._unpriced_warned = False

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """With ``compile``: the Trainer's model compiled in place."""
        # Compiled before the Trainer's accelerator wraps ``model.forward`` for bf16/fp16 (in
        # torch.autocast): the SlimFit forward then runs inside that autocast and its graph is
        # captured in the Trainer's precision.
        if self.compile and model is not None:
            compile_in_place(model, config=self.config)
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """The scheduler attached to the Trainer's optimizer, its state restored when training resumes."""
        if model is None or optimizer is None:
            raise RuntimeError("SlimFitCallback needs the Trainer's model and optimizer at on_train_begin")
        if self.scheduler is not None:
            self.scheduler.remove()  # a second trainer.train() call: start over on the new optimizer
        if self.compile:
            _refuse_late_mixed_precision(model, args)
            compile_in_place(model, config=self.config)
        inner = _unwrap_optimizer(optimizer)
        resume = inner.param_groups[0].pop(_GROUP_KEY, None) if inner.param_groups else None
        self.scheduler = Scheduler(model, inner, self.policy, **self.scheduler_kwargs)
        # The scheduler's state rides in every optimizer checkpoint (optimizer.pt), in the first param
        # group, which torch restores as saved: a resume from any path brings it back.
        scheduler = self.scheduler
        self._handles = [inner.register_state_dict_post_hook(
            lambda opt, sd: _stash(sd, scheduler) if scheduler is self.scheduler else sd)]
        if resume is None:
            resume = self._checkpoint_file(args, state)
        if resume is not None:
            self.scheduler.load_state_dict(resume)
        elif state.global_step:
            warnings.warn(
                f"SlimFitCallback: training resumes at step {state.global_step} but the checkpoint holds no "
                "SlimFit scheduler state (a checkpoint from a run without the callback?): the scheduler starts "
                "over at iteration 0, so the frozen sets will differ from an uninterrupted run", RuntimeWarning,
                stacklevel=2)
        return control

    def _checkpoint_file(self, args, state) -> dict | None:
        # Checkpoints written before the state rode in optimizer.pt: a file in the output_dir's checkpoint.
        import os

        if not state.global_step:
            return None
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.state_file)
        if os.path.exists(path):
            return torch.load(path, weights_only=False)
        return None

    def metrics(self) -> dict[str, float]:
        """What the callback adds to each log."""
        if self.scheduler is None:
            return {}
        out = {"slimfit/frozen_fraction": round(self.scheduler.frozen_fraction, 4)}
        try:
            est = self.scheduler.predicted_bytes()
        except SchedulerError as e:  # an optimizer the memory model cannot price (Adafactor): say so once
            if not self._unpriced_warned:
                warnings.warn(f"slimfit/predicted_activation_bytes is not logged: {e}", stacklevel=2)
                self._unpriced_warned = True
            return out
        if est is not None:
            out["slimfit/predicted_activation_bytes"] = int(est.activations)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        """``metrics()`` added to the log and to the Trainer's log history."""
        extra = self.metrics()
        if logs is not None:
            logs.update(extra)
        # The Trainer appended its copy of these logs to the history just before calling us.
        if state.log_history and extra:
            state.log_history[-1].update(extra)
        return control
