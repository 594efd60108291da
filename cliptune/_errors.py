"""Small helpers for error messages in the scikit-learn / Optuna style."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


class UsageError(Exception):
    """A mistake in how a training loop uses its trial (a metric never reported, a train function
    that reports nothing): the trial is recorded FAIL and the study stops, since every trial would
    fail the same way."""


class Terminated(KeyboardInterrupt):
    """The job got SIGTERM (a scheduler, ``kill``, Kubernetes, SLURM): like a second Ctrl-C, it
    aborts the running trial, which is recorded as failed and retried when the job runs again."""


class StorageError(RuntimeError):
    """The Optuna storage cannot be written (a full disk, a lost database): the job stops; what
    the storage recorded before is kept, and the trial it could not record is retried later."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: object, choices: Iterable[str], where: str = "") -> ValueError:
    """The error for a name that is not one of ``choices``."""
    choices = list(choices)
    prefix = f"{where}: " if where else ""
    return ValueError(
        f"{prefix}unknown {kind} {name!r}; expected one of {', '.join(map(repr, choices))}."
        + did_you_mean(str(name), choices)
    )


def check_positive_int(value: object, name: str, owner: str = "tune") -> int:
    """Validate a positive integer argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"The {name!r} parameter of {owner} must be an int >= 1. Got {value!r} instead."
        )
    return value


def check_positive_float(value: object, name: str, owner: str) -> float:
    """Validate a positive finite float argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    else:
        ok = math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(
            f"The {name!r} parameter of {owner} must be a positive finite float. "
            f"Got {value!r} instead."
        )
    return float(value)  # type: ignore[arg-type]


def check_non_negative_float(value: object, name: str, owner: str) -> float:
    """Validate a finite float >= 0 argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"The {name!r} parameter of {owner} must be a finite float >= 0. "
                         f"Got {value!r} instead.")
    return float(value)
