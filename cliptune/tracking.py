"""Tracking of a tuning job. The tuner talks to a :class:`Tracker`; MLflow is imported lazily.

:class:`MlflowTracker` records a job as one parent run (the job's settings, the best config, the
summary artifacts) with one nested run per trial (its clip, its per-epoch metrics, how it ended).
It talks to :class:`mlflow.MlflowClient` directly, never to the fluent API's global active run, and
sends values in batches: a run's metrics, params and tags go out in one ``log_batch``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cliptune._mlflow_store import probe_server, sqlite_lock
from cliptune.storage import mask_url, retry_schema_races

if TYPE_CHECKING:
    import optuna

    from cliptune.config import ClipConfig
    from cliptune.result import TuneResult

log = logging.getLogger("cliptune")

LOCAL_UI = "http://127.0.0.1:5000"  # what a plain ``mlflow ui`` serves
ML_WORKFLOW = "workflowType=machine_learning"  # opens the UI in its model-training mode
PARENT_ATTR = "cliptune.mlflow_parent_run_id"  # study user attribute: the job's parent run
# A pruned trial's run ends KILLED (stopped early), so the runs table tells it from a complete one.
_END_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
_MAX_PARAM, _MAX_TAG = 6000, 8000  # MLflow's value length limits
_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100  # MLflow's per-batch limits


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


def ui_url(tracking_uri: str) -> str:
    """Where the MLflow UI of a tracking URI lives: the server itself, or a local ``mlflow ui``."""
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
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


def _text(value: object, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _TrialRun:
    """A trial's nested run and the metrics not sent yet."""

    def __init__(self, run_id: str, params: list[Any]) -> None:
        self.run_id = run_id
        self.params = params  # go with the first send: one call less for a short trial
        self.pending: list[Any] = []
        self.sent_at = time.monotonic()


