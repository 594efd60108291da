"""Stability rules, the per-trial monitor that applies them, and the pruner that holds them.

A trial is stopped at once, with its reason, when training becomes unstable:

- ``nonfinite``: a loss or pre-clip gradient norm is NaN or infinite.
- ``diverged``: a step's loss exceeds ``divergence_factor`` x the trial's first loss (the median of
  its first ``warmup_steps`` steps), or an epoch's training loss exceeds ``divergence_factor`` x the
  best earlier epoch's.
- ``spiking``: ``max_spikes`` loss spikes within ``window`` steps, a spike being a step whose log
  loss lies more than ``spike_z`` robust standard deviations (1.4826 x MAD) above the median of the
  preceding window.
- ``unpromising``: the wrapped Optuna pruner (MedianPruner by default) says so at an epoch's end.

Instability is signalled by raising :class:`optuna.TrialPruned`, never by a NaN value. Pruned trials
rank below every complete trial in TPE's split, so the sampler learns to avoid unstable regions.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.pruners import BasePruner, MedianPruner

from cliptune._errors import check_positive_float, check_positive_int

PRUNE_REASONS = ("nonfinite", "diverged", "spiking", "unpromising")
_STATS_EVERY = 10  # steps between refreshes of the spike baseline (keeps a step O(1))
_MIN_LOG_SCALE = 0.05  # floor of the robust scale of log loss, so a flat loss is not all spikes


@dataclass(frozen=True)
class StabilityRules:
    """The thresholds of the stability rules (see the module docstring)."""

    divergence_factor: float = 10.0
    spike_z: float = 6.0
    max_spikes: int = 3
    window: int = 50
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        check_positive_float(self.divergence_factor, "divergence_factor", "StabilityRules")
        check_positive_float(self.spike_z, "spike_z", "StabilityRules")
        for name in ("max_spikes", "window", "warmup_steps"):
            check_positive_int(getattr(self, name), name, "StabilityRules")
        if self.divergence_factor <= 1:
            raise ValueError("The 'divergence_factor' parameter of StabilityRules must be > 1. "
                             f"Got {self.divergence_factor!r} instead.")


def is_nonfinite(value: float) -> bool:
    """True for NaN and +/-inf."""
    return not math.isfinite(value)


def is_diverged(loss: float, reference: float, factor: float) -> bool:
    """True when ``loss`` is above ``factor`` times a positive ``reference`` loss."""
    return reference > 0 and loss > factor * reference


def robust_stats(history: Sequence[float]) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x MAD, floored) of ``history``."""
    center = statistics.median(history)
    scale = max(1.4826 * statistics.median(abs(v - center) for v in history), _MIN_LOG_SCALE)
    return center, scale


def robust_z(history: Sequence[float], value: float) -> float:
    """How many robust standard deviations ``value`` lies above the median of ``history``."""
    center, scale = robust_stats(history)
    return (value - center) / scale


class StabilityPruner(BasePruner):
    """An Optuna pruner that adds stability rules to a normal pruner.

    The step-level rules run in :class:`TrialMonitor` (they stop a trial mid-epoch); at an epoch's
    end, a non-finite intermediate value prunes, and anything else goes to the wrapped pruner.

    Args:
        pruner: Pruner for unpromising trials; ``MedianPruner(n_startup_trials=5,
            n_warmup_steps=1)`` by default (no verdict on a first, noisy epoch). Pass
            ``optuna.pruners.NopPruner()`` to keep only the stability rules.
        rules: The stability thresholds, or ``None`` to switch the stability rules off.

    Example:
        >>> from cliptune import StabilityPruner, StabilityRules
        >>> pruner = StabilityPruner(rules=StabilityRules(divergence_factor=5.0))
    """

    def __init__(self, pruner: BasePruner | None = None,
                 rules: StabilityRules | None = StabilityRules()) -> None:
        if pruner is not None and not isinstance(pruner, BasePruner):
            raise TypeError("The 'pruner' parameter of StabilityPruner must be an Optuna "
                            f"BasePruner. Got {type(pruner).__name__} instead.")
        if rules is not None and not isinstance(rules, StabilityRules):
            raise TypeError("The 'rules' parameter of StabilityPruner must be StabilityRules or "
                            f"None. Got {type(rules).__name__} instead.")
        self.pruner = pruner if pruner is not None else MedianPruner(n_startup_trials=5,
                                                                     n_warmup_steps=1)
        self.rules = rules

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is not None and self.rules is not None and is_nonfinite(
                trial.intermediate_values[step]):
            return True
        return self.pruner.prune(study, trial)


EpochCallback = Callable[[int, dict[str, float]], None]


