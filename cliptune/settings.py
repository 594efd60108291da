"""Every setting of a tuning job, declared once: name, default, constraint, doc and job-file key.

The groups follow the job file's sections. ``tune``, ``tune_loop``, the job-file reader
(:mod:`cliptune.jobs`) and the scikit-learn estimators take their parameters from these
declarations: their signatures and docstrings are generated here, and one constraint checks a
value wherever it is given (:mod:`cliptune._checks`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import optuna

from cliptune import _checks as c
from cliptune import _setting_checks as sc
from cliptune._errors import did_you_mean
from cliptune.storage import Heartbeat
from cliptune.tracking import Tracker

LOSSES = ("mse", "cross_entropy", "bce_with_logits")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
ALL = frozenset({"tune", "tune_loop"})
BUILT_IN = frozenset({"tune"})  # settings of cliptune's own training loops


def _setting(default: Any, check: c.Check, doc: str, job: str | None = None,
             takes: frozenset[str] = ALL) -> Any:
    """A dataclass field that is a setting: its constraint, doc, job-file key and takers."""
    return field(default=default, metadata={"check": check, "doc": doc, "job": job,
                                            "takes": takes})


@dataclass(frozen=True)
class Training:
    """How cliptune's own loops train a trial (``tune`` and the estimators; not ``tune_loop``)."""

    loss: Any = _setting(
        None, c.optional(c.choice(LOSSES, callable_ok=True, what="a callable")),
        "``'mse'``, ``'cross_entropy'``, ``'bce_with_logits'`` or a callable (torch: "
        "``loss(output, target)``; Keras: ``loss(y_true, y_pred)``). None: a compiled Keras "
        "model keeps its own loss, anything else uses ``'mse'``.", "loss", BUILT_IN)
    optimizer: Any = _setting(
        "sgd", c.choice(OPTIMIZERS, callable_ok=True, what="a callable"),
        "A name, or a callable: torch ``(params, lr) -> optimizer``; Keras, an optimizer class "
        "or factory called with ``learning_rate``. Extras ``lr``, ``momentum`` and "
        "``weight_decay`` reach it.", "optimizer.name", BUILT_IN)
    lr: float = _setting(0.01, c.positive_float, "The learning rate (an extra ``lr`` overrides it).",
                         "optimizer.lr", BUILT_IN)
    epochs: int = _setting(10, c.positive_int, "Epochs a trial trains.", "epochs", BUILT_IN)
    batch_size: int = _setting(64, c.positive_int, "Rows a mini-batch (array data).", "batch_size",
                               BUILT_IN)
    val_fraction: float = _setting(0.2, c.fraction, "Share of ``(X, y)`` data held out for "
                                   "validation.", "val_fraction", BUILT_IN)
    device: str = _setting("cpu", c.text, "The torch device trials train on (torch only).",
                           "device", BUILT_IN)
    threads: int | None = _setting(
        None, c.optional(c.positive_int), "Intra-op threads of torch or TensorFlow in each "
        "worker. None: one for a model under 100k parameters (small models train faster on one "
        "thread, and far faster on a busy machine), else the cores shared by the workers.",
        "threads", BUILT_IN)
    metrics: dict[str, Any] = _setting(
        None, sc.metric_functions, "More validation metrics, ``{name: fn(outputs, targets)}``, "
        "reported each epoch as ``val_<name>``; ``val_accuracy`` comes built in for the "
        "classification losses.", None, BUILT_IN)


