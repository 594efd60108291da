"""``tune()`` and ``tune_loop()``: build the plan, run the study's workers, return the result.

Both take the settings declared in :mod:`cliptune.settings` (their signatures and docs are made
from those declarations) and go down one path: plan (:mod:`cliptune.plan`) -> study -> runner(s)
(:mod:`cliptune.runner`, :mod:`cliptune.parallel`) -> :class:`TuneResult`.
"""

from __future__ import annotations

import inspect
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna

from cliptune import confirm
from cliptune import settings as _settings
from cliptune._faults import finish_tracking
from cliptune._job_record import check_job, log_resumed, plan_settings, record_run
from cliptune._optuna import storage_of
from cliptune._study import open_study, record_job, stability_pruner
from cliptune.first_trials import (
    BASELINE_ATTR,
    TRANSFERRED_ATTR,
    Carried,
    enqueue_first,
    transferred,
)
from cliptune.parallel import run_workers, worker_plan
from cliptune.plan import Plan, plan_loop, plan_tune
from cliptune.probe import PROBE_ATTR, job_params, resolve_auto
from cliptune.result import TuneResult
from cliptune.runner import TrialRunner
from cliptune.settings import Settings
from cliptune.storage import open_storage
from cliptune.tracking import make_tracker
from cliptune.trial import Trial

log = logging.getLogger("cliptune")


def tune(model_fn: Callable[..., Any], data: Any, **settings: Any) -> TuneResult:
    """Search the gradient-clipping mode and threshold (and any extras) for a model.

    Each trial builds a fresh model with ``model_fn``, trains it ``epochs`` epochs with the trial's
    clip in cliptune's own loop (torch or Keras, picked from the model), and is worth the
    validation loss at its last epoch (``objective="best"``: at its best epoch; ``metric=`` another
    reported metric). Unstable trials (non-finite, diverging or spiking loss) are pruned at once,
    with the reason in the trial's user attribute ``prune_reason``.

    Args:
        model_fn: Zero-argument factory returning a fresh ``torch.nn.Module`` or Keras model, or a
            one-argument factory taking the dict of co-tuned extras.
        data: ``(X, y)`` arrays (split with ``val_fraction``), ``((X_tr, y_tr), (X_val, y_val))``,
            ``{"train": ..., "val": ...}``, or a pair of framework datasets (torch ``Dataset`` or
            ``DataLoader``; ``tf.data.Dataset``s already batched, as for ``model.fit``).
{settings}

    Returns:
        A :class:`TuneResult`.

    Example:
        >>> result = cliptune.tune(make_model, (X, y), epochs=8, n_trials=20, seed=0)  # doctest: +SKIP
        >>> result.best_config                                                        # doctest: +SKIP
        ClipConfig(mode='global_norm', threshold=0.83)
    """
    return run(plan_tune(model_fn, data, Settings.from_kwargs("tune", settings)))


def tune_loop(train: Callable[[Trial], Any], **settings: Any) -> TuneResult:
    """Search the gradient clipping of your own training loop.

    ``train(trial)`` trains one trial: it builds its model (``trial.extras``, ``trial.seed``),
    calls ``trial.clip_(params, loss)`` (torch) or ``trial.clip(grads, variables)`` (TensorFlow)
    after each backward pass, and ``trial.report(epoch, **metrics)`` after each epoch. A trial is
    worth ``metric`` at its last (or best) reported epoch; stability pruning, tracking, workers and
    resuming work as for :func:`tune`.

    Args:
        train: A function taking a :class:`cliptune.Trial`; what it returns is ignored.
{settings}

    Returns:
        A :class:`TuneResult`.

    Example:
        >>> result = cliptune.tune_loop(train, search_space="rnn", metric="bpc", seed=0)  # doctest: +SKIP
    """
    return run(plan_loop(train, Settings.from_kwargs("tune_loop", settings)))


_FIRST = inspect.Parameter.POSITIONAL_OR_KEYWORD
tune.__signature__ = _settings.signature("tune", [  # type: ignore[attr-defined]
    inspect.Parameter("model_fn", _FIRST), inspect.Parameter("data", _FIRST)])
tune_loop.__signature__ = _settings.signature(  # type: ignore[attr-defined]
    "tune_loop", [inspect.Parameter("train", _FIRST)])
tune.__doc__ = tune.__doc__.replace("{settings}", _settings.docs("tune"))  # type: ignore[union-attr]
tune_loop.__doc__ = tune_loop.__doc__.replace(  # type: ignore[union-attr]
    "{settings}", _settings.docs("tune_loop"))


