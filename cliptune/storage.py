"""Optuna storages for one or many workers: URLs checked, schemas made once, dead workers' trials retried.

- ``sqlite:///PATH``, ``postgresql://...`` (psycopg 3), ``postgresql+psycopg2://...``, ``mysql://...``:
  Optuna's RDBStorage with heartbeats, so a RUNNING trial whose worker died is failed after the grace
  period and retried by Optuna's ``RetryHeartbeatStaleTrialCallback``.
- ``journal:PATH``: Optuna's JournalStorage on a file. It has no heartbeat of its own, so cliptune
  stamps running trials (system attribute ``cliptune.heartbeat``) and fails and retries stale ones
  with the same callback.

Two processes opening a brand-new database at once race on creating its schema; opening retries.
"""

from __future__ import annotations

import random
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

HEARTBEAT_ATTR = "cliptune.heartbeat"
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
_OPEN_TRIES = 8


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe to log)."""
    return re.sub(r"(://[^:/@]+:)[^/]*@", r"\1***@", url)


@dataclass(frozen=True)
class Heartbeat:
    """How often a running trial says it is alive, and how long silence means its worker died."""

    interval: int = 10
    grace_period: int = 30

    def __post_init__(self) -> None:
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ValueError(f"The heartbeat interval must be an int >= 1 second. Got {self.interval!r}.")
        if not (isinstance(self.grace_period, int) and self.grace_period > self.interval):
            raise ValueError("The heartbeat grace period must be an int greater than the interval "
                             f"({self.interval}). Got {self.grace_period!r}.")


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def _is_schema_race(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("already exists", "unique constraint", "uniqueviolation",
                                   "duplicate key", "database is locked"))


def open_storage(storage: str | BaseStorage | None, heartbeat: Heartbeat | None = Heartbeat()
                 ) -> BaseStorage | None:
    """Turn a storage URL into an Optuna storage, creating its schema if needed.

    Raises:
        ValueError: The URL is malformed, its driver is missing, or the database cannot be reached.
    """
    if storage is None or isinstance(storage, BaseStorage):
        return storage
    if not isinstance(storage, str):
        raise TypeError("The 'storage' parameter must be an Optuna storage URL, a storage object or "
                        f"None. Got {type(storage).__name__} instead.")
    if storage.startswith("journal:"):
        path = storage[len("journal:"):]
        if not path:
            raise ValueError("A journal storage needs a file path: 'journal:PATH'. Got 'journal:'.")
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as exc:
            raise ValueError(f"Cannot open the journal storage {path!r}: {exc.strerror}.") from None
    if _scheme(storage) not in _RDB_SCHEMES or "://" not in storage:
        raise ValueError(f"Invalid storage URL {mask_url(storage)!r}: expected sqlite:///PATH, "
                         "postgresql://USER@HOST/DB, mysql://..., or journal:PATH.")
    return _open_rdb(storage, heartbeat)


def _open_rdb(url: str, heartbeat: Heartbeat | None) -> BaseStorage:
    kwargs: dict[str, Any] = {}
    if heartbeat is not None:
        kwargs = {"heartbeat_interval": heartbeat.interval, "grace_period": heartbeat.grace_period,
                  "heartbeat_stale_trial_callback": _retry_callback()}
    for attempt in range(_OPEN_TRIES):
        try:
            with quiet_experimental():
                return optuna.storages.RDBStorage(url, **kwargs)
        except ImportError as exc:  # Optuna wraps a missing driver in an ImportError
            raise ValueError(f"The storage URL {mask_url(url)!r} needs a database driver that is "
                             "not installed (for PostgreSQL: pip install 'cliptune[postgres]', which "
                             "brings psycopg 3 for postgresql:// and psycopg2 for "
                             "postgresql+psycopg2://).") from exc
        except Exception as exc:  # SQLAlchemy's errors, without importing it here
            if _is_schema_race(exc) and attempt < _OPEN_TRIES - 1:
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))  # another worker is creating it
                continue
            reason = str(exc).strip().splitlines()[0][:300]
            raise ValueError(f"Cannot open the Optuna storage {mask_url(url)!r}: {reason}") from None
    raise AssertionError("unreachable")


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna marks its heartbeat and retry API experimental (since 2.8); it is what we need."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with quiet_experimental():
        return RetryHeartbeatStaleTrialCallback(max_retry=3)


def _has_native_heartbeat(storage: BaseStorage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def watches_liveness(storage: BaseStorage) -> bool:
    """Whether dead workers' trials on ``storage`` become FAIL in time (so waiting on them ends)."""
    return _has_native_heartbeat(storage) or isinstance(storage, optuna.storages.JournalStorage)


def fail_stale_trials(study: optuna.Study, heartbeat: Heartbeat) -> None:
    """Fail (and retry) RUNNING trials whose worker stopped beating: Optuna's way, or ours on a journal."""
    storage = study._storage
    if _has_native_heartbeat(storage):
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        return
    if not isinstance(storage, optuna.storages.JournalStorage):
        return
    now = time.time()
    retry = _retry_callback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.system_attrs.get(HEARTBEAT_ATTR, trial.datetime_start.timestamp()
                                      if trial.datetime_start else now)
        if now - beat <= heartbeat.grace_period:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                with quiet_experimental():
                    retry(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first


@contextmanager
def beating(trial: optuna.Trial, heartbeat: Heartbeat | None) -> Iterator[None]:
    """Stamp a running trial on a journal storage every ``interval`` seconds (RDB beats by itself)."""
    storage = trial.storage
    if heartbeat is None or not isinstance(storage, optuna.storages.JournalStorage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
            if stop.wait(heartbeat.interval):
                return

    thread = threading.Thread(target=beat, name="cliptune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
