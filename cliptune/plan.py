"""A tuning job's plan: everything checked once, before anything is created, and picklable.

``tune(model_fn, data)`` and ``tune_loop(train)`` both end here: their settings are checked
(:mod:`cliptune.settings`), what depends on more than one setting is checked too (the metric a loop
can report, the direction), and the train function is fixed: the user's own, or a built-in loop
(:mod:`cliptune.backends`) after one check pass on a batch. Worker processes receive the plan.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cliptune.backends import call_factory, framework_of, make_task
from cliptune.data import make_splits
from cliptune.settings import Settings
from cliptune.space import SearchSpace
from cliptune.storage import storage_label

_MAXIMIZED = ("val_accuracy",)
_SCORE_WORDS = re.compile(r"acc|auc|f1|precision|recall|score|reward|bleu|rouge|map\b|r2")
SMALL_MODEL = 100_000  # parameters below which a trial trains on one thread (benchmarks/threads.py)


@dataclass(frozen=True)
class Plan:
    """A validated tuning job, ready for the runner of any worker process."""

    train: Callable[..., Any]  # the user's train(trial), or a built-in task
    settings: Settings
    space: SearchSpace
    direction: str
    name: str  # what the job trains, "module:qualname", for labels and the default study name
    backend: str | None  # "torch" / "keras" for tune(), None for a user's loop

    @property
    def study_name(self) -> str | None:
        s = self.settings.study
        if s.study_name:
            return s.study_name
        return f"cliptune-{self.name.rpartition(':')[2]}" if s.storage is not None else None

    def with_space(self, space: SearchSpace) -> Plan:
        return replace(self, space=space)

    def job_params(self) -> dict[str, Any]:
        """What the MLflow parent run records of the job's settings."""
        s = self.settings
        params: dict[str, Any] = {"model" if self.backend else "train": self.name,
                                  "backend": self.backend or "user loop"}
        if self.backend:
            t = s.training
            params.update(loss=str(t.loss), optimizer=str(t.optimizer), lr=t.lr, epochs=t.epochs,
                          batch_size=t.batch_size, threads=getattr(self.train, "threads", None))
        params.update(search_space=self.space.name, n_trials=s.search.n_trials, seed=s.search.seed,
                      metric=s.search.metric, direction=self.direction,
                      objective=s.search.objective, storage=storage_label(s.study.storage),
                      n_jobs=s.study.n_jobs, refit=s.run.refit)
        return params


def qualified_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a function or class, as a job file would reference it."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}:{name}" if module and module != "__main__" else name


def resolve_direction(metric: str, direction: str | None, owner: str) -> str:
    """The study's direction: given, or inferred from a known metric; never guessed for a score."""
    if direction is not None:
        return direction
    if metric in _MAXIMIZED:
        return "maximize"
    if _SCORE_WORDS.search(metric.lower()) and "loss" not in metric.lower():
        raise ValueError(f"The metric {metric!r} of {owner} reads like a score to maximise; pass "
                         "direction='maximize' (or direction='minimize' if lower is better).")
    return "minimize"


def _check_factory(model_fn: Any) -> None:
    if not callable(model_fn):
        raise TypeError("The 'model_fn' parameter of tune must be a callable returning a fresh "
                        f"model. Got {type(model_fn).__name__} instead.")
    if framework_of(model_fn) is not None:  # a model instance is callable too
        raise TypeError(f"model_fn is a model ({type(model_fn).__name__}), but tune needs a "
                        "factory that returns a fresh model for each trial: pass "
                        f"lambda: {type(model_fn).__name__}(...) or the class itself.")
    params = inspect.signature(model_fn).parameters.values()
    required = [p for p in params if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise TypeError("model_fn must take no argument or one (the dict of co-tuned extras). "
                        f"It takes {len(required)}.")


def _metrics_of(settings: Settings) -> list[str]:
    """The metrics the built-in loops report with these settings."""
    t = settings.training
    names = ["val_loss", "train_loss"]
    if t.loss in ("cross_entropy", "bce_with_logits"):
        names.append("val_accuracy")
    return names + [f"val_{name}" for name in t.metrics]


def _threads(settings: Settings, n_params: int) -> int:
    """Intra-op threads per trial: the setting, else one for a small model (see settings)."""
    if settings.training.threads is not None:
        return settings.training.threads
    cores = max(1, (os.cpu_count() or 1) // settings.study.n_jobs)
    return 1 if n_params < SMALL_MODEL else cores


def _n_params(model: Any) -> int:
    if hasattr(model, "count_params"):
        return int(model.count_params())
    return sum(p.numel() for p in model.parameters())


def plan_tune(model_fn: Callable[..., Any], data: Any, settings: Settings) -> Plan:
    """Check ``tune``'s inputs once (one forward/backward pass included) and fix its loop."""
    from cliptune._errors import unknown_name

    _check_factory(model_fn)
    search, training = settings.search, settings.training
    metrics = _metrics_of(settings)
    if search.metric not in metrics:
        raise unknown_name("'metric' value", search.metric, metrics, "tune")
    direction = resolve_direction(search.metric, search.direction, "tune")
    space: SearchSpace = search.search_space
    splits = make_splits(data, training.val_fraction, search.seed)
    model = call_factory(model_fn, space.default_extras())
    framework = framework_of(model)
    if framework is None:
        raise TypeError("model_fn must return a torch.nn.Module or a Keras model. "
                        f"Got {type(model).__name__} instead.")
    if framework == "keras" and training.metrics:
        raise ValueError("The 'metrics' parameter of tune works with torch models; compile a "
                         "Keras model with its metrics instead.")
    task = make_task(framework, model_fn, splits, training, threads=None)
    task.check(space.default_extras(), model=model)
    task = replace(task, threads=_threads(settings, _n_params(model)))  # type: ignore[type-var]
    return Plan(task, settings, space, direction, qualified_name(model_fn), framework)


def plan_loop(train: Callable[..., Any], settings: Settings) -> Plan:
    """Check ``tune_loop``'s inputs once: a callable taking the trial, a metric, a direction."""
    if not callable(train):
        raise TypeError("The 'train' parameter of tune_loop must be a callable train(trial). "
                        f"Got {type(train).__name__} instead.")
    try:
        params = inspect.signature(train).parameters.values()
    except (TypeError, ValueError):
        params = None
    if params is not None:
        required = [p for p in params if p.default is p.empty and p.kind in (
            p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_one = any(p.kind is p.VAR_POSITIONAL for p in params) or len(
            [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 1
        if len(required) > 1 or not takes_one:
            raise TypeError("The 'train' parameter of tune_loop must take one argument, the "
                            f"cliptune.Trial; {qualified_name(train)} takes "
                            f"{len(list(params))}.")
    search = settings.search
    direction = resolve_direction(search.metric, search.direction, "tune_loop")
    return Plan(train, settings, search.search_space, direction, qualified_name(train), None)


__all__ = ["Plan", "plan_loop", "plan_tune", "qualified_name", "resolve_direction"]
