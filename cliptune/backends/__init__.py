"""cliptune's own training loops, one per framework, picked without importing a framework here.

A *task* is the train function of ``tune(model_fn, data)``: ``task(trial)`` trains one trial
through the public :class:`cliptune.Trial` API, exactly as a user's ``tune_loop`` function would,
and returns the model. Besides, a task checks its inputs once before the study (``check``), and
gives what a refit needs (``with_splits``, ``predict``, ``sample_inputs``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cliptune.data import Splits
    from cliptune.settings import Training
    from cliptune.trial import Trial


class Task(Protocol):
    """What the tuner needs of a built-in loop."""

    name: str

    def __call__(self, trial: Trial) -> Any: ...
    def check(self, extras: dict[str, Any], model: Any = None) -> None: ...
    def with_splits(self, splits: Splits) -> Task: ...
    def predict(self, model: Any, X: Any) -> Any: ...
    def sample_inputs(self, data: Any, n: int = 5) -> Any: ...


def takes_extras(model_fn: Callable[..., Any]) -> bool:
    """Whether a factory wants the extras: a required parameter, or one named ``extras``
    (``def make(width=128)`` is a zero-argument factory with a default)."""
    params = inspect.signature(model_fn).parameters.values()
    return any(p.name == "extras" or (p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)) for p in params)


def call_factory(model_fn: Callable[..., Any], extras: dict[str, Any]) -> Any:
    """A fresh model from ``model_fn``, given the co-tuned extras when it takes them."""
    return model_fn(dict(extras)) if takes_extras(model_fn) else model_fn()


_MODULES = {"torch": ("cliptune.backends._torch", "TorchTask"),
            "keras": ("cliptune.backends._keras", "KerasTask")}
_BROADCASTING_LOSSES = ("mse", "bce_with_logits")


def framework_of(model: object) -> str | None:
    """'torch' or 'keras' from the model's class hierarchy, without importing either."""
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module.startswith("torch.nn"):
            return "torch"
        if module.split(".")[0] in ("keras", "tf_keras") or module.startswith("tensorflow.python.keras"):
            return "keras"
    return None


def make_task(framework: str, model_fn: Callable[..., Any], splits: Splits, training: Training,
              threads: int | None) -> Task:
    """The built-in loop of ``framework`` ('torch' or 'keras'); its framework is imported now."""
    module, name = _MODULES[framework]
    return getattr(importlib.import_module(module), name)(model_fn, splits, training, threads)


def check_shapes(loss: Any, output: tuple[int, ...], target: tuple[int, ...]) -> None:
    """Refuse outputs and targets that a broadcasting loss would silently pair up wrongly.

    ``mse`` and ``bce_with_logits`` broadcast: (n, 3) outputs against (n, 1) targets, or (n, 1)
    against (n,), train without complaint on a meaningless objective.
    """
    if loss not in _BROADCASTING_LOSSES and loss is not None:
        return
    if tuple(output) != tuple(target):
        name = loss or "mse"
        raise ValueError(
            f"the model's outputs have shape {tuple(output)} but the targets have shape "
            f"{tuple(target)}; the loss {name!r} would broadcast them and train on a meaningless "
            "objective. Make the model's output match the targets (e.g. reshape y to "
            f"{tuple(output)} or the output to {tuple(target)})")
