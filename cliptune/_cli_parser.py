"""The argparse tree of ``cliptune``: commands, options and the examples in each ``--help``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

_FORMAT = argparse.RawDescriptionHelpFormatter

_MAIN = """\
examples:
  cliptune tune examples/adding_rnn.yaml            run (or resume) a tuning job
  cliptune best examples/adding_rnn.yaml            the best clip config, ready to paste
  cliptune report examples/adding_rnn.yaml --out report/
  cliptune spaces                                   the shipped search spaces
  cliptune ui                                       browse the tracked runs in MLflow

exit status: 0 success, 1 every trial failed or the storage failed (a full disk), 2 bad input,
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM: the running trial is recorded as failed and
  runs again when the job does; the MLflow runs are closed and the worker processes stopped)"""

_TUNE = """\
n_trials is the study's total: running the same job again continues the same study (by default
in sqlite:///mlruns/cliptune-optuna.db) up to it, so a stopped job is finished by rerunning it.
Ctrl-C stops after the running trial is recorded; press it twice to abort that trial. SIGTERM
(kill, a scheduler's stop) aborts it at once, like a second Ctrl-C, and exits 143; the aborted
trial runs again when the job does, as does the trial of a job that was killed (SIGKILL).
A job whose search space, epochs, seed or other training settings changed since the study last ran
is refused (start a new study with --study NAME, or continue this one with --continue-changed).

examples:
  cliptune tune examples/adding_rnn.yaml
  cliptune tune examples/adding_rnn.yaml --n-trials 40          # 20 more trials for the study
  cliptune tune job.yaml --set optimizer.lr=0.1 --set epochs=4 --no-tracking
  cliptune tune job.yaml --storage postgresql://user@db/optuna --study nightly
  cliptune tune examples/adding_rnn.yaml --workers 2              # 2 processes, one study"""

_WORKER = """joins the job's study as one more worker (run it on as many machines as you like, all pointing at
one shared storage such as postgresql://... and one MLflow server). Workers share the study's total
of n_trials, log under one MLflow parent run, and retry the trial of a worker that died (after the
heartbeat grace period, study.heartbeat in the job file).

examples:
  cliptune worker job.yaml --storage postgresql://user@db-host/optuna --tracking-uri http://mlflow:5000
  cliptune worker job.yaml --workers 4                            # 4 processes on this machine"""

_BEST = """\
examples:
  cliptune best examples/adding_rnn.yaml > best_clip.yaml     # ClipConfig.from_yaml reads it
  cliptune best --study adding-rnn --format json
  cliptune best --storage sqlite:///optuna.db --study my-study"""

_REPORT = """\
writes trials.csv and the plots (PNG) to DIR; needs no MLflow.

examples:
  cliptune report examples/adding_rnn.yaml --out report/
  cliptune report --study adding-rnn --out report/"""

_SPACES = """\
examples:
  cliptune spaces             list the shipped search spaces
  cliptune spaces rnn > my_space.yaml   copy one to edit (use it with search_space: my_space.yaml)"""

_UI = """\
serves the local store the jobs use (sqlite:///mlflow.db, artifacts in ./mlruns) on 127.0.0.1;
MLFLOW_TRACKING_URI or --tracking-uri points it elsewhere.

examples:
  cliptune ui
  cliptune ui --port 5001"""


def _study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", nargs="?", metavar="JOB.yaml", help="the job file of the study")
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna storage URL (default: the job's, else "
                             "sqlite:///mlruns/cliptune-optuna.db)")
    parser.add_argument("--study", metavar="NAME", help="study name (default: the job's)")


def _tune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB.yaml", help="the job file")
    parser.add_argument("--n-trials", type=int, metavar="N", help="the study's total number of trials")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop starting trials after S seconds")
    parser.add_argument("--storage", metavar="URL", help="Optuna storage URL (study.storage)")
    parser.add_argument("--study", metavar="NAME", help="study name (study.name)")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (tracking.uri)")
    parser.add_argument("--experiment", metavar="NAME", help="MLflow experiment (tracking.experiment)")
    parser.add_argument("--seed", type=int, metavar="N", help="seed of the sampler and the training")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a job key, e.g. optimizer.lr=0.1 (repeatable)")
    parser.add_argument("--no-tracking", action="store_true", help="record nothing in MLflow")

    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes on this machine (workers; default: 1)")
    parser.add_argument("--continue-changed", action="store_true",
                        help="continue the study although the job changed since it last ran "
                             "(study.continue_changed); each version of the settings is recorded")


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The parser; ``commands`` maps each command name to the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="cliptune", description="Tune gradient clipping (mode and threshold) with Optuna.",
        epilog=_MAIN, formatter_class=_FORMAT)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, summary: str, epilog: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, epilog=epilog,
                           formatter_class=_FORMAT)
        p.set_defaults(func=commands[name])
        return p

    for name, summary, epilog in (("tune", "run a tuning job from a job file", _TUNE),
                                  ("worker", "join a job's shared study as one more worker", _WORKER)):
        _tune_options(add(name, summary, epilog))
    best = add("best", "print the best clip config of a study", _BEST)
    _study_options(best)
    best.add_argument("--format", choices=("yaml", "json"), default="yaml",
                      help="output format (default: yaml)")

    report = add("report", "write trials.csv and plots for a study", _REPORT)
    _study_options(report)
    report.add_argument("--out", required=True, metavar="DIR", help="output folder")

    spaces = add("spaces", "list the shipped search spaces, or print one", _SPACES)
    spaces.add_argument("name", nargs="?", metavar="NAME", help="the space to print")

    ui: Any = add("ui", "start the MLflow UI on the local tracking store", _UI)
    ui.add_argument("--port", type=int, default=5000, metavar="N", help="port (default: 5000)")
    ui.add_argument("--tracking-uri", metavar="URI", help="the store to serve")
    return parser
