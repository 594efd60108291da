"""What a clip is: a mode and its threshold, validated once, readable from and to YAML."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from cliptune._errors import check_positive_float, unknown_name


class ClipMode(StrEnum):
    """How gradients are clipped.

    - ``none``: gradients untouched.
    - ``value``: every element clamped to ``[-t, t]``.
    - ``norm``: each parameter tensor's gradient scaled to L2 norm <= t on its own (Keras ``clipnorm``).
    - ``global_norm``: all gradients scaled together so their joint L2 norm <= t
      (torch ``clip_grad_norm_``, Keras ``global_clipnorm``).

    Adaptive modes keep state across steps (one state per trial, or per :class:`cliptune.Clipper`);
    their one parameter travels in ``ClipConfig.threshold`` so that search spaces and the Optuna
    names ``clip_threshold_<mode>`` stay uniform:

    - ``autoclip``: the global norm clipped to the p-th percentile of all pre-clip global norms
      seen so far, the current one included (Seetharaman et al. 2020); parameter p in (0, 100].
    - ``agc``: unit-wise adaptive gradient clipping (Brock et al. 2021): each unit's gradient
      scaled to at most lambda * max(||W_unit||, 1e-3); parameter lambda > 0.
    - ``zclip``: the global norm clipped when its z-score against EMA mean and variance exceeds
      z_thres (Kumar et al. 2025); parameter z_thres > 0.
    """

    NONE = "none"
    VALUE = "value"
    NORM = "norm"
    GLOBAL_NORM = "global_norm"
    AUTOCLIP = "autoclip"
    AGC = "agc"
    ZCLIP = "zclip"

    @property
    def adaptive(self) -> bool:
        """Whether the mode keeps state across steps (its parameter is not a fixed threshold)."""
        return self in _PARAMETER

    @classmethod
    def parse(cls, mode: object, where: str = "") -> ClipMode:
        """Turn a string (or a ClipMode) into a ClipMode, with a 'did you mean' error."""
        try:
            return cls(mode)
        except ValueError:
            raise unknown_name("clip mode", mode, [m.value for m in cls], where) from None


_PARAMETER = {"autoclip": "percentile", "agc": "lambda", "zclip": "z_thres"}
_KERAS_ARG = {
    ClipMode.VALUE: "clipvalue",
    ClipMode.NORM: "clipnorm",
    ClipMode.GLOBAL_NORM: "global_clipnorm",
}


@dataclass(frozen=True)
class ClipConfig:
    """A gradient-clipping configuration.

    Args:
        mode: One of ``none``, ``value``, ``norm``, ``global_norm``, or an adaptive mode
            ``autoclip``, ``agc``, ``zclip`` (see :class:`ClipMode`).
        threshold: Positive finite threshold; must be left out (``None``) for ``none``. For an
            adaptive mode, the mode's parameter: the percentile in (0, 100] for ``autoclip``,
            lambda for ``agc``, z_thres for ``zclip``.

    Example:
        >>> ClipConfig("global_norm", 0.83)
        ClipConfig(mode='global_norm', threshold=0.83)
        >>> ClipConfig("norm", 1.0).keras_kwargs()
        {'clipnorm': 1.0}
    """

    mode: ClipMode
    threshold: float | None = None

    def __post_init__(self) -> None:
        mode = ClipMode.parse(self.mode)
        object.__setattr__(self, "mode", mode)
        if mode is ClipMode.NONE:
            if self.threshold is not None:
                raise ValueError(
                    "The 'threshold' parameter of ClipConfig must be None for mode='none'. "
                    f"Got {self.threshold!r} instead."
                )
            return
        if self.threshold is None:
            raise ValueError(
                f"The 'threshold' parameter of ClipConfig is required for mode={mode.value!r}."
            )
        owner = "ClipConfig"
        if mode.adaptive:
            owner = f"ClipConfig ({_PARAMETER[mode]} for mode={mode.value!r})"
        if mode is ClipMode.AUTOCLIP:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 100:
                raise ValueError(f"The 'threshold' parameter of {owner} must be in (0, 100]. "
                                 f"Got {t!r} instead.")
        object.__setattr__(self, "threshold", check_positive_float(self.threshold, "threshold",
                                                                   owner))

    def __repr__(self) -> str:
        return f"ClipConfig(mode={self.mode.value!r}, threshold={self.threshold!r})"

    def keras_kwargs(self) -> dict[str, float]:
        """The Keras optimizer arguments that apply this clip, e.g. ``{"clipnorm": 1.0}``.

        Adaptive modes have no such argument: use ``cliptune.keras_optimizer(config, ...)``.
        """
        if self.mode is ClipMode.NONE:
            return {}
        if self.mode.adaptive:
            raise ValueError(
                f"The adaptive clip mode {self.mode.value!r} cannot be expressed as Keras "
                "optimizer arguments; build the optimizer with "
                "cliptune.keras_optimizer(config, 'adam', learning_rate=...) instead."
            )
        return {_KERAS_ARG[self.mode]: float(self.threshold)}  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, as written to YAML."""
        return {"mode": self.mode.value, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: object, where: str = "ClipConfig") -> ClipConfig:
        """Build from ``{"mode": ..., "threshold": ...}``; errors name ``where``."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping with 'mode' and 'threshold'. "
                             f"Got {type(data).__name__} instead.")
        unknown = set(data) - {"mode", "threshold"}
        if unknown:
            raise unknown_name("key", sorted(unknown)[0], ["mode", "threshold"], where)
        if "mode" not in data:
            raise ValueError(f"{where}: the key 'mode' is required.")
        try:
            return cls(data["mode"], data.get("threshold"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def to_yaml(self, path: str | os.PathLike[str], **extras: Any) -> None:
        """Write this config (and any co-tuned ``extras``) to a YAML file."""
        body: dict[str, Any] = {"clip": self.to_dict()}
        if extras:
            body["extras"] = extras
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(body, fh, sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ClipConfig:
        """Read a config written by :meth:`to_yaml` (a ``clip:`` mapping, or the mapping itself)."""
        name = os.path.basename(os.fspath(path))
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as exc:
            raise ValueError(f"Cannot read clip config {os.fspath(path)!r}: {exc.strerror}.") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{name}: not valid YAML ({exc}).") from None
        if isinstance(data, dict) and "clip" in data:
            return cls.from_dict(data["clip"], f"{name}: clip")
        return cls.from_dict(data, name)