class TrialMonitor:
    """Watches one trial's training: the backend calls :meth:`step` and :meth:`epoch`.

    It sees plain floats; the backend decides when to read them off the device. It raises
    :class:`optuna.TrialPruned` on instability, with the reason in the trial's user attribute
    ``prune_reason``, and hands each epoch's statistics to ``on_epoch``.
    """

    def __init__(self, trial: optuna.Trial, rules: StabilityRules | None,
                 metric: str = "val_loss", objective: str = "last",
                 on_epoch: EpochCallback | None = None) -> None:
        self.trial = trial
        self.rules = rules
        self.metric = metric
        self.objective = objective
        self.on_epoch = on_epoch
        self.history: list[dict[str, float]] = []  # per-epoch statistics
        self.steps = 0
        self._minimize = trial.study.direction == optuna.study.StudyDirection.MINIMIZE
        self._first: list[float] = []
        self._reference = math.nan
        self._best_train = math.inf
        window = rules.window if rules else 1
        self._log_losses: deque[float] = deque(maxlen=window)
        self._spikes: deque[int] = deque()
        self._spike_bar = math.inf
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._n = 0
        self._loss_sum = 0.0
        self._norm_sum = 0.0
        self._norm_max = 0.0
        self._clipped = 0

    def step(self, loss: float, grad_norm: float, clipped: bool) -> None:
        """Record one optimisation step; may raise TrialPruned."""
        self.steps += 1
        self._n += 1
        self._loss_sum += loss
        self._norm_sum += grad_norm
        self._norm_max = max(self._norm_max, grad_norm)
        self._clipped += bool(clipped)
        rules = self.rules
        if rules is None:
            return
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            value = loss if what == "loss" else grad_norm
            self._prune("nonfinite", f"{what} was {value} at step {self.steps}")
        if len(self._first) < rules.warmup_steps:
            self._first.append(loss)
            if len(self._first) == rules.warmup_steps:
                self._reference = statistics.median(self._first)
        elif is_diverged(loss, self._reference, rules.divergence_factor):
            self._prune("diverged", f"step loss {loss:.4g} > {rules.divergence_factor:g} x "
                                    f"first loss {self._reference:.4g} at step {self.steps}")
        self._check_spike(math.log(loss) if loss > 0 else -math.inf, rules)

    def _check_spike(self, log_loss: float, rules: StabilityRules) -> None:
        if log_loss > self._spike_bar:
            self._spikes.append(self.steps)
        while self._spikes and self._spikes[0] <= self.steps - rules.window:
            self._spikes.popleft()
        if len(self._spikes) >= rules.max_spikes:
            self._prune("spiking", f"{len(self._spikes)} loss spikes (robust z > {rules.spike_z:g})"
                                   f" within {rules.window} steps, at step {self.steps}")
        self._log_losses.append(log_loss)
        if self.steps % _STATS_EVERY == 0 and len(self._log_losses) >= rules.warmup_steps:
            finite = [v for v in self._log_losses if math.isfinite(v)]
            if len(finite) >= rules.warmup_steps:
                center, scale = robust_stats(finite)
                self._spike_bar = center + rules.spike_z * scale

    def epoch(self, epoch: int, train_loss: float | None, val_loss: float) -> None:
        """Close an epoch: statistics to ``on_epoch``, checks, the report to Optuna."""
        stats = self._close_epoch(epoch, train_loss, val_loss)
        if self.rules is not None:
            for name in ("train_loss", "val_loss"):
                if is_nonfinite(stats[name]):
                    self._prune("nonfinite", f"{name} was {stats[name]} at epoch {epoch}")
            train = stats["train_loss"]
            if is_diverged(train, self._best_train, self.rules.divergence_factor):
                self._prune("diverged", f"train_loss {train:.4g} > "
                                        f"{self.rules.divergence_factor:g} x best epoch's "
                                        f"{self._best_train:.4g} at epoch {epoch}")
            self._best_train = min(self._best_train, train)
        value = stats[self.metric]
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self._prune("unpromising", f"{self.metric}={value:.4g} at epoch {epoch}")

    def _close_epoch(self, epoch: int, train_loss: float | None, val_loss: float) -> dict[str, Any]:
        n = max(self._n, 1)
        stats = {
            "train_loss": float(train_loss) if train_loss is not None else self._loss_sum / n,
            "val_loss": float(val_loss),
            "grad_norm_mean": self._norm_sum / n,
            "grad_norm_max": self._norm_max,
            "clip_fraction": self._clipped / n,
        }
        self._reset_epoch()
        self.history.append(stats)
        if self.on_epoch is not None:
            self.on_epoch(epoch, stats)
        return stats

    def _prune(self, reason: str, detail: str) -> None:
        if self._n:  # the statistics of the unfinished epoch still tell what happened
            self._close_epoch(len(self.history), None, math.nan)
        self.trial.set_user_attr("prune_reason", reason)
        self.trial.set_user_attr("prune_detail", detail)
        raise optuna.TrialPruned(f"{reason}: {detail}")

    def value(self) -> float:
        """The trial's value: the metric at the last epoch, or at the best one."""
        values = [h[self.metric] for h in self.history]
        if not values:
            raise RuntimeError("The trial ran no epoch; there is no value to return.")
        if self.objective == "best":
            return min(values) if self._minimize else max(values)
        return values[-1]
