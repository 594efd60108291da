"""The per-trial monitor: it applies the stability rules step by step and closes each epoch.

It sees plain floats (the :class:`cliptune.Trial` decides when to read them off the device) and
reports to a :class:`Reporter`: an ``optuna.Trial``, or a plain record for a refit or a probe.
The rules are in :mod:`cliptune.stability`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import optuna

from cliptune._errors import UsageError
from cliptune.stability import StabilityRules, is_diverged, is_nonfinite, robust_stats

_STATS_EVERY = 10  # steps between refreshes of the spike baseline (keeps a step O(1))
# What an epoch's statistics take from the steps; a loop's metric of the same name would be lost.
_OWN_STATS = frozenset({"grad_norm_mean", "grad_norm_max", "clip_fraction", "skipped_steps",
                        "grad_norm_postclip_mean", "clip_coef_mean", "steps"})


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
        self._n = self._n_loss = self._n_norm = self._clipped = self._skipped = self._n_post = 0
        self._loss_sum = self._norm_sum = self._norm_max = self._post_sum = self._coef_sum = 0.0
        self._saw_skip_flag = False

    def step(self, loss: float | None, grad_norm: float | None = None,
             clipped: bool | None = None, skipped: bool | None = None,
             post_norm: float | None = None) -> None:
        """Record one optimisation step; may raise TrialPruned.

        ``grad_norm`` is the pre-clip global norm, ``post_norm`` the one after the clip.
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
            if post_norm is not None and math.isfinite(grad_norm):
                self._n_post += 1
                self._post_sum += post_norm
                self._coef_sum += post_norm / grad_norm if grad_norm > 0 else 1.0
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
        if (log_loss > self._spike_bar and rise > rules.spike_min_rise * scale
                and (self._spike_median < (1 - rules.spike_min_fall) * scale
                     or not rules.spike_min_fall)):  # a jump counts once the net has learned
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
        the mean step loss. Raises :class:`UsageError` when the study's metric is missing or a
        metric takes the name of a statistic the monitor computes (``steps``, ``clip_fraction``, ...).
        """
        clash = sorted(_OWN_STATS.intersection(metrics or {}))
        if clash:
            raise UsageError(f"trial.report(epoch={epoch}, ...) reported {', '.join(clash)}, which "
                             "cliptune records itself from the training steps, so the loop's "
                             "value would be overwritten. Report it under another name.")
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
            self._prune(_verdict_of(self.reporter), f"{self.metric}={value:.4g} at epoch {epoch}")

    def _close_epoch(self, epoch: int, metrics: Mapping[str, float]) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self._n_loss:
            stats["train_loss"] = self._loss_sum / self._n_loss
        stats.update((k, float(v)) for k, v in metrics.items())
        if self._n_norm:
            stats.update(grad_norm_mean=self._norm_sum / self._n_norm,
                         grad_norm_max=self._norm_max,
                         clip_fraction=self._clipped / self._n_norm)
        if self._n_post:
            stats.update(grad_norm_postclip_mean=self._post_sum / self._n_post,
                         clip_coef_mean=self._coef_sum / self._n_post)
        if self._saw_skip_flag:
            stats["skipped_steps"] = float(self._skipped)
        if self.steps:  # so far, all epochs: what the trial has cost
            stats["steps"] = float(self.steps)
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




def _verdict_of(reporter: Any) -> str:
    """The reason a StabilityPruner gave for its last verdict on this reporter's study."""
    pruner = getattr(getattr(reporter, "study", None), "pruner", None)
    return getattr(pruner, "reason", None) or "unpromising"


__all__ = ["Reporter", "TrialMonitor"]
