"""Run ``tune()`` in several processes against one study: Optuna's storage is the only coordinator.

Every process is an ordinary worker: it opens the shared study, joins the MLflow parent run kept in
the study's user attributes, and runs trials until the study's total is reached. Processes, not
threads, because training is CPU-bound. They start with ``spawn`` (safe beside torch and TensorFlow
threads), so the model factory must be importable (a module-level function) and the data picklable.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def threads_per_worker(n_jobs: int) -> int:
    """Split this machine's cores between the workers, at least one each."""
    return max(1, (os.cpu_count() or 1) // n_jobs)


def _worker(kwargs: dict[str, Any], index: int) -> None:
    from cliptune.tuner import tune

    tune(**kwargs, _worker_index=index)


def run_workers(n_jobs: int, kwargs: dict[str, Any], run_here: Any) -> None:
    """Start ``n_jobs - 1`` worker processes, run ``run_here()`` as the last one, wait for all.

    Raises the first error a worker process raised (after the others have finished).
    """
    import pickle

    try:
        pickle.dumps(kwargs)
    except Exception as exc:
        raise TypeError(
            "n_jobs > 1 runs trials in separate processes, so model_fn must be importable (a "
            "module-level function, not a lambda or a local function) and data, search space, "
            f"sampler, pruner and tracker picklable: {exc}") from None
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(n_jobs - 1, mp_context=ctx) as pool:
        futures: list[Future[None]] = [pool.submit(_worker, kwargs, i) for i in range(1, n_jobs)]
        run_here()
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
