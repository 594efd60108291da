"""Search spaces: which clip modes and thresholds to try, and which extras to co-tune.

The YAML format (keys mirror Optuna's distributions)::

    version: 1
    modes:                  # leave a mode out to exclude it
      none: {}
      value:       {threshold: {low: 0.001, high: 10.0, log: true}}
      global_norm: {threshold: {low: 0.01,  high: 100.0, log: true}}
      norm:        {threshold: auto}   # a range from a short probe of the gradients (cliptune.probe)
    extras:                 # optional, tuned together with the clip
      lr: {low: 1.0e-4, high: 1.0e-1, log: true}

Optuna parameter names: ``clip_mode``, then ``clip_threshold_<mode>`` (one per mode, so a
multivariate TPE sees each mode's threshold as its own conditional dimension), then each extra.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cliptune._errors import unknown_name
from cliptune.config import ClipConfig, ClipMode

if TYPE_CHECKING:
    import optuna

_RANGE_KEYS = ("low", "high", "log", "step", "type")
_TYPES = ("float", "int")
AUTO = "auto"  # ``threshold: auto``: the range comes from a probe of the gradients
AUTO_MODES = (ClipMode.VALUE, ClipMode.NORM, ClipMode.GLOBAL_NORM)


@dataclass(frozen=True)
class ParamRange:
    """A numeric range (``type`` float or int) or a list of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    type: str = "float"
    choices: tuple[Any, ...] | None = None
    auto: bool = False  # ``threshold: auto``, not resolved yet (see cliptune.probe)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.auto:
            raise RuntimeError(f"{name} is 'auto' and was not resolved by a probe before sampling.")
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log,  # type: ignore[arg-type]
                                     step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)  # type: ignore[arg-type]

    def midpoint(self) -> Any:
        """A representative value (geometric middle on a log range), used before the study."""
        if self.choices is not None:
            return self.choices[0]
        low, high = float(self.low), float(self.high)  # type: ignore[arg-type]
        mid = math.sqrt(low * high) if self.log else (low + high) / 2
        return int(round(mid)) if self.type == "int" else mid

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        if self.type != "float":
            out["type"] = self.type
        return out


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}.")
    return float(value)


def _parse_range(spec: object, where: str, positive: bool = False) -> ParamRange:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping like {{low: 0.01, high: 10.0, log: true}}, "
                         f"got {spec!r}.")
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        if extra:
            raise ValueError(f"{where}: 'choices' cannot be combined with {sorted(extra)}.")
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ValueError(f"{where}.choices: expected a non-empty list, got {spec['choices']!r}.")
        return ParamRange(choices=tuple(spec["choices"]))
    for key in spec:
        if key not in _RANGE_KEYS:
            raise unknown_name("key", key, _RANGE_KEYS + ("choices",), where)
    for key in ("low", "high"):
        if key not in spec:
            raise ValueError(f"{where}: the key {key!r} is required.")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{where}.log: expected true or false, got {log!r}.")
    kind = spec.get("type", "float")
    if kind not in _TYPES:
        raise unknown_name("type", kind, _TYPES, f"{where}.type")
    step = None if spec.get("step") is None else _number(spec["step"], f"{where}.step")
    if low > high:
        raise ValueError(f"{where}: low <= high must hold, got low={low}, high={high}")
    if (log or positive) and low <= 0:
        why = "log=true" if log else "a threshold"
        raise ValueError(f"{where}: low must be > 0 for {why}, got low={low}")
    if log and step is not None:
        raise ValueError(f"{where}: step cannot be used with log=true.")
    return ParamRange(low, high, log, step, kind)


