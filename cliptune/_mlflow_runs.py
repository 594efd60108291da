"""The MLflow calls that make a tuning job's runs: its parent run (opened, joined, summarised), a
nested run per trial, and the runs that stopped workers left RUNNING.

Each function takes the ``MlflowClient``; the tracker (:mod:`cliptune.tracking`) decides when
they are called, and its sender (:mod:`cliptune._mlflow_sender`) makes most calls in the
background. A run's metrics, params and tags go out in one ``log_batch``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from cliptune.config import ClipConfig
    from cliptune.result import TuneResult

log = logging.getLogger("cliptune")

PARENT_ATTR = "cliptune.mlflow_parent_run_id"  # study user attribute: the job's parent run
RUN_KEY = "cliptune.run_key"  # a trial run's own tag: it is created once, whatever the retries
# A pruned trial's run ends KILLED (stopped early), so the runs table tells it from a complete one.
END_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
MAX_PARAM, MAX_TAG = 6000, 8000  # MLflow's value length limits
_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100  # MLflow's per-batch limits


def text(value: object, limit: int) -> str:
    out = str(value)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def send_batch(client: Any, run_id: str, metrics: list[Any] = (),  # type: ignore[assignment]
               params: list[Any] = (), tags: list[Any] = ()) -> None:  # type: ignore[assignment]
    """One ``log_batch`` (more only past MLflow's per-batch limits)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        client.log_batch(run_id, metrics=metrics[:_MAX_METRICS], params=params[:_MAX_PARAMS_TAGS],
                         tags=tags[:_MAX_PARAMS_TAGS], synchronous=True)
        metrics, params = metrics[_MAX_METRICS:], params[_MAX_PARAMS_TAGS:]
        tags = tags[_MAX_PARAMS_TAGS:]


ROLE_ATTRS = ("cliptune.baseline", "cliptune.transferred", "cliptune.confirms",
              "cliptune.duplicate_of")
METRICS_NOTE = """Metrics of this trial, per epoch (step = epoch):

- `grad_norm_mean`, `grad_norm_max`: the global gradient norm **before** the clip (what exploded).
- `grad_norm_postclip_mean`: the global norm **after** the clip (what the optimizer used).
- `clip_coef_mean`: their ratio, post / pre (1 when nothing was clipped).
- `clip_fraction`: the share of steps the clip changed anything.
- `skipped_steps`: steps a GradScaler skipped for inf/NaN gradients (mixed precision).
- `steps`: the training steps the trial has run so far (its cost).
- `train_loss` (mean step loss), `val_loss` and the loop's own metrics; `value` is the trial's value.
"""


class TrialRun:
    """A trial's nested run: the calls that create, feed and close it (made by the sender, in
    order), and the metrics not sent yet. Its params go with the first send."""

    def __init__(self, trial: optuna.Trial, parent_id: str, experiment_id: str,
                 clip: ClipConfig, extras: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.run_id = ""  # set by the create call
        self.number, self._experiment = trial.number, experiment_id
        self._key, self._tries = uuid.uuid4().hex, 0  # a create that timed out may have happened
        self._tags = {"mlflow.parentRunId": parent_id, "cliptune.study": trial.study.study_name,
                      "optuna.trial_number": str(trial.number), "cliptune.state": "RUNNING",
                      RUN_KEY: self._key, "mlflow.note.content": METRICS_NOTE,
                      **{k: str(v) for k, v in trial.user_attrs.items() if k in ROLE_ATTRS}}
        threshold = "" if clip.threshold is None else f"={clip.threshold:.4g}"
        self._name = f"trial-{trial.number} {clip.mode.value}{threshold}"  # the clip shows at once
        if trial.user_attrs.get("cliptune.duplicate_of") is not None:  # not trained: say so
            self._name += f" · duplicate of {trial.user_attrs['cliptune.duplicate_of']}"
        params = {"clip_mode": clip.mode.value, "clip_threshold": clip.threshold, **extras}
        self._params = [Param(k, text(v, MAX_PARAM)) for k, v in params.items() if v is not None]
        self._pending: list[Any] = []
        self.sent_at = time.monotonic()

    def create(self, client: Any) -> None:
        """Create the run; tried again, first look for the one an unanswered try made."""
        self._tries += 1
        if self._tries > 1:
            found = client.search_runs([self._experiment], max_results=1, order_by=[
                "attributes.start_time ASC"], filter_string=f"tags.`{RUN_KEY}` = '{self._key}'")
            if found:
                self.run_id = found[0].info.run_id
                return
        self.run_id = client.create_run(self._experiment, tags=self._tags,
                                        run_name=self._name).info.run_id

    def add(self, epoch: int, stats: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, epoch) for k, v in stats.items())

    def flush(self) -> Callable[[Any], None]:
        """The call that sends what is pending."""
        metrics, params = self._pending, self._params
        self._pending, self._params, self.sent_at = [], [], time.monotonic()
        return lambda client: send_batch(client, self.run_id, metrics, params)

    def close(self, state: str, value: float | None, tags: dict[str, str | None]
              ) -> Callable[[Any], None]:
        """The call that sends the rest and ends the run as its trial ended."""
        from mlflow.entities import Metric, RunTag

        if value is not None:
            self._pending.append(Metric("value", float(value), int(time.time() * 1000), 0))
        metrics, params = self._pending, self._params
        run_tags = [RunTag(k, text(v, MAX_TAG)) for k, v in tags.items() if v is not None]
        # The runs table shows a run's name and a status icon that is the same for a pruned and
        # a failed run: the name says how the trial ended ("... · pruned: spiking").
        ended = {"COMPLETE": "", "PRUNED": " · pruned", "FAIL": " · failed"}[state]
        reason = tags.get("cliptune.prune_reason")
        name = self._name + ended + (f": {reason}" if state == "PRUNED" and reason else "")

        def close(client: Any) -> None:
            send_batch(client, self.run_id, metrics, params, run_tags)
            if name != self._name:
                client.update_run(self.run_id, name=name)
            client.set_terminated(self.run_id, END_STATUS[state])

        return close


