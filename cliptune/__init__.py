"""cliptune: tune gradient clipping (mode and threshold) with Optuna, for PyTorch and Keras.

Importing cliptune imports no torch, TensorFlow or mlflow; each loads when first used.
"""

from __future__ import annotations

from typing import Any

from cliptune._errors import UsageError
from cliptune.config import ClipConfig, ClipMode
from cliptune.monitor import TrialMonitor
from cliptune.result import TuneResult
from cliptune.space import SearchSpace, shipped_spaces
from cliptune.stability import StabilityPruner, StabilityRules
from cliptune.storage import Heartbeat
from cliptune.tracking import MlflowTracker, Tracker
from cliptune.trial import Trial
from cliptune.tuner import tune, tune_loop

__version__ = "0.1.0"

_LAZY = {"Clipper": "cliptune.backends._torch_adaptive",
         "clip_grads_": "cliptune.backends._torch_clip",
         "keras_optimizer": "cliptune.backends._keras_optimizer"}


def __getattr__(name: str) -> Any:
    """Framework-specific helpers load their framework on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cliptune' has no attribute {name!r}")


__all__ = [
    "ClipConfig",
    "ClipMode",
    "Clipper",
    "Heartbeat",
    "MlflowTracker",
    "SearchSpace",
    "StabilityPruner",
    "StabilityRules",
    "Tracker",
    "Trial",
    "TrialMonitor",
    "TuneResult",
    "UsageError",
    "clip_grads_",
    "keras_optimizer",
    "shipped_spaces",
    "tune",
    "tune_loop",
]
