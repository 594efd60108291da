"""Threads per trial for small models: one torch thread against all of this machine's cores.

Why: ``tune()`` trains many small models; torch's default is a thread per core, which for a small
recurrent net costs more in synchronisation than it gains, and collapses on a machine whose other
cores are busy (the quick-start job once took 13.9 s a trial on a loaded 2-core machine against
1.3 s on one thread). cliptune therefore trains a model under ``plan.SMALL_MODEL`` parameters on
one thread unless ``threads=`` says otherwise. This script measures that choice: one trial of the
quick-start job (``examples/adding_rnn.py``) and of a wider MLP, on 1 thread and on all cores,
interleaved, in wall time, on an idle machine and beside a busy process on one core.

    python -m benchmarks threads
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._common import interleaved, median, report, target, train_one


def _spin(stop: Any) -> None:
    """Keep one core busy until ``stop`` is set (another job on a shared machine)."""
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _adding() -> tuple[Callable[[], Any], Any, dict[str, Any]]:
    from examples.adding_rnn import make_data, make_model

    return make_model, make_data(), {"loss": "mse", "optimizer": "sgd", "lr": 0.3, "epochs": 2,
                                     "batch_size": 32}


def _mlp() -> tuple[Callable[[], Any], Any, dict[str, Any]]:
    from torch import nn

    rng = np.random.default_rng(0)
    X = rng.normal(size=(4096, 64)).astype(np.float32)
    y = np.tanh(X @ rng.normal(size=(64, 1))).astype(np.float32)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 1))

    return make, (X, y), {"loss": "mse", "optimizer": "sgd", "lr": 0.01, "epochs": 2,
                          "batch_size": 64}


TASKS = {"adding_rnn (quick start)": _adding, "mlp 64-512-512-1": _mlp}


def one_trial(task: str, threads: int) -> None:
    import optuna
    import torch

    from cliptune import ClipConfig, StabilityRules, TrialMonitor
    from cliptune.data import make_splits

    torch.set_num_threads(threads)
    model_fn, data, training = TASKS[task]()
    monitor = TrialMonitor(optuna.create_study().ask(), StabilityRules())
    train_one("torch", model_fn, make_splits(data, 0.2, 0), ClipConfig("global_norm", 0.1),
              monitor, 0, **training)


def measure(task: str, cores: int, repeats: int, loaded: bool) -> dict[str, Any]:
    runs = {"1 thread": lambda: one_trial(task, 1),
            f"{cores} threads": lambda: one_trial(task, cores)}
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,)) if loaded else None
    if spinner is not None:
        spinner.start()
    try:
        times = interleaved(runs, repeats, clock=time.perf_counter)
    finally:
        stop.set()
        if spinner is not None:
            spinner.join()
    one, many = median(times["1 thread"]), median(times[f"{cores} threads"])
    return {"task": task, "machine": "one core busy" if loaded else "idle", "one_thread_s": one,
            "all_cores_s": many, "all_cores_over_one": many / one}


def run(repeats: int = 5, out_dir: Any = None) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    rows = [measure(task, cores, repeats, loaded) for loaded in (False, True) for task in TASKS]
    small = [r for r in rows if r["task"].startswith("adding")]
    worst = min(r["all_cores_over_one"] for r in small)
    targets = [target("adding_rnn trial: all cores / one thread (best case of idle, loaded)",
                      worst, ">= 1.0 (one thread is no slower)", worst >= 1.0)]
    meta = {"repeats": repeats, "cores": cores,
            "timing": "wall time of one trial, median of interleaved repeats"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("threads", "Threads per trial (torch)", rows,
                  ["task", "machine", "one_thread_s", "all_cores_s", "all_cores_over_one"],
                  targets, meta, **kwargs)


if __name__ == "__main__":
    run()
