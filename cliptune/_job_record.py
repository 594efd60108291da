"""What a study records of the job that runs it, and the check that a job still fits its study.

A study's trials compare only when they ran with the same search space, epochs, seed and the other
settings that decide what a trial is worth (``job_settings``). Each run of a job checks them
against its study's record before any work: a change is refused with one line that says how to
start a new study or continue this one (``continue_changed``). A continued study keeps each
version of its settings in the user attribute ``cliptune.runs`` (the settings, the first trial
that used them, what changed), and each version gets its own MLflow parent run. Whatever the flag,
a search space whose parameters Optuna cannot mix with the study's earlier trials (another set of
clip modes, other choices for an extra, a log range made linear) is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import optuna

from cliptune._optuna import incompatibility
from cliptune.plan import Plan, qualified_name
from cliptune.space import ParamRange, SearchSpace

log = logging.getLogger("cliptune")

RUNS_ATTR = "cliptune.runs"
_LEGACY_SPACE, _LEGACY_JOB = "cliptune.search_space", "cliptune.job"  # before cliptune.runs
_KEYS = ("seed", "metric", "objective")
_BUILT_IN_KEYS = ("epochs", "loss", "optimizer", "lr", "batch_size", "val_fraction")
_HOW = ("Start a new study under another name (study.name in the job, --study NAME, study_name= "
        "in Python), or continue this one with the new settings (--continue-changed, "
        "study.continue_changed: true, continue_changed=True)")


def job_settings(value: Callable[[str], Any], space: SearchSpace, direction: str,
                 built_in: bool) -> dict[str, Any]:
    """The settings that decide what a trial is worth, as the study stores them (JSON).

    ``value(name)`` gives a setting's value; ``built_in`` adds those of cliptune's own loops."""
    names = _KEYS + (_BUILT_IN_KEYS if built_in else ())
    out = {"search_space": space.to_dict(), "direction": direction,
           **{name: _plain(value(name)) for name in names}}
    return json.loads(json.dumps(out))


def plan_settings(plan: Plan) -> dict[str, Any]:
    """:func:`job_settings` of a plan (its space as given: ``auto`` ranges not resolved yet)."""
    groups = (plan.settings.training, plan.settings.search)
    return job_settings(lambda name: next(getattr(g, name) for g in groups if hasattr(g, name)),
                        plan.space, plan.direction, plan.backend is not None)


def _plain(value: Any) -> Any:
    if callable(value):  # a loss or optimizer given as a function: its importable name
        return qualified_name(value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def job_version(study: optuna.Study) -> int:
    """Which version of its settings the study runs now: 1, then 2 after a continued change..."""
    return max(1, len(study.user_attrs.get(RUNS_ATTR) or ()))


def check_job(study: optuna.Study, settings: dict[str, Any], space: SearchSpace,
              continue_changed: bool) -> list[str]:
    """What changed since the study's record ([] for a new or unchanged study).

    Raises:
        ValueError: The job changed and ``continue_changed`` is False, or the new search space
            cannot share the study with its earlier trials.
    """
    name = study.study_name
    clash = _clash(study, space)
    if study.direction.name.lower() != settings["direction"]:  # Optuna keeps a study's own
        clash = (f"the study {study.direction.name.lower()}s and the job would "
                 f"{settings['direction']}; Optuna cannot change a study's direction")
    recorded = _recorded(study)
    changes = [] if recorded is None else _changes(recorded, settings)
    if clash is not None:
        raise ValueError(f"This job cannot continue study {name!r}: {clash}. Start a new study "
                         "under another name (study.name in the job, --study NAME, study_name= "
                         "in Python).")
    if changes and not continue_changed:
        raise ValueError(f"Study {name!r} was run with other settings ({'; '.join(changes)}). "
                         f"{_HOW}.")
    return changes


def record_run(study: optuna.Study, settings: dict[str, Any], changes: list[str]) -> int:
    """Record the settings this run uses when they are new to the study; the job version."""
    runs = list(study.user_attrs.get(RUNS_ATTR) or ())
    if runs and not changes:
        return len(runs)
    first = len(study.get_trials(deepcopy=False))
    runs.append({"settings": settings, "first_trial": first, "changed": changes,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    study.set_user_attr(RUNS_ATTR, runs)
    if changes:
        log.warning("study %r continues with changed settings (%s): recorded as version %d of "
                    "its job, from trial %d on", study.study_name, "; ".join(changes), len(runs),
                    first)
    return len(runs)


def log_resumed(study: optuna.Study, grace_period: int | None) -> None:
    """Say what a rerun continues: the study's trials by state, and what happens to those a
    stopped run left RUNNING (failed and retried once their heartbeat is stale)."""
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    if not states:
        return
    parts = [f"{states[s]} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if states[s]]
    if states["WAITING"]:
        parts.append(f"{states['WAITING']} waiting to run (again)")
    running = ""
    if states["RUNNING"]:
        later = ("" if grace_period is None else
                 f"; a trial whose worker stopped is failed and retried after {grace_period} s "
                 "without a heartbeat")
        running = f"; {states['RUNNING']} RUNNING (another worker's, or left by a stopped run{later})"
    log.info("continuing study %r: %s%s", study.study_name, ", ".join(parts), running)


def _recorded(study: optuna.Study) -> dict[str, Any] | None:
    """The settings the study runs with: its latest record, or what an older cliptune kept."""
    runs = study.user_attrs.get(RUNS_ATTR)
    if runs:
        return runs[-1]["settings"]
    job, space = study.user_attrs.get(_LEGACY_JOB), study.user_attrs.get(_LEGACY_SPACE)
    if job is None:
        return None  # not a cliptune study, or a new one
    legacy = {k: job[k] for k in ("epochs", "seed", "lr", "batch_size", "metric", "objective",
                                   "direction") if k in job}
    return {**legacy, "search_space": space, "legacy": True}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    legacy = old.get("legacy", False)
    out = []
    for key in new:
        if key == "direction":
            continue  # the study's own direction is checked against the job's (a clash)
        if key == "search_space":
            out += _space_changes(old.get(key) or {}, new[key], legacy)
        elif (key in old or not legacy) and old.get(key) != new[key]:
            out.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    return out


def _space_changes(old: dict[str, Any], new: dict[str, Any], legacy: bool) -> list[str]:
    """The search space's changes, each short: modes added or left out, ranges, extras."""
    out = []
    for part in ("modes", "extras"):
        before, after = old.get(part) or {}, new.get(part) or {}
        added, dropped = [k for k in after if k not in before], [k for k in before if k not in after]
        if added:
            out.append(f"search space {part} added: {', '.join(added)}")
        if dropped:
            out.append(f"search space {part} left out: {', '.join(dropped)}")
        for key in (k for k in after if k in before and before[k] != after[k]):
            if legacy and "auto" in json.dumps(after[key]):
                continue  # an older record holds the probe's ranges for 'auto'
            out.append(f"search space {part}.{key} {_short(before[key])} -> {_short(after[key])}")
    return out


