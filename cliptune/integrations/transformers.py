"""Transformers: :class:`ClipTuneCallback` brings a :class:`cliptune.Trial` into ``Trainer.train``.

Where it acts, from ``Trainer._inner_training_loop`` (transformers 5.x; the hook exists from 4.45,
and an older Trainer, which would never call it, is refused):

- ``on_pre_optimizer_step`` runs once per optimizer step, after the backward passes of the step's
  micro-batches and after the Trainer's own ``max_grad_norm`` clip, just before
  ``optimizer.step()``. The Trainer's clip must be off (``max_grad_norm=0``); the trial's clip is
  applied at this hook. Under fp16 the gradients may still be scaled here (4.45) or already
  unscaled (5.24 unscales them to log the norm, ``accelerator.clip_grad_norm_(..., inf)``): the
  clip goes through the accelerate ``GradScaler`` either way (``trial.clip_(optimizer, loss,
  scaler=...)`` unscales only what is not yet unscaled), and a step the scaler will skip for
  inf/NaN gradients is counted, not clipped.
- The step's loss: the Trainer keeps it in a local (``tr_loss_step``) and logs a running mean in
  which ``logging_nan_inf_filter`` replaces a NaN or inf loss by the mean so far, so a callback
  cannot read it. The callback takes it from the model's own output instead, with a forward hook
  (registered at ``on_train_begin``, removed at ``on_train_end`` or a prune) that reads the loss
  as ``Trainer.compute_loss`` does (``outputs["loss"]``, or ``outputs[0]``) in training forwards.
  A NaN loss is therefore seen at the step it happens. Over gradient accumulation the step's loss
  is the mean of its micro-batches' (their sum when the Trainer passes ``num_items_in_batch``, as
  the model then divides by the whole step's count).
- ``on_evaluate`` reports the metrics of each evaluation during training.

Exceptions raised in a callback leave ``Trainer.train`` unchanged, so a pruned trial ends
``train()`` with ``optuna.TrialPruned``.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from accelerate.optimizer import AcceleratedOptimizer

from cliptune._errors import UsageError
from cliptune.trial import Trial

log = logging.getLogger("cliptune")
_SPEED = ("_runtime", "_per_second")  # the Trainer's timing entries among the eval metrics


def eval_name(metric: str) -> str:
    """The Trainer's name of a cliptune metric: ``val_loss`` -> ``eval_loss``, ``bpc`` -> ``eval_bpc``."""
    return metric if metric.startswith("eval_") else "eval_" + metric.removeprefix("val_")


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss in a model's output, read as ``Trainer.compute_loss`` reads it; None if absent."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = output
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _is_metric(name: str) -> bool:
    """An evaluation's metric, not its epoch or timing."""
    return name != "epoch" and not name.endswith(_SPEED)


