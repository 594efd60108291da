"""The command line: ``cliptune tune/worker/best/report/spaces/ui``, thin over jobs and the tuner.

Exit status: 0 on success, 1 when every trial (or the storage) failed, 2 on bad input, 130 when
interrupted (Ctrl-C), 143 when terminated (SIGTERM); see :mod:`cliptune._cli_tune`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import optuna

from cliptune import _cli_show as show
from cliptune._cli_tune import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    cmd_tune,
)
from cliptune._errors import Terminated, unknown_name
from cliptune.jobs import DEFAULT_STORAGE, Job, JobError, load_study, open_storage, storage_url
from cliptune.result import TuneResult
from cliptune.space import shipped_spaces
from cliptune.storage import storage_failure

log = logging.getLogger("cliptune")


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
        show.error("best", f"study {result.study.study_name!r} has no completed trial yet "
                       f"({result.counts_line()}).")
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
    warnings.showwarning = _warning_line
    # A store that fails is reported once, by the job: not again, with a traceback, by Optuna (a
    # trial it could not record), MLflow's logger or a thread (Optuna's heartbeat) that saw it.
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_QuietStorageFailures())
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    threading.excepthook = _quiet_thread_failures(threading.excepthook)


def _warning_line(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
    log.warning("%s: %s", category.__name__, message)


class _QuietStorageFailures(logging.Filter):
    """Drops Optuna's lines about a trial whose storage failed (the job says it once)."""

    def __init__(self) -> None:
        super().__init__()
        self._trials: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        trial = re.match(r"Trial (\d+) failed", record.getMessage())
        failure = record.exc_info[1] if record.exc_info else None
        if trial and failure is not None and storage_failure(failure) is not None:
            self._trials.add(trial.group(1))
        return not (trial and trial.group(1) in self._trials)


def _quiet_thread_failures(previous: Any) -> Any:
    def hook(args: Any) -> None:
        if args.exc_value is not None and storage_failure(args.exc_value) is not None:
            log.debug("%s: %s", args.thread.name if args.thread else "a thread", args.exc_value)
            return
        previous(args)

    return hook


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
        show.error(args.command, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # before the job runs (it handles its own)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
