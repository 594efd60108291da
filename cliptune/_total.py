"""The study's total: which trials use up ``n_trials``, and the progress bar toward it.

Finished trials count (a duplicate that took an earlier trial's outcome too), and so do RUNNING
and WAITING ones (so workers that start at once do not overshoot), but not a FAIL trial that was
retried after its worker died, nor a ``cliptune.surplus`` trial (one that two workers created at
the same instant for the last slot; it is recorded FAIL without running), nor a confirmation
re-run (:mod:`cliptune.confirm`), which comes on top of the total.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from cliptune.confirm import is_rerun
from cliptune.result import SURPLUS_ATTR
from cliptune.storage import quiet_experimental


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the trials this one retries (Optuna's record), oldest first."""
    with quiet_experimental():
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def _retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    numbers: set[int] = set()
    for trial in trials:
        numbers.update(retry_history(trial))
    return numbers


def counts_toward_total(trials: Sequence[FrozenTrial]) -> int:
    """How many of ``trials`` use up the study's ``n_trials`` (see the module docstring);
    confirmation re-runs (:mod:`cliptune.confirm`) come on top of it."""
    retried = _retried_numbers(trials)
    return sum(1 for t in trials if not t.user_attrs.get(SURPLUS_ATTR) and not is_rerun(t)
               and not (t.state is TrialState.FAIL and t.number in retried))


def progress_bar(study: optuna.Study, total: int) -> Any:
    from tqdm.auto import tqdm

    done = counts_toward_total(study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
    return tqdm(total=total, initial=min(done, total), desc="cliptune", unit="trial")


def advance(bar: Any, study: optuna.Study, total: int) -> None:
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                   TrialState.FAIL)]
    values = [t.value for t in finished if t.state is TrialState.COMPLETE]
    best = (min if study.direction == optuna.study.StudyDirection.MINIMIZE else max)(
        values, default=math.nan)
    pruned = sum(t.state is TrialState.PRUNED for t in finished)
    bar.set_postfix(best=f"{best:.4g}", pruned=pruned, refresh=False)
    bar.n = min(counts_toward_total(finished), total)
    bar.refresh()