def shared_parent(client: Any, study: optuna.Study, experiment_id: str, version: str) -> str | None:
    """The job's parent run when it is still open: another worker's, or one that a stopped run
    of the same job left RUNNING. A finished run of the job, or one with other settings (an
    older version of the job), is not reused: each run of a job has its own best."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # tracked in another store before: open a new parent here
        return None
    if (run.info.experiment_id != experiment_id or run.info.lifecycle_stage == "deleted"
            or run.info.status != "RUNNING"):
        return None
    if run.data.params.get("job_version", "1") != version:  # left open by the old settings
        client.set_terminated(run_id, "KILLED")
        return None
    log.info("joining MLflow run %s of this job (another worker's, or left open by a run that "
             "stopped)", run_id)
    return run_id


def open_parent(client: Any, study: optuna.Study, experiment_id: str, job: dict[str, Any]) -> str:
    """A new parent run for the job, named after its study, with the job's settings as params."""
    from mlflow.entities import Param

    name = study.study_name  # an in-memory study's is Optuna's "no-name-<uuid>"
    name = f"cliptune-{job.get('model')}" if name.startswith("no-name-") else name
    run = client.create_run(experiment_id, run_name=name, tags={
        "cliptune.study": study.study_name, "cliptune.backend": str(job.get("backend"))})
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    send_batch(client, run.info.run_id,
               params=[Param(k, text(v, MAX_PARAM)) for k, v in job.items()])
    return run.info.run_id


def parent_summary(result: TuneResult) -> tuple[list[Any], list[Any], list[Any], Path]:
    """The parent run's end: metrics, params and tags of the best, and a folder of report files
    (the caller logs it as artifacts, then removes it)."""
    from mlflow.entities import Metric, Param, RunTag

    from cliptune.report import write_report

    params, tags = {}, {}
    if result.best_config is not None:
        params = {"best_clip_mode": result.best_config.mode.value,
                  "best_clip_threshold": result.best_config.threshold,
                  **{f"best_{k}": v for k, v in result.best_extras.items()}}
        tags["cliptune.best_trial"] = str(result.best_trial)
    now = int(time.time() * 1000)
    counts = {"best_value": result.best_value, "n_complete": result.n_complete,
              "n_pruned": result.n_pruned, "n_failed": result.n_failed, "n_steps": result.n_steps}
    if len(result.best_values) > 1:  # the winner was confirmed on fresh seeds: its spread
        counts.update(best_value_std=result.best_std, best_n_runs=len(result.best_values))
    folder = Path(tempfile.mkdtemp(prefix="cliptune-"))
    try:
        write_report(result, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return ([Metric(k, float(v), now, 0) for k, v in counts.items() if v is not None],
            [Param(k, text(v, MAX_PARAM)) for k, v in params.items() if v is not None],
            [RunTag(k, v) for k, v in tags.items()], folder)


def close_orphans(client: Any, experiment_id: str, study_name: str, states: dict[int, str]
                  ) -> list[int]:
    """End the nested runs that stopped workers left RUNNING, for trials that are over.

    ``states`` maps each trial number of the study to its state name; a run whose trial still runs
    (or waits) is left alone. Returns the trial numbers whose runs were closed.
    """
    from mlflow.entities import RunTag

    name = study_name.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs([experiment_id], max_results=1000, filter_string=(
        f"tags.`cliptune.study` = '{name}' and attributes.status = 'RUNNING'"))
    closed = []
    for run in runs:
        number = run.data.tags.get("optuna.trial_number")
        state = None if number is None else states.get(int(number))
        if state not in END_STATUS:
            continue  # a parent run, or a trial that is not over
        if _is_duplicate(client, experiment_id, run):
            client.delete_run(run.info.run_id)
            continue
        tags = [RunTag("cliptune.state", state)]
        if state == "FAIL":  # a live worker that closes it after all says its own error
            tags.append(RunTag("cliptune.error", "its worker stopped before closing this run "
                                                 "(killed, or its storage failed)"))
        client.log_batch(run.info.run_id, tags=tags)
        client.set_terminated(run.info.run_id, END_STATUS[state])
        closed.append(int(number))  # type: ignore[arg-type]
    if closed:
        log.info("closed the MLflow runs that stopped workers left RUNNING, of trials %s",
                 ", ".join(map(str, sorted(closed))))
    return sorted(closed)


def _is_duplicate(client: Any, experiment_id: str, run: Any) -> bool:
    """Whether ``run`` is a second run of its trial: a create the store did after its client
    gave up on it (a server that resumed after an outage), the trial's own run made since."""
    key = run.data.tags.get(RUN_KEY)
    if key is None:
        return False
    twins = client.search_runs([experiment_id], max_results=10,
                               filter_string=f"tags.`{RUN_KEY}` = '{key}'")
    return any(t.info.run_id != run.info.run_id and t.info.status != "RUNNING" for t in twins)


__all__ = ["END_STATUS", "MAX_PARAM", "MAX_TAG", "PARENT_ATTR", "TrialRun", "close_orphans",
           "open_parent", "parent_summary", "send_batch", "shared_parent", "text"]
