"""Refit: train a final model with the best config on train plus validation data, and keep it.

The refit runs the job's built-in loop with a :class:`cliptune.Trial` whose reporter is a plain
record, not an Optuna trial, guarded by the same stability rules as a trial: an unstable or
non-finite refit is an error, never a silent NaN model. It trains ``epochs`` epochs seeded like
the best trial (``seed + its number``). Data:

- ``(X, y)`` arrays (and explicit array splits): train and validation together
  (:meth:`Splits.merged`); the validation loss it reports is then in-sample.
- framework datasets (torch ``Dataset``/``DataLoader``, ``tf.data.Dataset``): the train split only,
  since a loader's batching and transforms cannot be merged safely; recorded as
  ``cliptune.refit_data = train``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from cliptune.data import Splits
from cliptune.monitor import TrialMonitor
from cliptune.plan import Plan
from cliptune.result import TuneResult
from cliptune.space import config_from_params
from cliptune.stability import StabilityRules
from cliptune.tracking import Tracker
from cliptune.trial import PlainReporter, Trial


def refit_splits(splits: Splits) -> tuple[Splits, str]:
    """The refit's data and its label (see the module docstring)."""
    if splits.is_arrays:
        return Splits(splits.merged(), splits.val), "train+val"
    return splits, "train"


def refit_best(study: optuna.Study, plan: Plan, rules: StabilityRules | None,
               tracker: Tracker) -> Any:
    """Train the best config on the refit data, log it with the tracker, return the model.

    Returns None (with a warning) when no trial completed.
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        warnings.warn("No trial completed, so there is no best config to refit; result.model is "
                      "None.", RuntimeWarning, stacklevel=3)
        return None
    winner = TuneResult.from_study(study)  # the confirmed winner, where re-runs chose one
    best = study.trials[winner.best_trial]  # type: ignore[index]
    clip, extras = config_from_params(best.params)
    seed = plan.settings.search.seed
    seed = None if seed is None else seed + best.number
    task = plan.train
    data, label = refit_splits(task.splits)
    monitor = TrialMonitor(PlainReporter(), rules, direction=plan.direction)
    try:
        model = task.with_splits(data)(Trial(clip, extras, best.number, seed, monitor))
    except optuna.TrialPruned as exc:
        raise RuntimeError(f"The refit with the best config ({clip!r}, extras {extras}, from "
                           f"trial {best.number}) on the {label} data was unstable: {exc}. The "
                           "study is intact; tune longer or with a tighter search space.") from None
    last = monitor.history[-1] if monitor.history else {}
    if not all(math.isfinite(last.get(k, math.nan)) for k in ("train_loss", "val_loss")):
        raise RuntimeError(f"The refit with the best config ({clip!r}, from trial {best.number}) "
                           f"ended with a non-finite loss ({last}); no model is returned.")
    sample = task.sample_inputs(data.train)
    output = None if sample is None else task.predict(model, sample)
    tracker.model_refit(model, task.name, sample, output, {
        "cliptune.refit_data": label, "cliptune.refit_trial": str(best.number),
        "cliptune.refit_clip": repr(clip)})
    return model
