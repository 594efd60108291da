"""Keras 3 (TensorFlow) backend: train one trial, apply the clip, tell the monitor; nothing else.

The clip is the optimizer's own (``clipvalue``, ``clipnorm``, ``global_clipnorm`` from
:meth:`ClipConfig.keras_kwargs`; for the adaptive modes, a subclass of the optimizer's class that
keeps the clip's state, see ``_keras_adaptive``), so a tuned config means the same thing in a
user's ``model.fit`` with :func:`keras_optimizer`.
Training runs in a compiled ``tf.function`` step that also returns the pre-clip global gradient
norm and whether the clip changed anything, read with one host copy per step so a non-finite loss
stops the epoch at once.

Conventions that differ from the torch backend:

- a callable ``loss`` follows Keras: ``loss(y_true, y_pred)``; ``loss=None`` keeps the loss a
  compiled model was given (``"mse"`` for a model that was not compiled);
- a callable ``optimizer`` is a Keras optimizer class or factory, called as
  ``optimizer(learning_rate=lr, **clip.keras_kwargs())``, e.g. ``keras.optimizers.Lion`` or
  ``functools.partial(keras.optimizers.SGD, momentum=0.9)``;
- ``tf.data.Dataset`` splits must yield batches ``(x, y)`` or ``(x, y, sample_weight)``, as for
  ``model.fit``; ``batch_size`` and shuffling are then the dataset's own.

A compiled model keeps its metrics, ``jit_compile`` and ``run_eagerly``; otherwise Keras's default
``jit_compile="auto"`` applies (XLA on CPU, compiled once per trial: compile the model with
``jit_compile=False`` to skip that for short trials). A model's own ``train_step`` is not used,
and mixed precision is refused.

TensorFlow's thread pools can be sized only before it runs its first op: ``settings.threads`` (set
when workers share the cores) is applied then and ignored later; beside torch on few cores, pin
them yourself first (``tf.config.threading.set_intra_op_parallelism_threads(1)``, inter-op too).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from cliptune._errors import unknown_name
from cliptune.backends import call_factory
from cliptune.config import ClipConfig, ClipMode

if TYPE_CHECKING:
    from cliptune.backends import TrainSettings
    from cliptune.data import Splits
    from cliptune.stability import TrialMonitor

_LOSSES: dict[str, Callable[[], keras.losses.Loss]] = {
    "mse": keras.losses.MeanSquaredError,
    "cross_entropy": functools.partial(keras.losses.SparseCategoricalCrossentropy,
                                       from_logits=True),
    "bce_with_logits": functools.partial(keras.losses.BinaryCrossentropy, from_logits=True),
}
_OPTIMIZERS: dict[str, type[keras.optimizers.Optimizer]] = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "rmsprop": keras.optimizers.RMSprop,
}
_EXTRA_KWARGS = {"sgd": ("momentum", "weight_decay"), "rmsprop": ("momentum", "weight_decay"),
                 "adam": ("weight_decay",), "adamw": ("weight_decay",)}
_CLIP_ARGS = ("clipvalue", "clipnorm", "global_clipnorm")


def keras_optimizer(config: ClipConfig, optimizer: str | Callable[..., Any] = "adam",
                    **kwargs: Any) -> keras.optimizers.Optimizer:
    """A Keras optimizer that applies ``config`` itself, ready for ``model.compile``.

    Args:
        config: The clip, e.g. a tuned ``result.best_config``.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, or a Keras optimizer class
            or factory taking the clip keyword arguments. For an adaptive mode (``autoclip``,
            ``agc``, ``zclip``) a name, a class or a ``functools.partial`` of a class: the
            optimizer is then a subclass of it that clips with its own state (one per optimizer).
        **kwargs: More optimizer arguments, such as ``learning_rate``.

    Example:
        >>> opt = keras_optimizer(ClipConfig("global_norm", 1.0), "adam", learning_rate=1e-3)
        >>> opt.global_clipnorm
        1.0
    """
    if not isinstance(config, ClipConfig):
        raise TypeError("The 'config' parameter of keras_optimizer must be a ClipConfig. "
                        f"Got {type(config).__name__} instead.")
    given = sorted(set(kwargs) & set(_CLIP_ARGS))
    if given:
        raise ValueError(f"keras_optimizer takes the clip from 'config'; do not pass {given[0]}="
                         f"{kwargs[given[0]]!r} as well.")
    if isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError("The 'optimizer' parameter must be a name or an optimizer class or "
                        f"factory, not an instance ({type(optimizer).__name__}): each trial "
                        "needs a fresh optimizer with its own clip.")
    if not callable(optimizer):
        if optimizer not in _OPTIMIZERS:
            raise unknown_name("optimizer", optimizer, _OPTIMIZERS)
        optimizer = _OPTIMIZERS[optimizer]
    if config.mode.adaptive:
        return _adaptive_optimizer(config, optimizer, kwargs)
    opt = optimizer(**kwargs, **config.keras_kwargs())
    if not isinstance(opt, keras.optimizers.Optimizer):
        raise TypeError("An optimizer callable must return a keras.optimizers.Optimizer. "
                        f"Got {type(opt).__name__} instead.")
    wanted = config.keras_kwargs()
    if any(getattr(opt, arg, None) != wanted.get(arg) for arg in _CLIP_ARGS):
        raise ValueError(f"The optimizer factory dropped the clip arguments {wanted}; it must "
                         "pass clipvalue, clipnorm and global_clipnorm on to the optimizer.")
    return opt


def _adaptive_optimizer(config: ClipConfig, optimizer: Callable[..., Any],
                        kwargs: dict[str, Any]) -> keras.optimizers.Optimizer:
    """An adaptive clip lives in a subclass of the optimizer's class, so it needs that class."""
    from cliptune.backends._keras_adaptive import adaptive_optimizer_class

    base, bound = optimizer, {}
    if isinstance(optimizer, functools.partial) and not optimizer.args:
        base, bound = optimizer.func, dict(optimizer.keywords)
    if not (isinstance(base, type) and issubclass(base, keras.optimizers.Optimizer)):
        raise TypeError(f"The adaptive clip mode {config.mode.value!r} needs an optimizer name, "
                        "a Keras optimizer class or a functools.partial of one (cliptune "
                        f"subclasses it to keep the clip's state). Got {optimizer!r} instead.")
    return adaptive_optimizer_class(base)(**bound, **kwargs, cliptune_clip=config)


