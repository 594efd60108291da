"""Search quality: what tune() finds in 20 trials versus a grid oracle and the usual fixed defaults.

Why: a tuner is worth its trials only if it finds about what an exhaustive search finds, and does
better than the clip people set without searching. On each task of ``benchmarks/tasks.py``, for
seeds 0, 1 and 2:

- ``tune``: ``tune()`` with its defaults (TPE, stability rules + MedianPruner), 20 trials;
- ``grid``: every mode of the default search space x 8 log-spaced thresholds over its range (25
  configurations with ``none``), each trained to its last epoch;
- ``defaults``: no clip; global norm 1.0; value 1.0; per-tensor norm 1.0, each trained fully.

All are worth the validation loss at the last epoch on the same split (a non-finite one counts as
infinitely bad); the grid and the defaults train with the seed, tune()'s trials with seed + trial
number. Reported per task: the medians over seeds of tune / grid best and tune / best default, and
the training steps each approach spent (training-mode forward passes).

A best value is the minimum of noisy evaluations (a configuration's final loss moves with its
initialisation), so the grid's best over 25 draws is luckier than tune()'s over 20.
``chosen_tune_vs_grid`` takes that luck out: the configurations the two chose are each re-trained
on 3 fresh training seeds (same split) and their mean losses compared. Those re-runs are not
counted in the steps. ``seed_spread`` is the coefficient of variation of the grid's chosen
configuration over those 3 seeds: the noise floor of any comparison of single runs.

Adaptive modes (issue 8), on the same tasks and seeds: ``tune()`` over ``adaptive.yaml`` (the fixed
modes plus autoclip, agc, zclip), 20 trials, and the adaptive modes' usual settings (autoclip p=10,
agc lambda=0.01, zclip z=2.5) trained fully. ``adaptive_vs_tune`` is its best over tune()'s with
the default space, ``chosen_adaptive_vs_tune`` the same for the chosen configs re-trained on the 3
fresh seeds, ``adaptive_default_vs_fixed`` the best adaptive setting over the best fixed default,
and ``adaptive_chosen`` the seeds whose best trial used an adaptive mode (below 1 is a win).

    python -m benchmarks search_quality
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from benchmarks._common import median, report, setup_torch, target
from benchmarks.tasks import TASKS, Task, counting

N_TRIALS = 20
RETRAIN = 3  # fresh training seeds on which the configs chosen by tune and by the grid are re-run
SEEDS = (0, 1, 2)
DEFAULTS = {"no clip": ("none", None), "global_norm 1.0": ("global_norm", 1.0),
            "value 1.0": ("value", 1.0), "norm 1.0": ("norm", 1.0)}
ADAPTIVE_DEFAULTS = {"autoclip 10": ("autoclip", 10.0), "agc 0.01": ("agc", 0.01),
                     "zclip 2.5": ("zclip", 2.5)}
ADAPTIVE_COLUMNS = ["adaptive_tune_best", "adaptive_vs_tune", "chosen_adaptive_vs_tune",
                    "adaptive_default_vs_fixed", "adaptive_chosen"]


def grid_configs(n: int = 8) -> list[Any]:
    """``none`` plus ``n`` log-spaced thresholds over each mode's range in the default space."""
    from cliptune import ClipConfig, SearchSpace

    configs = []
    for mode, rng in SearchSpace.shipped("default").modes.items():
        if rng is None:
            configs.append(ClipConfig(mode))
        else:
            configs += [ClipConfig(mode, float(t)) for t in np.geomspace(rng.low, rng.high, n)]
    return configs


def train_fully(task: Task, clip: Any, seed: int, train_seed: int | None = None) -> float:
    """One configuration trained to its last epoch, no pruning; its last validation loss.

    ``seed`` picks the split (as in tune()); ``train_seed`` the initialisation and batches.
    """
    import optuna

    from benchmarks._common import train_one
    from cliptune.data import make_splits
    from cliptune.monitor import TrialMonitor

    splits = make_splits(task.data, 0.2, seed)
    train_seed = seed if train_seed is None else train_seed
    monitor = TrialMonitor(optuna.create_study(pruner=optuna.pruners.NopPruner()).ask(), None)
    train_one("torch", task.counted_model_fn(), splits, clip, monitor, train_seed, loss=task.loss,
              optimizer="sgd", lr=task.lr, epochs=task.epochs, batch_size=task.batch_size)
    value = monitor.value()
    return value if math.isfinite(value) else math.inf


