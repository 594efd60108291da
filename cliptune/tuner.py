"""``tune()``: check the inputs, make or load the study, run the trials, return a TuneResult."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from cliptune._errors import check_positive_float, check_positive_int, unknown_name
from cliptune.backends import TrainSettings, framework_of, get_backend
from cliptune.config import ClipConfig
from cliptune.data import Splits, make_splits
from cliptune.space import SearchSpace, config_from_params
from cliptune.stability import StabilityPruner, TrialMonitor
from cliptune.tracking import Tracker, make_tracker, storage_label

if TYPE_CHECKING:
    import pandas as pd

_METRICS = ("val_loss", "train_loss")
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


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
        states = [t.state for t in study.get_trials(deepcopy=False)]
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


def _probe_backend(model_fn: Callable[..., Any], space: SearchSpace) -> str:
    """Call the factory once to learn its framework (and catch a bad factory early)."""
    if not callable(model_fn):
        raise TypeError("The 'model_fn' parameter of tune must be a callable returning a fresh "
                        f"model. Got {type(model_fn).__name__} instead.")
    n_args = len(inspect.signature(model_fn).parameters)
    if n_args > 1:
        raise TypeError("model_fn must take no argument or one (the dict of co-tuned extras). "
                        f"It takes {n_args}.")
    model = model_fn(space.default_extras()) if n_args else model_fn()
    framework = framework_of(model)
    if framework is None:
        raise TypeError("model_fn must return a torch.nn.Module or a Keras model. "
                        f"Got {type(model).__name__} instead.")
    return framework


def tune(
    model_fn: Callable[..., Any],
    data: Any,
    *,
    loss: str | Callable[..., Any] = "mse",
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
            ``{"train": ..., "val": ...}``, or a pair of framework datasets.
        loss: ``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"`` or a callable.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or a callable
            ``(params, lr) -> optimizer``. An extra named ``lr`` overrides ``lr``.
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
    tracker = make_tracker(tracking, tracking_uri, experiment, tracker)
    space = SearchSpace.resolve(search_space)
    splits = make_splits(data, val_fraction, seed)
    framework = _probe_backend(model_fn, space)
    backend = get_backend(framework)
    settings = TrainSettings(loss, optimizer, float(lr), epochs, batch_size, device, seed)
    backend.check(model_fn, space.default_extras(), splits, settings)

    stability_pruner = _build_pruner(pruner)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and tracker report
    study = optuna.create_study(
        storage=storage, sampler=sampler or _default_sampler(seed), pruner=stability_pruner,
        study_name=study_name or (f"cliptune-{_model_name(model_fn)}" if storage else None),
        direction=direction, load_if_exists=True)
    study.set_user_attr("cliptune.search_space", space.to_dict())
    study.set_user_attr("cliptune.backend", framework)
    job = {"model": _model_name(model_fn), "backend": framework, "loss": str(loss),
           "optimizer": str(optimizer), "lr": lr, "epochs": epochs, "batch_size": batch_size,
           "search_space": space.name, "n_trials": n_trials, "seed": seed,
           "sampler": type(study.sampler).__name__,
           "pruner": type(stability_pruner.pruner).__name__, "storage": storage_label(storage)}
    runner = _Runner(backend, model_fn, splits, space, settings, stability_pruner, metric,
                     objective, tracker)
    remaining = n_trials - sum(t.state in _FINISHED for t in study.get_trials(deepcopy=False))
    tracker.start(study, job)
    if remaining > 0:
        runner.run(study, remaining, n_trials, timeout,
                   sys.stderr.isatty() if show_progress is None else show_progress, callbacks)
    tracker.finish(study)
    runner.raise_if_all_failed()
    return TuneResult.from_study(study)


class _Runner:
    """The objective and the loop around ``study.optimize`` for one tune() call."""

    def __init__(self, backend: Any, model_fn: Callable[..., Any], splits: Splits,
                 space: SearchSpace, settings: TrainSettings, pruner: StabilityPruner,
                 metric: str, objective: str, tracker: Tracker) -> None:
        self.backend, self.model_fn, self.splits, self.space = backend, model_fn, splits, space
        self.settings, self.pruner, self.metric, self.objective = settings, pruner, metric, objective
        self.tracker = tracker
        self.errors: list[str] = []
        self.n_ran = 0

    def __call__(self, trial: optuna.Trial) -> float:
        self.n_ran += 1
        clip, extras = self.space.suggest(trial)
        self.tracker.trial_started(trial, clip, extras)
        number = trial.number
        monitor = TrialMonitor(trial, self.pruner.rules, self.metric, self.objective,
                               on_epoch=lambda e, s: self.tracker.epoch(number, e, s))
        seed = None if self.settings.seed is None else self.settings.seed + number
        try:
            self.backend.train(self.model_fn, self.splits, clip, extras, self.settings, monitor,
                               seed)
            value = monitor.value()
        except optuna.TrialPruned:
            self.tracker.trial_finished(number, "PRUNED",
                                        reason=trial.user_attrs.get("prune_reason", "unpromising"))
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.errors.append(error)
            trial.set_user_attr("error", error)
            self.tracker.trial_finished(number, "FAIL", error=error)
            raise
        finally:  # once per trial, for the plots (a storage write per epoch is costly)
            trial.set_user_attr("history", monitor.history)
        self.tracker.trial_finished(number, "COMPLETE", value=value)
        return value

    def run(self, study: optuna.Study, remaining: int, total: int, timeout: float | None,
            progress: bool,
            extra: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None) -> None:
        callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [
            optuna.study.MaxTrialsCallback(total, states=_FINISHED), *(extra or ())]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=total - remaining, desc="cliptune", unit="trial")
            callbacks.append(lambda s, t: _advance(bar, s))
        try:
            study.optimize(self, n_trials=remaining, timeout=timeout, catch=(Exception,),
                           callbacks=callbacks)
        finally:
            if bar is not None:
                bar.close()

    def raise_if_all_failed(self) -> None:
        if self.n_ran and len(self.errors) == self.n_ran:
            raise RuntimeError(f"All {self.n_ran} trials failed; the first error was: "
                               f"{self.errors[0]}")


def _advance(bar: Any, study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    values = [t.value for t in trials if t.state is TrialState.COMPLETE]
    best = (min if study.direction == optuna.study.StudyDirection.MINIMIZE else max)(
        values, default=math.nan)
    pruned = sum(t.state is TrialState.PRUNED for t in trials)
    bar.set_postfix(best=f"{best:.4g}", pruned=pruned, refresh=False)
    bar.update(1)
