"""Opening an MLflow store safely: a lock for brand-new sqlite stores, a fast check of a server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def sqlite_lock(uri: str) -> Iterator[None]:
    """Hold a file lock beside a sqlite store: processes that open a brand-new store together
    would otherwise run MLflow's schema migrations at once and break each other's."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(uri.removeprefix("sqlite:///") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def probe_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable server (MLflow's own client retries for minutes)."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except HTTPError:
        pass  # something answered: MLflow's own calls will tell what is wrong
    except OSError as exc:
        raise ConnectionError(f"no MLflow server answers at {uri} ({exc})") from None
