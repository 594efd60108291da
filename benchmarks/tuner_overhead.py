"""Tuner overhead: the time a trial costs outside training (sampling, storage, reports, tracking).

Why: with small models a study runs hundreds of short trials, so what tune() adds per trial must
stay small next to Optuna's and MLflow's own costs, and cliptune's own share must be negligible.

Method. ``tune()`` runs 20 trials of 10 epochs on a near-free task (a 2-weight linear model, one
batch per epoch), so every trial makes 10 ``trial.report`` + ``should_prune`` calls like a real
one. A trial's wall time is the interval between consecutive trial starts in the study (median over
the trials). Subtracted from it:

- ``train_ms``: the same training run directly by ``TorchBackend.train`` with a do-nothing monitor;
- ``optuna_ms``: a bare Optuna loop on the same storage, sampler and pruner replaying the same
  calls (suggest mode and threshold, each trial's reports with a ``should_prune`` after each, one
  user attribute, the same end);
- ``mlflow_ms``: the 3 MLflow calls of one tracked trial made directly with ``MlflowClient`` (create
  the nested run with its tags; one ``log_batch`` of its params, 50 metrics and end tags;
  terminate it) on the same sqlite store.

``outside_ms`` = trial - train is what a user pays per trial; ``residual_ms`` = trial - train -
optuna - mlflow is what the parts do not explain, noise included (it can be negative: the parts
are medians of separate runs on a shared disk). ``cliptune_own_ms`` is measured directly instead:
the profiled self time of cliptune's functions (the monitor, the runner, the tracker's
bookkeeping; backends left out) per trial, an upper bound since profiling slows Python most.

    python -m benchmarks tuner_overhead
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import median, report, setup_torch, target

EPOCHS = 10
N_TRIALS = 20
CONFIGS = [  # (label, optuna storage kind, mlflow tracking on)
    ("in-memory", "memory", False),
    ("in-memory + sqlite MLflow", "memory", True),
    ("journal file", "journal", False),
    ("journal file + sqlite MLflow", "journal", True),
    ("SQLite", "sqlite", False),
    ("SQLite + sqlite MLflow", "sqlite", True),
]


def _model() -> Any:
    import torch

    return torch.nn.Linear(2, 1)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2)).astype(np.float32)
    return X, X.sum(axis=1, keepdims=True)


def _storage(kind: str, folder: Path) -> Any:
    if kind == "memory":
        return None
    if kind == "journal":
        return f"journal:{folder / 'optuna.journal'}"
    return f"sqlite:///{folder / 'optuna.db'}"


def _bare_storage(kind: str, folder: Path) -> Any:
    """The same storage for a bare Optuna study (Optuna itself has no ``journal:`` URL)."""
    import optuna

    url = _storage(kind, folder)
    if kind == "journal":
        path = url.removeprefix("journal:")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    return url


def _intervals_ms(study: Any) -> float:
    """Median ms between consecutive trial starts: one whole trial cycle each."""
    starts = sorted(t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start)
    return median([(b - a).total_seconds() * 1e3 for a, b in zip(starts, starts[1:], strict=False)])


def _tune(kind: str, tracking: bool, folder: Path, mlflow_db: Path) -> Any:
    import cliptune

    with contextlib.redirect_stderr(io.StringIO()):  # the tracker's links to the MLflow UI
        return cliptune.tune(_model, _data(), epochs=EPOCHS, batch_size=64, n_trials=N_TRIALS,
                             seed=0, storage=_storage(kind, folder), study_name="bench",
                             tracking=tracking, tracking_uri=f"sqlite:///{mlflow_db}",
                             experiment=f"bench-{folder.name}", show_progress=False,
                             baselines=False, confirm=0)  # trial for trial what the bare loop runs


Script = list[tuple[list[float], bool, Any]]  # per trial: its reports, pruned?, its value


def tune_trial_ms(kind: str, tracking: bool, folder: Path, mlflow_db: Path) -> tuple[float, Script]:
    """ms per trial of tune(), and what each trial reported (for the bare loop to replay)."""
    study = _tune(kind, tracking, folder, mlflow_db).study
    script = [([t.intermediate_values[k] for k in sorted(t.intermediate_values)],
               t.state.name == "PRUNED", t.value) for t in study.get_trials(deepcopy=False)]
    return _intervals_ms(study), script


def own_code_ms(tracking: bool, folder: Path, mlflow_db: Path) -> float:
    """Self time of cliptune's functions per trial, backends (training) left out, by cProfile.

    The profiler slows pure-Python code the most, so this is an upper bound of cliptune's share.
    """
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    _tune("memory", tracking, folder, mlflow_db)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    own = sum(tottime for (path, _, _), (_, _, tottime, _, _) in stats.items()
              if "/cliptune/" in path and "/backends/" not in path)
    return own / N_TRIALS * 1e3


def optuna_trial_ms(kind: str, folder: Path, script: Script) -> float:
    """The Optuna calls of tune()'s trials, replayed by a bare objective.

    Trial ``i`` reports the values tune()'s trial ``i`` reported, asks ``should_prune`` after each
    (the same pruner, so the same reads) and ends as that trial did; the sampler therefore sees
    the same history and samples the same parameters.
    """
    import optuna

    from cliptune import SearchSpace
    from cliptune._study import default_sampler

    space = SearchSpace.shipped("default")
    study = optuna.create_study(storage=_bare_storage(kind, folder), study_name="bare",
                                sampler=default_sampler(0), pruner=cliptune_pruner())
    history = [{"train_loss": 1.0, "val_loss": 1.0, "grad_norm_mean": 1.0, "grad_norm_max": 1.0,
                "clip_fraction": 0.0}] * EPOCHS

    def objective(trial: optuna.Trial) -> float:
        space.suggest(trial)
        values, pruned, value = script[trial.number]
        for epoch, value in enumerate(values):
            trial.report(value, epoch)
            trial.should_prune()
        trial.set_user_attr("history", history[:len(values)])
        if pruned:
            raise optuna.TrialPruned()
        return value  # (a duplicate of a finished trial reported nothing: its twin's value)

    study.optimize(objective, n_trials=N_TRIALS)
    return _intervals_ms(study)


def cliptune_pruner() -> Any:
    from cliptune import StabilityPruner

    return StabilityPruner()


def mlflow_trial_ms(folder: Path, mlflow_db: Path, n: int = 20) -> float:
    """One tracked trial's MLflow calls, made directly on a sqlite store."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    exp = client.create_experiment(f"bare-{folder.name}")
    parent = client.create_run(exp).info.run_id
    times = []
    for i in range(n):
        start = time.perf_counter()
        run = client.create_run(exp, run_name=f"trial-{i} norm=0.5", tags={
            "mlflow.parentRunId": parent, "cliptune.study": "bare", "optuna.trial_number": str(i),
            "cliptune.state": "RUNNING"})
        rid = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, 1.0, now, e) for e in range(EPOCHS)
                   for k in ("train_loss", "val_loss", "grad_norm_mean", "grad_norm_max",
                             "clip_fraction")]
        metrics.append(Metric("value", 1.0, now, 0))
        client.log_batch(rid, metrics=metrics, params=[Param("clip_mode", "norm"),
                                                       Param("clip_threshold", "0.5")],
                         tags=[RunTag("cliptune.state", "COMPLETE")], synchronous=True)
        client.set_terminated(rid, "FINISHED")
        times.append(time.perf_counter() - start)
    return median(times) * 1e3


