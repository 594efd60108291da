"""Run a plan in several processes against one study: Optuna's storage is the only coordinator.

Every process is an ordinary worker: it opens the shared study, joins the MLflow parent run kept in
the study's user attributes, and runs trials until the study's total is reached. Processes, not
threads, because training is CPU-bound. They start with ``spawn`` (safe beside torch and TensorFlow
threads), so the plan must pickle: the train function or model factory importable (a module-level
function) and the data picklable. Each worker gets an equal share of the cores
(``OMP_NUM_THREADS``, set before it imports a framework, unless set already).

No worker outlives its job. When this process's own run ends, the workers finish their running
trial and leave. When it is interrupted (Ctrl-C twice, SIGTERM), they get SIGTERM: each records
its running trial as failed (it runs again when the job does), closes its MLflow run and leaves.
On Linux they also get SIGTERM when this process dies without a word (SIGKILL). A terminal's
Ctrl-C reaches only this process (the workers ignore SIGINT), which decides for them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from cliptune._errors import Terminated
from cliptune.plan import Plan
from cliptune.settings import Run

log = logging.getLogger("cliptune")
_STOP_GRACE_S = 30.0  # how long an aborted worker may take to record its trial before SIGKILL
_LOGGERS = ("cliptune", "optuna", "mlflow.store.db.utils")  # workers log at their parent's levels


def worker_plan(plan: Plan) -> Plan:
    """The plan a worker process runs: no progress bar, no callbacks, no refit, no warm start (the
    parent enqueues the first trials); it must pickle."""
    out = replace(plan, settings=replace(plan.settings, run=Run(False, None, False),
                                        search=replace(plan.settings.search, warm_start=None)))
    try:
        pickle.dumps(out)
    except Exception as exc:
        what = "model_fn" if plan.backend else "the train function"
        raise TypeError(
            f"n_jobs > 1 runs trials in separate processes, so {what} must be importable (a "
            "module-level function, not a lambda or a local function) and the data, search space, "
            f"sampler, pruner and tracker picklable: {exc}") from None
    return out


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: recording the trial is not interrupted
    raise Terminated("SIGTERM")


def _die_with_parent(parent: int) -> None:
    """SIGTERM to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _parent_logging() -> dict[str, Any]:
    """What a worker needs to log as this process does: levels, and how cliptune's lines look."""
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    formats = [h.formatter for h in log.handlers
               if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr]
    return {"levels": levels, "format": formats[0] if formats else None}


def _log_as_parent(config: dict[str, Any]) -> None:
    for name, level in config["levels"].items():
        logging.getLogger(name).setLevel(level)
    if config["format"] is not None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(config["format"])
        log.addHandler(handler)
        log.propagate = False


def _worker(pickled_plan: bytes, storage: Any, study_name: str, threads: int, stop: Any,
            errors: Any, parent: int, logging_config: dict[str, Any]) -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    _die_with_parent(parent)
    _log_as_parent(logging_config)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before the plan imports a framework
        os.environ.setdefault(name, str(threads))
    from cliptune.runner import run_worker

    try:
        run_worker(pickle.loads(pickled_plan), storage, study_name,
                   lambda: stop.is_set() or os.getppid() != parent)
    except KeyboardInterrupt:
        return  # stopped by the job: its trial is recorded, nothing to report
    except Exception as exc:
        try:
            errors.put(exc)
        except Exception:  # an exception that does not pickle
            errors.put(RuntimeError(f"{type(exc).__name__}: {exc}"))


def run_workers(plan: Plan, storage: Any, study_name: str, run_here: Callable[[], None]) -> None:
    """Start ``n_jobs - 1`` worker processes, run ``run_here()`` as the last one, wait for all.

    Raises the first error a worker process raised (after the others have finished).
    """
    n_jobs = plan.settings.study.n_jobs
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    ctx = mp.get_context("spawn")
    stop, errors = ctx.Event(), ctx.SimpleQueue()
    args = (pickle.dumps(plan), storage, study_name, threads, stop, errors, os.getpid(),
            _parent_logging())
    procs = [ctx.Process(target=_worker, args=args, name=f"cliptune-worker-{i}", daemon=True)
             for i in range(1, n_jobs)]
    with _sigint_ignored():  # inherited: the workers ignore a terminal's Ctrl-C from the start
        for proc in procs:
            proc.start()
    try:
        try:
            run_here()
        finally:
            stop.set()  # this worker is done: the others finish their running trial and leave
        for proc in procs:
            proc.join()
    except BaseException:  # interrupted: the workers record their trials and leave now
        _stop_now(procs)
        raise
    for proc in procs:
        if proc.exitcode not in (0, None):
            log.warning("worker process %s ended with status %s; a trial it left RUNNING is "
                        "failed and retried", proc.name, proc.exitcode)
    if not errors.empty():
        raise errors.get()


def _stop_now(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: Terminated in the worker
    for proc in procs:
        proc.join(_STOP_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while child processes start (they inherit it), where this is possible."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are the main thread's business
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
