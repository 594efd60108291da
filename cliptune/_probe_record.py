"""The record of a gradient probe (see cliptune.probe): per step, what a probe trial saw.

A probe trains without clipping for at most one epoch or ``max_steps`` steps and keeps, per step,
the loss, the pre-clip global gradient norm, each parameter tensor's gradient norm and the largest
absolute gradient element. It stops at the first non-finite value, which is not recorded.
"""

from __future__ import annotations

import math
from typing import Any


def new_record(max_steps: int) -> dict[str, Any]:
    """An empty probe record; ``stopped`` says why it ended ("epoch", "max_steps", "nonfinite")."""
    return {"loss": [], "global_norm": [], "tensor_norms": [], "max_abs": [], "stopped": "epoch",
            "max_steps": max_steps}


def add_step(record: dict[str, Any], values: list[float]) -> bool:
    """Add one step's ``[loss, max_abs, *tensor_norms]``; False (and stop) when any is non-finite."""
    if not all(math.isfinite(v) for v in values):
        record["stopped"] = "nonfinite"
        return False
    loss, max_abs, *norms = values
    record["loss"].append(loss)
    record["max_abs"].append(max_abs)
    record["tensor_norms"].append(norms)
    record["global_norm"].append(math.sqrt(sum(n * n for n in norms)))
    return True
