"""Stability replay: do the step rules stop only runs that would have ended badly?

Why: a stability rule that stops a configuration which would have recovered is the costliest
mistake a tuner can make: the study never learns that the config is good, and the sampler steers
away from its region. ``pruning_savings`` sees this only through search trajectories that part
ways; here each run is trained to its end *without* rules, its step losses recorded, and the
rules are then replayed on those losses through a real :class:`cliptune.TrialMonitor`.

On each task of ``benchmarks/tasks.py``: the configs of ``search_quality``'s grid plus its fixed
defaults, each trained to its last epoch on one split (seed 0, as a study's trials share theirs)
with training seeds 0-3. A replayed stop is *false* when the run it stops ended among the best
quarter of its training seed's runs (a rank, since how far a useless run ends from the best
differs by task: 1.3x on adding_irnn, 3x on digits_rows). Rows compare the shipped
``StabilityRules()`` with the same rules counting spikes from the first step
(``spike_min_fall=0``, as before the gate). The replay feeds
step losses only: the gradient-norm and epoch-level checks are not in it.

    python -m benchmarks stability_replay
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from benchmarks._common import report, setup_torch, target
from benchmarks.search_quality import DEFAULTS, grid_configs, train_fully
from benchmarks.tasks import TASKS, Task

TRAIN_SEEDS = (0, 1, 2, 3)
GOOD = 0.25  # a stopped run that would have ended in this best share of its seed's runs


def _settings() -> dict[str, Any]:
    from cliptune import StabilityRules

    return {"shipped": StabilityRules(),
            "spikes from step 1": StabilityRules(spike_min_fall=0)}


def _configs() -> list[Any]:
    from cliptune import ClipConfig

    configs = {str(c): c for c in grid_configs(8)}
    for mode, threshold in DEFAULTS.values():
        configs.setdefault(str(ClipConfig(mode, threshold)), ClipConfig(mode, threshold))
    return list(configs.values())


def recorded_run(task: Task, clip: Any, train_seed: int) -> tuple[float, list[float]]:
    """``clip`` trained to its end without rules on split 0: its final value and step losses."""
    import optuna

    from cliptune.monitor import TrialMonitor

    losses: list[float] = []

    class Recording(TrialMonitor):
        def step(self, loss: float | None, *args: Any, **kwargs: Any) -> None:
            if loss is not None:
                losses.append(float(loss))
            super().step(loss, *args, **kwargs)

    monitor = Recording(optuna.create_study(pruner=optuna.pruners.NopPruner()).ask(), None,
                        metric=getattr(task, "metric", "val_loss"))
    return train_fully(task, clip, 0, train_seed, monitor=monitor), losses


def replay(losses: list[float], rules: Any) -> tuple[str, int] | None:
    """The reason and step at which ``rules`` stop a run with these step losses, or None."""
    import optuna

    from cliptune.monitor import TrialMonitor

    reporter = optuna.create_study(pruner=optuna.pruners.NopPruner()).ask()
    monitor = TrialMonitor(reporter, rules)
    for loss in losses:
        try:
            monitor.step(loss)
        except optuna.TrialPruned:
            return str(reporter.user_attrs.get("prune_reason")), monitor.steps
    return None


def task_rows(task: Task, configs: list[Any]) -> list[dict[str, Any]]:
    runs = []
    for seed in TRAIN_SEEDS:
        seed_runs = [recorded_run(task, clip, seed) for clip in configs]
        ranked = sorted(value for value, _ in seed_runs)
        good = ranked[max(1, round(GOOD * len(ranked))) - 1]
        runs += [(value / ranked[0] if math.isfinite(value) else math.inf, value <= good, losses,
                  clip) for (value, losses), clip in zip(seed_runs, configs, strict=True)]
    rows = []
    for name, rules in _settings().items():
        stops = [(ratio, good, stop, clip, len(losses)) for ratio, good, losses, clip in runs
                 if (stop := replay(losses, rules)) is not None]
        false = [(ratio, clip) for ratio, good, _, clip, _ in stops if good]
        rows.append({
            "task": task.name, "rules": name, "runs": len(runs), "stopped": len(stops),
            "reasons": " ".join(f"{k}:{v}" for k, v in sorted(
                Counter(stop[0] for _, _, stop, _, _ in stops).items())) or "-",
            "false_stops": len(false),
            "false_stop_configs": " | ".join(f"{str(c).removeprefix('ClipConfig')} {r:.2f}x"
                                             for r, c in false) or "-",
            "steps_saved": sum(n - stop[1] for _, _, stop, _, n in stops)
                           / sum(len(losses) for _, _, losses, _ in runs)})
    return rows


def run(tasks: tuple[str, ...] = tuple(TASKS), out_dir: Any = None) -> dict[str, Any]:
    setup_torch()
    configs = _configs()
    rows = [row for name in tasks for row in task_rows(TASKS[name](), configs)]
    shipped = [r for r in rows if r["rules"] == "shipped"]
    share = sum(r["false_stops"] for r in shipped) / sum(r["runs"] for r in shipped)
    targets = [target("runs the shipped step rules stop that would have ended in the best quarter "
                      "(share of all runs)", share, "<= 0.01", share <= 0.01)]
    meta = {"split_seed": 0, "train_seeds": list(TRAIN_SEEDS), "configs": [str(c) for c in configs],
            "false_stop": f"ended in the best {GOOD:.0%} of its seed's runs", "replayed": "step losses only"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("stability_replay", "Stability rules replayed on unpruned runs", rows,
                  ["task", "rules", "runs", "stopped", "reasons", "false_stops", "steps_saved",
                   "false_stop_configs"], targets, meta, **kwargs)


if __name__ == "__main__":
    run()
