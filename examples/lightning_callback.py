"""Tune the gradient clipping of an existing Lightning training script with ``ClipTuneCallback``.

The task is the adding problem on an IRNN (a ReLU RNN whose recurrent matrix starts as the
identity) trained with plain SGD at a learning rate of 0.3: without a clip it blows up within a
few steps (those trials are pruned, with their reason), with a fitting one it learns. The three
lines that cliptune adds to the Lightning code are marked ``# cliptune``. Needs Lightning
(``pip install "cliptune[lightning]"``). Run it:

    python examples/lightning_callback.py
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

import cliptune
from cliptune.integrations.lightning import ClipTuneCallback  # cliptune

SEQ_LEN, N_SAMPLES, LR = 15, 2560, 0.3


def make_loaders(seed: int = 0) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Adding-problem sequences (values, markers) -> the sum of the two marked values."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 1, size=(N_SAMPLES, SEQ_LEN))
    markers = np.zeros((N_SAMPLES, SEQ_LEN))
    markers[np.arange(N_SAMPLES), rng.integers(0, SEQ_LEN // 2, size=N_SAMPLES)] = 1.0
    markers[np.arange(N_SAMPLES), rng.integers(SEQ_LEN // 2, SEQ_LEN, size=N_SAMPLES)] = 1.0
    X = torch.tensor(np.stack([values, markers], axis=-1), dtype=torch.float32)
    y = torch.tensor((values * markers).sum(axis=1, keepdims=True), dtype=torch.float32)
    split = int(0.8 * N_SAMPLES)
    train = torch.utils.data.TensorDataset(X[:split], y[:split])
    val = torch.utils.data.TensorDataset(X[split:], y[split:])
    return (torch.utils.data.DataLoader(train, batch_size=32, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=256))


class AddingRNN(pl.LightningModule):
    """The user's module, unchanged: it logs ``val_loss``, the metric the study optimises."""

    def __init__(self, hidden: int = 32, lr: float = LR) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        nn.init.eye_(self.rnn.weight_hh_l0)
        self.head = nn.Linear(hidden, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def train(trial: cliptune.Trial) -> None:
    """One trial: the usual Lightning fit, with the trial's callback."""
    torch.manual_seed(trial.seed)
    train_loader, val_loader = make_loaders()
    trainer = pl.Trainer(max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ClipTuneCallback(trial)])  # cliptune
    trainer.fit(AddingRNN(), train_loader, val_loader)


if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    result = cliptune.tune_loop(train, search_space="rnn", n_trials=16, seed=0)  # cliptune
    print(result.summary())
