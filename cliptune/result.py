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
        """One row a trial: number, state, clip_mode, clip_threshold, extras, value, prune_reason."""
        import pandas as pd

        rows = []
        for t in self.study.get_trials(deepcopy=False):
            row: dict[str, Any] = {"number": t.number, "state": t.state.name}
            if "clip_mode" in t.params:
                clip, extras = config_from_params(t.params)
                row.update(clip_mode=clip.mode.value, clip_threshold=clip.threshold, **extras)
            row.update(value=t.value, role=_role(t), prune_reason=t.user_attrs.get("prune_reason"),
                       error=t.user_attrs.get("error"),
                       duration_s=t.duration.total_seconds() if t.duration else None)
            rows.append(row)
        return pd.DataFrame(rows)


def _role(trial: Any) -> str:
    """Why a trial ran: searched, a baseline, transferred from another run, or a re-run."""
    attrs = trial.user_attrs
    if attrs.get("cliptune.confirms") is not None:
        return f"re-run of {attrs['cliptune.confirms']}"
    if "cliptune.baseline" in attrs:
        return f"baseline: {attrs['cliptune.baseline']}"
    if "cliptune.transferred" in attrs:
        return f"from {attrs['cliptune.transferred']}"
    return "search"


__all__ = ["SURPLUS_ATTR", "TuneResult"]
