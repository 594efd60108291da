"""Tune the gradient clipping of an existing ``transformers.Trainer`` script with ``ClipTuneCallback``.

The model is any ``nn.Module`` whose forward returns ``{"loss": ..., "logits": ...}`` (a
Transformers model given ``labels`` does): here an IRNN on the adding problem (a ReLU RNN whose
recurrent matrix starts as the identity), trained with plain SGD at a learning rate of 0.3.
Without a clip it blows up within a few steps (those trials are pruned, with their reason); with
a fitting one it learns. The lines that cliptune adds to the Trainer code are marked
``# cliptune``; the Trainer's own clip is switched off (``max_grad_norm=0``, its default is 1.0).
Needs Transformers (``pip install "cliptune[transformers]"``). Run it:

    python examples/transformers_callback.py
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import transformers
from torch import nn

import cliptune
from cliptune.integrations.transformers import ClipTuneCallback  # cliptune

SEQ_LEN, N_SAMPLES, LR = 15, 2560, 0.3


class AddingData(torch.utils.data.Dataset):
    """Adding-problem sequences (values, markers) -> the sum of the two marked values."""

    def __init__(self, start: int, stop: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        values = rng.uniform(0, 1, size=(N_SAMPLES, SEQ_LEN))
        markers = np.zeros((N_SAMPLES, SEQ_LEN))
        markers[np.arange(N_SAMPLES), rng.integers(0, SEQ_LEN // 2, size=N_SAMPLES)] = 1.0
        markers[np.arange(N_SAMPLES), rng.integers(SEQ_LEN // 2, SEQ_LEN, size=N_SAMPLES)] = 1.0
        x = np.stack([values, markers], axis=-1)[start:stop]
        self.x = torch.tensor(x, dtype=torch.float32)
        self.y = torch.tensor((values * markers).sum(axis=1, keepdims=True)[start:stop],
                              dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class AddingRNN(nn.Module):
    """The user's model, unchanged: it returns its loss as Transformers models do."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        nn.init.eye_(self.rnn.weight_hh_l0)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out, _ = self.rnn(x)
        logits = self.head(out[:, -1])
        loss = None if labels is None else nn.functional.mse_loss(logits, labels)
        return {"loss": loss, "logits": logits}


def train(trial: cliptune.Trial) -> None:
    """One trial: the usual Trainer, with the trial's callback and without the Trainer's clip."""
    torch.manual_seed(trial.seed)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            out, num_train_epochs=20, per_device_train_batch_size=32, per_device_eval_batch_size=256,
            learning_rate=LR, optim="sgd", lr_scheduler_type="constant", eval_strategy="epoch",
            save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=True, seed=trial.seed, max_grad_norm=0)  # cliptune: the Trainer's own clip off
        trainer = transformers.Trainer(model=AddingRNN(), args=args,
                                       train_dataset=AddingData(0, 2048),
                                       eval_dataset=AddingData(2048, N_SAMPLES),
                                       callbacks=[ClipTuneCallback(trial)])  # cliptune
        trainer.remove_callback(transformers.PrinterCallback)  # (quiet: no metrics printed)
        trainer.train()


if __name__ == "__main__":
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    result = cliptune.tune_loop(train, search_space="rnn", n_trials=16, seed=0)  # cliptune
    print(result.summary())
