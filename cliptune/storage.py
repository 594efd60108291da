"""Optuna storages for one or many workers: URLs checked, schemas made once, dead workers' trials retried.

- ``sqlite:///PATH``, ``postgresql://...`` (psycopg 3), ``postgresql+psycopg2://...``, ``mysql://...``:
  Optuna's RDBStorage with heartbeats, so a RUNNING trial whose worker died is failed after the grace
  period and retried by Optuna's ``RetryHeartbeatStaleTrialCallback``.
- ``journal:PATH``: Optuna's JournalStorage on a file. It has no heartbeat of its own, so cliptune
  stamps running trials (system attribute ``cliptune.heartbeat``) and fails and retries stale ones
  with the same callback. A record a crash cut off is repaired first (:mod:`cliptune._journal`).

Two processes opening a brand-new database at once race on creating its schema; opening retries.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from cliptune._optuna import has_native_heartbeat, storage_of

log = logging.getLogger("cliptune")

HEARTBEAT_ATTR = "cliptune.heartbeat"
_SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "api_key", "apikey")
# In free text: scheme://user:PASSWORD@host (the password may hold '@'), and key=SECRET.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/\s'\"@]*):(\S*?)@(?=[^@/\s'\"]*(?:[/\s'\"?]|$))")
_SECRET_PAIR = re.compile(rf"\b({'|'.join(_SECRET_KEYS)})=[^&\s'\"]+", re.IGNORECASE)
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
_DB_ERRORS = ("OperationalError", "DatabaseError", "InterfaceError", "StorageInternalError")
_STORAGE_CODE = os.path.join("optuna", "storages", "")  # where a storage failure comes from
_OPEN_TRIES = 8
T = TypeVar("T")


def mask_url(url: str) -> str:
    """``url`` with any password (in the user info or a query parameter) replaced by ``***``.

    Example:
        >>> mask_url("postgresql://me:s3cret@db:5432/optuna")
        'postgresql://me:***@db:5432/optuna'
    """
    parts = urlsplit(url)
    if parts.password is None and not any(k.lower() in _SECRET_KEYS for k, _ in parse_qsl(parts.query)):
        return url  # untouched (urlunsplit would turn sqlite:///x into sqlite:/x)
    netloc = parts.netloc
    if parts.password is not None:
        user_info, host = netloc.rsplit("@", 1)
        netloc = f"{user_info.split(':', 1)[0]}:***@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, "***" if k.lower() in _SECRET_KEYS else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def mask_text(text: str) -> str:
    """``text`` (an error message, a log line) with the password of every URL in it masked.

    Example:
        >>> mask_text("API request to http://bob:pw@h:5000/api failed")
        'API request to http://bob:***@h:5000/api failed'
    """
    return _SECRET_PAIR.sub(r"\1=***", _USERINFO.sub(r"\1:***@", text))


def missing_driver(what: str, url: str, exc: BaseException) -> ValueError:
    """The error for a database URL whose driver is not installed (Optuna storage, MLflow store)."""
    name = getattr(exc, "name", None) or str(exc).rpartition(" ")[2].strip("'\"")
    return ValueError(f"The {what} URL {mask_url(url)!r} needs a database driver that is not "
                      f"installed ({name}; for PostgreSQL: pip install 'cliptune[postgres]', "
                      "which brings psycopg 3 for postgresql:// and psycopg2 for "
                      "postgresql+psycopg2://).")


def storage_failure(exc: BaseException) -> str | None:
    """Why the study's storage cannot be written, when ``exc`` says so; else None.

    A full disk, a read-only or lost file, a database that went away: an ``OSError``, a database
    error or Optuna's ``StorageInternalError`` that came out of Optuna's storage code (so that a
    train function's own database error is a failed trial, not a failed storage).
    """
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    found = [e for e in chain if type(e).__name__ in _DB_ERRORS
             or (isinstance(e, OSError) and e.errno is not None)]
    if not found or not any(_raised_in_storage(e) for e in chain):
        return None
    deepest = found[-1]  # says it best
    reason = (deepest.strerror if isinstance(deepest, OSError) and deepest.strerror else
              str(getattr(deepest, "orig", None) or deepest).strip().splitlines()[0])
    return mask_text(reason[:300])


def _raised_in_storage(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if _STORAGE_CODE in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def storage_label(storage: object) -> str:
    """What to log of an Optuna storage: its URL with the password masked, or its type."""
    if storage is None:
        return "in-memory"
    url = storage if isinstance(storage, str) else getattr(storage, "url", None)
    return mask_url(url) if isinstance(url, str) else type(storage).__name__


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
                                   "duplicate column",
                                   "duplicate key", "database is locked"))


def retry_schema_races(create: Callable[[], T], tries: int = _OPEN_TRIES) -> T:
    """Call ``create``, again after a short random pause while another process is creating the
    same brand-new database schema (or the same MLflow experiment) at the same moment."""
    for attempt in range(tries):
        try:
            return create()
        except Exception as exc:
            if attempt == tries - 1 or not _is_schema_race(exc):
                raise
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
    raise AssertionError("unreachable")


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
        from cliptune._journal import open_journal

        try:
            return open_journal(path)  # what a crash mid-write left is repaired first
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
                  "heartbeat_stale_trial_callback": retry_callback()}

    def create() -> BaseStorage:
        with quiet_experimental():
            return optuna.storages.RDBStorage(url, **kwargs)

    try:
        return retry_schema_races(create)
    except ImportError as exc:  # Optuna wraps a missing driver in an ImportError
        raise missing_driver("storage", url, exc.__cause__ or exc) from exc
    except Exception as exc:  # SQLAlchemy's errors, without importing it here
        reason = str(exc).strip().splitlines()[0][:300]
        raise ValueError(f"Cannot open the Optuna storage {mask_url(url)!r}: {reason}") from None


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna marks its heartbeat and retry API experimental (since 2.8); it is what we need."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class _LoggedRetry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker stopped beating, and a line that says so."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().__call__(study, trial)
        with quiet_experimental():
            retry = next((t.number for t in reversed(study.get_trials(deepcopy=False))
                          if self.retried_trial_number(t) == trial.number), None)
        if retry is not None:
            log.warning("trial %d was left RUNNING (its worker stopped, or it was interrupted): "
                        "failed, and retried as trial %d with the same parameters", trial.number,
                        retry)


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Fail-and-retry of a trial whose worker died (at most 3 retries of one trial)."""
    with quiet_experimental():
        return _LoggedRetry(max_retry=3)


def watches_liveness(storage: BaseStorage) -> bool:
    """Whether dead workers' trials on ``storage`` become FAIL in time (so waiting on them ends)."""
    return has_native_heartbeat(storage) or isinstance(storage, optuna.storages.JournalStorage)


def fail_stale_trials(study: optuna.Study, heartbeat: Heartbeat) -> None:
    """Fail (and retry) RUNNING trials whose worker stopped beating: Optuna's way, or ours on a journal."""
    storage = storage_of(study)
    if has_native_heartbeat(storage):
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        return
    if not isinstance(storage, optuna.storages.JournalStorage):
        return
    now = time.time()
    retry = retry_callback()
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
    """Stamp a running trial on a journal storage every ``interval`` seconds. An RDB storage beats
    in a thread of Optuna's, which may not have beaten yet when the trial starts: one beat first,
    since Optuna never finds a RUNNING trial without any beat stale (a rerun would wait forever)."""
    storage = trial.storage
    if heartbeat is not None and has_native_heartbeat(storage):
        storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
    if heartbeat is None or not isinstance(storage, optuna.storages.JournalStorage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
            except Exception as exc:  # the trial's own next write will say it
                log.debug("trial %d: heartbeat failed (%s)", trial.number, mask_text(str(exc)))
                return
            if stop.wait(heartbeat.interval):
                return

    thread = threading.Thread(target=beat, name="cliptune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
