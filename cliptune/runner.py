"""Run trials until the study's total is reached: the objective, the loop, and what counts.

Every ``tune()`` process is a worker of this kind, alone or beside others on the same storage.
``n_trials`` is the study's total: finished trials count, and so do RUNNING and WAITING ones (so
workers that start at once do not overshoot), but not a FAIL trial that was retried after its
worker died, nor a ``cliptune.surplus`` trial (one that two workers created at the same instant
for the last slot; it is recorded FAIL without running). At the end a worker waits for the other
workers' running trials, so that a dead worker's trial is failed and retried before it leaves.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from cliptune.backends import TrainSettings
from cliptune.data import Splits
from cliptune.space import SearchSpace
from cliptune.stability import StabilityPruner, TrialMonitor
from cliptune.storage import (
    Heartbeat,
    beating,
    fail_stale_trials,
    quiet_experimental,
    watches_liveness,
)
from cliptune.tracking import Tracker

SURPLUS_ATTR = "cliptune.surplus"
_QUIET_WAIT_S = 5.0  # a worker's last wait for the others is only worth a word when it is long
Callback = Callable[[optuna.Study, FrozenTrial], None]


class SurplusTrial(Exception):
    """A trial created beyond the study's total by a race between workers; it does not run."""


def _retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the trials this one retries (Optuna's record), oldest first."""
    with quiet_experimental():
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def _retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    numbers: set[int] = set()
    for trial in trials:
        numbers.update(_retry_history(trial))
    return numbers


def counts_toward_total(trials: Sequence[FrozenTrial]) -> int:
    """How many of ``trials`` use up the study's ``n_trials`` (see the module docstring)."""
    retried = _retried_numbers(trials)
    return sum(1 for t in trials if not t.user_attrs.get(SURPLUS_ATTR)
               and not (t.state is TrialState.FAIL and t.number in retried))


class TrialRunner:
    """The objective of one worker, and the loop around ``study.optimize``."""

    def __init__(self, backend: Any, model_fn: Callable[..., Any], splits: Splits,
                 space: SearchSpace, settings: TrainSettings, pruner: StabilityPruner,
                 metric: str, objective: str, tracker: Tracker, total: int,
                 heartbeat: Heartbeat | None) -> None:
        self.backend, self.model_fn, self.splits, self.space = backend, model_fn, splits, space
        self.settings, self.pruner, self.metric, self.objective = settings, pruner, metric, objective
        self.tracker, self.total, self.heartbeat = tracker, total, heartbeat
        self.errors: list[str] = []
        self.n_ran = 0
        self._reached = False

    def __call__(self, trial: optuna.Trial) -> float:
        if trial.number >= self.total and self._is_surplus(trial):  # fewer earlier trials: never
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"trial {trial.number} is beyond the study's total of {self.total}")
        self.n_ran += 1
        with beating(trial, self.heartbeat):
            return self._train(trial)

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        trials = trial.study.get_trials(deepcopy=False)
        this = next(t for t in trials if t.number == trial.number)
        earlier = [t for t in trials if t.number < trial.number]
        return counts_toward_total(earlier) >= self.total and not _retry_history(this)

    def _train(self, trial: optuna.Trial) -> float:
        clip, extras = self.space.suggest(trial)
        self.tracker.trial_started(trial, clip, extras)
        number = trial.number
        monitor = TrialMonitor(trial, self.pruner.rules, self.metric, self.objective,
                               on_epoch=lambda e, s: self.tracker.epoch(number, e, s))
        seed = None if self.settings.seed is None else self.settings.seed + number
        try:
            self.backend.train(self.model_fn, self.splits, clip, extras, self.settings, monitor,
                               seed)
            value = monitor.value()
        except optuna.TrialPruned:
            self.tracker.trial_finished(number, "PRUNED",
                                        reason=trial.user_attrs.get("prune_reason", "unpromising"))
            raise
        except KeyboardInterrupt:  # Optuna records the trial FAIL; close its run the same way
            self.tracker.trial_finished(number, "FAIL", error="KeyboardInterrupt: interrupted")
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.errors.append(error)
            trial.set_user_attr("error", error)
            self.tracker.trial_finished(number, "FAIL", error=error)
            raise
        finally:  # once per trial, for the plots (a storage write per epoch is costly)
            trial.set_user_attr("history", monitor.history)
        self.tracker.trial_finished(number, "COMPLETE", value=value)
        return value

    def _after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if study._storage.get_n_trials(study._study_id) < self.total:
            return  # a cheap count: fewer trials than the total cannot have reached it
        trials = study.get_trials(deepcopy=False)
        if counts_toward_total(trials) >= self.total and not any(
                t.state is TrialState.WAITING for t in trials):
            self._reached = True
            study.stop()

    def run(self, study: optuna.Study, timeout: float | None, progress: bool,
            callbacks: Sequence[Callback] = ()) -> None:
        """Run trials until the study's total is reached, the timeout passes or a callback stops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _progress_bar(study, self.total) if progress else None
        chain: list[Callback] = [self._after_trial, *callbacks]
        if bar is not None:
            chain.append(lambda s, t: _advance(bar, s, self.total))
        told, waited_since = False, 0.0
        try:
            while True:
                if self.heartbeat is not None:
                    fail_stale_trials(study, self.heartbeat)
                trials = study.get_trials(deepcopy=False)
                if counts_toward_total(trials) < self.total or any(
                        t.state is TrialState.WAITING for t in trials):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    self._reached = False
                    study.optimize(self, timeout=left, catch=(Exception,), callbacks=chain)
                    if not self._reached:  # the timeout, or a callback stopped the study
                        return
                    continue
                running = sum(t.state is TrialState.RUNNING for t in trials)
                if not running or not watches_liveness(study._storage):
                    return
                if bar is not None:
                    _advance(bar, study, self.total)
                waited_since = waited_since or time.monotonic()
                if not told and time.monotonic() - waited_since > _QUIET_WAIT_S:
                    print(f"cliptune: waiting for {running} running trial(s) of other workers "
                          "(a dead worker's trial is failed and retried after the heartbeat grace "
                          "period).", file=sys.stderr)
                    told = True
                time.sleep(1.0)
        finally:
            if bar is not None:
                bar.close()

    def raise_if_all_failed(self) -> None:
        if self.n_ran and len(self.errors) == self.n_ran:
            raise RuntimeError(f"All {self.n_ran} trials failed; the first error was: "
                               f"{self.errors[0]}")


def _progress_bar(study: optuna.Study, total: int) -> Any:
    from tqdm.auto import tqdm

    done = counts_toward_total(study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
    return tqdm(total=total, initial=min(done, total), desc="cliptune", unit="trial")


def _advance(bar: Any, study: optuna.Study, total: int) -> None:
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