@dataclass(frozen=True)
class Search:
    """What is searched and what a trial is worth."""

    search_space: Any = _setting("default", sc.space, "A shipped name (``'default'``, ``'rnn'``, "
                                 "...), a YAML path, a dict or a :class:`SearchSpace`.",
                                 "search_space")
    n_trials: int = _setting(20, c.positive_int, "The study's total of finished trials: a rerun "
                             "on the same storage runs only what is missing.", "n_trials")
    timeout: float | None = _setting(None, c.optional(c.positive_float), "Seconds after which "
                                     "no new trial starts.", "timeout")
    seed: int | None = _setting(None, c.optional(c.integer), "Seeds the sampler, the split and "
                                "each trial (``trial.seed`` is ``seed + trial number``).", "seed")
    metric: str = _setting("val_loss", c.text, "The reported metric a trial is worth.", "metric")
    direction: str | None = _setting(
        None, c.optional(c.choice(("minimize", "maximize"))), "``'minimize'`` or "
        "``'maximize'``; None minimises losses and maximises ``val_accuracy``.", "direction")
    objective: str = _setting("last", c.choice(("last", "best")), "The metric at the last "
                              "reported epoch, or at the best one.", "objective")
    sampler: Any = _setting(None, c.optional(c.instance_of(
        "an Optuna sampler", lambda v: isinstance(v, optuna.samplers.BaseSampler))),
        "An Optuna sampler; by default a seeded multivariate TPE.")
    pruner: Any = _setting(None, c.optional(c.instance_of(
        "an Optuna pruner", lambda v: isinstance(v, optuna.pruners.BasePruner))),
        "An Optuna pruner for unpromising trials (wrapped in a :class:`StabilityPruner`), or a "
        "StabilityPruner.")
    probe_steps: int = _setting(200, c.positive_int, "Most steps of the probe that sets "
                                "``threshold: auto`` ranges.", "probe_steps")
    baselines: Any = _setting(
        True, sc.baselines, "Configs tried first, so the result is never worse than them: True for "
        "the usual ones (no clip, global norm 1.0, and the probe's mean gradient norm where a "
        "probe ran), False for none, or a list of ClipConfigs (or {mode, threshold} mappings).",
        "baselines")
    warm_start: Any = _setting(
        None, sc.warm_start, "Start from another run: the best configs of a study (an "
        "``optuna.Study``, a TuneResult or ``'NAME@STORAGE_URL'``) or a best-config YAML, tried "
        "first and marked ``cliptune.transferred``.", "warm_start")
    multi_fidelity: bool = _setting(
        False, c.boolean, "Successive halving: short budgets for many configs, full ones for "
        "few (Optuna's SuccessiveHalvingPruner under the stability rules); False: the "
        "MedianPruner. A ``pruner`` replaces both.", "multi_fidelity")
    confirm: Any = _setting(
        "auto", sc.confirm, "How many of the best configs are re-trained on fresh seeds before "
        "the winner is chosen by its mean (0: off; 'auto': 3 for tune() with 10 trials or "
        "more, else 0).", "confirm")
    confirm_seeds: int = _setting(1, c.positive_int, "Fresh seeds each confirmed config "
                                  "re-trains on.", "confirm_seeds")


@dataclass(frozen=True)
class Study:
    """Where the study lives and who works on it."""

    storage: Any = _setting(None, c.optional(c.instance_of(
        "an Optuna storage URL, a storage object or None",
        lambda v: isinstance(v, (str, optuna.storages.BaseStorage)))),
        "An Optuna storage URL (or ``journal:PATH``); None keeps the study in memory.",
        "study.storage")
    study_name: str | None = _setting(None, c.optional(c.text), "The study's name in the "
                                      "storage.", "study.name")
    heartbeat: Heartbeat | None = _setting(
        Heartbeat(), sc.heartbeat, "With a storage, how often running trials say they are alive "
        "and how long silence means their worker died (their trial is retried).",
        "study.heartbeat")
    n_jobs: int = _setting(1, c.positive_int, "Worker processes on this machine (spawned: the "
                           "train function or model factory must be importable).", "workers")
    continue_changed: bool = _setting(
        False, c.boolean, "Continue a study whose job changed since it last ran (another search "
        "space, epochs, seed, learning rate, ...), recording each version of its settings in the "
        "study. False: such a change is an error before any work, so that no study mixes trials "
        "that do not compare.", "study.continue_changed")


