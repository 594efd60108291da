"""What the core needs from Keras besides a trial: a gradient probe, predictions, sample inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from cliptune.backends._keras import (
    _compiled,
    _datasets,
    _dense,
    _first_pass,
    _size_thread_pools,
    build_model,
    compile_model,
)
from cliptune.backends._probe import add_step, new_record
from cliptune.config import ClipConfig

if TYPE_CHECKING:
    from cliptune.backends import TrainSettings
    from cliptune.data import Splits

_PREDICT_CHUNK = 4096  # rows a forward pass at prediction time


def _probe_step(model: keras.Model) -> Callable[[Any], tf.Tensor]:
    """One unclipped step returning ``[loss, max |g|, *per-tensor norms]`` as one tensor."""
    variables = model.trainable_variables

    def step(batch: Any) -> tf.Tensor:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True), sample_weight, training=True)
        pairs = [(g, v) for g, v in zip(tape.gradient(loss, variables), variables, strict=True)
                 if g is not None]
        grads = [tf.cast(_dense(g), tf.float32) for g, _ in pairs]
        norms = tf.sqrt(tf.stack([tf.reduce_sum(tf.square(g)) for g in grads]))
        max_abs = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in grads]))
        model.optimizer.apply_gradients(pairs)
        return tf.concat([tf.stack([tf.cast(loss, tf.float32), max_abs]), norms], axis=0)

    return step


def probe(model_fn: Callable[..., Any], extras: dict[str, Any], splits: Splits,
          settings: TrainSettings, max_steps: int) -> dict[str, Any]:
    """Train without clipping for one epoch or ``max_steps`` steps; gradient statistics per step."""
    _size_thread_pools(settings.threads)
    if settings.seed is not None:
        keras.utils.set_random_seed(settings.seed)
    model = build_model(model_fn, extras)
    compile_model(model, ClipConfig("none"), extras, settings)  # type: ignore[arg-type]
    train, _ = _datasets(splits, settings, settings.seed)
    _first_pass(model, next(iter(train)))
    step = _compiled(_probe_step(model), model, train)
    record = new_record()
    for batch in train:
        if len(record["loss"]) >= max_steps:
            record["stopped"] = "max_steps"
            break
        if not add_step(record, step(batch).numpy().tolist()):
            break
    return record


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
