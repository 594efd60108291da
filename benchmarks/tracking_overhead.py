"""MLflow tracking overhead per trial on the local sqlite store (the default ``tune(tracking=True)``).

Why: every trial gets a nested run that is created at its start, logs its params, its 5 per-epoch
metrics and its end tags, and is ended; that must cost little next to the trial itself. MLflow's
per-call cost on sqlite (a transaction each) is why cliptune batches.

Two measurements, each the median over interleaved repeats, against one parent run:

- ``hooks_ms``: the tracker's hooks alone for one trial of 50 epochs (create the nested run, log
  params, 50 epochs of 5 metrics, tags, end), i.e. the tracking overhead in milliseconds.
- ``trial_ms`` and ``ratio``: a whole 50-epoch trial of a small MLP through ``TorchBackend.train``
  and a real ``TrialMonitor``, tracked this way versus the same trial untracked (no-op Tracker).

Variants: ``MlflowTracker`` as shipped (metrics sent every ``flush_every_s=2`` s, so a fast trial
sends them once at its end, with its params), ``flush_every_s=0`` (one ``log_batch`` per epoch), and the naive
one ``log_metric`` call per value, for comparison (its hooks only: it takes seconds a trial).

    python -m benchmarks.tracking_overhead
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._common import interleaved, median, report, setup_torch, target

EPOCHS = 50
GOAL_MS = 50.0
NAIVE = "mlflow, log_metric per value"  # timed for its hooks only (it takes seconds a trial)
STATS = {"train_loss": 0.5, "val_loss": 0.6, "grad_norm_mean": 1.2, "grad_norm_max": 3.4,
         "clip_fraction": 0.25}


def _per_value_tracker(base: Any) -> Any:
    """The naive tracker: one ``log_metric`` call per value (what cliptune avoids)."""
    from cliptune.tracking import MlflowTracker

    class PerValue(MlflowTracker):
        def _epoch(self, trial_number: int, epoch: int, stats: dict[str, float]) -> None:
            run_id = self._trials[trial_number].run_id
            for key, value in stats.items():
                self.client.log_metric(run_id, key, value, step=epoch, synchronous=True)

    tracker = PerValue(base.tracking_uri, base.experiment)
    tracker.client, tracker.experiment_id, tracker.parent_id = (
        base.client, base.experiment_id, base.parent_id)
    return tracker


def _trackers(uri: str, study: Any) -> dict[str, Any]:
    from cliptune.tracking import MlflowTracker, Tracker

    shipped = MlflowTracker(uri, "tracking-overhead")
    shipped.start(study, {"benchmark": "tracking_overhead", "epochs": EPOCHS})
    per_epoch = MlflowTracker(uri, "tracking-overhead", flush_every_s=0)
    per_epoch.client, per_epoch.experiment_id, per_epoch.parent_id = (
        shipped.client, shipped.experiment_id, shipped.parent_id)
    return {"untracked": Tracker(), "mlflow (shipped)": shipped,
            "mlflow, log_batch per epoch": per_epoch,
            NAIVE: _per_value_tracker(shipped)}


def hooks_only(tracker: Any, study: Any) -> None:
    """One trial's tracking calls, without the training."""
    from cliptune import ClipConfig

    trial = study.ask()
    trial.suggest_categorical("clip_mode", ["global_norm"])
    trial.suggest_categorical("clip_threshold_global_norm", [1.0])
    tracker.trial_started(trial, ClipConfig("global_norm", 1.0), {"lr": 0.05})
    for epoch in range(EPOCHS):
        tracker.epoch(trial.number, epoch, STATS)
    tracker.trial_finished(trial.number, "COMPLETE", value=0.6)
    study.tell(trial, 0.6)


def whole_trial(tracker: Any, study: Any, splits: Any, model_fn: Callable[[], Any]) -> None:
    """One trial as tune() runs it: hooks around the built-in loop with a real Trial."""
    from benchmarks._common import train_one
    from cliptune import ClipConfig, StabilityRules
    from cliptune.monitor import TrialMonitor

    trial, clip = study.ask(), ClipConfig("global_norm", 1.0)
    trial.suggest_categorical("clip_mode", ["global_norm"])
    trial.suggest_categorical("clip_threshold_global_norm", [1.0])
    tracker.trial_started(trial, clip, {"lr": 0.05})
    monitor = TrialMonitor(trial, StabilityRules(),
                           on_epoch=lambda e, s: tracker.epoch(trial.number, e, s))
    train_one("torch", model_fn, splits, clip, monitor, 0, {"lr": 0.05}, loss="mse",
              optimizer="sgd", lr=0.05, epochs=EPOCHS, batch_size=64)
    value = monitor.value()
    tracker.trial_finished(trial.number, "COMPLETE", value=value)
    study.tell(trial, value)


def _task() -> tuple[Any, Callable[[], Any]]:
    from torch import nn

    from cliptune.data import make_splits

    rng = np.random.default_rng(0)
    X = rng.normal(size=(640, 8)).astype(np.float32)
    y = np.tanh(X @ rng.normal(size=(8, 1))).astype(np.float32)
    return make_splits((X, y), 0.2, 0), lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(),
                                                               nn.Linear(32, 1))


def run(repeats: int = 15, out_dir: Any = None) -> dict[str, Any]:
    import optuna

    setup_torch()
    splits, model_fn = _task()
    with tempfile.TemporaryDirectory(prefix="cliptune-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        study = optuna.create_study(pruner=optuna.pruners.NopPruner())
        trackers = _trackers(uri, study)
        hooks = interleaved({n: (lambda t=t: hooks_only(t, study)) for n, t in trackers.items()},
                            repeats)
        trials = interleaved({n: (lambda t=t: whole_trial(t, study, splits, model_fn))
                              for n, t in trackers.items() if n != NAIVE}, repeats)
        started = time.perf_counter()
        trackers["mlflow (shipped)"].finish(study)
        finish_ms = (time.perf_counter() - started) * 1000
    untracked = median(trials["untracked"])
    rows = [{"variant": name, "hooks_ms": median(hooks[name]) * 1000,
             "trial_ms": median(trials[name]) * 1000 if name in trials else None,
             "ratio": median(trials[name]) / untracked if name in trials else None}
            for name in trackers]
    shipped = rows[1]["hooks_ms"]
    targets = [target("tracking overhead per trial, ms (shipped)", shipped, f"< {GOAL_MS:g}",
                      shipped < GOAL_MS)]
    meta = {"repeats": repeats, "epochs": EPOCHS, "store": "sqlite (local file)",
            "trial": "MLP 8-32-1, 512 train rows, batch 64, sgd, global_norm 1.0",
            "parent_finish_ms": finish_ms,
            "timing": "median of interleaved repeats; hooks_ms = tracker calls alone"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("tracking_overhead", "MLflow tracking overhead per trial (sqlite)", rows,
                  ["variant", "hooks_ms", "trial_ms", "ratio"], targets, meta, **kwargs)


if __name__ == "__main__":
    run()
