"""Run a plan in several processes against one study: Optuna's storage is the only coordinator.

Every process is an ordinary worker: it opens the shared study, joins the MLflow parent run kept in
the study's user attributes, and runs trials until the study's total is reached. Processes, not
threads, because training is CPU-bound. They start with ``spawn`` (safe beside torch and TensorFlow
threads), so the plan must pickle: the train function or model factory importable (a module-level
function) and the data picklable. Each worker gets an equal share of the cores
(``OMP_NUM_THREADS``, set before it imports a framework, unless set already).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from cliptune.plan import Plan
from cliptune.settings import Run


def worker_plan(plan: Plan) -> Plan:
    """The plan a worker process runs: no progress bar, no callbacks, no refit; it must pickle."""
    out = replace(plan, settings=replace(plan.settings, run=Run(False, None, False)))
    try:
        pickle.dumps(out)
    except Exception as exc:
        what = "model_fn" if plan.backend else "the train function"
        raise TypeError(
            f"n_jobs > 1 runs trials in separate processes, so {what} must be importable (a "
            "module-level function, not a lambda or a local function) and the data, search space, "
            f"sampler, pruner and tracker picklable: {exc}") from None
    return out


def _init_worker(threads: int) -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))


def _worker(plan: Plan, storage: Any, study_name: str) -> None:
    from cliptune.runner import run_worker

    run_worker(plan, storage, study_name)


def run_workers(plan: Plan, storage: Any, study_name: str, run_here: Callable[[], None]) -> None:
    """Start ``n_jobs - 1`` worker processes, run ``run_here()`` as the last one, wait for all.

    Raises the first error a worker process raised (after the others have finished).
    """
    n_jobs = plan.settings.study.n_jobs
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(n_jobs - 1, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures: list[Future[Any]] = [pool.submit(_worker, plan, storage, study_name)
                                      for _ in range(1, n_jobs)]
        run_here()
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