def _short(spec: Any) -> str:
    return json.dumps(spec, separators=(",", ":")).replace('"', "")


def _clash(study: optuna.Study, space: SearchSpace) -> str | None:
    """The first parameter whose new distribution Optuna cannot mix with the study's trials."""
    old: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        old.update(trial.distributions)
    for name, new in _distributions(space).items():
        if name in old:
            reason = incompatibility(old[name], new)
            if reason is not None:
                return (f"its parameter {name!r} was sampled from {_describe(old[name])} and "
                        f"would now be from {_describe(new)}; Optuna cannot mix the two in one "
                        f"study ({reason.rstrip('.')})")
    return None


def _describe(dist: Any) -> str:
    choices = getattr(dist, "choices", None)
    if choices is not None:
        return "[" + ", ".join(map(str, choices)) + "]"
    kind = "an int" if type(dist).__name__.startswith("Int") else "a float"
    return f"{kind} {'log' if dist.log else 'linear'} range"


def _distributions(space: SearchSpace) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution

    out: dict[str, Any] = {"clip_mode": CategoricalDistribution([m.value for m in space.modes])}
    for mode, rng in space.modes.items():
        if rng is not None:
            out[f"clip_threshold_{mode.value}"] = _distribution(rng)
    out.update({name: _distribution(rng) for name, rng in space.extras.items()})
    return out


def _distribution(rng: ParamRange) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if rng.choices is not None:
        return CategoricalDistribution(list(rng.choices))
    if rng.auto:  # resolved later from the probe: a log range (its ends do not matter here)
        return FloatDistribution(1e-3, 1e3, log=True)
    if rng.type == "int":
        return IntDistribution(int(rng.low), int(rng.high), log=rng.log,  # type: ignore[arg-type]
                               step=int(rng.step or 1))
    return FloatDistribution(rng.low, rng.high, log=rng.log, step=rng.step)  # type: ignore[arg-type]


__all__ = ["RUNS_ATTR", "check_job", "job_settings", "job_version", "log_resumed",
           "plan_settings", "record_run"]
