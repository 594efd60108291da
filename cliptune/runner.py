"""One worker's loop over the study: a Trial for each Optuna trial, until the study's total.

Every process that tunes is a worker of this kind, alone or beside others on the same storage.
``n_trials`` is the study's total (what counts toward it: :mod:`cliptune._total`). A trial that
repeats a finished one takes its outcome untrained (:mod:`cliptune._duplicates`). At the end a
worker waits for the other workers' running trials, so that a dead worker's trial is failed and
retried before it leaves.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cliptune._duplicates import mark_duplicate, repeat_outcome
from cliptune._errors import StorageError, UsageError
from cliptune._faults import retry_interrupted, storage_error
from cliptune._job_record import job_version
from cliptune._optuna import n_trials_of, quiet_failure, storage_of
from cliptune._study import load_study, stability_pruner
from cliptune._total import advance, counts_toward_total, progress_bar, retry_history
from cliptune.monitor import TrialMonitor
from cliptune.plan import Plan
from cliptune.result import SURPLUS_ATTR
from cliptune.stability import StabilityPruner
from cliptune.storage import (
    Heartbeat,
    beating,
    fail_stale_trials,
    storage_failure,
    watches_liveness,
)
from cliptune.tracking import Tracker, make_tracker
from cliptune.trial import Trial

log = logging.getLogger("cliptune")
_QUIET_WAIT_S = 5.0  # a worker's last wait for the others is only worth a word when it is long
Callback = Callable[[optuna.Study, FrozenTrial], None]


class SurplusTrial(Exception):
    """A trial created beyond the study's total by a race between workers; it does not run."""


