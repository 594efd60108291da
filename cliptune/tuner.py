"""``tune()``: check the inputs, make or load the study, run the trials, return a TuneResult."""

from __future__ import annotations

import inspect
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from cliptune._errors import check_positive_float, check_positive_int, unknown_name
from cliptune.backends import TrainSettings, call_factory, framework_of, get_backend
from cliptune.config import ClipConfig
from cliptune.data import make_splits
from cliptune.parallel import run_workers, threads_per_worker
from cliptune.probe import job_params, resolve_auto
from cliptune.refit import refit_best
from cliptune.runner import SURPLUS_ATTR, TrialRunner
from cliptune.space import SearchSpace, config_from_params
from cliptune.stability import StabilityPruner
from cliptune.storage import Heartbeat, open_storage, storage_label
from cliptune.tracking import Tracker, make_tracker

if TYPE_CHECKING:
    import pandas as pd

_METRICS = ("val_loss", "train_loss")


@dataclass
class TuneResult:
    """What a tuning job found. ``best_*`` are None when no trial completed."""

    study: optuna.Study
    best_config: ClipConfig | None
    best_extras: dict[str, Any]
    best_value: float | None
    best_params: dict[str, Any]
    n_complete: int
    n_pruned: int
    n_failed: int
    model: Any = None

    @classmethod
    def from_study(cls, study: optuna.Study) -> TuneResult:
        states = [t.state for t in study.get_trials(deepcopy=False)
                  if not t.user_attrs.get(SURPLUS_ATTR)]
        complete = states.count(TrialState.COMPLETE)
        config, extras, value, params = None, {}, None, {}
        if complete:
            best = study.best_trial
            config, extras = config_from_params(best.params)
            value, params = best.value, dict(best.params)
        return cls(study, config, extras, value, params, complete,
                   states.count(TrialState.PRUNED), states.count(TrialState.FAIL))

    def trials_dataframe(self) -> pd.DataFrame:
        """One row a trial: number, state, clip_mode, clip_threshold, extras, value, prune_reason."""
        import pandas as pd

        rows = []
        for t in self.study.get_trials(deepcopy=False):
            row: dict[str, Any] = {"number": t.number, "state": t.state.name}
            if "clip_mode" in t.params:
                clip, extras = config_from_params(t.params)
                row.update(clip_mode=clip.mode.value, clip_threshold=clip.threshold, **extras)
            row.update(value=t.value, prune_reason=t.user_attrs.get("prune_reason"),
                       error=t.user_attrs.get("error"),
                       duration_s=t.duration.total_seconds() if t.duration else None)
            rows.append(row)
        return pd.DataFrame(rows)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise unknown_name(f"{name!r} value", value, choices, "tune")


def _build_pruner(pruner: optuna.pruners.BasePruner | None) -> StabilityPruner:
    if pruner is None or isinstance(pruner, StabilityPruner):
        return pruner or StabilityPruner()
    return StabilityPruner(pruner)


def _default_sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    import warnings

    with warnings.catch_warnings():  # ``group`` is marked experimental; it handles our
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # conditional space
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=10)


def _model_name(model_fn: Callable[..., Any]) -> str:
    return getattr(model_fn, "__qualname__", None) or type(model_fn).__name__


def _probe_backend(model_fn: Callable[..., Any], space: SearchSpace) -> tuple[str, Any]:
    """Call the factory once to learn its framework (and catch a bad factory early)."""
    if not callable(model_fn):
        raise TypeError("The 'model_fn' parameter of tune must be a callable returning a fresh "
                        f"model. Got {type(model_fn).__name__} instead.")
    n_args = len(inspect.signature(model_fn).parameters)
    if n_args > 1:
        raise TypeError("model_fn must take no argument or one (the dict of co-tuned extras). "
                        f"It takes {n_args}.")
    model = call_factory(model_fn, space.default_extras())
    framework = framework_of(model)
    if framework is None:
        raise TypeError("model_fn must return a torch.nn.Module or a Keras model. "
                        f"Got {type(model).__name__} instead.")
    return framework, model