def train_ms(n: int = 20) -> float:
    """The trial's training alone: the built-in loop with a monitor that does nothing."""
    from benchmarks._common import train_one
    from cliptune import ClipConfig
    from cliptune.data import make_splits

    class _Null:
        metric, history = "val_loss", []

        def step(self, *args: Any) -> None:
            pass

        def epoch(self, epoch: int, metrics: Any = None) -> None:
            pass

    splits = make_splits(_data(), 0.2, 0)
    times = []
    for i in range(n):
        start = time.perf_counter()
        train_one("torch", _model, splits, ClipConfig("norm", 1.0), _Null(), i, loss="mse",
                  optimizer="sgd", lr=0.01, epochs=EPOCHS, batch_size=64)
        times.append(time.perf_counter() - start)
    return median(times) * 1e3


def run(rounds: int = 3, out_dir: Any = None) -> dict[str, Any]:
    """Each configuration ``rounds`` times (configurations interleaved), medians kept."""
    import logging

    import mlflow  # noqa: F401  (configures its loggers on import; quiet them after)

    setup_torch()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    samples: dict[str, dict[str, list[float]]] = {
        label: {"trial": [], "optuna": [], "mlflow": [], "train": []} for label, _, _ in CONFIGS}
    own: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="cliptune-bench-") as tmp:
            mlflow_db = Path(tmp) / "mlflow.db"  # one MLflow store a round: its schema takes seconds
            for i, (label, kind, tracking) in enumerate(CONFIGS):
                folder = Path(tmp) / f"c{i}"
                folder.mkdir()
                s = samples[label]
                s["train"].append(train_ms())
                trial_ms, script = tune_trial_ms(kind, tracking, folder, mlflow_db)
                s["trial"].append(trial_ms)
                s["optuna"].append(optuna_trial_ms(kind, folder, script))
                s["mlflow"].append(mlflow_trial_ms(folder, mlflow_db) if tracking else 0.0)
            for key, tracking in (("off", False), ("on", True)):
                folder = Path(tmp) / f"own-{key}"
                folder.mkdir()
                own[key].append(own_code_ms(tracking, folder, mlflow_db))
    rows = []
    for label, kind, tracking in CONFIGS:
        m = {k: median(v) for k, v in samples[label].items()}
        rows.append({"config": label, "trial_ms": m["trial"], "train_ms": m["train"],
                     "outside_ms": m["trial"] - m["train"], "optuna_ms": m["optuna"],
                     "mlflow_ms": m["mlflow"],
                     "residual_ms": m["trial"] - m["train"] - m["optuna"] - m["mlflow"],
                     "cliptune_own_ms": median(own["on" if tracking else "off"]),
                     "storage": kind, "tracking": tracking})
    by = {r["config"]: r for r in rows}
    fast = max(by["in-memory + sqlite MLflow"]["outside_ms"],
               by["journal file + sqlite MLflow"]["outside_ms"])
    slow = by["SQLite + sqlite MLflow"]["outside_ms"]
    own_ms = max(median(own["off"]), median(own["on"]))
    targets = [
        target("ms/trial outside training, in-memory or journal + sqlite MLflow (worst)", fast,
               "<= 20", fast <= 20),
        target("ms/trial outside training, SQLite + sqlite MLflow", slow, "<= 60", slow <= 60),
        target("cliptune's own ms/trial (profiled self time, tracking on or off)", own_ms, "<= 1",
               own_ms <= 1),
    ]
    meta = {"trials": N_TRIALS, "epochs": EPOCHS, "rounds": rounds,
            "timing": "wall time; median interval between trial starts; parts measured directly"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("tuner_overhead", "Tuner overhead per trial (ms)", rows,
                  ["config", "trial_ms", "train_ms", "outside_ms", "optuna_ms", "mlflow_ms",
                   "residual_ms", "cliptune_own_ms"], targets, meta, **kwargs)


if __name__ == "__main__":
    run()
