"""Tune the gradient clipping of an existing Keras ``model.fit`` script with ``ClipTuneCallback``.

The task is the adding problem on an LSTM trained with plain SGD at a learning rate of 1.0:
without a clip it blows up within a few steps (those trials are pruned, with their reason), with a
fitting one it learns. The lines that cliptune adds to the Keras code are marked ``# cliptune``:
the trial's optimizer (it applies the clip), its callback (it feeds the stability rules and the
study), and the tuning call. Needs TensorFlow (``pip install "cliptune[tensorflow]"``). Run it:

    python examples/keras_fit_callback.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: no start-up lines
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # (both are needed for a silent import)

import keras
import numpy as np

import cliptune
from cliptune.integrations.keras import ClipTuneCallback  # cliptune

SEQ_LEN, N_SAMPLES, LR = 15, 1024, 1.0


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Adding-problem sequences (values, markers) -> the sum of the two marked values."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 1, size=(N_SAMPLES, SEQ_LEN))
    markers = np.zeros((N_SAMPLES, SEQ_LEN))
    markers[np.arange(N_SAMPLES), rng.integers(0, SEQ_LEN // 2, size=N_SAMPLES)] = 1.0
    markers[np.arange(N_SAMPLES), rng.integers(SEQ_LEN // 2, SEQ_LEN, size=N_SAMPLES)] = 1.0
    X = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values * markers).sum(axis=1, keepdims=True).astype(np.float32)
    return X, y


def train(trial: cliptune.Trial) -> None:
    """One trial: the usual compile and fit, with the trial's optimizer and callback."""
    keras.utils.set_random_seed(trial.seed)
    X, y = make_data()
    model = keras.Sequential([keras.Input((SEQ_LEN, 2)), keras.layers.LSTM(32),
                              keras.layers.Dense(1)])
    model.compile(optimizer=trial.keras_optimizer("sgd", learning_rate=LR),  # cliptune
                  loss="mse")
    model.fit(X, y, batch_size=32, epochs=12, validation_split=0.2, verbose=0,
              callbacks=[ClipTuneCallback(trial)])  # cliptune


if __name__ == "__main__":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    result = cliptune.tune_loop(train, search_space="rnn", n_trials=12, seed=0)  # cliptune
    print(result.summary())
