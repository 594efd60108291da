"""A config the study has already finished is not trained again.

TPE draws a mode without a threshold (``none``) again: its random start-up trials draw the mode
uniformly, and after them its acquisition (a choice's density among the best trials over its
density among the rest) favours a choice the rest hold once, whatever its outcome, until repeats
add to that density; skipping tried configs in the start-up draw only moved the repeats into the
TPE trials (1-2 of 20 trials either way). Each draw used to retrain a config whose outcome the
study already had (6% of the training epochs of ``benchmarks/search_quality.py``'s studies). A
trial whose sampled params equal an earlier finished trial's (its *twin*) now takes
the twin's outcome at no cost, as Optuna's FAQ advises for repeated samples: the twin's value if
it completed; its last report and prune reason if it was pruned. It is marked
``cliptune.duplicate_of`` (the twin's number) and counts toward ``n_trials`` like any trial.

Only a point of a discrete space can repeat (a categorical, an integer or a stepped float: a
continuous value drawn twice is not a repeat worth a check). Enqueued trials (baselines, warm
starts, confirmation re-runs) are deliberate and always train. A train function that suggests
params of its own makes its trials' params more than what is sampled before it runs, so they
never equal an earlier trial's and always train.
"""

from __future__ import annotations

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from cliptune._optuna import is_enqueued

DUPLICATE_ATTR = "cliptune.duplicate_of"


def _discrete(distribution: BaseDistribution) -> bool:
    return isinstance(distribution, (CategoricalDistribution, IntDistribution)) or getattr(
        distribution, "step", None) is not None


def twin_of(trial: optuna.Trial) -> FrozenTrial | None:
    """The earliest finished trial (COMPLETE or PRUNED) with exactly ``trial``'s params, or None
    (see the module docstring for when a trial is never a duplicate)."""
    if not all(_discrete(d) for d in trial.distributions.values()) or is_enqueued(trial):
        return None
    params = trial.params
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                TrialState.PRUNED)):
        if other.params == params:  # the earliest is one that trained: no twin came before it
            return other
    return None


def mark_duplicate(trial: optuna.Trial) -> FrozenTrial | None:
    """``trial``'s twin, recorded in its ``cliptune.duplicate_of`` attribute; None if it has none."""
    twin = twin_of(trial)
    if twin is not None:
        trial.set_user_attr(DUPLICATE_ATTR, twin.number)
    return twin


def repeat_outcome(trial: optuna.Trial, twin: FrozenTrial) -> float:
    """Give ``trial`` its ``twin``'s outcome: return its value, or raise ``TrialPruned`` after
    reporting its last intermediate value and recording its prune reason."""
    if twin.state is TrialState.COMPLETE:
        return float(twin.value)  # type: ignore[arg-type]
    if twin.intermediate_values:
        step = max(twin.intermediate_values)
        trial.report(twin.intermediate_values[step], step)  # how far it got, for TPE's ranking
    trial.set_user_attr("prune_reason", twin.user_attrs.get("prune_reason", "unpromising"))
    raise optuna.TrialPruned(f"a duplicate of trial {twin.number}")
