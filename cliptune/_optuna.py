"""Every private Optuna API cliptune relies on, in one place (checked against Optuna 4.5 to 5.x).

- a study's storage and id (``study._storage``, ``study._study_id``): for a cheap trial count
  and for the liveness checks that Optuna's public API does not expose; the RDB storage behind
  its cache (``_CachedStorage._backend``), to name it in messages;
- whether an RDB storage runs heartbeats (``optuna.storages._heartbeat``);
- whether a parameter's new distribution can join a study's earlier trials
  (``optuna.distributions.check_distribution_compatibility``, marked as not for users);
- the random state of the TPE sampler and of its start-up random sampler (``_rng``), set per
  trial so that a continued or shared study keeps sampling new points (see :mod:`cliptune._study`);
- whether a trial was enqueued (``Trial._fixed_params``): an enqueued config is deliberate and
  is trained even when it repeats an earlier one (see :mod:`cliptune._duplicates`);
- the name and wording of the warnings ``study.optimize`` logs for a failed trial, to keep quiet
  about a surplus trial (see :mod:`cliptune.runner`), which fails by design and runs nothing.
"""

from __future__ import annotations

import logging

import optuna
from optuna.storages import BaseStorage


class _QuietFailures(logging.Filter):
    """Drops Optuna's "Trial N failed ..." warnings (and traceback) for the trials named."""

    def __init__(self) -> None:
        super().__init__()
        self.prefixes: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(tuple(self.prefixes))


_quiet_failures = _QuietFailures()


def quiet_failure(number: int) -> None:
    """Keep Optuna from logging trial ``number``'s failure: it is expected, not the user's."""
    logger = logging.getLogger("optuna.study._optimize")
    if _quiet_failures not in logger.filters:
        logger.addFilter(_quiet_failures)
    _quiet_failures.prefixes.add(f"Trial {number} failed ")


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def backend_of(storage: BaseStorage) -> BaseStorage:
    """The storage an RDB study's cache wraps (it has the URL)."""
    return getattr(storage, "_backend", storage)


def n_trials_of(study: optuna.Study) -> int:
    """How many trials the study has, in any state, without reading them."""
    return study._storage.get_n_trials(study._study_id)


def has_native_heartbeat(storage: BaseStorage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def reseed_tpe(sampler: optuna.samplers.TPESampler, seed: int) -> None:
    """Set the random state of a TPE sampler and of the random sampler it starts with."""
    sampler._rng.rng.seed(seed)
    sampler._random_sampler._rng.rng.seed(seed)


def is_enqueued(trial: optuna.Trial) -> bool:
    """True for a trial whose params were fixed by ``study.enqueue_trial``."""
    return bool(getattr(trial, "_fixed_params", None))


def incompatibility(old: optuna.distributions.BaseDistribution,
                    new: optuna.distributions.BaseDistribution) -> str | None:
    """Why a study whose trials used ``old`` for a parameter cannot sample it from ``new``."""
    try:
        optuna.distributions.check_distribution_compatibility(old, new)
    except ValueError as exc:
        return str(exc)
    return None
