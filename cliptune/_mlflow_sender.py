"""MLflow calls made in the background, in order: a trial never waits for the tracking store.

The tracker hands each call (a function of the ``MlflowClient``) to a :class:`Sender` and goes on;
one thread makes the calls in the order given. A store that does not answer (a server down or
overloaded, a sqlite store locked by another process) is tried again after growing pauses, so an
outage costs no training time and loses no record: what piled up is sent when the store answers
again (the sender says when it stops and starts answering). Any other failure (the experiment
deleted, a full disk, a refused login) stops the sending, and the tracker says so. On a sqlite
store every call holds the store's file lock, so the workers of one machine write one at a time.
:meth:`Sender.close` waits for what is left while the store keeps answering, and gives up once it
has not answered for its timeout: a slow store (four workers taking turns on a sqlite file after a
lock, each call waiting out MLflow's 20 s busy timeout) loses nothing, a dead one costs the timeout.
On a sqlite store, an answer to any worker's call counts (each answered call touches the lock
file): a worker whose turn comes after the others' queued calls waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cliptune._mlflow_store import describe, mark_answered, seconds_since_answer, sqlite_lock
from cliptune.storage import mask_url

log = logging.getLogger("cliptune")

Call = Callable[[Any], None]
_PAUSES = (0.25, 0.5, 1.0, 2.0, 5.0)  # between tries of a call the store did not answer
MAX_QUEUED = 100_000  # calls kept during an outage; beyond, new ones are dropped (and counted)


def is_outage(exc: BaseException, remote: bool) -> bool:
    """Whether a failed call is worth trying again: the store did not answer, or was busy."""
    text = str(exc)
    if "disk is full" in text or "No space left" in text:
        return False
    if "database is locked" in text:
        return True
    if not remote:
        return False
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else 0
    return status >= 500 or status == 429  # MLflow reports a connection error or timeout as 500


class Sender:
    """One background thread that makes a tracker's MLflow calls (see the module docstring)."""

    def __init__(self, client: Any, uri: str, remote: bool) -> None:
        self._client, self._uri, self._remote = client, uri, remote
        self._queue: deque[Call] = deque()
        self._wake = threading.Condition()
        self._deadline: float | None = None  # set by close(), moved on by every answered call
        self._grace = 0.0  # close()'s timeout
        self.failure: BaseException | None = None  # sending stopped for good
        self.last_error: BaseException | None = None
        self.down_since: float | None = None  # monotonic time of the first unanswered call
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name="cliptune-mlflow", daemon=True)
        self._thread.start()

    def submit(self, call: Call) -> None:
        with self._wake:
            if self.failure is not None or self._deadline is not None:
                return
            if len(self._queue) >= MAX_QUEUED:
                self.dropped += 1
                return
            self._queue.append(call)
            self._wake.notify()

    @property
    def pending(self) -> int:
        """Calls not made yet (the one in flight included)."""
        with self._wake:
            return len(self._queue)

    def close(self, timeout: float) -> int:
        """Wait for the queued calls until the store has not answered for ``timeout`` seconds;
        how many were not made."""
        with self._wake:
            self._grace = timeout
            self._deadline = time.monotonic() + timeout
            self._wake.notify_all()
        # A call stuck in MLflow's own retries is left to the daemon thread when time is up.
        while self._thread.is_alive():
            self._extend_by_others()
            with self._wake:
                left = self._deadline - time.monotonic()
            if left <= -0.5:
                break
            self._thread.join(min(max(left, 0.0) + 0.5, 1.0))
        return self.pending

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and self._deadline is None:
                    self._wake.wait()
                if not self._queue or (self._deadline is not None
                                       and time.monotonic() > self._deadline):
                    return
                call = self._queue[0]
            if not self._make(call):
                return
            with self._wake:
                self._queue.popleft()
                if self._deadline is not None:  # the store answers: closing waits on
                    self._deadline = max(self._deadline, time.monotonic() + self._grace)

    def _extend_by_others(self) -> None:
        """While closing, an answer to another worker's call on the same sqlite store counts as
        the store answering: the workers take turns on its lock, and one that waits its turn (or
        finds the store busy) behind the others' calls is not facing a dead store."""
        since = seconds_since_answer(self._uri) if self._deadline is not None else None
        if since is not None:
            with self._wake:
                self._deadline = max(self._deadline,  # type: ignore[type-var]
                                     time.monotonic() - since + self._grace)

    def _make(self, call: Call) -> bool:
        """Make one call, again after a pause while the store does not answer; False: stop."""
        attempt = 0
        while True:
            try:
                with sqlite_lock(self._uri):
                    call(self._client)
                    mark_answered(self._uri)
            except Exception as exc:
                if not is_outage(exc, self._remote):
                    with self._wake:
                        self.failure = exc
                        self._queue.clear()
                    return False
                self.last_error = exc
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("MLflow at %s does not answer (%s); the tuning goes on, and its "
                                "tracking records are kept and sent when the store answers "
                                "again", mask_url(self._uri), describe(self._uri, exc))
                pause = _PAUSES[min(attempt, len(_PAUSES) - 1)]
                attempt += 1
                self._extend_by_others()
                with self._wake:
                    if self._deadline is not None and time.monotonic() + pause > self._deadline:
                        return False  # closing, and the store still does not answer
                    self._wake.wait(pause)
                continue
            if self.down_since is not None:
                self.down_since = None
                log.info("MLflow at %s answers again; the tracking records kept meanwhile are "
                         "being sent (%d)", mask_url(self._uri), self.pending)
            return True


__all__ = ["MAX_QUEUED", "Sender", "is_outage"]