class ClipTuneCallback(transformers.TrainerCallback):
    """Applies the trial's gradient clip in ``Trainer.train`` and reports to the study.

    Args:
        trial: The :class:`cliptune.Trial` that ``train(trial)`` received.
        metric: The Trainer's name of the study's metric (``eval_loss``, ``eval_accuracy``);
            by default ``trial.metric`` with ``val_`` read as ``eval_``. It is reported to the
            study as ``trial.metric``; the other eval metrics as ``val_<name>``.

    Refused at ``on_train_begin``, before any step (a :class:`cliptune.UsageError`):
    ``TrainingArguments(max_grad_norm=...)`` other than 0 or None (its default is 1.0: two clips),
    and DeepSpeed or FSDP (they own the gradients' clipping and sharding).

    Example:
        >>> args = TrainingArguments("out", max_grad_norm=0, eval_strategy="epoch")  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=train, eval_dataset=val,              # doctest: +SKIP
        ...         callbacks=[ClipTuneCallback(trial)]).train()
    """

    def __init__(self, trial: Trial, metric: str | None = None) -> None:
        if not hasattr(transformers.TrainerCallback, "on_pre_optimizer_step"):
            raise ImportError("ClipTuneCallback clips in TrainerCallback.on_pre_optimizer_step, "
                              "which transformers added in 4.45: upgrade transformers (pip install "
                              "\"cliptune[transformers]\"). Got transformers "
                              f"{transformers.__version__} instead.")
        if not isinstance(trial, Trial):
            raise TypeError("The 'trial' parameter of ClipTuneCallback must be the cliptune.Trial "
                            f"that train(trial) received. Got {type(trial).__name__} instead.")
        if metric is not None and not (isinstance(metric, str) and metric):
            raise TypeError("The 'metric' parameter of ClipTuneCallback must be an eval metric's "
                            f"name or None. Got {metric!r} instead.")
        self.trial = trial
        self.metric = metric or eval_name(trial.metric)
        self.reports = 0  # evaluations reported (the epochs of the trial's history)
        self._hook: Any = None
        self._loss_sum: torch.Tensor | None = None  # this step's micro-batch losses, on device
        self._n_losses = 0
        self._summed = False  # the model normalised by the step's num_items_in_batch
        self._warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        _check_args(args)
        self._hook = model.register_forward_hook(self._see_loss, with_kwargs=True)

    def _see_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any],
                  output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = _loss_of(output)
        if loss is not None:
            loss = loss.detach().float().reshape(())  # (no copy for a float32 loss)
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._n_losses += 1
            self._summed = kwargs.get("num_items_in_batch") is not None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        scaler = getattr(optimizer, "scaler", None)  # AcceleratedOptimizer's GradScaler (fp16)
        while isinstance(optimizer, AcceleratedOptimizer):  # the scaler keys the inner optimizer
            optimizer = optimizer.optimizer
        with self._detach_on_error():
            self.trial.clip_(optimizer, self._step_loss(), scaler=scaler)

    def _step_loss(self) -> torch.Tensor | None:
        total, n = self._loss_sum, self._n_losses
        self._loss_sum, self._n_losses = None, 0
        if total is None:
            if not self._warned:
                log.warning("ClipTuneCallback found no loss in the model's output (a "
                            "compute_loss_func, label smoothing or a custom compute_loss): the "
                            "stability rules watch the gradient norm only.")
                self._warned = True
            return None
        return total if self._summed or n == 1 else total / n

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if self._hook is None:  # an evaluation outside train(): not an epoch of the trial
            return
        metrics = metrics or {}
        if self.metric not in metrics:
            got = ", ".join(sorted(k for k in metrics if _is_metric(k))) or "no metric"
            self._detach()
            raise UsageError(f"ClipTuneCallback reports {self.metric!r}, which the evaluation did "
                             f"not return (it returned {got}). Pass ClipTuneCallback(trial, "
                             "metric=...) one of them, or return it from compute_metrics.")
        reported = {"val_" + k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                    if k != self.metric and _is_metric(k) and isinstance(v, numbers.Real)}
        reported[self.trial.metric] = float(metrics[self.metric])
        with self._detach_on_error():
            self.trial.report(self.reports, **reported)
        self.reports += 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()
        if not self.reports:
            raise UsageError("ClipTuneCallback saw no evaluation, so the trial has no value: give "
                             "the Trainer an eval_dataset and TrainingArguments(eval_strategy="
                             "'epoch') (or 'steps').")

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @contextlib.contextmanager
    def _detach_on_error(self) -> Iterator[None]:
        """A pruned (or failed) trial leaves no hook on the model."""
        try:
            yield
        except BaseException:
            self._detach()
            raise


def _check_args(args: Any) -> None:
    """Refuse a second clip, and the strategies whose gradients the callback cannot clip."""
    if args.max_grad_norm not in (0, None):
        raise UsageError(
            "ClipTuneCallback applies the trial's clip, and TrainingArguments(max_grad_norm=...) "
            "would clip the gradients first (its default is 1.0): set max_grad_norm=0. Got "
            f"max_grad_norm={args.max_grad_norm!r} instead.")
    for name in ("deepspeed", "fsdp"):
        if getattr(args, name, None):
            raise UsageError(
                f"ClipTuneCallback clips the gradients of one process, and {name} shards them and "
                f"clips them itself. Got TrainingArguments({name}={getattr(args, name)!r}) "
                "instead of none.")


__all__ = ["ClipTuneCallback", "eval_name"]
