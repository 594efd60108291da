"""What a worker does when its run meets a fault: the trial an interruption aborted is queued to
run again, a storage that cannot be written is one clear error, and the job's tracking is closed
even when the study cannot be read."""

from __future__ import annotations

import logging

import optuna
from optuna.trial import TrialState

from cliptune._errors import StorageError
from cliptune._optuna import backend_of, storage_of
from cliptune.result import TuneResult
from cliptune.storage import retry_callback, storage_failure, storage_label
from cliptune.tracking import Tracker

log = logging.getLogger("cliptune")


def retry_interrupted(study: optuna.Study, number: int) -> None:
    """Queue trial ``number``, which an interruption aborted (recorded FAIL), to run again with
    its params, as the trial of a worker that died is (the retry says which trial it repeats)."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is not None and trial.state is TrialState.FAIL:
        retry_callback()(study, trial)


def storage_error(study: optuna.Study, reason: str, trial: int | None) -> StorageError:
    """The one line for a storage that stopped taking writes (a full disk, a lost database)."""
    at = "" if trial is None else f" at trial {trial}"
    return StorageError(
        f"The Optuna storage {storage_label(backend_of(storage_of(study)))} cannot be written "
        f"({reason}): the job stopped{at}. What it recorded before is kept (cliptune best reads "
        "it), and a trial it could not record runs again when the job does: free some space (or "
        "bring the database back), then run the job again.")


def finish_tracking(tracker: Tracker, study: optuna.Study) -> None:
    """Close the job's tracking with the best so far, unless the storage cannot even be read
    (then the next run of the study closes its runs)."""
    try:
        result = TuneResult.from_study(study)
    except Exception as exc:
        if storage_failure(exc) is None:
            raise
        log.warning("the study cannot be read to close its MLflow runs (%s)", storage_failure(exc))
        return
    tracker.finish(result)