def tune(
    model_fn: Callable[..., Any],
    data: Any,
    *,
    loss: str | Callable[..., Any] | None = None,
    optimizer: str | Callable[..., Any] = "sgd",
    lr: float = 0.01,
    epochs: int = 10,
    batch_size: int = 64,
    search_space: SearchSpace | str | dict[str, Any] = "default",
    n_trials: int = 20,
    timeout: float | None = None,
    metric: str = "val_loss",
    direction: str = "minimize",
    objective: str = "last",
    val_fraction: float = 0.2,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    seed: int | None = None,
    device: str = "cpu",
    show_progress: bool | None = None,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "cliptune",
    tracker: Tracker | None = None,
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
    n_jobs: int = 1,
    heartbeat: Heartbeat | None = Heartbeat(),
    refit: bool = False,
    probe_steps: int = 200,
    _worker_index: int = 0,
) -> TuneResult:
    """Search the gradient-clipping mode and threshold (and any extras) for a model.

    Each trial builds a fresh model with ``model_fn``, trains it ``epochs`` epochs with the trial's
    clip, and is worth the validation loss at its last epoch (``objective="best"``: at its best
    epoch). Unstable trials (non-finite, diverging or spiking loss) are pruned at once, with the
    reason in the trial's user attribute ``prune_reason``; unpromising ones by the wrapped pruner.

    Args:
        model_fn: Zero-argument factory returning a fresh ``torch.nn.Module`` or Keras model, or a
            one-argument factory taking the dict of co-tuned extras.
        data: ``(X, y)`` arrays (split with ``val_fraction``), ``((X_tr, y_tr), (X_val, y_val))``,
            ``{"train": ..., "val": ...}``, or a pair of framework datasets (torch ``Dataset`` or
            ``DataLoader``; ``tf.data.Dataset``s already batched, as for ``model.fit``).
        loss: ``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"`` or a callable (torch:
            ``loss(output, target)``; Keras: ``loss(y_true, y_pred)`` or a Keras loss).
            ``None``: a compiled Keras model keeps its own loss, anything else uses ``"mse"``.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or a callable: torch
            ``(params, lr) -> optimizer``; Keras, an optimizer class or factory called as
            ``optimizer(learning_rate=lr, **clip_kwargs)``. An extra named ``lr`` overrides
            ``lr``; extras ``momentum`` and ``weight_decay`` reach the optimizer.
        search_space: A shipped name (``"default"``, ``"rnn"``, ...), a YAML path, a dict or a
            :class:`SearchSpace`.
        n_trials: The study's total number of finished trials: a second call on the same storage
            and study runs only what is missing.
        storage: Any Optuna storage URL or object; ``None`` keeps the study in memory.
        study_name: Name of the study in ``storage`` (default ``cliptune-<model_fn name>``).
        seed: Seeds the sampler, the split and each trial's training (``seed + trial number``).
        show_progress: A progress bar; on by default when stderr is a terminal.
        callbacks: Called after each trial, as in ``Study.optimize`` (``study.stop()`` in one
            ends the job once that trial is recorded).
        tracking: Record the job in MLflow: a parent run, a nested run per trial (see
            :class:`cliptune.tracking.MlflowTracker`). ``False`` records nothing.
        tracking_uri: MLflow tracking URI; by default ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db`` in the working folder (a plain ``mlflow ui`` there shows it).
        experiment: Name of the MLflow experiment.
        tracker: A custom :class:`cliptune.tracking.Tracker`; replaces ``tracking*``.
        n_jobs: Worker processes running trials at once on this machine (``spawn``ed, so
            ``model_fn`` must be importable, a module-level function, and the data picklable).
            Without a ``storage`` they share a temporary journal file.
        heartbeat: With a storage URL, how often running trials say they are alive, and how long
            silence means their worker died (their trial is then failed and retried). ``None``
            turns heartbeats off.
        refit: Then train the best config on train plus validation data (see
            :mod:`cliptune.refit`), return it as ``result.model`` and log it to the MLflow run.
        probe_steps: Most steps of the probe that sets ``threshold: auto`` ranges (at most one
            epoch; see :mod:`cliptune.probe`).

    Returns:
        A :class:`TuneResult`.

    Example:
        >>> result = cliptune.tune(make_model, (X, y), epochs=8, n_trials=20, seed=0)  # doctest: +SKIP
        >>> result.best_config                                                        # doctest: +SKIP
        ClipConfig(mode='global_norm', threshold=0.83)
    """
    check_positive_int(n_trials, "n_trials")
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_positive_float(lr, "lr", "tune")
    if timeout is not None:
        check_positive_float(timeout, "timeout", "tune")
    _check_choice(metric, "metric", _METRICS)
    _check_choice(direction, "direction", ("minimize", "maximize"))
    _check_choice(objective, "objective", ("last", "best"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"The 'seed' parameter of tune must be an int or None. Got {seed!r} instead.")
    check_positive_int(n_jobs, "n_jobs")
    check_positive_int(probe_steps, "probe_steps")
    if not isinstance(refit, bool):
        raise TypeError(f"The 'refit' parameter of tune must be a bool. Got {refit!r} instead.")
    if heartbeat is not None and not isinstance(heartbeat, Heartbeat):
        raise TypeError("The 'heartbeat' parameter of tune must be a cliptune Heartbeat or None. "
                        f"Got {type(heartbeat).__name__} instead.")
    if n_jobs > 1 and storage is None:  # before any work: the call it makes does it all once
        return _tune_in_memory_by_workers(locals())
    job_tracker = make_tracker(tracking, tracking_uri, experiment, tracker)
    space = SearchSpace.resolve(search_space)
    splits = make_splits(data, val_fraction, seed)
    framework, first_model = _probe_backend(model_fn, space)
    backend = get_backend(framework)
    threads = threads_per_worker(n_jobs) if n_jobs > 1 else None
    settings = TrainSettings(loss, optimizer, float(lr), epochs, batch_size, device, seed, threads)
    if not _worker_index:
        backend.check(model_fn, space.default_extras(), splits, settings, model=first_model)
    del first_model  # not kept alive through the study
    opened = open_storage(storage, heartbeat)

    stability_pruner = _build_pruner(pruner)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and tracker report
    worker_seed = None if seed is None else seed + 7919 * _worker_index  # workers sample apart
    study = optuna.create_study(
        storage=opened, sampler=sampler or _default_sampler(worker_seed), pruner=stability_pruner,
        study_name=study_name or (f"cliptune-{_model_name(model_fn)}" if storage else None),
        direction=direction, load_if_exists=True)
    space, probe_info = resolve_auto(space, study, backend, model_fn, splits, settings,
                                     probe_steps, quiet=bool(_worker_index))
    if not _worker_index:
        study.set_user_attr("cliptune.search_space", space.to_dict())
        study.set_user_attr("cliptune.backend", framework)
    job = {"model": _model_name(model_fn), "backend": framework, "loss": str(loss),
           "optimizer": str(optimizer), "lr": lr, "epochs": epochs, "batch_size": batch_size,
           "search_space": space.name, "n_trials": n_trials, "seed": seed,
           "sampler": type(study.sampler).__name__,
           "pruner": type(stability_pruner.pruner).__name__, "storage": storage_label(storage),
           "n_jobs": n_jobs, "refit": refit, **job_params(probe_info)}
    runner = TrialRunner(backend, model_fn, splits, space, settings, stability_pruner, metric,
                         objective, job_tracker, n_trials, heartbeat if storage is not None else None)
    job_tracker.start(study, job)
    progress = sys.stderr.isatty() if show_progress is None else show_progress
    try:
        if n_jobs > 1:
            worker_kwargs = {**_worker_kwargs(locals()), "storage": opened,
                             "study_name": study.study_name}
            run_workers(n_jobs, worker_kwargs,
                        lambda: runner.run(study, timeout, progress, callbacks or ()))
        else:
            runner.run(study, timeout, progress and not _worker_index, callbacks or ())
        model = refit_best(study, backend, model_fn, splits, settings, stability_pruner.rules,
                           job_tracker) if refit and not _worker_index else None
    finally:  # interrupted too: the parent run gets the best so far and is closed
        job_tracker.finish(study)
    runner.raise_if_all_failed()
    result = TuneResult.from_study(study)
    result.model = model
    return result


_TUNE_ARGS = tuple(inspect.signature(tune).parameters)


def _worker_kwargs(scope: dict[str, Any]) -> dict[str, Any]:
    """tune()'s own arguments, for a worker process (which checks nothing twice and shows no bar)."""
    kwargs = {name: scope[name] for name in _TUNE_ARGS if name != "_worker_index"}
    splits = scope["splits"]  # the same split, and no scikit-learn import in each worker
    kwargs.update(data=(splits.train, splits.val), n_jobs=1, show_progress=False, callbacks=None,
                  refit=False)
    return kwargs


def _tune_in_memory_by_workers(scope: dict[str, Any]) -> TuneResult:
    """n_jobs > 1 without a storage: the workers share a temporary journal; the result is in memory."""
    with tempfile.TemporaryDirectory(prefix="cliptune-") as folder:
        kwargs = {name: scope[name] for name in _TUNE_ARGS}
        name = kwargs["study_name"] or f"cliptune-{_model_name(kwargs['model_fn'])}"
        result = tune(**{**kwargs, "storage": f"journal:{folder}/study.log", "study_name": name})
        memory = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=name, from_storage=result.study._storage,
                          to_storage=memory)
        study = optuna.load_study(study_name=name, storage=memory)
    out = TuneResult.from_study(study)
    out.model = result.model
    return out
