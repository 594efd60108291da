"""What a new study tries first: configs carried over from another run, then the usual baselines.

- **Warm start** (``warm_start=``): the best configs of another study (an ``optuna.Study``, a
  :class:`TuneResult`, or ``"NAME@STORAGE_URL"``; its ``WARM_TOP`` best complete trials) or of a
  best-config YAML (``cliptune best`` writes one), e.g. a smaller model's run. They are tried
  again here, marked with the user attribute ``cliptune.transferred`` (where they came from); no
  value of the other run enters this study.
- **Baselines** (``baselines=True``): what people use without searching: no clip, global norm 1.0,
  and, where a probe ran, the Pascanu-style threshold (the mean pre-clip gradient norm of the
  probe's healthy steps). Marked ``cliptune.baseline`` with their name. A study therefore never
  returns a config worse than these (on the trials' own evaluation).

A config outside the search space (a mode it leaves out, a threshold beyond its range) is skipped
with a log line. All are enqueued once, when the study is new; they count toward ``n_trials``.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from cliptune.config import ClipConfig, ClipMode
from cliptune.space import SearchSpace, config_from_params

log = logging.getLogger("cliptune")
BASELINE_ATTR, TRANSFERRED_ATTR = "cliptune.baseline", "cliptune.transferred"
WARM_TOP = 3


def params_of(config: ClipConfig, space: SearchSpace) -> dict[str, Any] | None:
    """The Optuna params that make ``config`` in ``space``, or None when the space excludes it."""
    if config.mode not in space.modes:
        return None
    params: dict[str, Any] = {"clip_mode": config.mode.value}
    rng = space.modes[config.mode]
    if rng is None:
        return params
    t = config.threshold
    inside = t in rng.choices if rng.choices is not None else rng.low <= t <= rng.high  # type: ignore[operator]
    if not inside:
        return None
    params[f"clip_threshold_{config.mode.value}"] = t
    return params


def baselines(setting: bool | list[ClipConfig], probe: dict[str, Any] | None
              ) -> list[tuple[str, ClipConfig]]:
    """The baseline configs of the ``baselines`` setting, named."""
    if setting is False:
        return []
    if setting is not True:
        return [(repr(c), c) for c in setting]
    out = [("no clip", ClipConfig(ClipMode.NONE)),
           ("global_norm 1.0", ClipConfig(ClipMode.GLOBAL_NORM, 1.0))]
    if probe is not None and probe.get("global_norm_mean", 0) > 0:
        out.append(("probe mean norm", ClipConfig(ClipMode.GLOBAL_NORM,
                                                  float(f"{probe['global_norm_mean']:.4g}"))))
    return out


def _from_study(study: optuna.Study, label: str) -> list[tuple[str, dict[str, Any]]]:
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "clip_mode" in t.params]
    done.sort(key=lambda t: t.value if study.direction.name == "MINIMIZE" else -t.value)
    return [(f"{label}#{t.number}", dict(t.params)) for t in done[:WARM_TOP]]


Carried = list[tuple[str, ClipConfig, dict[str, Any]]]


def transferred(source: Any) -> Carried:
    """The configs (and extras) a warm start carries over, each with where it came from. Read
    before anything is created, so that a wrong source is an error that costs nothing."""
    if source is None:
        return []
    if isinstance(source, str) and "@" in source and not source.endswith((".yaml", ".yml")):
        from cliptune.storage import open_storage

        name, _, url = source.partition("@")
        try:
            study = optuna.load_study(study_name=name, storage=open_storage(url, None))
        except KeyError:
            raise ValueError(f"warm_start: no study {name!r} in that storage.") from None
        found = _from_study(study, name)
    elif isinstance(source, str):
        import yaml

        try:
            config = ClipConfig.from_yaml(source)
        except ValueError as exc:
            raise ValueError(f"warm_start: {exc}") from None
        with open(source, encoding="utf-8") as fh:
            body = yaml.safe_load(fh) or {}
        extras = body.get("extras", {}) if isinstance(body, dict) else {}
        return [(source, config, dict(extras))]
    else:
        study = getattr(source, "study", source)
        found = _from_study(study, study.study_name)
    out = []
    for label, params in found:
        config, extras = config_from_params(params)
        out.append((label, config, extras))
    return out


def enqueue_first(study: optuna.Study, space: SearchSpace, baseline_setting: Any,
                  carried: Carried, probe: dict[str, Any] | None) -> dict[str, int]:
    """Enqueue the warm-start configs (``carried``, from :func:`transferred`), then the
    baselines, on a new study; how many of each (keyed by their user attribute)."""
    counts = {TRANSFERRED_ATTR: 0, BASELINE_ATTR: 0}
    if study.get_trials(deepcopy=False):
        return counts
    seen: list[dict[str, Any]] = []
    planned = [(TRANSFERRED_ATTR, label, config, extras) for label, config, extras in carried]
    planned += [(BASELINE_ATTR, name, config, {}) for name, config in baselines(baseline_setting,
                                                                                 probe)]
    for attr, label, config, extras in planned:
        params = params_of(config, space)
        if params is None:
            log.info("%s %s is outside the search space; not tried first", attr.split(".")[1],
                     label)
            continue
        params.update({k: v for k, v in extras.items() if k in space.extras})
        if params in seen:
            continue
        seen.append(params)
        study.enqueue_trial(params, user_attrs={attr: label})
        counts[attr] += 1
    return counts