@dataclass(frozen=True)
class Tracking:
    """What MLflow records."""

    tracking: bool = _setting(True, c.boolean, "Record a parent run and a nested run per trial "
                              "in MLflow.", "tracking.enabled")
    tracking_uri: str | None = _setting(None, c.optional(c.text), "MLflow tracking URI; by "
                                        "default ``MLFLOW_TRACKING_URI``, else "
                                        "``sqlite:///mlflow.db`` here.", "tracking.uri")
    experiment: str = _setting("cliptune", c.text, "The MLflow experiment.",
                               "tracking.experiment")
    tracker: Any = _setting(None, c.optional(c.instance_of(
        "a cliptune Tracker", lambda v: isinstance(v, Tracker))),
        "A custom :class:`Tracker`; replaces the three above.")


@dataclass(frozen=True)
class Run:
    """How this call runs: progress, callbacks, the final model."""

    show_progress: bool | None = _setting(None, c.optional(c.boolean), "A progress bar; by "
                                          "default when stderr is a terminal.")
    callbacks: list[Any] | None = _setting(None, sc.callables, "Called after each trial as in "
                                           "``Study.optimize``.")
    refit: bool = _setting(False, c.boolean, "Train the best config on train plus validation "
                           "data and return it as ``result.model``.", "refit", BUILT_IN)


GROUPS: tuple[type, ...] = (Training, Search, Study, Tracking, Run)


def declared(taker: str | None = None) -> Iterator[tuple[type, Any]]:
    """Every (group, field) pair, or those that ``taker`` (``"tune"``, ...) takes."""
    for group in GROUPS:
        for f in fields(group):
            if taker is None or taker in f.metadata["takes"]:
                yield group, f


def by_name() -> dict[str, Any]:
    return {f.name: f for _, f in declared()}


def check_value(f: Any, value: Any, owner: str) -> Any:
    """One setting's value through its constraint; the error names ``owner``."""
    try:
        return f.metadata["check"](value)
    except c.Invalid as exc:
        raise exc.kind(f"The {f.name!r} parameter of {owner} must be {exc.expected}. "
                       f"Got {c.describe(value)} instead.{exc.hint}") from None


@dataclass(frozen=True)
class Settings:
    """A call's validated settings, by group."""

    training: Training
    search: Search
    study: Study
    tracking: Tracking
    run: Run

    @classmethod
    def from_kwargs(cls, taker: str, kwargs: Mapping[str, Any], owner: str | None = None
                    ) -> Settings:
        """Check every keyword ``taker`` takes; unknown names are a TypeError, as in Python.

        Errors name ``owner`` (by default the taker: ``tune``, ``tune_loop``)."""
        owner = owner or taker
        taken = {f.name: (group, f) for group, f in declared(taker)}
        for name in kwargs:
            if name not in taken:
                raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}."
                                f"{did_you_mean(name, taken)}")
        values: dict[type, dict[str, Any]] = {group: {} for group in GROUPS}
        for group, f in declared():  # what owner does not take keeps its (checked) default
            value = kwargs.get(f.name, f.default) if f.name in taken else f.default
            values[group][f.name] = check_value(f, value, owner)
        return cls(*(group(**values[group]) for group in GROUPS))


def signature(owner: str, leading: list[inspect.Parameter]) -> inspect.Signature:
    """The signature of ``owner``: its leading parameters, then its settings, keyword-only."""
    params = list(leading)
    for _, f in declared(owner):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=f.default, annotation=f.type))
    return inspect.Signature(params)


def docs(owner: str, indent: str = "        ") -> str:
    """The ``Args`` lines of ``owner``'s settings, grouped, for its docstring."""
    lines = []
    for group in GROUPS:
        names = [f for g, f in declared(owner) if g is group]
        if not names:
            continue
        lines.append(f"{indent[:-4]}{group.__name__} ({group.__doc__})")
        lines += [f"{indent}{f.name}: {f.metadata['doc']}" for f in names]
    return "\n".join(lines)


def job_keys() -> dict[str, Any]:
    """Each job-file key (``optimizer.lr``) and the setting it sets."""
    return {f.metadata["job"]: f for _, f in declared() if f.metadata["job"]}


__all__ = ["GROUPS", "Run", "Search", "Settings", "Study", "Tracking", "Training", "by_name",
           "check_value", "declared", "docs", "job_keys", "signature"]
