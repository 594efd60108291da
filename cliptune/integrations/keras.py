"""Keras ``fit``: an optimizer that applies a :class:`cliptune.Trial`'s clip, and a callback that
feeds the trial each step and each epoch.

Where it acts, from Keras 3's own code:

- The clip runs where Keras applies ``clipnorm`` & co: ``Optimizer._clip_gradients``, inside the
  compiled train step, on the gradients ``apply`` hands on (unscaled by then: a
  ``LossScaleOptimizer``, which ``compile`` wraps around the optimizer under ``mixed_float16``,
  divides by its scale before calling the inner optimizer, and skips the inner optimizer on
  inf/NaN gradients). :func:`trial_optimizer` subclasses the given optimizer class for this
  (as ``_keras_adaptive`` does), and keeps ``[pre-clip norm, clipped, applies, clips]`` in one
  non-trainable float64 variable, read once per batch by the callback.
- The step's loss: ``logs["loss"]`` at ``on_train_batch_end`` is the epoch's running mean, not the
  step's. The callback reads the model's loss tracker (the ``Mean`` named ``loss`` in
  ``model.metrics``, updated by ``train_step``) and takes the step's loss as the increment of its
  ``total`` over the increment of its ``count`` (batch-size weighted, as Keras weighs it). That
  works for any optimizer and ``LossScaleOptimizer``, where stashing the loss from the
  optimizer's ``scale_loss`` would not (the wrapper does not call the inner optimizer's). A NaN
  step makes the total NaN, so it is seen at once. A custom ``train_step`` that updates no such
  tracker: ``logs["loss"]`` is taken as the step's loss.
- A batch whose step a ``LossScaleOptimizer`` skipped leaves the inner optimizer's counters as
  they were: it is recorded as a skipped step.

Exceptions raised in a callback leave ``model.fit`` unchanged, so a pruned trial ends ``fit``
with ``optuna.TrialPruned``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import keras
import tensorflow as tf

from cliptune._errors import UsageError, unknown_name
from cliptune.backends._keras_optimizer import CLIP_ARGS, OPTIMIZERS
from cliptune.config import ClipConfig, ClipMode

# cliptune.trial imports this module (Trial.keras_optimizer), so this one does not import it back:
# a cliptune.Trial is checked by what it offers and typed as _Trial.
_Trial = Any

# The slots of the optimizer's cliptune_stats: the last clip's pre-clip norm and whether it changed
# the gradients, how many times apply and the clip ran, the loss tracker's total and count, and
# how many times apply copied them (not when the train step was traced before the callback).
_NORM, _CLIPPED, _APPLIES, _CLIPS, _TOTAL, _COUNT, _COPIES = range(7)


def _check_trial(trial: Any, owner: str) -> _Trial:
    if not (isinstance(getattr(trial, "config", None), ClipConfig) and callable(
            getattr(trial, "clip", None)) and callable(getattr(trial, "step", None))):
        raise TypeError(f"The 'trial' parameter of {owner} must be the cliptune.Trial that "
                        f"train(trial) received. Got {type(trial).__name__} instead.")
    return trial


class _TrialClipMixin:
    """Clips with the trial where a Keras optimizer applies ``clipnorm`` & co, and keeps the
    step's statistics in ``cliptune_stats``."""

    def __init__(self, *args: Any, cliptune_trial: _Trial, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cliptune_trial = cliptune_trial
        self.cliptune_stats: tf.Variable | None = None
        self.cliptune_tracker: Any = None  # the model's loss tracker, set by ClipTuneCallback
        self._cliptune_variables: list[Any] = []

    def build(self, variables: list[Any]) -> None:
        super().build(variables)  # type: ignore[misc]
        with tf.init_scope():  # eagerly, even when built inside the train function
            self.cliptune_stats = tf.Variable(tf.zeros([7], tf.float64), trainable=False,
                                              name="cliptune_stats")

    def _backend_apply_gradients(self, grads: list[Any], trainable_variables: list[Any]) -> Any:
        """Count the apply and copy the loss tracker (train_step updated it before the gradients),
        so that the callback reads one variable a batch."""
        self._cliptune_variables = list(trainable_variables)  # for agc, in _clip_gradients
        stats, tracker = self.cliptune_stats, self.cliptune_tracker
        copied = (stats[_TOTAL], stats[_COUNT], stats[_COPIES]) if tracker is None else (
            tf.cast(tracker.total.value, tf.float64), tf.cast(tracker.count.value, tf.float64),
            stats[_COPIES] + 1)
        stats.assign(tf.stack([stats[_NORM], stats[_CLIPPED], stats[_APPLIES] + 1, stats[_CLIPS],
                               *copied]))
        return super()._backend_apply_gradients(grads, trainable_variables)  # type: ignore[misc]

    def _clip_gradients(self, grads: list[Any]) -> list[Any]:
        clipped, norm, changed = self.cliptune_trial.clip(grads, self._cliptune_variables)
        stats = self.cliptune_stats
        stats.assign(tf.concat([tf.stack([tf.cast(norm, tf.float64), tf.cast(changed, tf.float64),
                                          stats[_APPLIES], stats[_CLIPS] + 1]), stats[_TOTAL:]], 0))
        return clipped


_CLASSES: dict[type, type] = {}


def _trial_class(base: type[keras.optimizers.Optimizer]) -> type:
    """``base`` with the trial's clip, taking ``cliptune_trial=trial`` (one class per base)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}ClipTune", (_TrialClipMixin, base),
                              {"__module__": __name__})
    return _CLASSES[base]


def trial_optimizer(trial: _Trial, optimizer: Any = "adam", **kwargs: Any) -> keras.optimizers.Optimizer:
    """A Keras optimizer that applies ``trial``'s clip (any mode) and records each step for
    :class:`ClipTuneCallback`; also ``trial.keras_optimizer(optimizer, **kwargs)``.

    Args:
        trial: The :class:`cliptune.Trial` that ``train(trial)`` received.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, a Keras optimizer class, or
            a ``functools.partial`` of one (the optimizer is a subclass of that class).
        **kwargs: More optimizer arguments, such as ``learning_rate``; not ``clipnorm``,
            ``clipvalue`` or ``global_clipnorm`` (the trial's clip is the clip).

    With ``autoclip``, compile the model with ``jit_compile=False`` (its history grows each step,
    which XLA cannot compile). The optimizer holds the trial: save the model's weights, not the
    compiled model.
    """
    _check_trial(trial, "trial_optimizer")
    given = sorted(set(kwargs) & set(CLIP_ARGS))
    if given:
        raise ValueError(f"trial_optimizer applies the trial's clip, so a second one from "
                         f"{given[0]}= would clip the gradients twice. Got {given[0]}="
                         f"{kwargs[given[0]]!r} instead of no {given[0]}.")
    base, bound = optimizer, {}
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", optimizer, OPTIMIZERS, "trial_optimizer")
        base = OPTIMIZERS[optimizer]
    elif isinstance(optimizer, functools.partial) and not optimizer.args:
        base, bound = optimizer.func, dict(optimizer.keywords)
    if not (isinstance(base, type) and issubclass(base, keras.optimizers.Optimizer)):
        raise TypeError("The 'optimizer' parameter of trial_optimizer must be a name, a Keras "
                        "optimizer class or a functools.partial of one (cliptune subclasses it "
                        f"to apply the trial's clip). Got {optimizer!r} instead.")
    return _trial_class(base)(**bound, **kwargs, cliptune_trial=trial)


def _keras_name(metric: str) -> str:
    """Keras's log name of a cliptune metric: ``train_loss`` -> ``loss``; ``val_*`` as is."""
    return metric.removeprefix("train_")


def _cliptune_name(name: str) -> str:
    """cliptune's name of a Keras log: ``loss`` -> ``train_loss``, ``val_*`` as is."""
    return name if name.startswith("val_") else f"train_{name}"


class ClipTuneCallback(keras.callbacks.Callback):
    """Feeds the trial each step of ``model.fit`` and reports each epoch to the study.

    The model must be compiled with ``trial.keras_optimizer(...)`` (or
    :func:`trial_optimizer`), which applies the clip; this callback records what it did.

    Args:
        trial: The :class:`cliptune.Trial` that ``train(trial)`` received.
        metric: Keras's log name of the study's metric (``val_loss``, ``val_mae``); by default
            ``trial.metric`` (``train_x`` read as ``x``). It is reported as ``trial.metric``, the
            other logs as ``train_<name>`` and ``val_<name>`` (``train_loss`` is the mean of the
            step losses the rules saw, as for every loop). An epoch without validation
            (``validation_freq``) is reported with the next one.

    Refused at ``on_train_begin`` (a :class:`cliptune.UsageError`): a model compiled with another
    optimizer (its clip would not be the trial's), ``steps_per_execution`` > 1 (the callback
    would see one step in N), and ``autoclip`` under XLA.
    """

    def __init__(self, trial: _Trial, metric: str | None = None) -> None:
        super().__init__()
        self.trial = _check_trial(trial, "ClipTuneCallback")
        if metric is not None and not (isinstance(metric, str) and metric):
            raise TypeError("The 'metric' parameter of ClipTuneCallback must be a log name or "
                            f"None. Got {metric!r} instead.")
        self.metric = metric or _keras_name(trial.metric)
        self.reports = 0
        self._optimizer: Any = None
        self._scaled = False  # a LossScaleOptimizer wraps the trial's optimizer
        self._tracker: Any = None
        self._stats = [0.0] * 7
        self._total = self._count = 0.0
        self._pending: list[float] = []  # losses of micro-batches not yet applied (accumulation)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._optimizer, self._scaled = _trial_optimizer_of(self.model, self.trial)
        if getattr(self.model, "steps_per_execution", 1) != 1:
            raise UsageError("ClipTuneCallback feeds the stability rules every step, and "
                             "steps_per_execution > 1 shows callbacks one step in N: compile "
                             "with steps_per_execution=1. Got steps_per_execution="
                             f"{self.model.steps_per_execution} instead.")
        if self.trial.config.mode is ClipMode.AUTOCLIP and self.model.jit_compile:
            raise UsageError("autoclip keeps a history that grows each step, which XLA cannot "
                             "compile: compile the model with jit_compile=False for autoclip "
                             "trials. Got jit_compile=True instead.")
        self._tracker = next((m for m in self.model.metrics if m.name == "loss"
                              and isinstance(m, keras.metrics.Mean)), None)
        self._optimizer.cliptune_tracker = self._tracker  # read in the train step, if not traced
        if self._optimizer.cliptune_stats is not None:
            self._stats = self._optimizer.cliptune_stats.value().numpy().tolist()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._total, self._count = self._tracked()

    def _tracked(self) -> tuple[float, float]:
        if self._tracker is None:
            return 0.0, 0.0
        return float(self._tracker.total), float(self._tracker.count)

    def _step_loss(self, stats: list[float], copies: float, logs: dict[str, Any] | None
                   ) -> float | None:
        """The tracker's increment over the step: from the stats the optimizer copied, or read
        here (a step the LossScaleOptimizer skipped, a train function traced before this fit)."""
        total, count = stats[_TOTAL], stats[_COUNT]
        if stats[_COPIES] == copies:
            total, count = self._tracked()
        added, done = total - self._total, count - self._count
        self._total, self._count = total, count
        if done > 0:
            return added / done
        value = (logs or {}).get("loss")  # no tracker of Keras's: the train_step's own figure
        return None if value is None else float(value)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        before = self._stats
        self._stats = stats = self._optimizer.cliptune_stats.value().numpy().tolist()
        loss = self._step_loss(stats, before[_COPIES], logs)
        if stats[_APPLIES] == before[_APPLIES] and self._scaled:  # the wrapper skipped the step
            self._pending = []
            self.trial.step(loss, None, None, skipped=True)
            return
        if loss is not None:
            self._pending.append(loss)
        if stats[_CLIPS] == before[_CLIPS]:  # a micro-batch of gradient accumulation
            return
        loss = math.fsum(self._pending) / len(self._pending) if self._pending else None
        self._pending = []
        self.trial.step(loss, stats[_NORM], stats[_CLIPPED] > 0.5,
                        skipped=False if self._scaled else None)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        if self.metric not in logs:
            if any(k.startswith("val_") for k in logs):  # validation ran: the name is wrong
                raise UsageError(
                    f"ClipTuneCallback reports {self.metric!r}, which is not in Keras's epoch "
                    f"logs ({', '.join(sorted(logs))}). Pass ClipTuneCallback(trial, metric=...) "
                    "one of them.")
            return  # no validation this epoch (validation_freq): the next one reports
        metrics = {_cliptune_name(k): float(v) for k, v in logs.items()  # train_loss: the steps'
                   if k not in (self.metric, "loss", "learning_rate") and isinstance(v, numbers.Real)}
        metrics[self.trial.metric] = float(logs[self.metric])
        self.trial.report(epoch, **metrics)
        self.reports += 1

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self.reports:
            raise UsageError(f"ClipTuneCallback saw no epoch with {self.metric!r} in Keras's "
                             "logs, so the trial has no value: pass validation_data to fit (or "
                             "validation_split).")


def _trial_optimizer_of(model: Any, trial: _Trial) -> tuple[Any, bool]:
    """The model's optimizer made by :func:`trial_optimizer` for ``trial``; whether a
    ``LossScaleOptimizer`` wraps it."""
    optimizer, scaled = model.optimizer, False
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer, scaled = optimizer.inner_optimizer, True
    if not isinstance(optimizer, _TrialClipMixin):
        raise UsageError("ClipTuneCallback records the clip that the trial's optimizer applies: "
                         "compile the model with optimizer=trial.keras_optimizer(...). Got "
                         f"{type(optimizer).__name__} instead.")
    if optimizer.cliptune_trial is not trial:
        raise UsageError("The model's optimizer was made for another trial (number "
                         f"{optimizer.cliptune_trial.number}); build a fresh model and optimizer "
                         f"in train(trial) for trial {trial.number}.")
    return optimizer, scaled


__all__ = ["ClipTuneCallback", "trial_optimizer"]
