"""cliptune's own Keras 3 (TensorFlow) loop, written on the public ``Trial`` API.

``KerasTask(model_fn, splits, training)`` trains a trial in one compiled ``tf.function`` step that
calls ``trial.clip`` between the tape and ``apply_gradients`` and returns ``[loss, pre-clip norm,
clipped]``, read with one host copy per step (so a non-finite loss stops the epoch at once) and
handed to ``trial.step``. Each epoch it reports ``val_loss`` (and ``val_accuracy`` for the
classification losses).

Conventions that differ from the torch loop:

- a callable ``loss`` follows Keras: ``loss(y_true, y_pred)``; ``loss=None`` keeps the loss a
  compiled model was given (``"mse"`` for a model that was not compiled);
- a callable ``optimizer`` is a Keras optimizer class or factory, called as
  ``optimizer(learning_rate=lr, **clip.keras_kwargs())``, e.g. ``keras.optimizers.Lion``;
- ``tf.data.Dataset`` splits must yield batches ``(x, y)`` or ``(x, y, sample_weight)``, as for
  ``model.fit``; ``batch_size`` and shuffling are then the dataset's own.

A compiled model keeps its metrics, ``jit_compile`` and ``run_eagerly``; otherwise Keras's default
``jit_compile="auto"`` applies (XLA on CPU, compiled once per trial). A model's own ``train_step``
is not used, and mixed precision is refused. TensorFlow's thread pools can be sized only before
it runs its first op: ``threads`` is applied then and ignored later. ``device`` is honoured with
``tf.device`` ('cpu', 'cuda'/'gpu', 'cuda:N'); a GPU TensorFlow does not see is an error.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from cliptune.backends import call_factory, check_shapes
from cliptune.backends._keras_optimizer import make_optimizer
from cliptune.config import ClipConfig, ClipMode

if TYPE_CHECKING:
    from cliptune.data import Splits
    from cliptune.settings import Training
    from cliptune.trial import Trial

_LOSSES: dict[str, Callable[[], keras.losses.Loss]] = {
    "mse": keras.losses.MeanSquaredError,
    "cross_entropy": functools.partial(keras.losses.SparseCategoricalCrossentropy,
                                       from_logits=True),
    "bce_with_logits": functools.partial(keras.losses.BinaryCrossentropy, from_logits=True),
}
_NO_CLIP = ClipConfig("none")


def make_loss(loss: str | Callable[..., Any] | None, model: keras.Model) -> Any:
    """The Keras loss for ``loss``; ``None`` keeps a compiled model's own."""
    if loss is None:
        return getattr(model, "loss", None) or keras.losses.MeanSquaredError()
    return loss if callable(loss) else _LOSSES[loss]()


def build_model(model_fn: Callable[..., Any], extras: dict[str, Any],
                model: Any = None) -> keras.Model:
    """Call the factory (with the extras when it takes an argument), or take a ``model`` it has
    just returned, and check it."""
    if model is None:
        model = call_factory(model_fn, extras)
    if not isinstance(model, keras.Model):
        raise TypeError("model_fn must return a Keras 3 model (keras.Model) or a torch.nn.Module. "
                        f"Got {type(model).__name__} instead.")
    return model


def compile_model(model: keras.Model, clip: ClipConfig, extras: dict[str, Any],
                  training: Training) -> None:
    """(Re)compile with the trial's optimizer, keeping a compiled model's metrics and XLA choice."""
    old = model._compile_config.config if getattr(model, "compiled", False) else {}
    optimizer = make_optimizer(training.optimizer, clip, extras.get("lr", training.lr), extras)
    model.compile(optimizer=optimizer, loss=make_loss(training.loss, model),
                  metrics=old.get("metrics"), weighted_metrics=old.get("weighted_metrics"),
                  loss_weights=old.get("loss_weights"), jit_compile=old.get("jit_compile", "auto"),
                  run_eagerly=bool(old.get("run_eagerly")))
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError("Mixed precision (a LossScaleOptimizer, from the dtype policy "
                         f"{model.dtype_policy.name!r}) is not supported by cliptune's Keras "
                         "loop yet; tune with the 'float32' policy.")


