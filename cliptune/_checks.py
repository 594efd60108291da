"""Constraints of settings: small callables that return the value (normalised) or raise ``Invalid``.

One constraint serves every place a setting is given: ``tune(lr=-1)`` says "The 'lr' parameter of
tune must be a positive finite float. Got -1 instead.", a job file says "job.yaml: optimizer.lr:
expected a positive finite float, got -1." (see :mod:`cliptune.settings`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from cliptune._errors import did_you_mean


class Invalid(ValueError):
    """A value that breaks a constraint: ``expected`` says what was wanted, ``hint`` may help."""

    def __init__(self, expected: str, hint: str = "", kind: type[Exception] = ValueError) -> None:
        super().__init__(expected)
        self.expected, self.hint, self.kind = expected, hint, kind


Check = Callable[[Any], Any]


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid("an int >= 1")
    return value


def positive_float(value: Any) -> float:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise Invalid("a positive finite float")
    return float(value)


positive_float.number = True  # type: ignore[attr-defined]  # a job file may write it as text (1e-3)


def fraction(value: Any) -> float:
    if not (_is_number(value) and 0.0 < value < 1.0):
        raise Invalid("a float in (0, 1)")
    return float(value)


fraction.number = True  # type: ignore[attr-defined]


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("a bool", kind=TypeError)
    return value


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("an int or None", kind=TypeError)
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a non-empty string")
    return value


def optional(check: Check) -> Check:
    """``check``, or None."""

    def allow_none(value: Any) -> Any:
        return None if value is None else check(value)

    allow_none.number = getattr(check, "number", False)  # type: ignore[attr-defined]
    return allow_none


def choice(choices: Sequence[str], callable_ok: bool = False, what: str = "") -> Check:
    """One of ``choices`` (a string), or also a callable when ``callable_ok``."""
    listed = ", ".join(map(repr, choices))
    expected = f"one of {listed}" + (f" or {what}" if callable_ok else "")

    def one_of(value: Any) -> Any:
        if callable_ok and callable(value):
            return value
        if not isinstance(value, str):
            raise Invalid(expected, kind=TypeError)
        if value not in choices:
            raise Invalid(expected, did_you_mean(value, choices))
        return value

    return one_of


def instance_of(cls_name: str, test: Callable[[Any], bool]) -> Check:
    """An object for which ``test`` holds (a type check without importing its module here)."""

    def check(value: Any) -> Any:
        if not test(value):
            raise Invalid(cls_name, kind=TypeError)
        return value

    return check


def describe(value: Any) -> str:
    """How an offending value is echoed: its repr, or its type for a long or opaque object."""
    text_ = repr(value)
    return text_ if len(text_) <= 80 else f"a {type(value).__name__}"
