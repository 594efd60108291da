"""Tracking of a tuning job. The tuner talks to a :class:`Tracker`; MLflow is imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from cliptune.config import ClipConfig


class Tracker:
    """What the tuner tells a tracker. This base class records nothing (``tracking=False``)."""

    def start(self, study: optuna.Study, job: dict[str, Any]) -> None:
        """A tuning job starts on ``study`` with the job's parameters."""

    def trial_started(self, trial: optuna.Trial, clip: ClipConfig, extras: dict[str, Any]) -> None:
        """A trial starts with this clip and these extras."""

    def epoch(self, trial_number: int, epoch: int, stats: dict[str, float]) -> None:
        """A trial closed an epoch: train_loss, val_loss, grad_norm_mean/max, clip_fraction."""

    def trial_finished(self, trial_number: int, state: str, value: float | None = None,
                       reason: str | None = None, error: str | None = None) -> None:
        """A trial ended COMPLETE, PRUNED (with its reason) or FAIL (with its error)."""

    def finish(self, study: optuna.Study) -> None:
        """The job ended: record the best config and the summary."""