def make_optimizer(optimizer: str | Callable[..., Any], clip: ClipConfig, lr: float,
                   extras: dict[str, Any]) -> keras.optimizers.Optimizer:
    kwargs = {}
    if isinstance(optimizer, str):
        kwargs = {k: extras[k] for k in _EXTRA_KWARGS.get(optimizer, ()) if k in extras}
    return keras_optimizer(clip, optimizer, learning_rate=lr, **kwargs)


def make_loss(loss: str | Callable[..., Any] | None, model: keras.Model) -> Any:
    """The Keras loss for ``loss``; ``None`` keeps a compiled model's own."""
    if loss is None:
        return getattr(model, "loss", None) or keras.losses.MeanSquaredError()
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise unknown_name("loss", loss, _LOSSES)
    return _LOSSES[loss]()


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
                  settings: TrainSettings) -> None:
    """(Re)compile with the clipping optimizer, keeping a compiled model's metrics and XLA choice."""
    old = model._compile_config.config if getattr(model, "compiled", False) else {}
    optimizer = make_optimizer(settings.optimizer, clip, extras.get("lr", settings.lr), extras)
    model.compile(optimizer=optimizer, loss=make_loss(settings.loss, model),
                  metrics=old.get("metrics"), weighted_metrics=old.get("weighted_metrics"),
                  loss_weights=old.get("loss_weights"), jit_compile=old.get("jit_compile", "auto"),
                  run_eagerly=bool(old.get("run_eagerly")))
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError("Mixed precision (a LossScaleOptimizer, from the dtype policy "
                         f"{model.dtype_policy.name!r}) is not supported by cliptune's Keras "
                         "backend yet; tune with the 'float32' policy.")


