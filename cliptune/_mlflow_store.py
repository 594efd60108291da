"""Opening an MLflow store safely: a lock for sqlite stores, a fast check of a server (its
credentials kept out of every message), and one clear line when it cannot be opened."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cliptune.storage import mask_text, mask_url, missing_driver


@contextmanager
def sqlite_lock(uri: str) -> Iterator[None]:
    """Hold a file lock beside a sqlite store: processes that open a brand-new store together
    would otherwise run MLflow's schema migrations at once and break each other's, and workers
    that write together may find it locked."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = _lock_file(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_file(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///") + ".lock")


def mark_answered(uri: str) -> None:
    """Note that a sqlite store answered a call (the lock file's time): every process that waits
    its turn for the lock knows the store is alive though its own call has not been made yet."""
    if uri.startswith("sqlite:///"):
        with suppress(OSError):
            os.utime(_lock_file(uri))


def seconds_since_answer(uri: str) -> float | None:
    """How long ago any process's call to this sqlite store was last answered; None if unknown
    (another kind of store, or no lock file)."""
    if not uri.startswith("sqlite:///"):
        return None
    try:
        return max(time.time() - _lock_file(uri).stat().st_mtime, 0.0)
    except OSError:
        return None


def without_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@`` part (for links and for our own requests)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def probe_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable server (MLflow's own client retries for minutes).

    Credentials in the URI (``http://user:password@host``, which MLflow's client sends as basic
    auth) go in a header here too, never into a message.
    """
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    parts, bare = urlsplit(uri), without_credentials(uri).rstrip("/")
    request = Request(f"{bare}/health")
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    try:
        with urlopen(request, timeout=timeout):
            pass
    except HTTPError:
        pass  # something answered: MLflow's own calls will tell what is wrong
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"no MLflow server answers at {bare} ({reason})") from None


def connect(uri_arg: str | None, experiment: str) -> tuple[str, Any, str]:
    """The store's URI (``uri_arg``, else MLflow's, else ``./mlflow.db``), a client, and the
    experiment's id (created when missing)."""
    import mlflow

    uri = uri_arg or (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set()
                      else f"sqlite:///{Path.cwd() / 'mlflow.db'}")  # absolute: MLflow caches
    if urlsplit(uri).scheme in ("http", "https"):                      # stores by URI
        probe_server(uri)
        # MLflow prints two links per ended run, from the URI as given (password included);
        # cliptune logs its own, masked, once.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    elif uri.startswith("sqlite:///"):
        # A fresh sqlite connection for each of MLflow's sessions: a pooled one that saw a write
        # fail on a locked store could keep its lock, and the other workers' writes (and its own
        # retries) then failed until the process ended (tests/faults/test_local_store.py, under
        # load). Only where the user set no pool of their own.
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    with sqlite_lock(uri):  # MLflow migrates a fresh store on first use
        client = mlflow.MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise RuntimeError(f"the experiment {experiment!r} is deleted; restore it "
                               "(mlflow experiments restore) or choose another name")
        return uri, client, (found.experiment_id if found is not None
                             else client.create_experiment(experiment))


def describe(uri: str, exc: BaseException) -> str:
    """One line about a failure of the store at ``uri``, every password masked."""
    lines = str(exc).strip().splitlines() or [""]
    secret = urlsplit(uri).password if "://" in uri else None
    text = mask_text(f"{type(exc).__name__}: {lines[0][:300]}")
    return text.replace(secret, "***") if secret else text


def unreachable(uri: str, exc: BaseException) -> ValueError:
    """The error when the store at ``uri`` cannot be opened: what to do, in one line."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ImportError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and "://" in uri:  # a database URL whose driver is missing
        return missing_driver("MLflow tracking", uri, cause)
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else 0
    refused = status in (401, 403) or any(f"{s} != 200" in str(exc) for s in (401, 403))
    hint = ("Check the user and password in the URI (or MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD)" if refused else
            "Check that the store is reachable, or pass another tracking_uri or tracking=False")
    return ValueError(f"Cannot record the tuning job in MLflow at tracking URI {mask_url(uri)!r}: "
                      f"{describe(uri, exc)}. {hint}.")


__all__ = ["connect", "describe", "probe_server", "sqlite_lock", "unreachable",
           "without_credentials"]
