"""What the integration tests share: a study of enqueued trials run through ``tune_loop`` on a real
sqlite Optuna storage and a real MLflow store, a stand-alone trial, and the MLflow runs' tags."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

import cliptune
from cliptune import ClipConfig, StabilityRules, Trial, TrialMonitor

STUDY = "integration"


def tune_enqueued(train: Callable[[Trial], Any], tmp_path: Path, params: list[dict[str, Any]],
                  space: dict[str, Any], **settings: Any) -> optuna.Study:
    """Run exactly the trials ``params`` (Optuna parameter names) through ``tune_loop``."""
    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=storage, study_name=STUDY)
    for p in params:
        study.enqueue_trial(p)
    result = cliptune.tune_loop(train, n_trials=len(params), storage=storage, study_name=STUDY,
                                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                search_space=space, seed=0, show_progress=False, **settings)
    return result.study


def trial_runs(tmp_path: Path) -> dict[int, dict[str, str]]:
    """The tags of each trial's nested MLflow run, by trial number."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {int(r.data.tags["optuna.trial_number"]): r.data.tags for r in runs
            if "optuna.trial_number" in r.data.tags}


def a_trial(mode: str, threshold: float | None = None) -> Trial:
    """A trial outside a tuning job (an in-memory Optuna trial, the default stability rules)."""
    monitor = TrialMonitor(optuna.create_study().ask(), StabilityRules())
    return Trial(ClipConfig(mode, threshold), {}, 0, 0, monitor)