def _datasets(splits: Splits, training: Training, seed: int | None) -> tuple[Any, Any]:
    """Batched ``tf.data`` pipelines for both splits (arrays) or the user's datasets."""
    if not splits.is_arrays:
        for name, ds in (("train", splits.train), ("val", splits.val)):
            if not isinstance(ds, tf.data.Dataset):
                raise TypeError(f"A Keras model needs tf.data.Dataset splits (or arrays). The "
                                f"{name} split is a {type(ds).__name__} instead.")
        return splits.train, splits.val
    train = _from_arrays(splits.train, training.loss).shuffle(
        len(splits.train[0]), seed=seed, reshuffle_each_iteration=True)
    val = _from_arrays(splits.val, training.loss)
    return (train.batch(training.batch_size).prefetch(2),
            val.batch(training.batch_size).prefetch(2))


def _from_arrays(pair: tuple[np.ndarray, np.ndarray], loss: Any) -> tf.data.Dataset:
    X, y = pair
    X = X.astype(np.float32) if X.dtype.kind == "f" else X
    int_targets = loss == "cross_entropy" or (callable(loss) and y.dtype.kind in "iub")
    y = y.astype(np.int64 if int_targets else np.float32)
    return tf.data.Dataset.from_tensor_slices((X, y))


def _step_fn(model: keras.Model, trial: Trial) -> Callable[[Any], tf.Tensor]:
    """One optimisation step returning ``[loss, pre-clip global norm, clipped]`` as one tensor."""
    variables = model.trainable_variables

    def step(batch: Any) -> tf.Tensor:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
        grads, norm, clipped = trial.clip(tape.gradient(loss, variables), variables)
        model.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables, strict=True)
                                         if g is not None])
        return tf.stack([tf.cast(loss, tf.float32), tf.cast(norm, tf.float32),
                         tf.cast(clipped, tf.float32)])

    return step


def _eval_fn(model: keras.Model, accuracy: str | None) -> Callable[[Any], tf.Tensor]:
    """Summed loss, correct predictions and sample count of one batch."""

    def evaluate(batch: Any) -> tf.Tensor:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        y_pred = model(x, training=False)
        loss = model.compute_loss(x, y, y_pred, sample_weight, training=False)
        n = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
        if accuracy == "cross_entropy":
            right = tf.cast(tf.argmax(y_pred, -1), tf.int64) == tf.cast(tf.reshape(y, [-1]), tf.int64)
        elif accuracy == "bce_with_logits":
            right = tf.reduce_all(tf.reshape(y_pred > 0, [tf.shape(y_pred)[0], -1])
                                  == tf.reshape(y > 0.5, [tf.shape(y_pred)[0], -1]), axis=-1)
        else:
            right = tf.zeros([0], tf.bool)
        return tf.stack([tf.cast(loss, tf.float32) * n,
                         tf.reduce_sum(tf.cast(right, tf.float32)), n])

    return evaluate


def _compiled(fn: Callable[[Any], tf.Tensor], model: keras.Model, dataset: tf.data.Dataset,
              xla: bool = True) -> Callable[[Any], tf.Tensor]:
    """``fn`` as a ``tf.function`` traced once for the dataset's batches (XLA as Keras would,
    unless ``xla`` is false: autoclip's growing history cannot be compiled by XLA)."""
    if model.run_eagerly:
        return fn
    return tf.function(fn, input_signature=[dataset.element_spec],
                       jit_compile=bool(model.jit_compile) and xla)


def _first_pass(model: keras.Model, batch: Any, loss: Any) -> None:
    """Build the model, its loss and its optimizer eagerly on one batch; clear errors."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    shapes = f"inputs {_shapes(x)}, targets {_shapes(y)}"
    try:
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            if isinstance(y_pred, tf.Tensor) and isinstance(y, tf.Tensor):
                check_shapes(loss, tuple(y_pred.shape), tuple(y.shape))
            loss_value = model.compute_loss(x, y, y_pred, sample_weight)
    except Exception as exc:  # shape and dtype mismatches surface here, before the study
        raise ValueError(
            f"One training batch failed the forward pass or the loss: {_plain(exc)} ({shapes}). "
            "Check that the model's input and output match the data and the loss (and that a "
            "tf.data.Dataset is batched)."
        ) from exc
    if not model.trainable_variables:
        raise ValueError(f"The model returned by model_fn ({type(model).__name__}) has no "
                         "trainable parameters; there is nothing to clip or tune.")
    tape.gradient(loss_value, model.trainable_variables)
    model.optimizer.build(model.trainable_variables)


def _plain(exc: Exception) -> str:
    """The error's text without the terminal colour codes Keras adds."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()


