"""The command line: ``cliptune tune/best/report/spaces/ui``, thin over :mod:`cliptune.jobs` and tune().

Exit status: 0 on success, 1 when every trial failed, 2 on bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import yaml

from cliptune import _cli_show as show
from cliptune._errors import unknown_name
from cliptune.jobs import (
    DEFAULT_STORAGE,
    Job,
    JobError,
    JobSpec,
    load_study,
    open_storage,
    read_spec,
    storage_url,
)
from cliptune.space import shipped_spaces
from cliptune.tuner import TuneResult, tune

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
LOCAL_MLFLOW = "sqlite:///mlflow.db"


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
             "tracking.enabled": False if args.no_tracking else None}
    out.update({key: value for key, value in flags.items() if value is not None})
    return out


def _summary(result: TuneResult, spec: JobSpec | None) -> None:
    print(show.best_table(result))
    print(show.counts_line(result))
    if result.best_config is not None:
        print()
        print(show.best_text(result, spec))


def cmd_tune(args: argparse.Namespace) -> int:
    job = Job.load(args.job, _overrides(args))
    where = "--storage" if args.storage else f"{job.source}: study.storage"
    storage = open_storage(storage_url(job.spec), where, heartbeat=job.heartbeat())
    kwargs = job.tune_kwargs()
    stopper = _StopOnInterrupt()
    if args.workers < 1:
        raise JobError(f"--workers: expected an int >= 1, got {args.workers}.")
    kwargs.update(storage=storage, show_progress=True, callbacks=[stopper.callback],
                  tracking=job.spec.tracking.enabled, tracking_uri=job.spec.tracking.uri,
                  experiment=job.spec.tracking.experiment, n_jobs=args.workers,
                  heartbeat=job.heartbeat())
    interrupted = False
    try:
        with stopper:
            result = tune(**kwargs)
    except KeyboardInterrupt:
        interrupted = True
        result = TuneResult.from_study(optuna.load_study(study_name=job.study_name,
                                                         storage=storage))
    except RuntimeError as exc:
        if not str(exc).startswith("All "):
            raise
        _error("tune", str(exc))
        return EXIT_FAILED
    except (ValueError, TypeError) as exc:
        _error("tune", f"{job.source}: {exc}")
        return EXIT_USAGE
    if interrupted or stopper.requested:
        print(f"Interrupted; the best so far in study {job.study_name!r}:", file=sys.stderr)
    _summary(result, job.spec)
    return EXIT_INTERRUPTED if interrupted or stopper.requested else 0


def _study_from_args(args: argparse.Namespace) -> tuple[optuna.Study, JobSpec | None]:
    spec = None
    if args.job:
        job = Job(Path(args.job), read_spec(args.job))
        spec, name = job.spec, args.study or job.study_name
        url = args.storage or storage_url(job.spec)
        where = "--storage" if args.storage else f"{job.source}: study.storage"
    elif args.study:
        name, url, where = args.study, args.storage or DEFAULT_STORAGE, "--study"
    else:
        raise JobError("give a job file, or --study NAME (and --storage URL unless the study is "
                       f"in the default {DEFAULT_STORAGE}).")
    storage = open_storage(url, where, must_exist=True)
    return load_study(storage, name, where), spec


def cmd_best(args: argparse.Namespace) -> int:
    study, spec = _study_from_args(args)
    result = TuneResult.from_study(study)
    if result.best_config is None:
        _error("best", f"study {study.study_name!r} has no completed trial yet "
                       f"({show.counts_line(result)}).")
        return EXIT_FAILED
    print(show.best_text(result, spec, args.format))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cliptune.report import write_report

    study, _ = _study_from_args(args)
    for path in write_report(TuneResult.from_study(study), Path(args.out)):
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
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_MLFLOW
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--default-artifact-root", Path("mlruns").resolve().as_uri(),
               "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def _error(command: str, message: str) -> None:
    for line in message.splitlines():
        print(f"cliptune {command}: error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cliptune`` and ``python -m cliptune``."""
    from cliptune._cli_parser import build_parser

    parser = build_parser({"tune": cmd_tune, "worker": cmd_tune, "best": cmd_best, "report": cmd_report,
                           "spaces": cmd_spaces, "ui": cmd_ui})
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except JobError as exc:
        _error(args.command, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
