"""``threshold: auto``: size each mode's threshold range from a short probe of the gradients.

Before the study, when some mode of the search space says ``threshold: auto``, the job's own train
function runs once with a *probe trial*: a :class:`cliptune.Trial` that never clips, records per
step the pre-clip global gradient norm, each parameter tensor's gradient norm and the largest
absolute gradient element (from ``trial.clip_`` or ``trial.clip``), and ends the run after one
epoch (its first report), ``probe_steps`` steps or a non-finite step. So the probe is the same loop
as a trial, for cliptune's built-in loops and a user's ``tune_loop`` alike. The ranges (log scale)
then follow these rules, on means over the probe's finite steps:

- ``global_norm``: [0.5 x, 10 x] the mean global norm. Pascanu et al. (2013) advise a threshold
  between about half and ten times the average gradient norm.
- ``norm``: [0.5 x the mean per-tensor norm, 10 x the mean of each step's largest per-tensor norm].
  The same factors on the quantity this mode clips: at the low end a typical tensor is scaled down
  every step, at the high end even the largest tensor is almost never touched.
- ``value``: [0.1 x, 10 x] the mean of each step's largest absolute element. The largest element
  is an extreme of many, and the bulk of the elements sits well below it, so the low end reaches a
  decade down (clamping a real share of the large elements); the high end hardly ever clips.

Only the probe's healthy start counts: the statistics use the steps before the first one whose
global norm jumps above ``JUMP`` x the median of the steps before it. On a net that explodes
without clipping (the case clipping is for) the norm grows by a decade a step within a few steps;
means over those steps would centre the ranges on the explosion, not on the gradients' scale.

The ranges and the probe's statistics and cost are stored in the study's user attribute
``cliptune.probe``; a resumed study (or another worker) reuses them and never probes again, so the
search space does not change under a running study.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

from cliptune._errors import UsageError
from cliptune._probe_record import new_record
from cliptune.config import ClipConfig, ClipMode
from cliptune.monitor import TrialMonitor
from cliptune.space import ParamRange, SearchSpace
from cliptune.trial import PlainReporter, ProbeDone, Trial

log = logging.getLogger("cliptune")

PROBE_ATTR = "cliptune.probe"
FACTORS: dict[ClipMode, tuple[float, float]] = {
    ClipMode.GLOBAL_NORM: (0.5, 10.0),
    ClipMode.NORM: (0.5, 10.0),
    ClipMode.VALUE: (0.1, 10.0),
}
JUMP = 10.0
RULE = ("global_norm: [0.5, 10] x mean global norm; norm: [0.5 x mean tensor norm, "
        "10 x mean largest tensor norm]; value: [0.1, 10] x mean largest |g|; over the steps "
        "before the global norm first jumps 10x above the median of the steps before it")


def healthy_steps(global_norms: list[float]) -> int:
    """How many first steps come before the global norm jumps ``JUMP`` x above their median."""
    for i in range(1, len(global_norms)):
        if global_norms[i] > JUMP * statistics.median(global_norms[:i]):
            return i
    return len(global_norms)


def summarize(record: dict[str, Any]) -> dict[str, float]:
    """Means over a probe record's steps (see :mod:`cliptune.backends._probe`)."""
    norms = record["tensor_norms"]
    return {
        "global_norm_mean": statistics.fmean(record["global_norm"]),
        "global_norm_max": max(record["global_norm"]),
        "tensor_norm_mean": statistics.fmean(n for step in norms for n in step),
        "tensor_norm_max_mean": statistics.fmean(max(step) for step in norms),
        "max_abs_mean": statistics.fmean(record["max_abs"]),
    }


def auto_ranges(stats: dict[str, float], modes: list[ClipMode]) -> dict[ClipMode, ParamRange]:
    """Each mode's threshold range from the probe's statistics, by the module's rules."""
    bases = {
        ClipMode.GLOBAL_NORM: (stats["global_norm_mean"], stats["global_norm_mean"]),
        ClipMode.NORM: (stats["tensor_norm_mean"], stats["tensor_norm_max_mean"]),
        ClipMode.VALUE: (stats["max_abs_mean"], stats["max_abs_mean"]),
    }
    ranges = {}
    for mode in modes:
        (low_f, high_f), (low_b, high_b) = FACTORS[mode], bases[mode]
        if not low_b > 0:
            raise ValueError("The probe for 'threshold: auto' saw only zero gradients, so there is "
                             f"no scale to size mode {mode.value!r} from; give it an explicit "
                             "range {low: ..., high: ...}.")
        ranges[mode] = ParamRange(low_f * low_b, high_f * high_b, log=True)
    return ranges


