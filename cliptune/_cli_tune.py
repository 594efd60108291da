"""``cliptune tune`` and ``cliptune worker``: run a job file to its end, or stop it cleanly.

Exit status: 0 done, 1 every trial failed or the storage failed, 2 bad input, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import optuna
import yaml

from cliptune import _cli_show as show
from cliptune._errors import StorageError, Terminated, UsageError
from cliptune._job_record import check_job, job_settings
from cliptune._total import counts_toward_total
from cliptune.jobs import Job, JobError, open_storage, storage_url
from cliptune.plan import resolve_direction
from cliptune.result import TuneResult
from cliptune.settings import by_name
from cliptune.space import SearchSpace
from cliptune.storage import mask_url, storage_failure

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143
log = logging.getLogger("cliptune")


class StopOnSignals:
    """Ctrl-C: the running trial finishes and is recorded, then the job stops; Ctrl-C again aborts
    that trial. SIGTERM (a scheduler, ``kill``, Kubernetes, SLURM) aborts it at once, like a second
    Ctrl-C: the trial is recorded as failed (it runs again when the job does), the MLflow runs are
    closed, the worker processes stopped, and the job exits 143."""

    def __init__(self) -> None:
        self.requested = False
        self.terminated = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignals:
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt),
                          signal.SIGTERM: signal.signal(signal.SIGTERM, self._terminate)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _interrupt(self, signum: int, frame: object) -> None:
        if self.requested:
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # we say it: no traceback
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Stopping after the running trial is recorded (Ctrl-C again to abort it).")

    def _terminate(self, signum: int, frame: object) -> None:
        if self.terminated:
            return  # the first SIGTERM is being handled: let it record the trial
        self.terminated = True
        log.warning("SIGTERM: stopping now; the running trial is recorded as failed and runs "
                    "again when the job does.")
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        raise Terminated("SIGTERM")

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.requested:
            study.stop()


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set key=value`` (values read as YAML) and the named flags, as dotted job keys."""
    out: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobError(f"--set: expected key=value (e.g. optimizer.lr=0.1), got {item!r}.")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    flags = {"n_trials": args.n_trials, "timeout": args.timeout, "seed": args.seed,
             "study.storage": args.storage, "study.name": args.study,
             "tracking.uri": args.tracking_uri, "tracking.experiment": args.experiment,
             "tracking.enabled": False if args.no_tracking else None, "workers": args.workers,
             "study.continue_changed": True if args.continue_changed else None}
    out.update({key: value for key, value in flags.items() if value is not None})
    return out


def _summary(result: TuneResult) -> None:
    print(result.best_table())
    print(result.counts_line())
    if result.best_config is not None:
        print()
        print(show.best_text(result))


def _finished(storage: Any, job: Job, url: str) -> TuneResult | None:
    """The study's result when it already has its total and nothing runs (no work to do)."""
    try:
        study = optuna.load_study(study_name=job.study_name, storage=storage)
    except KeyError:
        return None
    try:  # a changed job is refused here too: this study's result is not the job's
        settings, space = _job_settings(job)
        check_job(study, settings, space, job.get("continue_changed", False))
    except ValueError as exc:
        raise JobError(f"{job.source}: {exc}") from None
    trials = study.get_trials(deepcopy=False)
    total = job.get("n_trials", 20)
    if counts_toward_total(trials) < total or any(
            t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
            for t in trials):
        return None
    log.info("study %r in %s already has its %d trials; nothing to run (raise --n-trials to "
             "run more).", job.study_name, mask_url(url), total)
    return TuneResult.from_study(study)


def _job_settings(job: Job) -> tuple[dict[str, Any], SearchSpace]:
    """The job's settings as its study records them (see :mod:`cliptune._job_record`), and its
    search space."""
    declared = by_name()

    def value(name: str) -> Any:
        return job.get(name, declared[name].default)

    space = SearchSpace.resolve(value("search_space"))
    direction = resolve_direction(value("metric"), value("direction"), job.source)
    return job_settings(value, space, direction, built_in=not job.own_loop), space


def cmd_tune(args: argparse.Namespace) -> int:
    """``cliptune tune`` and ``cliptune worker``."""
    stopper = StopOnSignals()
    with stopper:  # from here on, a signal stops the job cleanly
        return _tune(args, stopper)


def _tune(args: argparse.Namespace, stopper: StopOnSignals) -> int:
    job = Job.load(args.job, overrides(args))
    url = storage_url(job)
    where = "--storage" if args.storage else f"{job.source}: study.storage"
    storage = open_storage(url, where, heartbeat=job.heartbeat())
    done = _finished(storage, job, url)
    if done is not None:
        _summary(done)
        return 0
    from cliptune.tuner import tune, tune_loop

    positional, kwargs = job.arguments()
    kwargs.update(storage=storage, show_progress=True, callbacks=[stopper.callback])
    log.info("study %r in %s (optuna-dashboard %s; cliptune best %s)", job.study_name,
             mask_url(url), mask_url(url), args.job)
    try:
        result = (tune_loop if job.own_loop else tune)(*positional, **kwargs)
    except KeyboardInterrupt as exc:
        return _stopped(exc, storage, job)
    except StorageError as exc:
        show.error(args.command, str(exc))
        return EXIT_FAILED
    except (RuntimeError, UsageError) as exc:
        if not isinstance(exc, UsageError) and not str(exc).startswith("All "):
            raise
        show.error(args.command, str(exc))
        return EXIT_FAILED
    except (ValueError, TypeError) as exc:
        show.error(args.command, f"{job.source}: {exc}")
        return EXIT_USAGE
    except Exception as exc:  # the storage failed before or after the trials
        if storage_failure(exc) is None:
            raise
        show.error(args.command, f"The Optuna storage {mask_url(url)} cannot be written "
                                 f"({storage_failure(exc)}): the job stopped. Free some space "
                                 "(or bring the database back), then run the job again.")
        return EXIT_FAILED
    if stopper.requested:
        print(f"Interrupted; the best so far in study {job.study_name!r}:", file=sys.stderr)
    _summary(result)
    return EXIT_INTERRUPTED if stopper.requested else 0


def _stopped(exc: KeyboardInterrupt, storage: Any, job: Job) -> int:
    """After Ctrl-C twice or SIGTERM: the best so far; the status says which stopped the job."""
    terminated = isinstance(exc, Terminated)
    how = "Terminated (SIGTERM)" if terminated else "Interrupted"
    try:
        result = TuneResult.from_study(optuna.load_study(study_name=job.study_name,
                                                         storage=storage))
    except KeyError:  # stopped before the study was created
        result = None
    if result is not None:
        print(f"{how}; the best so far in study {job.study_name!r}:", file=sys.stderr)
        _summary(result)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
