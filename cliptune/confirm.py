"""The robust winner: re-train the best few configs on fresh seeds, choose by the mean.

A study's best value is the minimum of noisy runs (a config's final loss moves with its
initialisation and batch order), so the single best trial is partly luck. Before a study reports
its winner, its ``confirm`` best complete configs (distinct params, within 20% of the best value:
the others cannot win) each train again ``confirm_seeds`` times; a re-run is an ordinary trial of
the study with the same params, marked with the user attribute ``cliptune.confirms`` (the trial
it confirms), seeded ``seed + its own number`` (so fresh), never pruned as unpromising, and not
counted in ``n_trials``. The winner is
the candidate with the best mean over its original run and its re-runs (a pruned or failed re-run
counts as infinitely bad); its values and their spread are in :class:`TuneResult`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

CONFIRMS_ATTR = "cliptune.confirms"
MARGIN = 0.2  # a candidate's value is within 20% of the best one's (the seed spread is 5-15%)


@dataclass(frozen=True)
class Confirmed:
    """One candidate: its original trial and every value it reached (re-runs included)."""

    trial: FrozenTrial
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        """The mean value; a failed or pruned run (the worst value, +-inf) makes it the worst."""
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return statistics.pstdev(finite) if len(finite) == len(self.values) else math.inf


def is_rerun(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get(CONFIRMS_ATTR) is not None


def candidates(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The ``k`` best complete trials with distinct params (re-runs left out) whose values lie
    within ``MARGIN`` of the best one's: a config far behind cannot win on its mean. Empty when
    only the best qualifies (re-running it alone would change nothing)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not is_rerun(t) and math.isfinite(t.value)]
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    out: list[FrozenTrial] = []
    for t in sorted(done, key=lambda t: sign * t.value):
        best = out[0].value if out else t.value
        if sign * (t.value - best) > MARGIN * abs(best):
            break
        if all(t.params != o.params for o in out):
            out.append(t)
        if len(out) == k:
            break
    return out if len(out) > 1 else []


def enqueue_reruns(study: optuna.Study, k: int, seeds: int) -> tuple[int, int]:
    """Enqueue the re-runs the best ``k`` configs still lack; how many configs (up to ``k``: those
    within reach of the best) and how many re-runs."""
    trials = study.get_trials(deepcopy=False)
    added = 0
    found = candidates(study, k)
    for candidate in found:
        have = sum(1 for t in trials if t.user_attrs.get(CONFIRMS_ATTR) == candidate.number)
        for _ in range(seeds - have):
            study.enqueue_trial(dict(candidate.params),
                                user_attrs={CONFIRMS_ATTR: candidate.number})
            added += 1
    return len(found), added


def _value(trial: FrozenTrial, sign: float) -> float:
    if trial.state is TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value):
        return trial.value
    return math.inf * sign


def confirmed(study: optuna.Study) -> list[Confirmed]:
    """Every candidate that has finished re-runs, with its values (original first)."""
    trials = study.get_trials(deepcopy=False)
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    reruns: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        if is_rerun(t) and t.state.is_finished():
            reruns.setdefault(t.user_attrs[CONFIRMS_ATTR], []).append(t)
    by_number = {t.number: t for t in trials}
    return [Confirmed(by_number[n], (by_number[n].value,
                                     *(_value(r, 1.0 if minimize else -1.0) for r in runs)))
            for n, runs in sorted(reruns.items()) if n in by_number]


def robust_best(study: optuna.Study) -> Confirmed | None:
    """The candidate with the best mean over its runs, or None when nothing was confirmed."""
    found = confirmed(study)
    if not found:
        return None
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(found, key=lambda c: sign * c.mean)


def resolve(setting: Any, n_trials: int, user_loop: bool) -> int:
    """How many configs to confirm: the setting, or for 'auto' 3 (tune(), 10 trials or more)."""
    if setting != "auto":
        return int(setting)
    return 3 if not user_loop and n_trials >= 10 else 0


__all__ = ["CONFIRMS_ATTR", "Confirmed", "candidates", "confirmed", "enqueue_reruns", "is_rerun",
           "resolve", "robust_best"]
