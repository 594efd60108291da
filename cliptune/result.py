"""``TuneResult``: what a tuning job found, read from its Optuna study."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from cliptune.config import ClipConfig
from cliptune.confirm import is_rerun, robust_best
from cliptune.space import config_from_params

if TYPE_CHECKING:
    import pandas as pd

SURPLUS_ATTR = "cliptune.surplus"  # a trial two workers created for the last slot; never ran


@dataclass
class TuneResult:
    """What a tuning job found. ``best_*`` are None when no trial completed.

    Attributes:
        study: The Optuna study (every trial, its params, values and user attributes).
        best_config, best_extras, best_value, best_params: The winner's clip, extras, value and
            Optuna params. With confirmation (``confirm=``), the winner is the config with the
            best mean over its original trial and its re-runs on fresh seeds, and ``best_value``
            is that mean; else the best trial.
        best_values: Every value the winner reached (its trial first, then its re-runs).
        best_std: Their standard deviation (0.0 for a single run).
        best_trial: The winner's (original) trial number.
        n_complete, n_pruned, n_failed: Search trial counts (surplus trials of a worker race and
            confirmation re-runs excluded).
        model: The refit model (``tune(refit=True)``), else None.
    """

    study: optuna.Study
    best_config: ClipConfig | None
    best_extras: dict[str, Any]
    best_value: float | None
    best_params: dict[str, Any]
    n_complete: int
    n_pruned: int
    n_failed: int
    best_values: list[float] = field(default_factory=list)
    best_std: float | None = None
    best_trial: int | None = None
    model: Any = None

    @classmethod
    def from_study(cls, study: optuna.Study) -> TuneResult:
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials if not t.user_attrs.get(SURPLUS_ATTR) and not is_rerun(t)]
        complete = states.count(TrialState.COMPLETE)
        result = cls(study, None, {}, None, {}, complete, states.count(TrialState.PRUNED),
                     states.count(TrialState.FAIL))
        if not any(t.state is TrialState.COMPLETE for t in trials):
            return result
        robust = robust_best(study)
        if robust is not None:
            best, values, value, std = robust.trial, list(robust.values), robust.mean, robust.std
        else:
            best = study.best_trial
            values, value, std = [best.value], best.value, 0.0
        result.best_config, result.best_extras = config_from_params(best.params)
        result.best_value, result.best_params = value, dict(best.params)
        result.best_values, result.best_std, result.best_trial = values, std, best.number
        return result

    def trials_dataframe(self) -> pd.DataFrame:
        """One row a trial: number, state, clip_mode, clip_threshold, extras, value, role,
        prune_reason, error, steps (trained, 0 for a duplicate), duration_s."""
        import pandas as pd

        rows = []
        for t in self.study.get_trials(deepcopy=False):
            row: dict[str, Any] = {"number": t.number, "state": t.state.name}
            if "clip_mode" in t.params:
                clip, extras = config_from_params(t.params)
                row.update(clip_mode=clip.mode.value, clip_threshold=clip.threshold, **extras)
            row.update(value=t.value, role=_role(t), prune_reason=t.user_attrs.get("prune_reason"),
                       error=t.user_attrs.get("error"), steps=_steps_of(t),
                       duration_s=t.duration.total_seconds() if t.duration else None)
            rows.append(row)
        return pd.DataFrame(rows)

    @property
    def n_steps(self) -> int:
        """Training steps the study spent, every trial's (pruned ones and re-runs included): its
        cost. Counted by the trials' monitors; 0 for a loop that reports no steps."""
        return sum(_steps_of(t) for t in self.study.get_trials(deepcopy=False))

    def counts_line(self) -> str:
        """``20 trials: 6 complete, 14 pruned, 0 failed; 4368 training steps`` (re-runs and
        surplus trials left out of the counts, not of the steps)."""
        n = self.n_complete + self.n_pruned + self.n_failed
        steps = self.n_steps
        return (f"{n} trials: {self.n_complete} complete, {self.n_pruned} pruned, "
                f"{self.n_failed} failed" + (f"; {steps} training steps" if steps else ""))

    def spread_text(self) -> str:
        """How the winner did over its runs, when re-runs confirmed it; else empty."""
        if len(self.best_values) < 2:
            return ""
        return f" (mean of {len(self.best_values)} runs on different seeds, std {self.best_std:.3g})"

    def best_table(self, top: int = 5) -> str:
        """The ``top`` completed trials (duplicates left out), best first, as a plain-text table."""
        frame = self.trials_dataframe()
        if frame.empty or self.best_value is None:
            return "No trial completed yet."
        frame = frame[(frame["state"] == "COMPLETE")  # a duplicate repeats its twin's row
                      & ~frame["role"].str.startswith("duplicate of")]
        maximize = self.study.direction.name == "MAXIMIZE"
        frame = frame.sort_values("value", ascending=not maximize).head(top)
        drop = ["state", "prune_reason", "error", "duration_s", "steps"] + (
            ["role"] if (frame.get("role", "search") == "search").all() else [])
        frame = frame.drop(columns=[c for c in drop if c in frame.columns])
        return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")

    def summary(self, top: int = 5) -> str:
        """What a job found, as ``cliptune tune`` prints it: the best trials, the counts, the
        winner (with its spread when re-runs confirmed it)."""
        lines = [self.best_table(top), self.counts_line()]
        if self.best_config is not None:
            lines.append(f"best: {self.best_config} (trial {self.best_trial}), value "
                         f"{self.best_value:.6g}{self.spread_text()}")
        return "\n".join(lines)


def _steps_of(trial: Any) -> int:
    """The training steps a trial ran, from its last epoch's statistics (0 when it trained none,
    or failed before an epoch closed)."""
    history = trial.user_attrs.get("history") or []
    return int(history[-1].get("steps", 0)) if history else 0


def _role(trial: Any) -> str:
    """Why a trial ran: searched, a baseline, transferred from another run, a re-run, or a
    duplicate (not trained: it took an earlier trial's outcome)."""
    attrs = trial.user_attrs
    if attrs.get("cliptune.confirms") is not None:
        return f"re-run of {attrs['cliptune.confirms']}"
    if "cliptune.baseline" in attrs:
        return f"baseline: {attrs['cliptune.baseline']}"
    if "cliptune.transferred" in attrs:
        return f"from {attrs['cliptune.transferred']}"
    if attrs.get("cliptune.duplicate_of") is not None:
        return f"duplicate of {attrs['cliptune.duplicate_of']}"
    return "search"


__all__ = ["SURPLUS_ATTR", "TuneResult"]
