"""Stability rules as pure functions, and the pruner that holds them (the monitor that applies them
step by step: :mod:`cliptune.monitor`).

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
  noise is large in log space but tiny on the loss's own scale. Spikes count only once the
  window's median loss is below ``1 - spike_min_fall`` x the first loss: a net still at its
  starting loss (an IRNN at chance) that jumps about has learned nothing to lose yet, and such runs
  went on to end among the best (``benchmarks/stability_replay.py`` replays the rules on unpruned
  runs); ``diverged`` and ``plateaued`` judge it meanwhile.
- ``skipped_steps``: more than ``max_skipped_steps`` steps in a row skipped by a ``GradScaler``
  (its scale keeps falling, so the gradients overflow in any precision).
- ``plateaued``: the reported metric has stayed within ``plateau_tolerance`` (relative, up or down)
  over the last ``plateau_epochs`` epochs and is ``plateau_factor`` times worse than the best complete
  trial's at the same epoch: a dead net, or one stuck at chance, that the wrapped pruner would
  keep training (near the best, a flat stretch is only noise: the wrapped pruner judges those).
  One flat epoch is enough by default: with the 2x guard, the trials it stopped in
  ``benchmarks/pruning_savings.py``'s unpruned studies all ended far behind the best.
- ``unpromising``: the wrapped Optuna pruner (MedianPruner by default) says so at an epoch's end.

Neither ``plateaued`` nor ``unpromising`` judges a trial at the last epoch a complete trial reached:
stopping there saves no training step, and the trial's value, recorded as complete, tells the
sampler more than a prune (in a 2-epoch loop, a MedianPruner that waits one epoch only ever pruned
at the last report).

The step rules run in :class:`cliptune.monitor.TrialMonitor`; the epoch verdicts here.
Instability is signalled by raising :class:`optuna.TrialPruned`, never by a NaN value. Pruned trials
rank below every complete trial in TPE's split, so the sampler learns to avoid unstable regions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.pruners import BasePruner, MedianPruner

from cliptune._errors import check_positive_float, check_positive_int

PRUNE_REASONS = ("nonfinite", "diverged", "spiking", "skipped_steps", "plateaued", "unpromising")
_MIN_LOG_SCALE = 0.05  # floor of the robust scale of log loss, so a flat loss is not all spikes


@dataclass(frozen=True)
class StabilityRules:
    """The thresholds of the stability rules (see the module docstring)."""

    divergence_factor: float = 10.0
    spike_z: float = 6.0
    spike_min_rise: float = 0.1
    spike_min_fall: float = 0.1
    max_spikes: int = 3
    window: int = 50
    warmup_steps: int = 10
    max_skipped_steps: int = 25
    plateau_epochs: int = 1
    plateau_tolerance: float = 0.01
    plateau_factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("divergence_factor", "spike_z", "spike_min_rise", "plateau_tolerance",
                     "plateau_factor"):
            check_positive_float(getattr(self, name), name, "StabilityRules")
        for name in ("max_spikes", "window", "warmup_steps", "max_skipped_steps",
                     "plateau_epochs"):
            check_positive_int(getattr(self, name), name, "StabilityRules")
        fall = self.spike_min_fall
        if isinstance(fall, bool) or not (isinstance(fall, (int, float)) and 0 <= fall < 1):
            raise ValueError("The 'spike_min_fall' parameter of StabilityRules must be a float in "
                             f"[0, 1) (0 counts spikes from the first step). Got "
                             f"{self.spike_min_fall!r} instead.")
        if self.divergence_factor <= 1:
            raise ValueError("The 'divergence_factor' parameter of StabilityRules must be > 1. "
                             f"Got {self.divergence_factor!r} instead.")


def is_nonfinite(value: float) -> bool:
    """True for NaN and +/-inf."""
    return not math.isfinite(value)


def is_diverged(loss: float, reference: float, factor: float) -> bool:
    """True when ``loss`` is above ``factor`` times a positive ``reference`` loss."""
    return reference > 0 and loss > factor * reference


def is_plateau(values: Sequence[float], best_at_step: float | None, epochs: int,
               tolerance: float, factor: float) -> bool:
    """True when ``values`` (a minimised metric, epoch by epoch, with its sign flipped for a
    maximised one) stayed within ``tolerance`` (relative) over the last ``epochs`` epochs, and the
    last one is ``factor`` times worse than ``best_at_step`` (the best complete trial's at the
    same epoch). Flat means neither better nor worse: a run that jumps about is noisy, not dead."""
    if len(values) <= epochs or best_at_step is None:
        return False
    window = values[-1 - epochs:]
    last = values[-1]
    flat = max(window) - min(window) <= tolerance * abs(window[0])
    far = last > best_at_step * factor if best_at_step > 0 else last > best_at_step / factor
    return flat and far


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
            n_warmup_steps=1)`` by default (no verdict on a first, noisy epoch: pruning from the
            first epoch saved more steps but lost up to 30% of the best value in
            ``benchmarks/pruning_savings.py``). Pass ``optuna.pruners.NopPruner()`` to keep only
            the stability rules.
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
        self.reason: str | None = None  # of the last verdict, for the trial's monitor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.reason = self.verdict(study, trial)
        return self.reason is not None

    def verdict(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
        """Why ``trial`` should stop now (a reason of ``PRUNE_REASONS``), or None."""
        step = trial.last_step
        if step is None:
            return None
        if self.rules is not None and is_nonfinite(trial.intermediate_values[step]):
            return "nonfinite"
        if trial.user_attrs.get("cliptune.confirms") is not None:
            return None  # a re-run of a top config on a fresh seed runs to its end
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if step >= max((t.last_step for t in complete if t.last_step is not None), default=math.inf):
            return None  # the last report: stopping saves no step and would hide a complete value
        if self.rules is not None and self._plateaued(study, trial, step, complete):
            return "plateaued"
        return "unpromising" if self.pruner.prune(study, trial) else None

    def _plateaued(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, step: int,
                   complete: list[optuna.trial.FrozenTrial]) -> bool:
        rules = self.rules
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        values = [sign * trial.intermediate_values[s] for s in sorted(trial.intermediate_values)]
        if len(values) <= rules.plateau_epochs:  # type: ignore[union-attr]
            return False
        at_step = [sign * t.intermediate_values[step] for t in complete
                   if step in t.intermediate_values]
        return is_plateau(values, min(at_step, default=None), rules.plateau_epochs,  # type: ignore[union-attr]
                          rules.plateau_tolerance, rules.plateau_factor)  # type: ignore[union-attr]


__all__ = ["PRUNE_REASONS", "StabilityPruner", "StabilityRules", "is_diverged", "is_nonfinite",
           "is_plateau", "robust_stats", "robust_z"]
