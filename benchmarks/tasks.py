"""Three small exploding-gradient tasks shared by the pruning and search-quality benchmarks.

Why these: clipping only matters where gradients explode, so each task blows up without a clip at
its learning rate, yet each trains in well under a second a trial on one CPU thread.

- ``adding_irnn``: the adding problem (length 10) on an IRNN (``examples/adding_rnn.py``), SGD at
  lr 0.3: unclipped, the gradient norm reaches 1e8 and the net learns nothing.
- ``digits_rows``: scikit-learn's 8x8 digits read row by row (8 steps of 8 pixels) by an IRNN,
  10-way cross-entropy, SGD at lr 0.6: unclipped, it stays at chance.
- ``deep_tanh``: a 12-layer tanh MLP whose weights start 3x too large (std 3/sqrt(fan_in)) on a
  smooth regression, SGD at lr 0.2: unclipped, the loss turns NaN in the first epoch.

A training step is counted as one forward pass in training mode (a forward pre-hook on the model),
which is independent of cliptune's internals; ``tune()`` checks the model with one such pass before
its study, which :func:`counting` leaves out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Task:
    """A model factory, its data and the training settings tune() gets."""

    name: str
    model_fn: Callable[[], Any]
    data: tuple[np.ndarray, np.ndarray]
    loss: str
    lr: float
    epochs: int
    batch_size: int
    space: str = "default"
    steps: list[int] = field(default_factory=lambda: [0])

    def tune_kwargs(self) -> dict[str, Any]:
        return {"loss": self.loss, "optimizer": "sgd", "lr": self.lr, "epochs": self.epochs,
                "batch_size": self.batch_size, "search_space": self.space}

    def counted_model_fn(self) -> Callable[[], Any]:
        """``model_fn`` whose models add their training-mode forward passes to ``self.steps``."""
        def hook(module: Any, args: Any) -> None:
            if module.training:
                self.steps[0] += 1

        def make() -> Any:
            model = self.model_fn()
            model.register_forward_pre_hook(hook)
            return model

        make.__qualname__ = self.name
        return make


@contextmanager
def counting(task: Task, checked: bool = True) -> Iterator[list[int]]:
    """Count the training steps run inside the block; ``checked``: leave out tune()'s check pass."""
    task.steps[0] = 0
    box = [0]
    yield box
    box[0] = task.steps[0] - (1 if checked else 0)


def _irnn(n_in: int, hidden: int, n_out: int) -> Any:
    import torch
    from torch import nn

    class IRNN(nn.Module):
        """A ReLU RNN with identity recurrent weights; reads the last step's state."""

        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(n_in, hidden, nonlinearity="relu", batch_first=True)
            nn.init.eye_(self.rnn.weight_hh_l0)
            self.head = nn.Linear(hidden, n_out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    return IRNN()


def adding_irnn() -> Task:
    from examples.adding_rnn import make_data

    return Task("adding_irnn", lambda: _irnn(2, 32, 1), make_data(1920, seq_len=10), "mse", 0.3, 6, 32)


def digits_rows() -> Task:
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)  # (n, 8 rows, 8 pixels)
    return Task("digits_rows", lambda: _irnn(8, 64, 10), (X, digits.target.astype(np.int64)),
                "cross_entropy", 0.6, 6, 32)


def deep_tanh() -> Task:
    from torch import nn

    def make() -> nn.Module:
        layers: list[nn.Module] = []
        width = 16
        for _ in range(11):
            layers += [nn.Linear(width, 64), nn.Tanh()]
            width = 64
        layers.append(nn.Linear(64, 1))
        model = nn.Sequential(*layers)
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=3.0 / m.in_features ** 0.5)
        return model

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2048, 16)).astype(np.float32)
    y = np.sin(X[:, :4]).sum(axis=1, keepdims=True).astype(np.float32)
    return Task("deep_tanh", make, (X, y), "mse", 0.2, 6, 64)


TASKS: dict[str, Callable[[], Task]] = {"adding_irnn": adding_irnn, "digits_rows": digits_rows,
                                        "deep_tanh": deep_tanh}
