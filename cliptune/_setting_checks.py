"""The constraints of the settings that are more than a number or a name (see cliptune.settings)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optuna

from cliptune import _checks as c
from cliptune._errors import did_you_mean
from cliptune.space import SearchSpace
from cliptune.storage import Heartbeat


def space(value: Any) -> SearchSpace:
    try:
        return SearchSpace.resolve(value)
    except TypeError:
        raise c.Invalid("a shipped name, a YAML path, a dict or a SearchSpace",
                        kind=TypeError) from None


def heartbeat(value: Any) -> Heartbeat | None:
    if value is None or isinstance(value, Heartbeat):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"interval", "grace_period"}
        if unknown:
            key = sorted(map(str, unknown))[0]
            raise c.Invalid("a mapping with the keys 'interval' and 'grace_period'",
                            f" Unknown key {key!r}.{did_you_mean(key, ['interval', 'grace_period'])}")
        try:
            return Heartbeat(**value)
        except ValueError as exc:
            raise c.Invalid(f"a valid heartbeat ({exc})") from None
    raise c.Invalid("a cliptune Heartbeat or None", kind=TypeError)


def baselines(value: Any) -> bool | list[Any]:
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        from cliptune.config import ClipConfig

        try:
            return [v if isinstance(v, ClipConfig) else ClipConfig.from_dict(v, "baselines")
                    for v in value]
        except ValueError as exc:
            raise c.Invalid(f"ClipConfigs or {{mode: ..., threshold: ...}} mappings ({exc})") \
                from None
    raise c.Invalid("True, False or a list of clip configs", kind=TypeError)


def confirm(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise c.Invalid("'auto' or an int >= 0")


def warm_start(value: Any) -> Any:
    if value is None or isinstance(value, optuna.Study) or hasattr(value, "study"):
        return value  # a study, or a TuneResult
    if isinstance(value, str) and value.strip():
        return value  # a best-config YAML, or "STUDY@STORAGE_URL"
    raise c.Invalid("a best-config YAML path, 'STUDY@STORAGE_URL', an optuna.Study, a "
                    "TuneResult or None", kind=TypeError)


def callables(value: Any) -> list[Callable[..., Any]] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(callable(v) for v in value):
        return list(value)
    raise c.Invalid("a list of callables (study, frozen_trial) or None", kind=TypeError)


def metric_functions(value: Any) -> dict[str, Callable[..., Any]]:
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(k, str) and k.isidentifier() and callable(v)
                                          for k, v in value.items()):
        return dict(value)
    raise c.Invalid("a dict of metric names to callables (outputs, targets) -> float",
                    kind=TypeError)
