"""``TuneResult``: what a tuning job found, read from its Optuna study."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from cliptune.config import ClipConfig
from cliptune.space import config_from_params

if TYPE_CHECKING:
    import pandas as pd

SURPLUS_ATTR = "cliptune.surplus"  # a trial two workers created for the last slot; never ran


@dataclass
class TuneResult:
    """What a tuning job found. ``best_*`` are None when no trial completed.

    Attributes:
        study: The Optuna study (every trial, its params, values and user attributes).
        best_config, best_extras, best_value, best_params: The best complete trial's clip, extras,
            value and Optuna params.
        n_complete, n_pruned, n_failed: Trial counts (surplus trials of a worker race excluded).
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
    model: Any = None

    @classmethod
    def from_study(cls, study: optuna.Study) -> TuneResult:
        states = [t.state for t in study.get_trials(deepcopy=False)
                  if not t.user_attrs.get(SURPLUS_ATTR)]
        complete = states.count(TrialState.COMPLETE)
        config, extras, value, params = None, {}, None, {}
        if complete:
            best = study.best_trial
            config, extras = config_from_params(best.params)
            value, params = best.value, dict(best.params)
        return cls(study, config, extras, value, params, complete,
                   states.count(TrialState.PRUNED), states.count(TrialState.FAIL))

    def trials_dataframe(self) -> pd.DataFrame:
        """One row a trial: number, state, clip_mode, clip_threshold, extras, value, prune_reason."""
        import pandas as pd

        rows = []
        for t in self.study.get_trials(deepcopy=False):
            row: dict[str, Any] = {"number": t.number, "state": t.state.name}
            if "clip_mode" in t.params:
                clip, extras = config_from_params(t.params)
                row.update(clip_mode=clip.mode.value, clip_threshold=clip.threshold, **extras)
            row.update(value=t.value, prune_reason=t.user_attrs.get("prune_reason"),
                       error=t.user_attrs.get("error"),
                       duration_s=t.duration.total_seconds() if t.duration else None)
            rows.append(row)
        return pd.DataFrame(rows)


__all__ = ["SURPLUS_ATTR", "TuneResult"]
