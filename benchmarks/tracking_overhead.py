"""MLflow tracking overhead per trial on the local sqlite store (the default ``tune(tracking=True)``).

Why: every trial gets a nested run that is created at its start, logs its params, its per-epoch
metrics and its end tags, and is ended; that must cost the trial little. MLflow's per-call cost
on sqlite (a transaction each) is why cliptune batches, and a slow or absent server is why the
calls run in a background sender (``cliptune._mlflow_sender``): a trial only queues them.

Measurements, each the median over interleaved repeats:

- ``hooks_ms``: the tracker's hooks for one trial of 50 epochs on the trial's thread (create the
  nested run, 50 epochs of metrics, tags, end): what tracking holds a trial up.
- ``delivered_ms``: the same trial's calls until they are all in the store: a fresh tracker's
  start, the hooks and its close (which waits for the sender), minus the same without a trial.
- ``trial_ms`` and ``ratio``: a whole 50-epoch trial of a small MLP in cliptune's loop with a real
  ``Trial``, tracked (the sender working beside it) versus untracked (no-op Tracker).

Variants: ``MlflowTracker`` as shipped (a trial's metrics go out every ``flush_every_s=2`` s, so
a fast trial sends them once at its end, with its params) and ``flush_every_s=0`` (one
``log_batch`` per epoch).

    python -m benchmarks tracking_overhead
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._common import interleaved, median, report, setup_torch, target

EPOCHS = 50
GOAL_MS = 50.0
STATS = {"train_loss": 0.5, "val_loss": 0.6, "grad_norm_mean": 1.2, "grad_norm_max": 3.4,
         "grad_norm_postclip_mean": 1.0, "clip_coef_mean": 0.8, "clip_fraction": 0.25}
FLUSH = {"mlflow (shipped)": 2.0, "mlflow, log_batch per epoch": 0.0}


def _tracker(uri: str, study: Any, flush: float) -> Any:
    from cliptune.tracking import MlflowTracker

    tracker = MlflowTracker(uri, "tracking-overhead", flush_every_s=flush)
    tracker.open()
    tracker.start(study, {"benchmark": "tracking_overhead", "epochs": EPOCHS})
    return tracker


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


def delivered(uri: str, study: Any, flush: float, with_trial: bool) -> None:
    """A fresh tracker's start, one trial's hooks (or none), its close: all delivered."""
    tracker = _tracker(uri, study, flush)
    if with_trial:
        hooks_only(tracker, study)
    tracker.close()


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

    from cliptune.tracking import Tracker

    setup_torch()
    splits, model_fn = _task()
    with tempfile.TemporaryDirectory(prefix="cliptune-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        study = optuna.create_study(pruner=optuna.pruners.NopPruner())
        trackers = {"untracked": Tracker(), **{n: _tracker(uri, study, f) for n, f in FLUSH.items()}}
        hooks = interleaved({n: (lambda t=t: hooks_only(t, study)) for n, t in trackers.items()},
                            repeats)
        trials = interleaved({n: (lambda t=t: whole_trial(t, study, splits, model_fn))
                              for n, t in trackers.items()}, repeats)
        ends = interleaved({f"{n}/{w}": (lambda f=f, w=w: delivered(uri, study, f, w))
                            for n, f in FLUSH.items() for w in (True, False)}, max(5, repeats // 3))
        for tracker in trackers.values():
            tracker.close()
    untracked = median(trials["untracked"])
    rows = [{"variant": name, "hooks_ms": median(hooks[name]) * 1000,
             "delivered_ms": (median(ends[f"{name}/True"]) - median(ends[f"{name}/False"])) * 1000
             if name in FLUSH else None,
             "trial_ms": median(trials[name]) * 1000, "ratio": median(trials[name]) / untracked}
            for name in trackers]
    shipped = rows[1]
    targets = [target("tracking overhead per trial, ms on the trial's thread (shipped)",
                      shipped["hooks_ms"], f"< {GOAL_MS:g}", shipped["hooks_ms"] < GOAL_MS),
               target("a trial's calls delivered to the store, ms (shipped)",
                      shipped["delivered_ms"], f"< {GOAL_MS:g}", shipped["delivered_ms"] < GOAL_MS)]
    meta = {"repeats": repeats, "epochs": EPOCHS, "store": "sqlite (local file)",
            "trial": "MLP 8-32-1, 512 train rows, batch 64, sgd, global_norm 1.0",
            "timing": "median of interleaved repeats; hooks_ms on the trial's thread"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("tracking_overhead", "MLflow tracking overhead per trial (sqlite)", rows,
                  ["variant", "hooks_ms", "delivered_ms", "trial_ms", "ratio"], targets, meta,
                  **kwargs)


if __name__ == "__main__":
    run()