def one_seed(task: Task, seed: int, n_trials: int, grid: list[Any]) -> dict[str, Any]:
    import cliptune
    from cliptune import ClipConfig

    start = time.perf_counter()
    with counting(task) as tune_steps:
        result = cliptune.tune(task.counted_model_fn(), task.data, **task.tune_kwargs(),
                               n_trials=n_trials, seed=seed, tracking=False, show_progress=False)
    tune_s = time.perf_counter() - start
    with counting(task, checked=False) as grid_steps:
        grid_values = [train_fully(task, clip, seed) for clip in grid]
    with counting(task, checked=False) as default_steps:
        defaults = {name: train_fully(task, ClipConfig(mode, t), seed)  # type: ignore[arg-type]
                    for name, (mode, t) in DEFAULTS.items()}
    best_grid = int(np.argmin(grid_values))
    best_default = min(defaults, key=defaults.__getitem__)
    tune_best = result.best_value if result.best_value is not None else math.inf

    def retrained(clip: Any) -> list[float]:  # the chosen config on fresh training seeds
        return [train_fully(task, clip, seed, 1000 + k) for k in range(RETRAIN)]

    grid_runs = retrained(grid[best_grid])
    tune_runs = retrained(result.best_config) if result.best_config is not None else [math.inf]
    chosen_grid, chosen_tune = float(np.mean(grid_runs)), float(np.mean(tune_runs))
    return {"task": task.name, "seed": seed, "tune_best": tune_best,
            "tune_config": str(result.best_config), "grid_best": grid_values[best_grid],
            "grid_config": str(grid[best_grid]), "best_default": defaults[best_default],
            "best_default_name": best_default, **{f"default {k}": v for k, v in defaults.items()},
            "tune_vs_grid": tune_best / grid_values[best_grid],
            "tune_vs_best_default": tune_best / defaults[best_default],
            "tune_chosen_retrained": chosen_tune, "grid_chosen_retrained": chosen_grid,
            "seed_spread": float(np.std(grid_runs) / np.mean(grid_runs)),
            "chosen_tune_vs_grid": chosen_tune / chosen_grid, "tune_steps": tune_steps[0],
            "grid_steps": grid_steps[0], "defaults_steps": default_steps[0], "tune_seconds": tune_s}


def adaptive_seed(task: Task, seed: int, n_trials: int, base: dict[str, Any]) -> dict[str, Any]:
    """tune() over adaptive.yaml and the adaptive defaults, against ``base`` (one_seed's row)."""
    import cliptune
    from cliptune import ClipConfig

    kwargs = {**task.tune_kwargs(), "search_space": "adaptive"}
    with counting(task) as steps:
        result = cliptune.tune(task.counted_model_fn(), task.data, **kwargs, n_trials=n_trials,
                               seed=seed, tracking=False, show_progress=False)
    defaults = {name: train_fully(task, ClipConfig(mode, t), seed)  # type: ignore[arg-type]
                for name, (mode, t) in ADAPTIVE_DEFAULTS.items()}
    best_default = min(defaults, key=defaults.__getitem__)
    best = result.best_value if result.best_value is not None else math.inf
    chosen = result.best_config
    retrained = (float(np.mean([train_fully(task, chosen, seed, 1000 + k) for k in range(RETRAIN)]))
                 if chosen is not None else math.inf)
    return {"adaptive_tune_best": best, "adaptive_tune_config": str(chosen),
            "adaptive_is_adaptive": bool(chosen is not None and chosen.mode.adaptive),
            "adaptive_vs_tune": best / base["tune_best"],
            "chosen_adaptive_vs_tune": retrained / base["tune_chosen_retrained"],
            "best_adaptive_default": defaults[best_default],
            "best_adaptive_default_name": best_default,
            "adaptive_default_vs_fixed": defaults[best_default] / base["best_default"],
            "adaptive_steps": steps[0], **{f"default {k}": v for k, v in defaults.items()}}


def run(n_trials: int = N_TRIALS, seeds: tuple[int, ...] = SEEDS,
        tasks: tuple[str, ...] = tuple(TASKS), grid_points: int = 8,
        out_dir: Any = None) -> dict[str, Any]:
    setup_torch()
    grid = grid_configs(grid_points)
    per_seed = []
    rows = []
    for name in tasks:
        task = TASKS[name]()
        found = [one_seed(task, seed, n_trials, grid) for seed in seeds]
        for r in found:
            r.update(adaptive_seed(task, r["seed"], n_trials, r))
        per_seed += found
        rows.append({
            "task": name,
            "tune_best": median([r["tune_best"] for r in found]),
            "grid_best": median([r["grid_best"] for r in found]),
            "best_default": median([r["best_default"] for r in found]),
            "no_clip": median([r["default no clip"] for r in found]),
            "tune_vs_grid": median([r["tune_vs_grid"] for r in found]),
            "tune_vs_best_default": median([r["tune_vs_best_default"] for r in found]),
            "chosen_tune_vs_grid": median([r["chosen_tune_vs_grid"] for r in found]),
            "seed_spread": median([r["seed_spread"] for r in found]),
            "tune_steps": median([r["tune_steps"] for r in found]),
            "grid_steps": median([r["grid_steps"] for r in found]),
            "defaults_steps": median([r["defaults_steps"] for r in found]),
            "grid_configs": len(grid),
            **{key: median([r[key] for r in found]) for key in ADAPTIVE_COLUMNS[:-1]},
            "adaptive_chosen": f"{sum(r['adaptive_is_adaptive'] for r in found)}/{len(found)}",
        })
    worst_grid = max(r["tune_vs_grid"] for r in rows)
    beats = sum(r["tune_vs_best_default"] < 1 for r in rows)
    targets = [
        target("tune / grid best (worst task, median of seeds)", worst_grid, "<= 1.05",
               worst_grid <= 1.05),
        target("tasks where tune beats the best fixed default", float(beats), ">= 2", beats >= 2),
    ]
    meta = {"trials": n_trials, "seeds": list(seeds), "grid": [str(c) for c in grid],
            "defaults": list(DEFAULTS), "adaptive_defaults": list(ADAPTIVE_DEFAULTS),
            "per_seed": per_seed,
            "value": "validation loss at the last epoch (lower is better)"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("search_quality", "Search quality (median of seeds)", rows,
                  ["task", "tune_best", "grid_best", "best_default", "no_clip", "tune_vs_grid",
                   "tune_vs_best_default", "chosen_tune_vs_grid", "seed_spread", "tune_steps",
                   "grid_steps", "defaults_steps", *ADAPTIVE_COLUMNS],
                  targets, meta, **kwargs)


if __name__ == "__main__":
    run()
