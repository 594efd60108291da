"""Pruning savings: training steps saved by stopping unstable trials, at no cost in the result.

Why: on exploding-gradient tasks many configurations blow up (no clip, a loose threshold). Running
them to the end is wasted work; the stability rules stop them at the first non-finite or diverging
loss. The same seeded study of 30 trials (TPE, seed 0, the default search space) runs three times a
task (``benchmarks/tasks.py``):

- ``off``: ``StabilityPruner(NopPruner(), rules=None)``: every trial trains to its last epoch (an
  exploded one ends FAIL with a NaN value);
- ``rules``: ``StabilityPruner(NopPruner())``: the stability rules alone;
- ``default``: ``StabilityPruner()``: the rules (``plateaued`` included) and the MedianPruner
  from the second epoch, what ``tune()`` uses;
- ``patient``: the rules and Optuna's ``PatientPruner(MedianPruner(n_warmup_steps=0),
  patience=0)``: the median's verdict from the first epoch on, but only at an epoch where the trial
  did not improve on its own best (the alternative measured against the default).

Baselines are on in all three, the confirmation re-runs off (they are the same in all three, and
``search_quality`` counts them).

The ``off`` row also replays the ``plateaued`` rule on its unpruned trials (``plateau_replay``):
how many it would have stopped and how good the best of those ended, so a rule that stops trials
which would have recovered shows here, apart from the search trajectories parting ways.

Training steps are counted as forward passes in training mode (a hook on the model, outside
cliptune). Once a trial is pruned the sampler sees a PRUNED trial instead of a FAIL one, so the
studies part ways after that: each is the study a user would get.

    python -m benchmarks pruning_savings
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any

from benchmarks._common import median, report, setup_torch, target
from benchmarks.tasks import TASKS, LoopTask, Task, counting

N_TRIALS = 30


def _pruner(kind: str) -> Any:
    import optuna

    from cliptune import StabilityPruner

    if kind == "off":
        return StabilityPruner(optuna.pruners.NopPruner(), rules=None)
    if kind == "rules":
        return StabilityPruner(optuna.pruners.NopPruner())
    if kind == "patient":
        with warnings.catch_warnings():  # PatientPruner is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return StabilityPruner(optuna.pruners.PatientPruner(
                optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0), patience=0))
    return StabilityPruner()


def study(task: Task, kind: str, n_trials: int, seed: int = 0) -> dict[str, Any]:
    import cliptune

    start = time.perf_counter()
    common = {"n_trials": n_trials, "seed": seed, "pruner": _pruner(kind), "tracking": False,
              "show_progress": False, "confirm": 0}  # the pruning alone
    with counting(task, checked=not isinstance(task, LoopTask)) as steps:
        if isinstance(task, LoopTask):
            result = cliptune.tune_loop(task.counted_train(), metric=task.metric, **common)
        else:
            result = cliptune.tune(task.counted_model_fn(), task.data,
                                   **{**task.tune_kwargs(), **common})
    replay = _plateau_replay(result.study) if kind == "off" else "-"
    reasons = Counter(t.user_attrs.get("prune_reason", "unpromising")
                      for t in result.study.get_trials(deepcopy=False) if t.state.name == "PRUNED")
    return {"steps": steps[0], "seconds": time.perf_counter() - start,
            "best_value": result.best_value, "complete": result.n_complete,
            "pruned": result.n_pruned, "failed": result.n_failed,
            "prune_reasons": " ".join(f"{k}:{v}" for k, v in sorted(reasons.items())) or "-",
            "plateau_replay": replay}


def _plateau_replay(study: Any) -> str:
    """Replays the ``plateaued`` rule on the unpruned study: how many trials it would have stopped,
    and the best final value among them over the study's best (a rule that stops only dead trials
    keeps this far above 1)."""
    from cliptune.stability import StabilityRules, is_plateau

    rules, done, stopped = StabilityRules(), [], []
    for t in study.get_trials(deepcopy=False):
        values = [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
        for step in range(len(values)):
            at_step = [d.intermediate_values[step] for d in done if step in d.intermediate_values]
            if is_plateau(values[:step + 1], min(at_step, default=None), rules.plateau_epochs,
                          rules.plateau_tolerance, rules.plateau_factor):
                stopped.append(t.value if t.value is not None else float("inf"))
                break
        if t.state.name == "COMPLETE":
            done.append(t)
    best = study.best_value
    return f"{len(stopped)} stopped, best {min(stopped) / best:.2f}x" if stopped else "0 stopped"


def run(n_trials: int = N_TRIALS, tasks: tuple[str, ...] = tuple(TASKS),
        out_dir: Any = None) -> dict[str, Any]:
    setup_torch()
    rows = []
    for name in tasks:
        task = TASKS[name]()
        found = {kind: study(task, kind, n_trials) for kind in ("off", "rules", "default", "patient")}
        off = found["off"]
        for kind, r in found.items():
            rows.append({"task": name, "pruning": kind, **r,
                         "steps_vs_off": r["steps"] / off["steps"],
                         "best_vs_off": (r["best_value"] / off["best_value"]
                                         if r["best_value"] and off["best_value"] else None)})
    default = [r for r in rows if r["pruning"] == "default"]
    steps_ratio = median([r["steps_vs_off"] for r in default])
    worst_steps = max(r["steps_vs_off"] for r in default)
    worst_best = max(r["best_vs_off"] or float("inf") for r in default)
    targets = [
        target("steps default/off (median of tasks)", steps_ratio, "<= 0.6", steps_ratio <= 0.6),
        target("steps default/off (worst task)", worst_steps, "<= 0.6", worst_steps <= 0.6),
        target("best value default/off (worst task)", worst_best, "<= 1.02", worst_best <= 1.02),
    ]
    meta = {"trials": n_trials, "seed": 0, "search_space": "default",
            "steps": "training-mode forward passes, tune()'s one check pass left out"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("pruning_savings", f"Pruning savings ({n_trials} seeded trials)", rows,
                  ["task", "pruning", "steps", "steps_vs_off", "best_value", "best_vs_off",
                   "complete", "pruned", "failed", "prune_reasons", "plateau_replay", "seconds"],
                  targets, meta, **kwargs)


if __name__ == "__main__":
    run()
