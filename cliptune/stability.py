"""Stability rules, the per-trial monitor that applies them, and the pruner that holds them.

A trial is stopped at once, with its reason, when training becomes unstable:

- ``nonfinite``: a loss, a pre-clip gradient norm or a reported metric is NaN or infinite (a step
  that a ``GradScaler`` skipped for inf/NaN gradients is counted instead, see ``skipped_steps``).
- ``diverged``: a step's loss exceeds ``divergence_factor`` x the trial's first loss (the median of
  its first ``warmup_steps`` steps), or an epoch's training loss exceeds ``divergence_factor`` x the
  best earlier epoch's.
- ``spiking``: ``max_spikes`` loss spikes within ``window`` steps. A spike is a real jump: its log
  loss lies more than ``spike_z`` robust standard deviations (1.4826 x MAD) above the median of the
  preceding window, *and* the loss rose by more than ``spike_min_rise`` x the trial's first loss
  above that median. The second test keeps a converging run alive: near zero, ordinary minibatch
  noise is large in log space but tiny on the loss's own scale.
- ``skipped_steps``: more than ``max_skipped_steps`` steps in a row skipped by a ``GradScaler``
  (its scale keeps falling, so the gradients overflow in any precision).
- ``unpromising``: the wrapped Optuna pruner (MedianPruner by default) says so at an epoch's end.

Instability is signalled by raising :class:`optuna.TrialPruned`, never by a NaN value. Pruned trials
rank below every complete trial in TPE's split, so the sampler learns to avoid unstable regions.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.pruners import BasePruner, MedianPruner

from cliptune._errors import UsageError, check_positive_float, check_positive_int

PRUNE_REASONS = ("nonfinite", "diverged", "spiking", "skipped_steps", "unpromising")
_STATS_EVERY = 10  # steps between refreshes of the spike baseline (keeps a step O(1))
_MIN_LOG_SCALE = 0.05  # floor of the robust scale of log loss, so a flat loss is not all spikes


@dataclass(frozen=True)
class StabilityRules:
    """The thresholds of the stability rules (see the module docstring)."""

    divergence_factor: float = 10.0
    spike_z: float = 6.0
    spike_min_rise: float = 0.1
    max_spikes: int = 3
    window: int = 50
    warmup_steps: int = 10
    max_skipped_steps: int = 25

    def __post_init__(self) -> None:
        for name in ("divergence_factor", "spike_z", "spike_min_rise"):
            check_positive_float(getattr(self, name), name, "StabilityRules")
        for name in ("max_spikes", "window", "warmup_steps", "max_skipped_steps"):
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
        if trial.user_attrs.get("cliptune.confirms") is not None:
            return False  # a re-run of a top config on a fresh seed runs to its end
        return self.pruner.prune(study, trial)


class Reporter(Protocol):
    """Where a monitor reports: an ``optuna.Trial``, or a plain record (a refit, a probe)."""

    def report(self, value: float, step: int) -> None: ...
    def should_prune(self) -> bool: ...
    def set_user_attr(self, key: str, value: Any) -> None: ...


EpochCallback = Callable[[int, dict[str, float]], None]


class TrialMonitor:
    """Watches one trial's training: the :class:`cliptune.Trial` calls :meth:`step` and :meth:`epoch`.

    It sees plain floats; the trial decides when to read them off the device. It raises
    :class:`optuna.TrialPruned` on instability, with the reason in the reporter's user attribute
    ``prune_reason``, and hands each epoch's statistics to ``on_epoch``.
    """

    def __init__(self, reporter: Reporter, rules: StabilityRules | None,
                 metric: str = "val_loss", objective: str = "last",
                 on_epoch: EpochCallback | None = None, direction: str = "minimize") -> None:
        self.reporter = reporter
        self.rules = rules
        self.metric = metric
        self.objective = objective
        self.on_epoch = on_epoch
        self.history: list[dict[str, float]] = []  # per-epoch statistics
        self.steps = 0
        self.skipped_steps = 0
        self._minimize = direction == "minimize"
        self._first: list[float] = []
        self._reference = math.nan
        self._best_train = math.inf
        window = rules.window if rules else 1
        self._losses: deque[float] = deque(maxlen=window)
        self._spikes: deque[int] = deque()
        self._spike_bar = math.inf
        self._spike_median = math.inf
        self._skip_run = 0
        self._epoch = 0  # the next epoch's number, for a partial epoch closed by a prune
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._n = self._n_loss = self._n_norm = self._clipped = self._skipped = 0
        self._loss_sum = self._norm_sum = self._norm_max = 0.0
        self._saw_skip_flag = False

    def step(self, loss: float | None, grad_norm: float | None = None,
             clipped: bool | None = None, skipped: bool | None = None) -> None:
        """Record one optimisation step; may raise TrialPruned.

        ``skipped``: a ``GradScaler`` skipped the step for inf/NaN gradients (its norm is not a
        sign of divergence); None when no scaler is in use.
        """
        self.steps += 1
        self._n += 1
        self._saw_skip_flag |= skipped is not None
        if skipped:
            self._skipped += 1
            self.skipped_steps += 1
            self._skip_run += 1
            if loss is not None and self.rules is not None and not math.isfinite(loss):
                self._prune("nonfinite", f"loss was {loss} at step {self.steps}")
            if self.rules is not None and self._skip_run > self.rules.max_skipped_steps:
                self._prune("skipped_steps", f"{self._skip_run} steps in a row skipped by the "
                                             f"GradScaler (inf/NaN gradients) at step {self.steps}")
            return
        self._skip_run = 0
        if loss is not None:
            self._n_loss += 1
            self._loss_sum += loss
        if grad_norm is not None:
            self._n_norm += 1
            self._norm_sum += grad_norm
            self._norm_max = max(self._norm_max, grad_norm)
            self._clipped += bool(clipped)
        if self.rules is not None:
            self._check_step(loss, grad_norm, self.rules)

    def _check_step(self, loss: float | None, grad_norm: float | None,
                    rules: StabilityRules) -> None:
        for what, value in (("loss", loss), ("gradient norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                self._prune("nonfinite", f"{what} was {value} at step {self.steps}")
        if loss is None:
            return
        if len(self._first) < rules.warmup_steps:
            self._first.append(loss)
            if len(self._first) == rules.warmup_steps:
                self._reference = statistics.median(self._first)
        elif is_diverged(loss, self._reference, rules.divergence_factor):
            self._prune("diverged", f"step loss {loss:.4g} > {rules.divergence_factor:g} x "
                                    f"first loss {self._reference:.4g} at step {self.steps}")
        self._check_spike(loss, rules)

    def _check_spike(self, loss: float, rules: StabilityRules) -> None:
        log_loss = math.log(loss) if loss > 0 else -math.inf
        rise = loss - self._spike_median
        scale = self._reference if self._reference > 0 else max(self._first, default=0.0)
        if log_loss > self._spike_bar and rise > rules.spike_min_rise * scale:
            self._spikes.append(self.steps)
        while self._spikes and self._spikes[0] <= self.steps - rules.window:
            self._spikes.popleft()
        if len(self._spikes) >= rules.max_spikes:
            self._prune("spiking", f"{len(self._spikes)} loss spikes (robust z > {rules.spike_z:g}"
                                   f", rise > {rules.spike_min_rise:g} x first loss) within "
                                   f"{rules.window} steps, at step {self.steps}")
        self._losses.append(loss)
        if self.steps % _STATS_EVERY == 0 and len(self._losses) >= rules.warmup_steps:
            finite = [v for v in self._losses if v > 0 and math.isfinite(v)]
            if len(finite) >= rules.warmup_steps:
                center, spread = robust_stats([math.log(v) for v in finite])
                self._spike_bar = center + rules.spike_z * spread
                self._spike_median = math.exp(center)

    def epoch(self, epoch: int, metrics: Mapping[str, float] | None = None) -> None:
        """Close an epoch: statistics to ``on_epoch``, checks, the metric to the reporter.

        ``metrics`` are the loop's own (``val_loss``, ``bpc``, ...); ``train_loss`` defaults to
        the mean step loss. Raises :class:`UsageError` when the study's metric is missing.
        """
        stats = self._close_epoch(epoch, metrics or {})
        if self.metric not in stats:
            got = ", ".join(sorted(metrics or {})) or "no metric"
            raise UsageError(f"trial.report(epoch={epoch}, ...) did not report the metric "
                             f"{self.metric!r} that the study optimises (it reported {got}). "
                             f"Report {self.metric} every epoch, or pass metric= one of them.")
        if self.rules is not None:
            for name, value in stats.items():
                if is_nonfinite(value):
                    self._prune("nonfinite", f"{name} was {value} at epoch {epoch}")
            train = stats.get("train_loss")
            if train is not None:
                if is_diverged(train, self._best_train, self.rules.divergence_factor):
                    self._prune("diverged", f"train_loss {train:.4g} > "
                                            f"{self.rules.divergence_factor:g} x best epoch's "
                                            f"{self._best_train:.4g} at epoch {epoch}")
                self._best_train = min(self._best_train, train)
        value = stats[self.metric]
        self.reporter.report(value, epoch)
        if self.reporter.should_prune():
            self._prune("unpromising", f"{self.metric}={value:.4g} at epoch {epoch}")

    def _close_epoch(self, epoch: int, metrics: Mapping[str, float]) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self._n_loss:
            stats["train_loss"] = self._loss_sum / self._n_loss
        stats.update((k, float(v)) for k, v in metrics.items())
        if self._n_norm:
            stats.update(grad_norm_mean=self._norm_sum / self._n_norm,
                         grad_norm_max=self._norm_max,
                         clip_fraction=self._clipped / self._n_norm)
        if self._saw_skip_flag:
            stats["skipped_steps"] = float(self._skipped)
        self._reset_epoch()
        self._epoch = epoch + 1
        self.history.append(stats)
        if self.on_epoch is not None:
            self.on_epoch(epoch, stats)
        return stats

    def _prune(self, reason: str, detail: str) -> None:
        if self._n:  # the statistics of the unfinished epoch still tell what happened
            self._close_epoch(self._epoch, {})
        self.reporter.set_user_attr("prune_reason", reason)
        self.reporter.set_user_attr("prune_detail", detail)
        raise optuna.TrialPruned(f"{reason}: {detail}")

    def value(self) -> float:
        """The trial's value: the metric at the last reported epoch, or at the best one."""
        values = [h[self.metric] for h in self.history if self.metric in h]
        if not values:
            raise UsageError("The trial reported no epoch, so it has no value: call "
                             f"trial.report(epoch, {self.metric}=...) at the end of each epoch.")
        if self.objective == "best":
            return min(values) if self._minimize else max(values)
        return values[-1]


__all__ = ["PRUNE_REASONS", "Reporter", "StabilityPruner", "StabilityRules", "TrialMonitor",
           "is_diverged", "is_nonfinite", "robust_stats", "robust_z"]
