"""What the integration tests share: a study of enqueued trials run through ``tune_loop`` on a real
sqlite Optuna storage and a real MLflow store, a stand-alone trial, the MLflow runs' tags, and the
checks every framework's callback must pass the same way."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

import cliptune
from cliptune import ClipConfig, StabilityRules, Trial, TrialMonitor

STUDY = "integration"
SPACE = {"modes": {"none": {}, "global_norm": {"threshold": {"choices": [1.0, 0.05]}}}}
AUTO = {"modes": {"global_norm": {"threshold": "auto"}}}  # ranges from a probe of the gradients


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


def check_stable_and_exploding(fit: Callable[[Trial], Any], tmp_path: Path, steps: int) -> None:
    """Global norm 1.0 completes, every step seen and each epoch reported; no clip explodes and is
    pruned with its reason, the framework's loop stops there, and its MLflow run says so."""
    seen: dict[int, tuple[int, int]] = {}

    def train(trial: Trial) -> None:
        try:
            fit(trial)
        finally:
            seen[trial.number] = (trial.monitor.steps, trial.monitor.skipped_steps)

    study = tune_enqueued(train, tmp_path, [
        {"clip_mode": "global_norm", "clip_threshold_global_norm": 1.0}, {"clip_mode": "none"}],
        SPACE)
    stable, exploding = study.trials
    assert stable.state is optuna.trial.TrialState.COMPLETE
    assert seen[0] == (steps, 0) and len(stable.user_attrs["history"]) == 2
    assert stable.value == stable.user_attrs["history"][-1]["val_loss"]
    assert exploding.state is optuna.trial.TrialState.PRUNED
    assert exploding.user_attrs["prune_reason"] in ("diverged", "nonfinite")
    assert seen[1][0] < steps  # the framework's loop stopped at the prune
    runs = trial_runs(tmp_path)
    assert runs[1]["cliptune.state"] == "PRUNED"
    assert runs[1]["cliptune.prune_reason"] == exploding.user_attrs["prune_reason"]


def overflowed_trial(train: Callable[[Trial], Any], tmp_path: Path,
                     steps: int) -> tuple[list[dict[str, float]], int]:
    """A global norm 0.05 trial whose first steps overflow in float16: it completes with some,
    not all, of its ``steps`` counted as skipped. Its epoch history and the skipped count."""
    study = tune_enqueued(train, tmp_path,
                          [{"clip_mode": "global_norm", "clip_threshold_global_norm": 0.05}], SPACE)
    (trial,) = study.trials
    history = trial.user_attrs["history"]
    assert trial.state is optuna.trial.TrialState.COMPLETE
    skipped = sum(h["skipped_steps"] for h in history)
    assert 0 < skipped < steps
    return history, skipped


def check_fp16_overflow(train: Callable[[Trial], Any], tmp_path: Path, steps: int,
                        models: list[Any]) -> None:
    """A global norm 0.05 trial under a GradScaler whose first steps overflow: it completes, the
    skipped steps are counted, the optimizer sees exactly the other steps with the unscaled
    gradients clipped to 0.05, and the losses reach the rules unscaled. ``train`` appends its
    model (which records ``seen`` norms and step ``losses``) to ``models``."""
    history, skipped = overflowed_trial(train, tmp_path, steps)
    model = models[0]
    assert len(model.seen) == steps - skipped  # the scaler skipped exactly the counted steps
    # the clip acts on unscaled gradients: t, not t / 2**k, reaches the optimizer
    assert model.seen == pytest.approx([0.05] * len(model.seen), rel=1e-4)
    assert history[-1]["clip_fraction"] == 1.0 and history[-1]["grad_norm_max"] < 1e3
    raw = statistics.mean(model.losses[16:])  # the step losses reach the rules unscaled
    assert 0.5 * raw < history[1]["train_loss"] < 2 * raw


def check_auto_probe(fit: Callable[[Trial], Any]) -> None:
    """``threshold: auto`` probes the gradients through the callback and then runs the trial."""
    result = cliptune.tune_loop(fit, n_trials=1, search_space=AUTO, tracking=False, seed=0,
                                probe_steps=20)
    low, high = (result.study.user_attrs["cliptune.search_space"]["modes"]["global_norm"]
                 ["threshold"][k] for k in ("low", "high"))
    assert 0 < low < high and result.n_complete + result.n_pruned == 1  # the trial ran its clip
