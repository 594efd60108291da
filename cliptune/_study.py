"""Create or load a job's Optuna study: its sampler, its pruner, what it records of the job.

The default sampler is a multivariate TPE whose random state is set from ``(seed, trial number)``
before each trial. A study continued after a crash, or shared by processes started on their own,
therefore keeps sampling new points (a sampler seeded once would replay the first run's trials),
and a given history still gives the same next trial.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import optuna

from cliptune._optuna import reseed_tpe
from cliptune.plan import Plan
from cliptune.stability import StabilityPruner

SPACE_ATTR, BACKEND_ATTR = "cliptune.search_space", "cliptune.backend"
JOB_ATTR = "cliptune.job"  # the job's settings (optimizer, lr, ...), for `cliptune best`


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE seeded per trial from ``(seed, trial number)`` (see the module docstring)."""

    def __init__(self, seed: int | None, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self._base_seed is not None:
            state = np.random.SeedSequence([self._base_seed, trial.number]).generate_state(1)
            reseed_tpe(self, int(state[0]))
        super().before_trial(study, trial)


def default_sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # ``group`` is marked experimental; it handles our
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # conditional space
        return TrialSeededTPE(seed, multivariate=True, group=True, n_startup_trials=10)


def stability_pruner(pruner: optuna.pruners.BasePruner | None,
                     multi_fidelity: bool = False) -> StabilityPruner:
    """The job's pruner: a StabilityPruner as given, or one wrapping the given pruner, else the
    stability rules over successive halving (``multi_fidelity``) or the MedianPruner."""
    if isinstance(pruner, StabilityPruner):
        return pruner
    if pruner is None and multi_fidelity:
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return StabilityPruner(pruner)


def open_study(plan: Plan, storage: Any, pruner: StabilityPruner) -> optuna.Study:
    """The job's study in ``storage`` (created, or loaded when it exists)."""
    search = plan.settings.search
    return optuna.create_study(
        storage=storage, sampler=search.sampler or default_sampler(search.seed), pruner=pruner,
        study_name=plan.study_name, direction=plan.direction, load_if_exists=True)


def load_study(plan: Plan, storage: Any, study_name: str,
               pruner: StabilityPruner) -> optuna.Study:
    """The study a worker process joins (its parent created it)."""
    search = plan.settings.search
    return optuna.load_study(study_name=study_name, storage=storage, pruner=pruner,
                             sampler=search.sampler or default_sampler(search.seed))


def record_job(study: optuna.Study, plan: Plan) -> None:
    """What a later reader of the study needs to know: the (resolved) search space, the backend."""
    study.set_user_attr(SPACE_ATTR, plan.space.to_dict())
    study.set_user_attr(BACKEND_ATTR, plan.backend or "user loop")
    study.set_user_attr(JOB_ATTR, {k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                                   for k, v in plan.job_params().items()})
