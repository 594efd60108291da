"""Trials per minute with 1 and 2 worker processes on one study (the adding-problem job).

Why: ``tune(n_jobs=N)`` / ``cliptune tune --workers N`` should turn cores into trials. Each run is
a fresh study of ``N_TRIALS`` trials on a fresh SQLite storage (the CLI's default), tracking off,
timed end to end: the workers' start-up (spawned processes import torch), the storage's locking
and the wait for the last trial all count. Runs alternate between the variants; medians are kept.

Variants: one worker with one torch thread, one worker with two threads (what a single process
can get from the second core), and two workers with one thread each.

    python -m benchmarks.parallel_scaling
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from benchmarks._common import median, report, setup_torch, target

N_TRIALS = 96  # long enough that the workers' start-up (importing torch) is not the figure
REPEATS = 2
GOAL = 1.7


def _run(n_jobs: int, threads: int, folder: str, tag: str) -> float:
    import optuna
    import torch

    import cliptune
    from examples.adding_rnn import make_data, make_model

    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = cliptune.tune(make_model, make_data(), loss="mse", optimizer="sgd", lr=0.3, epochs=8,
                           batch_size=32, search_space="rnn", n_trials=N_TRIALS, seed=0,
                           storage=f"sqlite:///{folder}/{tag}.db", study_name="scaling",
                           n_jobs=n_jobs, tracking=False, show_progress=False, baselines=False,
                           confirm=0,  # the re-runs run in the main process only: left out
                           pruner=optuna.pruners.NopPruner())  # each trial a fixed amount of work
    elapsed = time.perf_counter() - start
    assert len(result.study.trials) >= N_TRIALS
    return elapsed


def main() -> dict[str, Any]:
    setup_torch()
    variants = {"1 worker, 1 thread": (1, 1), "1 worker, 2 threads": (1, 2),
                "2 workers, 1 thread each": (2, 1)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="cliptune-scaling-") as folder:
        for r in range(REPEATS):
            names = list(variants)
            for name in names[r % len(names):] + names[:r % len(names)]:
                n_jobs, threads = variants[name]
                seconds[name].append(_run(n_jobs, threads, folder, f"r{r}-{n_jobs}-{threads}"))
    rows = [{"variant": name, "seconds": median(s), "trials_per_min": 60 * N_TRIALS / median(s)}
            for name, s in seconds.items()]
    best_single = max(r["trials_per_min"] for r in rows[:2])
    ratio = rows[2]["trials_per_min"] / best_single
    for row in rows:
        row["vs_best_single"] = row["trials_per_min"] / best_single
    return report("parallel_scaling", f"Parallel scaling: {N_TRIALS} adding-problem trials, SQLite",
                  rows, ["variant", "seconds", "trials_per_min", "vs_best_single"],
                  [target("2 workers vs the best single worker (trials/min)", ratio, f">= {GOAL}",
                          ratio >= GOAL)],
                  {"n_trials": N_TRIALS, "repeats": REPEATS})


if __name__ == "__main__":
    main()
