"""What the CLI prints: the best-trials table, the best config and its one-liners, shipped spaces,
errors."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import yaml

from cliptune._study import JOB_ATTR
from cliptune.config import ClipConfig, ClipMode
from cliptune.probe import PROBE_ATTR, describe

if TYPE_CHECKING:
    from cliptune.tuner import TuneResult

_KERAS_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}


def _short(value: Any) -> Any:
    """Four significant digits: plenty for a threshold, and easy to read and paste."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _optimizer(result: TuneResult) -> tuple[str | None, Any]:
    """The job's optimizer name and learning rate, as its study recorded them."""
    job = result.study.user_attrs.get(JOB_ATTR) or {}
    return job.get("optimizer"), job.get("lr")


def _one_liners(result: TuneResult) -> dict[str, str]:
    """How to apply the best clip in torch and in Keras, ready to paste."""
    if result.best_config is None:
        raise ValueError(f"Study {result.study.study_name!r} has no completed trial yet.")
    clip = ClipConfig(result.best_config.mode, _short(result.best_config.threshold))
    torch_line = f"cliptune.clip_grads_(model.parameters(), {clip!r})"
    optimizer, job_lr = _optimizer(result)
    lr = _short(result.best_extras.get("lr", job_lr))
    name = _KERAS_OPTIMIZERS.get(str(optimizer).lower(), "Adam")
    args = [f"learning_rate={lr!r}" if lr is not None else "..."]
    if clip.mode.adaptive:  # stateful: one Clipper (or optimizer) for the whole training run
        torch_line = (f"clipper = cliptune.Clipper({clip!r})  # once; each step: "
                      "clipper(model.parameters())")
        keras_line = f"cliptune.keras_optimizer({clip!r}, {name.lower()!r}, {args[0]})"
        return {"torch": torch_line, "keras": keras_line}
    args += [f"{key}={value!r}" for key, value in clip.keras_kwargs().items()]
    keras_line = f"keras.optimizers.{name}({', '.join(args)})"
    if clip.mode is ClipMode.NONE:
        torch_line = "# no clipping: " + torch_line
    return {"torch": torch_line, "keras": keras_line}


def best_document(result: TuneResult) -> dict[str, Any]:
    """The best config as written by ``ClipConfig.to_yaml``, plus where it came from."""
    body: dict[str, Any] = {"clip": result.best_config.to_dict()}  # type: ignore[union-attr]
    if result.best_extras:
        body["extras"] = dict(result.best_extras)
    body.update(study=result.study.study_name, trial=result.best_trial, value=result.best_value)
    if len(result.best_values) > 1:
        body.update(values=list(result.best_values), std=result.best_std)
    return body


def best_text(result: TuneResult, fmt: str = "yaml") -> str:
    """YAML that ``ClipConfig.from_yaml`` reads back (one-liners as comments), or JSON."""
    document, lines = best_document(result), _one_liners(result)
    probe = result.study.user_attrs.get(PROBE_ATTR)
    if fmt == "json":
        return json.dumps({**document, "apply": lines, **({"probe": probe} if probe else {})},
                          indent=2)
    header = (f"# best of study {document['study']!r}: trial {document['trial']}, "
              f"value {document['value']:.6g}{result.spread_text()} ({result.counts_line()})")
    clip_part = {k: {key: _short(v) for key, v in document[k].items()}
                 for k in ("clip", "extras") if k in document}
    body = yaml.safe_dump(clip_part, sort_keys=False).rstrip()
    if probe:
        header += f"\n# auto threshold ranges: {describe(probe)}"
    return "\n".join([header, body, f"# torch: {lines['torch'].removeprefix('# ')}",
                      f"# keras: {lines['keras']}"])


def space_description(path: Any) -> str:
    """The ``description`` key of a shipped search-space file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ""
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def error(command: str, message: str) -> None:
    """``cliptune COMMAND: error: ...`` on stderr, a line per line of the message."""
    for line in message.splitlines():
        print(f"cliptune {command}: error: {line}", file=sys.stderr)
