"""Lightning: :class:`ClipTuneCallback` brings a :class:`cliptune.Trial` into ``Trainer.fit``.

Where it acts, from Lightning's own code (``plugins/precision/precision.py``, ``amp.py``):

- ``on_before_backward`` receives each micro-batch's loss (divided by ``accumulate_grad_batches``,
  and multiplied by the loss scale under ``16-mixed``); the callback keeps the step's mean loss.
- ``on_before_optimizer_step`` runs once per optimizer step, after the closure (forward and
  backward) and, under a ``GradScaler``, after ``scaler.unscale_(optimizer)``, and just before
  Lightning's own ``gradient_clip_val`` clip and ``optimizer.step``. The trial's clip is applied
  there with the step's loss, so every step reaches the stability rules once, before it is taken.
- ``on_validation_end`` (after the module's ``on_validation_epoch_end``, so every logged value is
  in ``trainer.callback_metrics``) reports the monitored metric; the sanity check is skipped.

An exception raised in a callback leaves ``trainer.fit`` unchanged (Lightning's
``_call_and_handle_interrupt`` tears down and re-raises it), so a pruned trial ends ``fit`` with
``optuna.TrialPruned``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from cliptune._errors import UsageError
from cliptune.trial import Trial

log = logging.getLogger("cliptune")


def _check_trial(trial: Any, owner: str) -> Trial:
    if not isinstance(trial, Trial):
        raise TypeError(f"The 'trial' parameter of {owner} must be the cliptune.Trial that "
                        f"train(trial) received. Got {type(trial).__name__} instead.")
    return trial


def _scaler(trainer: pl.Trainer) -> Any:
    """The ``GradScaler`` of a ``16-mixed`` run (public attribute of the AMP plugins), else None."""
    return getattr(trainer.precision_plugin, "scaler", None)


class ClipTuneCallback(pl.Callback):
    """Applies the trial's gradient clip in ``Trainer.fit`` and reports to the study.

    Args:
        trial: The :class:`cliptune.Trial` that ``train(trial)`` received.
        monitor: The name under which the module logs the study's metric (``self.log(...)`` in
            its validation step); by default ``trial.metric`` (``val_loss``). It is reported to
            the study as ``trial.metric``.

    Refused before training (a :class:`cliptune.UsageError`): ``Trainer(gradient_clip_val=...)``
    (two clips, and Lightning's would hide the tuned one) and a module with
    ``automatic_optimization = False`` (no optimizer step of Lightning's to hook; call
    ``trial.clip_(optimizer, loss)`` in your ``training_step`` instead).

    Example:
        >>> def train(trial):  # doctest: +SKIP
        ...     trainer = pl.Trainer(max_epochs=5, callbacks=[ClipTuneCallback(trial)])
        ...     trainer.fit(MyModule(lr=trial.extras.get("lr", 1e-3)), train_loader, val_loader)
    """

    def __init__(self, trial: Trial, monitor: str | None = None) -> None:
        self.trial = _check_trial(trial, "ClipTuneCallback")
        if monitor is not None and not (isinstance(monitor, str) and monitor):
            raise TypeError("The 'monitor' parameter of ClipTuneCallback must be a logged "
                            f"metric's name or None. Got {monitor!r} instead.")
        self.monitor = monitor or trial.metric
        self.reports = 0  # validation rounds reported (the epochs of the trial's history)
        self._loss_sum: torch.Tensor | None = None  # this step's micro-batch losses, on device
        self._n_losses = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _check_fit(trainer, pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        raw = loss.detach().float()  # (no copy for a float32 loss)
        if trainer.accumulate_grad_batches != 1:  # Lightning divided the loss by it
            raw = raw * trainer.accumulate_grad_batches
        scaler = _scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            raw = raw / scaler.get_scale()  # AMP scales the loss before this hook; a power of 2
        self._loss_sum = raw if self._loss_sum is None else self._loss_sum + raw
        self._n_losses += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._n_losses:  # training_step returned None: no backward, nothing to clip
            return
        loss, n = self._loss_sum, self._n_losses
        self._loss_sum, self._n_losses = None, 0
        if n > 1:
            loss = loss / n  # type: ignore[operator]
        self.trial.clip_(optimizer, loss, scaler=_scaler(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            got = ", ".join(sorted(metrics)) or "nothing"
            raise UsageError(
                f"ClipTuneCallback monitors {self.monitor!r}, which the module did not log in "
                f"validation (trainer.callback_metrics holds {got}). Log it with "
                f"self.log({self.monitor!r}, ...) in validation_step, or pass "
                "ClipTuneCallback(trial, monitor=...) the name you log.")
        self.trial.report(self.reports, **{self.trial.metric: float(metrics[self.monitor])})
        self.reports += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.reports:
            raise UsageError(
                "ClipTuneCallback saw no validation round, so the trial has no value: give "
                "trainer.fit validation data (val_dataloaders or a val_dataloader() method) and "
                "let it validate at least once (limit_val_batches > 0).")


def _check_fit(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse what would clip twice or leave nothing to hook, before any step."""
    clip_val = trainer.gradient_clip_val
    if clip_val is not None and clip_val > 0:  # Lightning clips only for a positive value
        raise UsageError(
            "ClipTuneCallback applies the trial's clip, and Trainer(gradient_clip_val=...) would "
            "clip the same gradients again right after it: remove gradient_clip_val (or set it "
            f"to None). Got gradient_clip_val={clip_val!r} instead.")
    if not pl_module.automatic_optimization:
        raise UsageError(
            f"ClipTuneCallback hooks Lightning's optimizer step, which a module with manual "
            f"optimisation does not use: call trial.clip_(optimizer, loss) between "
            f"self.manual_backward(loss) and optimizer.step() in training_step instead. Got "
            f"{type(pl_module).__name__}.automatic_optimization=False instead of True.")
    if type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:
        log.warning("%s overrides configure_gradient_clipping, which runs after the trial's clip; "
                    "if it clips as well, the tuned clip is not the one applied.",
                    type(pl_module).__name__)


__all__ = ["ClipTuneCallback"]