def _datasets(splits: Splits, settings: TrainSettings, seed: int | None) -> tuple[Any, Any]:
    """Batched ``tf.data`` pipelines for both splits (arrays) or the user's datasets."""
    if not splits.is_arrays:
        for name, ds in (("train", splits.train), ("val", splits.val)):
            if not isinstance(ds, tf.data.Dataset):
                raise TypeError(f"A Keras model needs tf.data.Dataset splits (or arrays). The "
                                f"{name} split is a {type(ds).__name__} instead.")
        return splits.train, splits.val
    train = _from_arrays(splits.train, settings.loss).shuffle(
        len(splits.train[0]), seed=seed, reshuffle_each_iteration=True)
    val = _from_arrays(splits.val, settings.loss)
    return (train.batch(settings.batch_size).prefetch(2),
            val.batch(settings.batch_size).prefetch(2))


def _from_arrays(pair: tuple[np.ndarray, np.ndarray], loss: Any) -> tf.data.Dataset:
    X, y = pair
    X = X.astype(np.float32) if X.dtype.kind == "f" else X
    int_targets = loss == "cross_entropy" or (callable(loss) and y.dtype.kind in "iub")
    y = y.astype(np.int64 if int_targets else np.float32)
    return tf.data.Dataset.from_tensor_slices((X, y))


def _changed(grads: list[tf.Tensor], norms: tf.Tensor, total: tf.Tensor,
             clip: ClipConfig) -> tf.Tensor:
    """Whether the optimizer's clip alters ``grads`` (the same test as the torch kernel)."""
    t = clip.threshold
    if clip.mode is ClipMode.VALUE:
        return tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in grads])) > t
    if clip.mode is ClipMode.NORM:
        return tf.reduce_any(norms > t)
    if clip.mode is ClipMode.GLOBAL_NORM:
        return total > t
    return tf.constant(False)


def _dense(g: Any) -> tf.Tensor:
    return g.values if isinstance(g, tf.IndexedSlices) else g


def _step_fn(model: keras.Model, clip: ClipConfig) -> Callable[[Any], tf.Tensor]:
    """One optimisation step returning ``[loss, pre-clip global norm, clipped]`` as one tensor."""
    variables = model.trainable_variables

    def step(batch: Any) -> tf.Tensor:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
        pairs = [(g, v) for g, v in zip(tape.gradient(loss, variables), variables, strict=True)
                 if g is not None]
        grads = [tf.cast(_dense(g), tf.float32) for g, _ in pairs]
        norms = tf.sqrt(tf.stack([tf.reduce_sum(tf.square(g)) for g in grads]))
        total = tf.norm(norms)
        clipped = None if clip.mode.adaptive else _changed(grads, norms, total, clip)
        model.optimizer.apply_gradients(pairs)  # the optimizer clips with its own arguments
        if clipped is None:  # an adaptive clip records in its state whether it changed anything
            clipped = model.optimizer.cliptune_state.changed.read_value()
        return tf.stack([tf.cast(loss, tf.float32), total, tf.cast(clipped, tf.float32)])

    return step


def _eval_fn(model: keras.Model) -> Callable[[Any], tf.Tensor]:
    """Summed loss and sample count of one batch, for a size-weighted mean."""

    def evaluate(batch: Any) -> tf.Tensor:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        loss = model.compute_loss(x, y, model(x, training=False), sample_weight, training=False)
        n = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
        return tf.stack([tf.cast(loss, tf.float32) * n, n])

    return evaluate


def _compiled(fn: Callable[[Any], tf.Tensor], model: keras.Model, dataset: tf.data.Dataset,
              xla: bool = True) -> Callable[[Any], tf.Tensor]:
    """``fn`` as a ``tf.function`` traced once for the dataset's batches (XLA as Keras would,
    unless ``xla`` is false: autoclip's growing history cannot be compiled by XLA)."""
    if model.run_eagerly:
        return fn
    return tf.function(fn, input_signature=[dataset.element_spec],
                       jit_compile=bool(model.jit_compile) and xla)


