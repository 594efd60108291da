"""Backends train one trial in one framework. This module picks one without importing a framework."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cliptune.config import ClipConfig
    from cliptune.data import Splits
    from cliptune.stability import TrialMonitor


@dataclass(frozen=True)
class TrainSettings:
    """Everything about training a trial that is not the clip or the co-tuned extras."""

    loss: str | Callable[..., Any] | None  # None: the backend's default (or a compiled loss)
    optimizer: str | Callable[..., Any]
    lr: float
    epochs: int
    batch_size: int
    device: str = "cpu"
    seed: int | None = None
    threads: int | None = None  # intra-op threads, set when workers share the cores


class Backend(Protocol):
    """Trains trials in one framework; knows nothing of Optuna or MLflow, only the monitor."""

    name: str

    def check(self, model_fn: Callable[..., Any], extras: dict[str, Any], splits: Splits,
              settings: TrainSettings, model: Any = None) -> None:
        """One forward/backward pass on one batch, turning framework errors into clear ones.

        ``model``: one the factory has just returned, so that it is not built twice."""

    def train(self, model_fn: Callable[..., Any], splits: Splits, clip: ClipConfig,
              extras: dict[str, Any], settings: TrainSettings, monitor: TrialMonitor,
              seed: int | None) -> Any:
        """Train one trial, calling ``monitor.step`` each step and ``monitor.epoch`` each epoch.

        Returns the trained model.
        """

    def probe(self, model_fn: Callable[..., Any], extras: dict[str, Any], splits: Splits,
              settings: TrainSettings, max_steps: int) -> dict[str, Any]:
        """Train without clipping for one epoch or ``max_steps`` steps, stopping at a non-finite
        value; per step the loss, global norm, per-tensor norms, largest |g| (see ``_probe``)."""

    def predict(self, model: Any, X: Any) -> Any:
        """The model's outputs for the rows ``X``, as a numpy array."""

    def sample_inputs(self, data: Any, n: int = 5) -> Any:
        """A few input rows of a split as a numpy array (for a model signature), or None."""


def call_factory(model_fn: Callable[..., Any], extras: dict[str, Any]) -> Any:
    """A fresh model from ``model_fn``, given the co-tuned extras when it takes an argument."""
    return model_fn(dict(extras)) if inspect.signature(model_fn).parameters else model_fn()


_BACKENDS = {"torch": "cliptune.backends._torch", "keras": "cliptune.backends._keras"}


def framework_of(model: object) -> str | None:
    """'torch' or 'keras' from the model's class hierarchy, without importing either."""
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module.startswith("torch.nn"):
            return "torch"
        if module.split(".")[0] in ("keras", "tf_keras") or module.startswith("tensorflow.python.keras"):
            return "keras"
    return None


def get_backend(name: str) -> Backend:
    """Load a backend by name ('torch' or 'keras'); its framework is imported now."""
    module = importlib.import_module(_BACKENDS[name])
    return module.BACKEND
