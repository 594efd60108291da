"""The command line: ``cliptune tune/worker/best/report/spaces/ui``, thin over jobs and the tuner.

Exit status: 0 on success, 1 when every trial failed, 2 on bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import optuna
import yaml

from cliptune import _cli_show as show
from cliptune._errors import UsageError, unknown_name
from cliptune._job_record import check_job, job_settings
from cliptune.jobs import DEFAULT_STORAGE, Job, JobError, load_study, open_storage, storage_url
from cliptune.plan import resolve_direction
from cliptune.result import TuneResult
from cliptune.runner import counts_toward_total
from cliptune.settings import by_name
from cliptune.space import SearchSpace, shipped_spaces
from cliptune.storage import mask_url

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
log = logging.getLogger("cliptune")


class _StopOnInterrupt:
    """First Ctrl-C: let the running trial finish and be recorded, then stop. Second: abort it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after the running trial is recorded (Ctrl-C again to abort it).",
              file=sys.stderr, flush=True)

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.requested:
            study.stop()


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
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
    print(show.best_table(result))
    print(show.counts_line(result))
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
    job = Job.load(args.job, _overrides(args))
    url = storage_url(job)
    where = "--storage" if args.storage else f"{job.source}: study.storage"
    storage = open_storage(url, where, heartbeat=job.heartbeat())
    done = _finished(storage, job, url)
    if done is not None:
        _summary(done)
        return 0
    from cliptune.tuner import tune, tune_loop

    positional, kwargs = job.arguments()
    stopper = _StopOnInterrupt()
    kwargs.update(storage=storage, show_progress=True, callbacks=[stopper.callback])
    log.info("study %r in %s (optuna-dashboard %s; cliptune best %s)", job.study_name,
             mask_url(url), mask_url(url), args.job)
    interrupted = False
    try:
        with stopper:
            result = (tune_loop if job.own_loop else tune)(*positional, **kwargs)
    except KeyboardInterrupt:
        interrupted = True
        result = TuneResult.from_study(optuna.load_study(study_name=job.study_name,
                                                         storage=storage))
    except (RuntimeError, UsageError) as exc:
        if not isinstance(exc, UsageError) and not str(exc).startswith("All "):
            raise
        _error("tune", str(exc))
        return EXIT_FAILED
    except (ValueError, TypeError) as exc:
        _error("tune", f"{job.source}: {exc}")
        return EXIT_USAGE
    if interrupted or stopper.requested:
        print(f"Interrupted; the best so far in study {job.study_name!r}:", file=sys.stderr)
    _summary(result)
    return EXIT_INTERRUPTED if interrupted or stopper.requested else 0


def _study_from_args(args: argparse.Namespace) -> optuna.Study:
    if args.job:
        job = Job.load(args.job)
        name = args.study or job.study_name
        url = args.storage or storage_url(job)
        where = "--storage" if args.storage else f"{job.source}: study.storage"
    elif args.study:
        name, url = args.study, args.storage or DEFAULT_STORAGE
        where = "--storage" if args.storage else f"the default storage {DEFAULT_STORAGE}"
    else:
        raise JobError("give a job file, or --study NAME (and --storage URL unless the study is "
                       f"in the default {DEFAULT_STORAGE}).")
    storage = open_storage(url, where, must_exist=True)
    return load_study(storage, name, where)


def cmd_best(args: argparse.Namespace) -> int:
    result = TuneResult.from_study(_study_from_args(args))
    if result.best_config is None:
        _error("best", f"study {result.study.study_name!r} has no completed trial yet "
                       f"({show.counts_line(result)}).")
        return EXIT_FAILED
    print(show.best_text(result, args.format))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cliptune.report import write_report

    for path in write_report(TuneResult.from_study(_study_from_args(args)), Path(args.out)):
        print(path)
    return 0


def cmd_spaces(args: argparse.Namespace) -> int:
    spaces = shipped_spaces()
    if args.name is None:
        width = max(map(len, spaces), default=0)
        for name, path in spaces.items():
            print(f"{name:<{width}}  {show.space_description(path)}")
        return 0
    if args.name not in spaces:
        raise JobError(str(unknown_name("search space", args.name, sorted(spaces))))
    print(spaces[args.name].read_text(encoding="utf-8"), end="")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from cliptune._cli_ui import serve_ui

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return serve_ui(uri, args.port)


def _error(command: str, message: str) -> None:
    for line in message.splitlines():
        print(f"cliptune {command}: error: {line}", file=sys.stderr)


def _configure_logging() -> None:
    """The CLI shows cliptune's messages on stderr; Optuna's per-trial lines give way to the bar."""
    logger = logging.getLogger("cliptune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cliptune: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cliptune`` and ``python -m cliptune``."""
    from cliptune._cli_parser import build_parser

    parser = build_parser({"tune": cmd_tune, "worker": cmd_tune, "best": cmd_best, "report": cmd_report,
                           "spaces": cmd_spaces, "ui": cmd_ui})
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        return args.func(args)
    except JobError as exc:
        _error(args.command, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
