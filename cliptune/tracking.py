"""Tracking of a tuning job. The tuner talks to a :class:`Tracker`; MLflow is imported lazily.

:class:`MlflowTracker` records a job as one parent run (the job's settings, the best config, the
summary artifacts) with one nested run per trial (its clip, its per-epoch metrics, how it ended),
through :class:`mlflow.MlflowClient` (never the fluent API's global run). It decides what is sent
when; :mod:`cliptune._mlflow_runs` makes the calls, in the background after the job's start
(:mod:`cliptune._mlflow_sender`), so that the store never holds a trial up.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cliptune import _mlflow_runs as runs
from cliptune._errors import check_non_negative_float
from cliptune._mlflow_sender import Sender
from cliptune._mlflow_store import (
    connect,
    describe,
    sqlite_lock,
    unreachable,
    without_credentials,
)
from cliptune.storage import mask_text, mask_url, retry_schema_races

if TYPE_CHECKING:
    import optuna

    from cliptune.config import ClipConfig
    from cliptune.result import TuneResult

log = logging.getLogger("cliptune")

LOCAL_UI = "http://127.0.0.1:5000"  # what a plain ``mlflow ui`` serves
ML_WORKFLOW = "workflowType=machine_learning"  # opens the UI in its model-training mode


class Tracker:
    """What the tuner tells a tracker. This base class records nothing (``tracking=False``)."""

    def open(self) -> None:
        """Before the study is created or loaded: check that the store can be written."""

    def start(self, study: optuna.Study, job: dict[str, Any]) -> None:
        """A tuning job starts on ``study`` with the job's parameters."""

    def trial_started(self, trial: optuna.Trial, clip: ClipConfig, extras: dict[str, Any]) -> None:
        """A trial starts with this clip and these extras."""

    def epoch(self, trial_number: int, epoch: int, stats: dict[str, float]) -> None:
        """A trial closed an epoch: train_loss, val_loss, grad_norm_mean/max, clip_fraction."""

    def trial_finished(self, trial_number: int, state: str, value: float | None = None,
                       reason: str | None = None, error: str | None = None) -> None:
        """A trial ended COMPLETE, PRUNED (with its reason) or FAIL (with its error)."""

    def model_refit(self, model: Any, framework: str, sample: Any, output: Any,
                    tags: dict[str, str]) -> None:
        """The best config was refit (``tune(refit=True)``): keep the model with its signature."""

    def finish(self, result: TuneResult) -> None:
        """The job ended: record the best config and the summary."""

    def close(self) -> None:
        """A worker process is done: what it recorded goes out; the job's summary is left to the
        parent process, which calls :meth:`finish`."""


def ui_url(tracking_uri: str) -> str:
    """Where the MLflow UI of a tracking URI lives: the server itself, or a local ``mlflow ui``."""
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return without_credentials(tracking_uri).rstrip("/")  # a link, never a password
    return LOCAL_UI


def make_tracker(tracking: bool, tracking_uri: str | None, experiment: str,
                 tracker: Tracker | None) -> Tracker:
    """The tracker ``tune()`` uses: a custom one, MLflow, or the no-op base class."""
    if tracker is not None:
        if not isinstance(tracker, Tracker):
            raise TypeError("The 'tracker' parameter of tune must be a cliptune Tracker. "
                            f"Got {type(tracker).__name__} instead.")
        return tracker
    if not isinstance(tracking, bool):
        raise TypeError(f"The 'tracking' parameter of tune must be a bool. Got {tracking!r} instead.")
    return MlflowTracker(tracking_uri, experiment) if tracking else Tracker()