def run(plan: Plan) -> TuneResult:
    """Run a plan to its end: the study, its workers, the confirmation, the refit; the result."""
    s = plan.settings
    tracker = make_tracker(s.tracking.tracking, s.tracking.tracking_uri, s.tracking.experiment,
                           s.tracking.tracker)
    carried = transferred(s.search.warm_start)  # a wrong source is an error before any work
    if s.study.n_jobs > 1 and s.study.storage is None:
        return _run_in_a_temporary_journal(plan)
    if s.study.n_jobs > 1:
        worker_plan(plan)  # it must pickle: checked before anything is created
    storage = open_storage(s.study.storage, s.study.heartbeat)
    tracker.open()  # a store that cannot be written is an error before the study exists
    pruner = stability_pruner(s.search.pruner, s.search.multi_fidelity)
    study = open_study(plan, storage, pruner)
    plan, probe, version = _prepare(plan, study, carried)
    tracker.start(study, {**plan.job_params(), "sampler": type(study.sampler).__name__,
                          "pruner": type(pruner.pruner).__name__, **job_params(probe),
                          "job_version": version})
    heartbeat = s.study.heartbeat if s.study.storage is not None else None
    runner = TrialRunner(plan, pruner, tracker, heartbeat)
    progress = sys.stderr.isatty() if s.run.show_progress is None else s.run.show_progress
    model = None
    try:
        if s.study.n_jobs > 1:
            run_workers(worker_plan(plan), storage, study.study_name,
                        lambda: runner.run(study, progress, s.run.callbacks or ()))
        else:
            runner.run(study, progress, s.run.callbacks or ())
        _confirm(plan, runner, study)
        if s.run.refit and runner.usage_error is None:
            from cliptune.refit import refit_best

            model = refit_best(study, plan, pruner.rules, tracker)
    finally:  # interrupted too: the parent run gets the best so far and is closed
        finish_tracking(tracker, study)
    runner.raise_if_failed()
    result = TuneResult.from_study(study)
    result.model = model
    return result


def _prepare(plan: Plan, study: optuna.Study, carried: Carried
             ) -> tuple[Plan, dict[str, Any] | None, str]:
    """Before the first trial: a changed job refused, auto ranges, the configs tried first, what
    the study records; the plan with its space resolved, the probe, this run's job version."""
    s = plan.settings
    settings = plan_settings(plan)  # a changed job is refused before any work...
    probed = PROBE_ATTR in study.user_attrs  # ...and before a probe: recorded ranges cost nothing
    if probed:
        space, probe = resolve_auto(plan.space, study, plan.train, s.search.seed,
                                    s.search.probe_steps)
    changes = check_job(study, settings, plan.space, s.study.continue_changed)
    log_resumed(study, None if s.study.heartbeat is None else s.study.heartbeat.grace_period)
    if not probed:
        space, probe = resolve_auto(plan.space, study, plan.train, s.search.seed,
                                    s.search.probe_steps)
    plan = plan.with_space(space)
    record_job(study, plan)
    version = record_run(study, settings, changes)  # from the next trial on
    first = enqueue_first(study, space, s.search.baselines, carried, probe)
    said = [f"{n} {what} (user attribute {attr})" for attr, what in (
        (TRANSFERRED_ATTR, "from the warm start"), (BASELINE_ATTR, "baseline(s)"))
        if (n := first[attr])]
    if said:
        log.info("configs tried first: %s", ", ".join(said))
    return plan, probe, version


def _confirm(plan: Plan, runner: TrialRunner, study: optuna.Study) -> None:
    """Re-train the best configs on fresh seeds, once the search reached its total."""
    s = plan.settings
    k = confirm.resolve(s.search.confirm, s.search.n_trials, plan.backend is None)
    if not k or runner.usage_error is not None or runner.stopped_early:
        return
    n_configs, added = confirm.enqueue_reruns(study, k, s.search.confirm_seeds)
    if added:
        log.info("confirming the %d best config(s) (of up to %d, those within %d%% of the best): "
                 "%d re-run(s) on fresh seeds (user attribute cliptune.confirms); the winner is "
                 "the best mean", n_configs, k, round(confirm.MARGIN * 100), added)
        runner.run(study, progress=False, callbacks=s.run.callbacks or ())


def _run_in_a_temporary_journal(plan: Plan) -> TuneResult:
    """n_jobs > 1 without a storage: the workers share a temporary journal; the result is in memory."""
    with tempfile.TemporaryDirectory(prefix="cliptune-") as folder:
        name = plan.settings.study.study_name or f"cliptune-{plan.name.rpartition(':')[2]}"
        study_settings = replace(plan.settings.study, storage=f"journal:{folder}/study.log",
                                 study_name=name)
        result = run(replace(plan, settings=replace(plan.settings, study=study_settings)))
        memory = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=name, from_storage=storage_of(result.study),
                          to_storage=memory)
        study = optuna.load_study(study_name=name, storage=memory)
    out = TuneResult.from_study(study)
    out.model = result.model
    return out