def _first_pass(model: keras.Model, batch: Any) -> None:
    """Build the model, its loss and its optimizer eagerly on one batch; clear errors."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    shapes = f"inputs {_shapes(x)}, targets {_shapes(y)}"
    try:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True), sample_weight)
    except Exception as exc:  # shape and dtype mismatches surface here, before the study
        raise ValueError(
            f"One training batch failed the forward pass or the loss: {_plain(exc)} ({shapes}). "
            "Check that the model's input and output match the data and the loss (and that a "
            "tf.data.Dataset is batched)."
        ) from exc
    if not model.trainable_variables:
        raise ValueError(f"The model returned by model_fn ({type(model).__name__}) has no "
                         "trainable parameters; there is nothing to clip or tune.")
    tape.gradient(loss, model.trainable_variables)
    model.optimizer.build(model.trainable_variables)


def _plain(exc: Exception) -> str:
    """The error's text without the terminal colour codes Keras adds."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()


def _shapes(t: Any) -> str:
    return str(tf.nest.map_structure(lambda a: tuple(a.shape), t))


def _size_thread_pools(threads: int | None) -> None:
    if threads:
        with contextlib.suppress(RuntimeError):  # TF has started: its pools are fixed
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)


class KerasBackend:
    """Supervised training of a Keras model in a compiled step that reports clip statistics."""

    name = "keras"

    def check(self, model_fn: Callable[..., Any], extras: dict[str, Any], splits: Splits,
              settings: TrainSettings, model: Any = None) -> None:
        _size_thread_pools(settings.threads)
        model = build_model(model_fn, extras, model)
        # A clip that sets an argument, so a factory that drops it fails here, before the study.
        compile_model(model, ClipConfig("global_norm", 1.0), extras, settings)
        train, _ = _datasets(splits, settings, seed=None)
        _first_pass(model, next(iter(train)))

    def train(self, model_fn: Callable[..., Any], splits: Splits, clip: ClipConfig,
              extras: dict[str, Any], settings: TrainSettings, monitor: TrialMonitor,
              seed: int | None) -> keras.Model:
        _size_thread_pools(settings.threads)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        model = build_model(model_fn, extras)
        compile_model(model, clip, extras, settings)
        train, val = _datasets(splits, settings, seed)
        _first_pass(model, next(iter(train)))
        step = _compiled(_step_fn(model, clip), model, train, xla=clip.mode is not ClipMode.AUTOCLIP)
        evaluate = _compiled(_eval_fn(model), model, val)
        for epoch in range(settings.epochs):
            for batch in train:  # one host copy a step: a NaN stops the epoch here
                loss, norm, clipped = step(batch).numpy().tolist()
                monitor.step(loss, norm, clipped > 0.5)
            monitor.epoch(epoch, None, _mean_loss(evaluate, val))
        return model

    # Beyond a trial (in _keras_tools): a probe for ``threshold: auto``, predictions, a sample.
    def probe(self, model_fn: Callable[..., Any], extras: dict[str, Any], splits: Splits,
              settings: TrainSettings, max_steps: int) -> dict[str, Any]:
        from cliptune.backends._keras_tools import probe

        return probe(model_fn, extras, splits, settings, max_steps)

    def predict(self, model: keras.Model, X: np.ndarray) -> np.ndarray:
        from cliptune.backends._keras_tools import predict

        return predict(model, X)

    def sample_inputs(self, data: Any, n: int = 5) -> np.ndarray | None:
        from cliptune.backends._keras_tools import sample_inputs

        return sample_inputs(data, n)


def _mean_loss(evaluate: Callable[[Any], tf.Tensor], data: tf.data.Dataset) -> float:
    """Mean loss over a split, weighted by batch size."""
    total = tf.zeros((2,))
    for batch in data:
        total += evaluate(batch)
    loss_sum, count = total.numpy().tolist()
    return loss_sum / max(count, 1.0)


BACKEND = KerasBackend()