class TrialRunner:
    """The objective of one worker (a :class:`Trial` through the plan's train function), and the
    loop around ``study.optimize``."""

    def __init__(self, plan: Plan, pruner: StabilityPruner, tracker: Tracker,
                 heartbeat: Heartbeat | None) -> None:
        self.plan, self.pruner, self.tracker, self.heartbeat = plan, pruner, tracker, heartbeat
        self.total = plan.settings.search.n_trials
        self.errors: list[str] = []
        self.usage_error: UsageError | None = None
        self.n_ran = 0
        self.stop_requested: Callable[[], bool] = lambda: False  # a worker's parent says stop
        self._reached = False
        self.stopped_early = False  # a timeout, a callback (Ctrl-C) or a stop ended the last run
        self._current: int | None = None  # the trial this worker runs (or ran last)
        self._interrupted: int | None = None
        self._storage_failed: Exception | None = None
        self._twin: FrozenTrial | None = None  # the trial the current one duplicates

    def __call__(self, trial: optuna.Trial) -> float:
        if (trial.number >= self.total and trial.user_attrs.get("cliptune.confirms") is None
                and self._is_surplus(trial)):  # fewer earlier trials: never; a re-run: never
            trial.set_user_attr(SURPLUS_ATTR, True)
            quiet_failure(trial.number)
            raise SurplusTrial(f"trial {trial.number} is beyond the study's total of {self.total}")
        self.n_ran += 1
        self._current = trial.number
        try:
            with beating(trial, self.heartbeat):
                return self._train(trial)
        except Exception as exc:
            if storage_failure(exc) is not None:  # every next trial would fail the same way
                self._storage_failed = exc
                trial.study.stop()
            raise

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        trials = trial.study.get_trials(deepcopy=False)
        this = next(t for t in trials if t.number == trial.number)
        earlier = [t for t in trials if t.number < trial.number]
        return counts_toward_total(earlier) >= self.total and not retry_history(this)

    def make_trial(self, trial: optuna.Trial) -> Trial:
        """The handle of an Optuna trial: its clip and extras sampled, its monitor wired."""
        plan, search = self.plan, self.plan.settings.search
        config, extras = plan.space.suggest(trial)
        self._twin = mark_duplicate(trial)  # before its run starts, so the run says so
        self.tracker.trial_started(trial, config, extras)
        number = trial.number
        monitor = TrialMonitor(trial, self.pruner.rules, search.metric, search.objective,
                               on_epoch=lambda e, s: self.tracker.epoch(number, e, s),
                               direction=plan.direction)
        seed = None if search.seed is None else search.seed + number
        return Trial(config, extras, number, seed, monitor, optuna_trial=trial)

    def _train(self, trial: optuna.Trial) -> float:
        number = trial.number
        try:
            handle = self.make_trial(trial)
        except Exception as exc:  # sampling failed: a failed trial like any other
            self._record_error(trial, exc)
            raise
        try:
            if self._twin is None:
                self.plan.train(handle)
                value = handle.monitor.value()
            else:  # not trained again: the earlier trial's outcome
                value = repeat_outcome(trial, self._twin)
        except optuna.TrialPruned:
            self.tracker.trial_finished(number, "PRUNED",
                                        reason=trial.user_attrs.get("prune_reason", "unpromising"))
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C twice, or SIGTERM: Optuna records it FAIL
            self._interrupted = number
            error = f"{type(exc).__name__}: interrupted" + (f" ({exc})" if str(exc) else "")
            trial.set_user_attr("error", error)
            self.tracker.trial_finished(number, "FAIL", error=error)
            raise
        except Exception as exc:
            self.tracker.trial_finished(number, "FAIL", error=self._record_error(trial, exc))
            if isinstance(exc, UsageError):  # every trial would fail the same way: stop
                self.usage_error = exc
                trial.study.stop()
            raise
        finally:  # once per trial, for the plots (a storage write per epoch is costly)
            trial.set_user_attr("history", handle.monitor.history)
        self.tracker.trial_finished(number, "COMPLETE", value=value)
        return value

    def _record_error(self, trial: optuna.Trial, exc: Exception) -> str:
        error = f"{type(exc).__name__}: {exc}"
        self.errors.append(error)
        trial.set_user_attr("error", error)
        return error

    def _after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if n_trials_of(study) < self.total:
            return  # a cheap count: fewer trials than the total cannot have reached it
        trials = study.get_trials(deepcopy=False)
        if counts_toward_total(trials) >= self.total and not any(
                t.state is TrialState.WAITING for t in trials):
            self._reached = True
            study.stop()

    def run(self, study: optuna.Study, progress: bool, callbacks: Sequence[Callback] = ()) -> None:
        """Run trials until the study's total is reached, the timeout passes or a callback stops.

        Raises:
            KeyboardInterrupt: Interrupted (``Terminated`` for SIGTERM); the trial it aborted is
                recorded FAIL and queued to run again (with its params) when the job runs again.
            StorageError: The storage cannot be written (one clear line; nothing lost).
        """
        timeout = self.plan.settings.search.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = progress_bar(study, self.total) if progress else None
        chain: list[Callback] = [self._after_trial, *callbacks]
        chain.append(lambda s, t: s.stop() if self.stop_requested() else None)
        if bar is not None:
            chain.append(lambda s, t: advance(bar, s, self.total))
        self.stopped_early = False
        try:
            self._loop(study, deadline, chain, bar)
            if self._storage_failed is not None:  # it stopped the study
                raise self._storage_failed
        except KeyboardInterrupt:
            self._retry_interrupted(study)
            raise
        except Exception as exc:
            reason = storage_failure(exc)
            if reason is None:
                raise
            raise self._storage_error(study, reason) from exc
        finally:
            if bar is not None:
                bar.close()

    def _loop(self, study: optuna.Study, deadline: float | None, chain: list[Callback],
              bar: Any) -> None:
        told, waited_since = False, 0.0
        while self.usage_error is None:
            if self.stop_requested():
                self.stopped_early = True
                return
            if self.heartbeat is not None:
                fail_stale_trials(study, self.heartbeat)
            trials = study.get_trials(deepcopy=False)
            if counts_toward_total(trials) < self.total or any(
                    t.state is TrialState.WAITING for t in trials):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.stopped_early = True
                    return
                self._reached = False
                study.optimize(self, timeout=left, catch=(Exception,), callbacks=chain)
                if not self._reached:  # the timeout, or a callback stopped the study
                    self.stopped_early = True
                    return
                continue
            running = sum(t.state is TrialState.RUNNING for t in trials)
            if not running or not watches_liveness(storage_of(study)):
                return
            if bar is not None:
                advance(bar, study, self.total)
            waited_since = waited_since or time.monotonic()
            if not told and time.monotonic() - waited_since > _QUIET_WAIT_S:
                log.info("waiting for %d running trial(s) of other workers (a dead worker's "
                         "trial is failed and retried after the heartbeat grace period)", running)
                told = True
            time.sleep(1.0)

    def _retry_interrupted(self, study: optuna.Study) -> None:
        number, self._interrupted = self._interrupted, None
        if number is not None:
            retry_interrupted(study, number)

    def _storage_error(self, study: optuna.Study, reason: str) -> StorageError:
        if self._current is not None:  # close its MLflow run (if it is open) as the trial ended
            self.tracker.trial_finished(self._current, "FAIL", error=f"StorageError: {reason}")
            with contextlib.suppress(Exception):  # FAIL was recorded after all (space came
                retry_interrupted(study, self._current)  # back): queue it, if writes pass
        return storage_error(study, reason, self._current)

    def raise_if_failed(self) -> None:
        """A usage error stops the job; so does a job in which every trial failed."""
        if self.usage_error is not None:
            raise self.usage_error
        if self.n_ran and len(self.errors) == self.n_ran:
            raise RuntimeError(f"All {self.n_ran} trials failed; the first error was: "
                               f"{self.errors[0]}")


def run_worker(plan: Plan, storage: Any, study_name: str,
               stop_requested: Callable[[], bool] | None = None) -> None:
    """One more worker process on a study its parent created: run trials to the total, or until
    ``stop_requested()`` (then the running trial finishes first)."""
    s = plan.settings
    tracker: Tracker = make_tracker(s.tracking.tracking, s.tracking.tracking_uri,
                                    s.tracking.experiment, s.tracking.tracker)
    pruner = stability_pruner(s.search.pruner, s.search.multi_fidelity)
    study = load_study(plan, storage, study_name, pruner)
    tracker.start(study, {**plan.job_params(), "job_version": job_version(study)})
    runner = TrialRunner(plan, pruner, tracker, s.study.heartbeat)
    runner.stop_requested = stop_requested or runner.stop_requested
    try:
        runner.run(study, progress=False)
    finally:  # its trials' records go out; the job's summary is the parent process's to record
        tracker.close()
    runner.raise_if_failed()
