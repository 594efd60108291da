"""Refit: train a final model with the best config on train plus validation data, and keep it.

The refit uses the backend's own training loop, guarded by the same stability rules as a trial: an
unstable or non-finite refit is an error, never a silent NaN model. It trains ``epochs`` epochs
seeded like the best trial (``seed + its number``). Data:

- ``(X, y)`` arrays (and explicit array splits): train and validation together
  (:meth:`Splits.merged`); the validation loss it reports is then in-sample.
- framework datasets (torch ``Dataset``/``DataLoader``, ``tf.data.Dataset``): the train split only,
  since a loader's batching and transforms cannot be merged safely; recorded as
  ``cliptune.refit_data = train``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import optuna
from optuna.trial import TrialState

from cliptune.backends import TrainSettings
from cliptune.data import Splits
from cliptune.space import config_from_params
from cliptune.stability import StabilityRules, TrialMonitor
from cliptune.tracking import Tracker


class _RefitTrial:
    """Stands in for an Optuna trial, so that the monitor's stability rules guard the refit."""

    def __init__(self, direction: optuna.study.StudyDirection) -> None:
        self.study = SimpleNamespace(direction=direction)
        self.user_attrs: dict[str, Any] = {}

    def report(self, value: float, step: int) -> None:
        """Nothing to report: the refit is not a trial."""

    def should_prune(self) -> bool:
        return False

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def refit_splits(splits: Splits) -> tuple[Splits, str]:
    """The refit's data and its label (see the module docstring)."""
    if splits.is_arrays:
        return Splits(splits.merged(), splits.val), "train+val"
    return splits, "train"


def refit_best(study: optuna.Study, backend: Any, model_fn: Callable[..., Any], splits: Splits,
               settings: TrainSettings, rules: StabilityRules | None, tracker: Tracker) -> Any:
    """Train the best config on the refit data, log it with the tracker, return the model.

    Returns None (with a warning) when no trial completed.
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        warnings.warn("No trial completed, so there is no best config to refit; result.model is "
                      "None.", RuntimeWarning, stacklevel=3)
        return None
    best = study.best_trial
    clip, extras = config_from_params(best.params)
    seed = None if settings.seed is None else settings.seed + best.number
    data, label = refit_splits(splits)
    monitor = TrialMonitor(_RefitTrial(study.direction), rules)  # type: ignore[arg-type]
    try:
        model = backend.train(model_fn, data, clip, extras, settings, monitor, seed)
    except optuna.TrialPruned as exc:
        raise RuntimeError(f"The refit with the best config ({clip!r}, extras {extras}, from "
                           f"trial {best.number}) on the {label} data was unstable: {exc}. The "
                           "study is intact; tune longer or with a tighter search space.") from None
    last = monitor.history[-1] if monitor.history else {}
    if not all(math.isfinite(last.get(k, math.nan)) for k in ("train_loss", "val_loss")):
        raise RuntimeError(f"The refit with the best config ({clip!r}, from trial {best.number}) "
                           f"ended with a non-finite loss ({last}); no model is returned.")
    sample = backend.sample_inputs(data.train)
    output = None if sample is None else backend.predict(model, sample)
    tracker.model_refit(model, backend.name, sample, output, {
        "cliptune.refit_data": label, "cliptune.refit_trial": str(best.number),
        "cliptune.refit_clip": repr(clip)})
    return model
