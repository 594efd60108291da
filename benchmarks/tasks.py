"""Five small exploding-gradient tasks shared by the pruning and search-quality benchmarks.

Why these: clipping only matters where gradients explode, so each task blows up without a clip at
its learning rate, yet each trains in well under a second a trial on one CPU thread.

- ``adding_irnn``: the adding problem (length 10) on an IRNN (``examples/adding_rnn.py``), SGD at
  lr 0.3: unclipped, the gradient norm reaches 1e8 and the net learns nothing.
- ``digits_rows``: scikit-learn's 8x8 digits read row by row (8 steps of 8 pixels) by an IRNN,
  10-way cross-entropy, SGD at lr 0.6: unclipped, it stays at chance.
- ``deep_tanh``: a 12-layer tanh MLP whose weights start 3x too large (std 3/sqrt(fan_in)) on a
  smooth regression, SGD at lr 0.2: unclipped, the loss turns NaN in the first epoch.
- ``warmup_mlp`` (a user's loop, ``tune_loop``): a 4-layer ReLU MLP whose SGD learning rate warms
  up linearly to 0.2 over half the run: unclipped, it trains, then blows up mid-training (around
  step 110 of 300), once the rising learning rate crosses the edge of stability.
- ``char_lstm`` (a user's loop, ``tune_loop``): the character-level LSTM language model of
  ``examples/char_lstm.py`` on less text and for 2 epochs, truncated BPTT, SGD at lr 30 with a
  one-cycle schedule, bits per character: unclipped it blows up (as does global norm 1.0).

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


@dataclass
class LoopTask(Task):
    """A task trained by a user's loop: ``train(trial, count)`` is what ``tune_loop`` runs."""

    train: Callable[..., Any] = None  # type: ignore[assignment]
    metric: str = "val_loss"

    def counted_train(self) -> Callable[[Any], None]:
        def train(trial: Any) -> None:
            self.train(trial, self.steps)

        train.__qualname__ = self.name
        return train


def _counter(model: Any, steps: list[int]) -> None:
    def hook(module: Any, args: Any) -> None:
        if module.training:
            steps[0] += 1

    model.register_forward_pre_hook(hook)


def _warmup_train(trial: Any, steps: list[int]) -> None:
    import torch
    from torch import nn

    torch.manual_seed(trial.seed or 0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2048, 16)).astype(np.float32)
    y = (np.sin(X[:, :4]).sum(axis=1, keepdims=True) * 3).astype(np.float32)
    layers: list[nn.Module] = []
    width = 16
    for _ in range(4):
        layers += [nn.Linear(width, 128), nn.ReLU()]
        width = 128
    model = nn.Sequential(*layers, nn.Linear(128, 1))
    _counter(model, steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 150))
    xt, yt = torch.from_numpy(X[:1600]), torch.from_numpy(y[:1600])
    xv, yv = torch.from_numpy(X[1600:]), torch.from_numpy(y[1600:])
    gen = torch.Generator().manual_seed(trial.seed or 0)
    for epoch in range(6):
        order = torch.randperm(1600, generator=gen)
        for i in range(0, 1600, 32):
            idx = order[i:i + 32]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xt[idx]), yt[idx])
            loss.backward()
            trial.clip_(model.parameters(), loss)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            trial.report(epoch, val_loss=float(nn.functional.mse_loss(model(xv), yv)))
        model.train()


def warmup_mlp() -> LoopTask:
    return LoopTask("warmup_mlp", None, None, "mse", 0.2, 6, 32,  # type: ignore[arg-type]
                    train=_warmup_train)


def _char_train(trial: Any, steps: list[int]) -> None:
    import math

    import torch
    from torch import nn

    from examples.char_lstm import CharLSTM, bits_per_char, load_text, streams

    torch.manual_seed(trial.seed or 0)
    train_codes, val_codes, vocab = load_text()
    train_data = streams(train_codes[:120_000], 32)
    val_data = streams(val_codes, 8)
    model = CharLSTM(vocab, hidden=64)
    _counter(model, steps)
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    total = 2 * math.ceil((train_data.shape[1] - 1) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=30.0, total_steps=total)
    for epoch in range(2):
        state = None
        for i in range(0, train_data.shape[1] - 1, 64):
            x, y = train_data[:, i:i + 64], train_data[:, i + 1:i + 65]
            x = x[:, : y.shape[1]]
            opt.zero_grad()
            logits, state = model(x, state)
            state = tuple(s.detach() for s in state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            trial.clip_(model.parameters(), loss)
            opt.step()
            sched.step()
        trial.report(epoch, bpc=bits_per_char(model, val_data))


def char_lstm() -> LoopTask:
    return LoopTask("char_lstm", None, None, "cross_entropy", 30.0, 2, 64,  # type: ignore[arg-type]
                    train=_char_train, metric="bpc")


TASKS: dict[str, Callable[[], Task]] = {"adding_irnn": adding_irnn, "digits_rows": digits_rows,
                                        "deep_tanh": deep_tanh, "warmup_mlp": warmup_mlp,
                                        "char_lstm": char_lstm}