def _shapes(t: Any) -> str:
    return str(tf.nest.map_structure(lambda a: tuple(a.shape), t))


def tf_device(device: str) -> str:
    """The TensorFlow device of a ``device`` setting ('cpu', 'cuda', 'cuda:1', 'gpu:0'), checked
    against the devices TensorFlow sees."""
    kind, _, index = device.lower().partition(":")
    if kind not in ("cpu", "cuda", "gpu") or (index and not index.isdigit()):
        raise ValueError("The 'device' parameter of tune must be 'cpu', 'cuda', 'cuda:N' or "
                         f"'gpu:N' for a Keras model. Got {device!r} instead.")
    if kind == "cpu":
        return "/CPU:0"
    gpus = tf.config.list_physical_devices("GPU")
    if int(index or 0) >= len(gpus):
        raise ValueError(f"device={device!r} was asked for, but TensorFlow sees {len(gpus)} GPU(s) "
                         "here. Use device='cpu'.")
    return f"/GPU:{int(index or 0)}"


def size_thread_pools(threads: int | None) -> None:
    if threads:
        with contextlib.suppress(RuntimeError):  # TF has started: its pools are fixed
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)


@dataclass
class KerasTask:
    """Train one trial of ``tune(model_fn, data)`` on Keras: a train function for the runner."""

    model_fn: Callable[..., Any]
    splits: Splits
    training: Training
    threads: int | None = None
    name: str = "keras"

    def with_splits(self, splits: Splits) -> KerasTask:
        return replace(self, splits=splits)

    def check(self, extras: dict[str, Any], model: Any = None) -> None:
        tf_device(self.training.device)
        size_thread_pools(self.threads)
        model = build_model(self.model_fn, extras, model)
        # A clip that sets an argument, so a factory that drops it (and could not apply the
        # tuned config in model.fit) fails here, before the study.
        compile_model(model, ClipConfig("global_norm", 1.0), extras, self.training)
        train, _ = _datasets(self.splits, self.training, seed=None)
        _first_pass(model, next(iter(train)), self.training.loss)

    def __call__(self, trial: Trial) -> keras.Model:
        with tf.device(tf_device(self.training.device)):
            return self._train(trial)

    def _train(self, trial: Trial) -> keras.Model:
        t = self.training
        size_thread_pools(self.threads)
        if trial.seed is not None:
            keras.utils.set_random_seed(trial.seed)
        model = build_model(self.model_fn, trial.extras)
        compile_model(model, _NO_CLIP, trial.extras, t)  # the trial clips
        train, val = _datasets(self.splits, t, trial.seed)
        _first_pass(model, next(iter(train)), t.loss)
        step = _compiled(_step_fn(model, trial), model, train,
                         xla=trial.config.mode is not ClipMode.AUTOCLIP)
        accuracy = t.loss if t.loss in ("cross_entropy", "bce_with_logits") else None
        evaluate = _compiled(_eval_fn(model, accuracy), model, val)
        for epoch in range(t.epochs):
            for batch in train:  # one host copy a step: a NaN stops the epoch here
                loss, norm, clipped = step(batch).numpy().tolist()
                trial.step(loss, norm, clipped > 0.5)
            trial.report(epoch, **_metrics(evaluate, val, accuracy))
        return model

    def predict(self, model: keras.Model, X: np.ndarray) -> np.ndarray:
        from cliptune.backends._keras_tools import predict

        return predict(model, X)

    def sample_inputs(self, data: Any, n: int = 5) -> np.ndarray | None:
        from cliptune.backends._keras_tools import sample_inputs

        return sample_inputs(data, n)


def _metrics(evaluate: Callable[[Any], tf.Tensor], data: tf.data.Dataset,
             accuracy: str | None) -> dict[str, float]:
    """Mean loss over a split (weighted by batch size), and accuracy for classification."""
    total = tf.zeros((3,))
    for batch in data:
        total += evaluate(batch)
    loss_sum, correct, count = total.numpy().tolist()
    out = {"val_loss": loss_sum / max(count, 1.0)}
    if accuracy:
        out["val_accuracy"] = correct / max(count, 1.0)
    return out
