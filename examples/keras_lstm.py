"""The adding problem on a Keras LSTM trained with plain SGD at a learning rate of 1.0.

Each sequence has two channels: random numbers in [0, 1] and a marker that is 1 at two positions;
the target is the sum of the two marked numbers (predicting the mean scores an MSE of about 0.17).
At this learning rate the unclipped LSTM blows up within a few steps (its loss passes 1e15), while
a clipped one trains. Needs TensorFlow (``pip install "cliptune[tensorflow]"``). Run it:

    python examples/keras_lstm.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: no start-up lines
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # (both are needed for a silent import)

import keras
import numpy as np

SEQ_LEN = 30
N_SAMPLES = 768
LR = 1.0


def make_data(n: int = N_SAMPLES, seq_len: int = SEQ_LEN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(X, y): X of shape (n, seq_len, 2), y of shape (n, 1)."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 1, size=(n, seq_len))
    markers = np.zeros((n, seq_len))
    markers[np.arange(n), rng.integers(0, seq_len // 2, size=n)] = 1.0
    markers[np.arange(n), rng.integers(seq_len // 2, seq_len, size=n)] = 1.0
    X = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values * markers).sum(axis=1, keepdims=True).astype(np.float32)
    return X, y


def make_model() -> keras.Model:
    """A one-layer LSTM regressor; cliptune compiles it with each trial's clipping optimizer."""
    return keras.Sequential([keras.Input((SEQ_LEN, 2)), keras.layers.LSTM(32),
                             keras.layers.Dense(1)])


if __name__ == "__main__":
    import cliptune

    result = cliptune.tune(make_model, make_data(), loss="mse", optimizer="sgd", lr=LR,
                           epochs=4, batch_size=32, search_space="rnn", n_trials=10, seed=0)
    print(result.summary())