class MlflowTracker(Tracker):
    """Records a tuning job in MLflow: a parent run for the job, a nested run per trial.

    A failing tracking store never costs tuning work: it is a ``ValueError`` at :meth:`start`
    (before any trial), and later a warning, after which this job is no longer tracked while the
    Optuna storage keeps every result.

    Args:
        tracking_uri: An MLflow tracking URI. By default ``MLFLOW_TRACKING_URI`` (or
            ``mlflow.set_tracking_uri``), else ``sqlite:///mlflow.db`` in the working folder with
            artifacts under ``./mlruns``, which a plain ``mlflow ui`` there shows.
        experiment: Name of the MLflow experiment, created when missing.
        flush_every_s: Seconds between sends of a running trial's params and metrics (at most
            one send an epoch, plus one at the trial's end); ``0`` sends every epoch. The nested
            run itself, named after its clip, is created when the trial starts.

    Example:
        >>> tracker = MlflowTracker("sqlite:///mlflow.db", experiment="rnn-clipping")
        >>> cliptune.tune(make_model, (X, y), tracker=tracker)  # doctest: +SKIP
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "cliptune",
                 flush_every_s: float = 2.0) -> None:
        if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri):
            raise ValueError("The 'tracking_uri' parameter of MlflowTracker must be a non-empty "
                             f"string or None. Got {tracking_uri!r} instead.")
        if not isinstance(experiment, str) or not experiment.strip():
            raise ValueError("The 'experiment' parameter of MlflowTracker must be a non-empty "
                             f"string. Got {experiment!r} instead.")
        if isinstance(flush_every_s, bool) or not isinstance(flush_every_s, (int, float)) or not (
                math.isfinite(flush_every_s) and flush_every_s >= 0):
            raise ValueError("The 'flush_every_s' parameter of MlflowTracker must be a finite "
                             f"float >= 0. Got {flush_every_s!r} instead.")
        self._uri_arg, self.experiment, self.flush_every_s = tracking_uri, experiment, flush_every_s
        self.tracking_uri = tracking_uri or ""
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.broken = False
        self._trials: dict[int, _TrialRun] = {}

    # -- the hooks ---------------------------------------------------------------------------

    def open(self) -> None:
        try:
            retry_schema_races(self._connect)  # workers may open a fresh store together
        except Exception as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> ValueError:
        return ValueError(f"Cannot record the tuning job in MLflow at tracking URI "
                          f"{mask_url(self.tracking_uri)!r}: {type(exc).__name__}: "
                          f"{mask_url(str(exc))}. Check that the store is reachable, or pass "
                          "another tracking_uri or tracking=False.")

    def start(self, study: optuna.Study, job: dict[str, Any]) -> None:
        from mlflow.entities import Param

        try:
            if self.client is None:
                retry_schema_races(self._connect)
            self.parent_id = self._shared_parent(study, str(job.get("job_version", 1)))
            if self.parent_id is None:  # the study's first worker opens the job's parent run
                name = study.study_name  # an in-memory study's is Optuna's "no-name-<uuid>"
                name = f"cliptune-{job.get('model')}" if name.startswith("no-name-") else name
                run = self.client.create_run(self.experiment_id, run_name=name, tags={
                    "cliptune.study": study.study_name, "cliptune.backend": str(job.get("backend"))})
                self.parent_id = run.info.run_id
                study.set_user_attr(PARENT_ATTR, self.parent_id)
                self._send(self.parent_id,
                           params=[Param(k, _text(v, _MAX_PARAM)) for k, v in job.items()])
        except Exception as exc:
            raise self._unreachable(exc) from exc
        self._log_links("tracking the tuning job in")

    def trial_started(self, trial: optuna.Trial, clip: ClipConfig, extras: dict[str, Any]) -> None:
        self._guard(self._trial_started, trial, clip, extras)

    def epoch(self, trial_number: int, epoch: int, stats: dict[str, float]) -> None:
        self._guard(self._epoch, trial_number, epoch, stats)

    def trial_finished(self, trial_number: int, state: str, value: float | None = None,
                       reason: str | None = None, error: str | None = None) -> None:
        self._guard(self._trial_finished, trial_number, state, value, reason, error)

    def model_refit(self, model: Any, framework: str, sample: Any, output: Any,
                    tags: dict[str, str]) -> None:
        self._guard(self._model_refit, model, framework, sample, output, tags)

    def finish(self, result: TuneResult) -> None:
        if self.parent_id is not None and self._guard(self._finish, result):
            self._log_links("the tuning job is recorded in")

    # -- the work behind them ----------------------------------------------------------------

    def _connect(self) -> None:
        import mlflow

        if self._uri_arg is None:  # absolute: MLflow caches a store by URI, whatever the cwd
            self.tracking_uri = (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set()
                                 else f"sqlite:///{Path.cwd() / 'mlflow.db'}")
        if urlsplit(self.tracking_uri).scheme in ("http", "https"):
            probe_server(self.tracking_uri)
        with sqlite_lock(self.tracking_uri):  # MLflow migrates a fresh store on first use
            self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
            found = self.client.get_experiment_by_name(self.experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise RuntimeError(f"the experiment {self.experiment!r} is deleted; restore it "
                               "(mlflow experiments restore) or choose another name")
        self.experiment_id = (found.experiment_id if found is not None
                              else self.client.create_experiment(self.experiment))

    def _shared_parent(self, study: optuna.Study, version: str) -> str | None:
        """The job's parent run when it is still open: another worker's, or one that a stopped run
        of the same job left RUNNING. A finished run of the job, or one with other settings (an
        older version of the job), is not reused: each run of a job has its own best."""
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # tracked in another store before: open a new parent here
            return None
        if (run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage == "deleted"
                or run.info.status != "RUNNING"):
            return None
        if run.data.params.get("job_version", "1") != version:  # left open by the old settings
            self.client.set_terminated(run_id, "KILLED")
            return None
        return run_id

    def _trial_started(self, trial: optuna.Trial, clip: ClipConfig, extras: dict[str, Any]) -> None:
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": self.parent_id, "cliptune.study": trial.study.study_name,
                "optuna.trial_number": str(trial.number), "cliptune.state": "RUNNING"}
        clip_text = clip.mode.value + ("" if clip.threshold is None else f"={clip.threshold:.4g}")
        run = self.client.create_run(self.experiment_id, tags=tags,  # the clip shows at once
                                     run_name=f"trial-{trial.number} {clip_text}")
        params = {"clip_mode": clip.mode.value, "clip_threshold": clip.threshold, **extras}
        self._trials[trial.number] = _TrialRun(run.info.run_id, [
            Param(k, _text(v, _MAX_PARAM)) for k, v in params.items() if v is not None])

    def _epoch(self, trial_number: int, epoch: int, stats: dict[str, float]) -> None:
        from mlflow.entities import Metric

        run = self._trials[trial_number]
        now = int(time.time() * 1000)
        run.pending.extend(Metric(k, float(v), now, epoch) for k, v in stats.items())
        if time.monotonic() - run.sent_at >= self.flush_every_s:
            self._send(run.run_id, metrics=run.pending, params=run.params)
            run.pending, run.params, run.sent_at = [], [], time.monotonic()

    def _trial_finished(self, trial_number: int, state: str, value: float | None,
                        reason: str | None, error: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        run = self._trials.pop(trial_number, None)
        if run is None:  # its run was never created (the trial failed before it started)
            return
        tags = {"cliptune.state": state, "cliptune.prune_reason": reason, "cliptune.error": error}
        metrics = run.pending
        if value is not None:
            metrics.append(Metric("value", float(value), int(time.time() * 1000), 0))
        self._send(run.run_id, metrics=metrics, params=run.params, tags=[
            RunTag(k, _text(v, _MAX_TAG)) for k, v in tags.items() if v is not None])
        self.client.set_terminated(run.run_id, _END_STATUS[state])

    def _model_refit(self, model: Any, framework: str, sample: Any, output: Any,
                     tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        from cliptune._mlflow_model import log_model

        uri, flavor = log_model(self.tracking_uri, self.parent_id, model, framework, sample, output)
        self._send(self.parent_id, tags=[RunTag(k, v) for k, v in
                                         {**tags, "cliptune.model_uri": uri}.items()])
        log.info("the refit model is logged as %s (load it with mlflow.%s.load_model)", uri, flavor)

    def _finish(self, result: TuneResult) -> None:
        from mlflow.entities import Metric, Param, RunTag

        from cliptune.report import write_report

        study = result.study
        params, tags = {}, {}
        if result.best_config is not None:
            params = {"best_clip_mode": result.best_config.mode.value,
                      "best_clip_threshold": result.best_config.threshold,
                      **{f"best_{k}": v for k, v in result.best_extras.items()}}
            tags["cliptune.best_trial"] = str(study.best_trial.number)
        now = int(time.time() * 1000)
        counts = {"best_value": result.best_value, "n_complete": result.n_complete,
                  "n_pruned": result.n_pruned, "n_failed": result.n_failed}
        self._send(self.parent_id,
                   metrics=[Metric(k, float(v), now, 0) for k, v in counts.items() if v is not None],
                   params=[Param(k, _text(v, _MAX_PARAM)) for k, v in params.items() if v is not None],
                   tags=[RunTag(k, v) for k, v in tags.items()])
        with tempfile.TemporaryDirectory(prefix="cliptune-") as tmp:
            write_report(result, Path(tmp))
            self.client.log_artifacts(self.parent_id, tmp)
        self.client.set_terminated(self.parent_id, "FINISHED")

    def _send(self, run_id: str, metrics: list[Any] = (), params: list[Any] = (),  # type: ignore[assignment]
              tags: list[Any] = ()) -> None:  # type: ignore[assignment]
        """One ``log_batch`` (more only past MLflow's per-batch limits)."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            self.client.log_batch(run_id, metrics=metrics[:_MAX_METRICS],
                                  params=params[:_MAX_PARAMS_TAGS], tags=tags[:_MAX_PARAMS_TAGS],
                                  synchronous=True)
            metrics, params = metrics[_MAX_METRICS:], params[_MAX_PARAMS_TAGS:]
            tags = tags[_MAX_PARAMS_TAGS:]

    def _guard(self, work: Any, *args: Any) -> bool:
        """Run ``work``; on a failure warn once and stop tracking, so that the study goes on."""
        if self.broken or self.parent_id is None:
            return False
        try:
            work(*args)
        except Exception as exc:
            self.broken = True
            warnings.warn(f"MLflow tracking at {mask_url(self.tracking_uri)!r} failed "
                          f"({type(exc).__name__}: {exc}); the rest of this tuning job is not "
                          "tracked. The study goes on and its Optuna storage keeps every result.",
                          RuntimeWarning, stacklevel=3)
            return False
        return True

    def _log_links(self, what: str) -> None:
        ui = ui_url(self.tracking_uri)
        runs = f"{ui}/#/experiments/{self.experiment_id}/runs"
        hint = ""
        if ui == LOCAL_UI:
            here = self.tracking_uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
            hint = (" (open with `mlflow ui` in this folder)" if here else
                    f" (open with `mlflow ui --backend-store-uri {mask_url(self.tracking_uri)}`)")
        log.info("%s MLflow experiment %r at %s%s\n  runs table: %s?%s\n  this job:   %s/%s?%s",
                 what, self.experiment, mask_url(self.tracking_uri), hint, runs, ML_WORKFLOW, runs,
                 self.parent_id, ML_WORKFLOW)