class MlflowTracker(Tracker):
    """Records a tuning job in MLflow: a parent run for the job, a nested run per trial.

    A failing store never costs tuning work. Unreachable at the start, it is a ``ValueError``
    before any trial. Later, trials never wait for it: records are kept while it does not answer
    and sent when it answers again; the job's end waits for them while the store answers, at most
    ``flush_timeout_s`` without an answer, then says what was not sent. Any other failure is a
    warning, and the job goes on untracked; the Optuna storage keeps every result either way.

    Args:
        tracking_uri: An MLflow tracking URI (``http://user:password@host:port`` sends basic
            auth, as MLflow's client does). By default ``MLFLOW_TRACKING_URI`` (or
            ``mlflow.set_tracking_uri``), else ``sqlite:///mlflow.db`` in the working folder with
            artifacts under ``./mlruns``, which a plain ``mlflow ui`` there shows.
        experiment: Name of the MLflow experiment, created when missing.
        flush_every_s: Seconds between sends of a running trial's params and metrics (at most
            one send an epoch, plus one at the trial's end); ``0`` sends every epoch. The nested
            run itself, named after its clip, is created when the trial starts.
        flush_timeout_s: Seconds without an answer from the store after which the job's end stops
            waiting for records still unsent (a server down).

    Example:
        >>> tracker = MlflowTracker("sqlite:///mlflow.db", experiment="rnn-clipping")
        >>> cliptune.tune(make_model, (X, y), tracker=tracker)  # doctest: +SKIP
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "cliptune",
                 flush_every_s: float = 2.0, flush_timeout_s: float = 30.0) -> None:
        if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri):
            raise ValueError("The 'tracking_uri' parameter of MlflowTracker must be a non-empty "
                             f"string or None. Got {mask_text(repr(tracking_uri))} instead.")
        if not isinstance(experiment, str) or not experiment.strip():
            raise ValueError("The 'experiment' parameter of MlflowTracker must be a non-empty "
                             f"string. Got {experiment!r} instead.")
        self._uri_arg, self.experiment = tracking_uri, experiment
        self.flush_every_s = check_non_negative_float(flush_every_s, "flush_every_s",
                                                      "MlflowTracker")
        self.flush_timeout_s = check_non_negative_float(flush_timeout_s, "flush_timeout_s",
                                                        "MlflowTracker")
        self._reset()

    def _reset(self) -> None:
        self.tracking_uri = self._uri_arg or ""
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.broken = False
        self._trials: dict[int, runs.TrialRun] = {}
        self._sender: Sender | None = None

    def __getstate__(self) -> dict[str, Any]:  # a worker process gets a fresh, unstarted tracker
        return {k: self.__dict__[k] for k in ("_uri_arg", "experiment", "flush_every_s",
                                              "flush_timeout_s")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- the hooks ---------------------------------------------------------------------------

    def open(self) -> None:
        try:
            retry_schema_races(self._connect)  # workers may open a fresh store together
        except Exception as exc:
            raise unreachable(self.tracking_uri, exc) from exc

    def start(self, study: optuna.Study, job: dict[str, Any]) -> None:
        try:
            if self.client is None:
                retry_schema_races(self._connect)
            with sqlite_lock(self.tracking_uri):
                self.parent_id = runs.shared_parent(self.client, study, self.experiment_id,
                                                    str(job.get("job_version", 1)))
                if self.parent_id is None:  # the first worker of this run opens its parent run
                    self.parent_id = runs.open_parent(self.client, study, self.experiment_id, job)
        except Exception as exc:
            raise unreachable(self.tracking_uri, exc) from exc
        remote = urlsplit(self.tracking_uri).scheme in ("http", "https")
        self._sender = Sender(self.client, self.tracking_uri, remote)
        self._close_orphans(study)
        self._log_links("tracking the tuning job in")

    def trial_started(self, trial: optuna.Trial, clip: ClipConfig, extras: dict[str, Any]) -> None:
        if self._live():
            run = runs.TrialRun(trial, self.parent_id, self.experiment_id, clip, extras)
            self._trials[trial.number] = run
            self._sender.submit(run.create)  # type: ignore[union-attr]

    def epoch(self, trial_number: int, epoch: int, stats: dict[str, float]) -> None:
        run = self._trials.get(trial_number)
        if run is not None and self._live():
            run.add(epoch, stats)
            if time.monotonic() - run.sent_at >= self.flush_every_s:
                self._sender.submit(run.flush())  # type: ignore[union-attr]

    def trial_finished(self, trial_number: int, state: str, value: float | None = None,
                       reason: str | None = None, error: str | None = None) -> None:
        run = self._trials.pop(trial_number, None)
        if run is not None and self._live():  # no run: the trial failed before it started
            tags = {"cliptune.state": state, "cliptune.prune_reason": reason,
                    "cliptune.error": None if error is None else mask_text(error)}
            self._sender.submit(run.close(state, value, tags))  # type: ignore[union-attr]

    def model_refit(self, model: Any, framework: str, sample: Any, output: Any,
                    tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        from cliptune._mlflow_model import log_model

        if not self._live():
            return
        try:  # at the job's end, in this thread: MLflow's flavors need the fluent API
            uri, flavor = log_model(self.tracking_uri, self.parent_id, model, framework, sample,
                                    output)
        except Exception as exc:
            self._stop(exc)
            return
        self._sender.submit(lambda client: runs.send_batch(  # type: ignore[union-attr]
            client, self.parent_id, tags=[RunTag(k, v) for k, v in
                                          {**tags, "cliptune.model_uri": uri}.items()]))
        log.info("the refit model is logged as %s (load it with mlflow.%s.load_model)", uri, flavor)

    def finish(self, result: TuneResult) -> None:
        if self._sender is None:
            return
        folder = None
        if self._live():
            try:
                metrics, params, tags, folder = runs.parent_summary(result)
            except Exception as exc:
                self._stop(exc)
            else:
                self._close_orphans(result.study)
                parent = self.parent_id

                def close(client: Any) -> None:
                    runs.send_batch(client, parent, metrics, params, tags)
                    client.log_artifacts(parent, str(folder))
                    client.set_terminated(parent, "FINISHED")

                self._sender.submit(close)
        self._drain()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        if self._sender is not None:
            self._drain(job_end=False)

    def _drain(self, job_end: bool = True) -> None:
        """Wait for the calls queued while the store answers; say what was not sent."""
        left = self._sender.close(self.flush_timeout_s)  # type: ignore[union-attr]
        self._report()
        if left or self._sender.dropped:  # type: ignore[union-attr]
            error = self._sender.last_error  # type: ignore[union-attr]
            why = ("MLflow's client was still trying its call" if error is None else
                   describe(self.tracking_uri, error))
            log.warning("MLflow at %s: %d tracking call(s) of this job were not sent: the store "
                        "did not answer for the %.0f s its end waits (%s), so its parent run is "
                        "left RUNNING there; the next run of the study closes it. The Optuna "
                        "study has every result.", mask_url(self.tracking_uri),
                        left + self._sender.dropped, self.flush_timeout_s, why)  # type: ignore[union-attr]
        elif job_end and not self.broken:
            self._log_links("the tuning job is recorded in")

    # -- connecting, and saying how the sending goes -----------------------------------------

    def _connect(self) -> None:
        self.tracking_uri, self.client, self.experiment_id = connect(self._uri_arg, self.experiment)

    def _close_orphans(self, study: optuna.Study) -> None:
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        experiment, name = self.experiment_id, study.study_name
        self._sender.submit(  # type: ignore[union-attr]
            lambda client: runs.close_orphans(client, experiment, name, states))

    def _live(self) -> bool:
        """Whether to send: tracking started and not stopped; says how the sending goes."""
        if self.broken or self.parent_id is None or self._sender is None:
            return False
        self._report()
        return not self.broken

    def _report(self) -> None:
        if self._sender is not None and self._sender.failure is not None and not self.broken:
            self._stop(self._sender.failure)

    def _stop(self, exc: BaseException) -> None:
        """A failure that is not an outage: warn once and track no more; the study goes on."""
        self.broken = True
        warnings.warn(f"MLflow tracking at {mask_url(self.tracking_uri)!r} failed "
                      f"({describe(self.tracking_uri, exc)}); the rest of this tuning job is not "
                      "tracked. The study goes on and its Optuna storage keeps every result.",
                      RuntimeWarning, stacklevel=4)

    def _log_links(self, what: str) -> None:
        ui = ui_url(self.tracking_uri)
        table = f"{ui}/#/experiments/{self.experiment_id}/runs"
        hint = ""
        if ui == LOCAL_UI:
            here = self.tracking_uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
            hint = (" (open with `mlflow ui` in this folder)" if here else
                    f" (open with `mlflow ui --backend-store-uri {mask_url(self.tracking_uri)}`)")
        log.info("%s MLflow experiment %r at %s%s\n  runs table: %s?%s\n  this job:   %s/%s?%s",
                 what, self.experiment, mask_url(self.tracking_uri), hint, table, ML_WORKFLOW,
                 table, self.parent_id, ML_WORKFLOW)