def _recorded(space: SearchSpace, info: dict[str, Any], study_name: str) -> dict[ClipMode, ParamRange]:
    missing = [m.value for m in space.auto_modes if m.value not in info["ranges"]]
    if missing:
        raise ValueError(f"Study {study_name!r} was probed for the auto modes "
                         f"{sorted(info['ranges'])}, but the search space now also asks 'auto' for "
                         f"{missing}; the search space of a running study cannot change. Use a "
                         "new study name.")
    return {m: ParamRange(*info["ranges"][m.value], log=True) for m in space.auto_modes}


def probe_gradients(train: Callable[..., Any], extras: dict[str, Any], seed: int | None,
                    max_steps: int) -> dict[str, Any]:
    """Run ``train`` with a probe trial (no clip); its record of the gradients, step by step."""
    record = new_record(max_steps)
    monitor = TrialMonitor(PlainReporter(), None)
    trial = Trial(ClipConfig("none"), extras, number=-1, seed=seed, monitor=monitor, probe=record)
    try:
        train(trial)
    except ProbeDone:
        pass
    except UsageError:
        raise
    except Exception as exc:
        raise ValueError(f"The probe for 'threshold: auto' (one unclipped run of the train "
                         f"function) failed: {type(exc).__name__}: {exc}") from exc
    return record


def run_probe(space: SearchSpace, probe: Callable[..., dict[str, Any]], extras: dict[str, Any],
              max_steps: int) -> tuple[dict[ClipMode, ParamRange], dict[str, Any]]:
    """Call ``probe`` (see :func:`probe_gradients`) and turn its record into ranges and a JSON-able
    summary."""
    start = time.perf_counter()
    record = probe(extras=extras, max_steps=max_steps)
    seconds = time.perf_counter() - start
    steps = len(record["loss"])
    if not steps:
        raise ValueError("The probe for 'threshold: auto' went non-finite at its first step, "
                         "without clipping. Lower the learning rate, or give the auto modes "
                         "explicit ranges {low: ..., high: ...}.")
    if record["stopped"] == "nonfinite":
        warnings.warn(f"The probe for 'threshold: auto' went non-finite at step {steps + 1}; the "
                      f"auto ranges come from its first {steps} steps.", RuntimeWarning,
                      stacklevel=3)
    used = healthy_steps(record["global_norm"])
    stats = summarize({key: record[key][:used] for key in ("global_norm", "tensor_norms",
                                                             "max_abs")})
    ranges = auto_ranges(stats, space.auto_modes)
    info = {"steps": steps, "steps_used": used, "seconds": round(seconds, 4),
            "stopped": record["stopped"], **stats,
            "ranges": {m.value: [r.low, r.high] for m, r in ranges.items()}, "rule": RULE}
    return ranges, info


def resolve_auto(space: SearchSpace, study: Any, train: Callable[..., Any], seed: int | None,
                 max_steps: int) -> tuple[SearchSpace, dict[str, Any] | None]:
    """The space with its ``auto`` ranges set: from the study's record, else from a new probe."""
    if not space.auto_modes:
        return space, None
    info = study.user_attrs.get(PROBE_ATTR)
    if info is not None:
        ranges = _recorded(space, info, study.study_name)
        how = "recorded by the study's probe"
    else:
        def probe(extras: dict[str, Any], max_steps: int) -> dict[str, Any]:
            return probe_gradients(train, extras, seed, max_steps)

        ranges, info = run_probe(space, probe, space.default_extras(), max_steps)
        study.set_user_attr(PROBE_ATTR, info)
        how = "from a probe"
    log.info("auto threshold ranges %s: %s", how, describe(info))
    return space.with_ranges(ranges), info


def describe(info: dict[str, Any]) -> str:
    """One line: the resolved ranges and what the probe saw and cost."""
    ranges = ", ".join(f"{mode} [{low:.3g}, {high:.3g}]" for mode, (low, high)
                       in info["ranges"].items())
    used = info.get("steps_used", info["steps"])
    return (f"{ranges} (probe without clipping: {info['steps']} steps in {info['seconds']:.2f} s, "
            f"stopped at {info['stopped']}; mean global norm {info['global_norm_mean']:.4g} over "
            f"its first {used} steps)")


def job_params(info: dict[str, Any] | None) -> dict[str, Any]:
    """The probe as parameters of the tuning job (MLflow parent-run params)."""
    if info is None:
        return {}
    out: dict[str, Any] = {"probe_steps": info["steps"], "probe_seconds": info["seconds"],
                           "probe_stopped": info["stopped"],
                           "probe_global_norm_mean": info["global_norm_mean"],
                           "probe_tensor_norm_mean": info["tensor_norm_mean"],
                           "probe_max_abs_mean": info["max_abs_mean"]}
    out.update({f"auto_range_{mode}": f"[{low:.6g}, {high:.6g}]"
                for mode, (low, high) in info["ranges"].items()})
    return out
