"""What a refit needs from Keras besides a trial: predictions and sample inputs (a signature)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

_PREDICT_CHUNK = 4096  # rows a forward pass at prediction time


def predict(model: keras.Model, X: np.ndarray) -> np.ndarray:
    """The model's outputs for ``X`` (inference mode) as a numpy array."""
    X = np.asarray(X)
    X = X.astype(np.float32) if X.dtype.kind == "f" else X
    outs = [keras.ops.convert_to_numpy(model(X[i:i + _PREDICT_CHUNK], training=False))
            for i in range(0, len(X), _PREDICT_CHUNK)]
    return np.concatenate(outs).astype(np.float32, copy=False)


def sample_inputs(data: Any, n: int = 5) -> np.ndarray | None:
    """A few input rows of a split (arrays or a batched ``tf.data.Dataset``), for a signature."""
    if isinstance(data, tuple):
        return np.asarray(data[0][:n])
    x, _, _ = keras.utils.unpack_x_y_sample_weight(next(iter(data)))
    return x[:n].numpy() if isinstance(x, tf.Tensor) else None