def _check_ends(mode: ClipMode, rng: ParamRange, where: str) -> ParamRange:
    """Every value of the range is a valid parameter of ``mode`` (autoclip's percentile <= 100)."""
    for value in rng.choices if rng.choices is not None else (rng.low, rng.high):
        try:
            ClipConfig(mode, value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return rng


def _parse_auto(value: str, mode: ClipMode, where: str) -> ParamRange:
    """``threshold: auto`` for a mode that a probe can size (see :mod:`cliptune.probe`)."""
    if value != AUTO:
        raise ValueError(f"{where}: expected a mapping like {{low: 0.01, high: 10.0, log: true}} "
                         f"or 'auto', got {value!r}.")
    if mode not in AUTO_MODES:
        raise ValueError(f"{where}: 'auto' is supported for the modes "
                         f"{', '.join(m.value for m in AUTO_MODES)}; give mode {mode.value!r} a "
                         "range {low: ..., high: ...}.")
    return ParamRange(log=True, auto=True)


@dataclass(frozen=True)
class SearchSpace:
    """Clip modes with their threshold ranges, plus co-tuned extras.

    Build one with :meth:`from_yaml`, :meth:`from_dict` or :meth:`shipped`, or let
    :meth:`resolve` take any of a shipped name, a path, a dict or a SearchSpace.
    """

    modes: dict[ClipMode, ParamRange | None]
    extras: dict[str, ParamRange] = field(default_factory=dict)
    name: str = "custom"

    @classmethod
    def from_dict(cls, data: object, source: str = "<dict>", name: str | None = None) -> SearchSpace:
        """Validate a parsed search space; every error names ``source`` and the key."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping with 'modes', got {type(data).__name__}.")
        for key in data:
            if key not in ("version", "modes", "extras", "description"):
                raise unknown_name("key", key, ["version", "modes", "extras", "description"], source)
        if data.get("version", 1) != 1:
            raise ValueError(f"{source}: version: only version 1 is supported, got {data['version']!r}.")
        raw_modes = data.get("modes")
        if not isinstance(raw_modes, dict) or not raw_modes:
            raise ValueError(f"{source}: modes: expected a non-empty mapping of clip modes, "
                             f"got {raw_modes!r}.")
        modes: dict[ClipMode, ParamRange | None] = {}
        for raw_mode, spec in raw_modes.items():
            mode = ClipMode.parse(raw_mode, f"{source}: modes")
            where = f"{source}: modes.{mode.value}"
            spec = spec or {}
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: expected a mapping, got {spec!r}.")
            for key in spec:
                if key != "threshold":
                    raise unknown_name("key", key, ["threshold"], where)
            if mode is ClipMode.NONE:
                if spec:
                    raise ValueError(f"{where}: mode 'none' takes no threshold.")
                modes[mode] = None
                continue
            if "threshold" not in spec:
                raise ValueError(f"{where}: the key 'threshold' is required.")
            if isinstance(spec["threshold"], str):
                modes[mode] = _parse_auto(spec["threshold"], mode, f"{where}.threshold")
                continue
            modes[mode] = _check_ends(mode, _parse_range(spec["threshold"], f"{where}.threshold",
                                                         positive=True), f"{where}.threshold")
        raw_extras = data.get("extras") or {}
        if not isinstance(raw_extras, dict):
            raise ValueError(f"{source}: extras: expected a mapping, got {raw_extras!r}.")
        extras: dict[str, ParamRange] = {}
        for key, spec in raw_extras.items():
            if not isinstance(key, str) or not key.isidentifier() or key.startswith("clip_"):
                raise ValueError(f"{source}: extras.{key}: names must be identifiers not "
                                 "starting with 'clip_'.")
            extras[key] = _parse_range(spec, f"{source}: extras.{key}")
        return cls(modes, extras, name or Path(source).stem)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SearchSpace:
        """Read and validate a search-space YAML file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"Cannot read search space {str(path)!r}: {exc.strerror}.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path.name}: not valid YAML ({exc}).") from None
        return cls.from_dict(data, path.name, path.stem)

    @classmethod
    def shipped(cls, name: str) -> SearchSpace:
        """A search space shipped with cliptune, by name (see :func:`shipped_spaces`)."""
        spaces = shipped_spaces()
        if name not in spaces:
            raise unknown_name("search space", name, sorted(spaces))
        return cls.from_yaml(spaces[name])

    @classmethod
    def resolve(cls, space: SearchSpace | str | os.PathLike[str] | dict[str, Any]) -> SearchSpace:
        """Accept a SearchSpace, a shipped name, a YAML path or a dict."""
        if isinstance(space, SearchSpace):
            return space
        if isinstance(space, dict):
            return cls.from_dict(space)
        if isinstance(space, (str, os.PathLike)):
            text = os.fspath(space)
            if text.endswith((".yaml", ".yml")) or os.sep in text or os.path.exists(text):
                return cls.from_yaml(text)
            return cls.shipped(text)
        raise TypeError("The 'search_space' parameter of tune must be a shipped name, a YAML path, "
                        f"a dict or a SearchSpace. Got {type(space).__name__} instead.")

    def suggest(self, trial: optuna.Trial) -> tuple[ClipConfig, dict[str, Any]]:
        """Sample a clip config and the extras, define-by-run."""
        mode = ClipMode(trial.suggest_categorical("clip_mode", [m.value for m in self.modes]))
        rng = self.modes[mode]
        threshold = None if rng is None else rng.suggest(trial, f"clip_threshold_{mode.value}")
        extras = {key: rng.suggest(trial, key) for key, rng in self.extras.items()}
        return ClipConfig(mode, threshold), extras

    @property
    def auto_modes(self) -> list[ClipMode]:
        """The modes whose threshold is ``auto`` (still to be set from a probe)."""
        return [m for m, r in self.modes.items() if r is not None and r.auto]

    def with_ranges(self, ranges: dict[ClipMode, ParamRange]) -> SearchSpace:
        """This space with some modes' threshold ranges replaced (e.g. resolved ``auto`` ones)."""
        return replace(self, modes={m: ranges.get(m, r) for m, r in self.modes.items()})

    def default_extras(self) -> dict[str, Any]:
        """A value for each extra, for checking a model factory before the study."""
        return {key: rng.midpoint() for key, rng in self.extras.items()}

    def to_dict(self) -> dict[str, Any]:
        """The YAML form."""
        out: dict[str, Any] = {"version": 1, "modes": {
            m.value: ({} if r is None else {"threshold": AUTO if r.auto else r.to_dict()})
            for m, r in self.modes.items()
        }}
        if self.extras:
            out["extras"] = {k: r.to_dict() for k, r in self.extras.items()}
        return out


def config_from_params(params: dict[str, Any]) -> tuple[ClipConfig, dict[str, Any]]:
    """Rebuild (ClipConfig, extras) from a trial's Optuna params."""
    mode = ClipMode(params["clip_mode"])
    threshold = params.get(f"clip_threshold_{mode.value}")
    extras = {k: v for k, v in params.items() if not k.startswith("clip_")}
    return ClipConfig(mode, threshold), extras


def _spaces_dir() -> Path:
    """Shipped spaces live in the wheel as cliptune/search_spaces, in a checkout at the top level."""
    packaged = Path(str(resources.files("cliptune"))) / "search_spaces"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "search_spaces"


def shipped_spaces() -> dict[str, Path]:
    """Names and paths of the search spaces shipped with cliptune."""
    folder = _spaces_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


__all__ = ["ParamRange", "SearchSpace", "config_from_params", "shipped_spaces"]
