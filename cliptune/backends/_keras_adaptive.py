"""The adaptive clip modes (autoclip, agc, zclip) for Keras 3 / TensorFlow, with state in variables.

The rules and constants are in ``_adaptive_rules`` (shared with torch); a parity test holds the
two backends together. Differences of layout only:

- ``agc``: a unit is an output unit, the *last* axis of a Keras kernel (Dense ``(in, out)``,
  Conv ``(..., in, out)``), where torch has it first; a 0-D or 1-D variable is one unit. (An
  Embedding table is ``(vocab, dim)`` in both frameworks, so there units differ: columns here,
  rows in torch.)
- ``autoclip`` keeps its history in a variable whose length grows each step, which XLA cannot
  compile: the Keras backend turns XLA off for autoclip trials; compile a model that uses
  ``keras_optimizer`` with autoclip with ``jit_compile=False``.

The clip runs inside the optimizer (:func:`adaptive_optimizer_class` subclasses any Keras
optimizer class), so ``model.fit`` with ``cliptune.keras_optimizer(config, ...)`` clips exactly
as a tuning trial did. Its state is not saved with the model (a fresh optimizer starts afresh).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from cliptune.backends._adaptive_rules import (
    AGC_EPS,
    AGC_GRAD_FLOOR,
    ZCLIP_ALPHA,
    ZCLIP_EPS,
    ZCLIP_WARMUP,
)
from cliptune.config import ClipConfig, ClipMode


def _unit_norms(x: tf.Tensor) -> tf.Tensor:
    """Norm of each output unit (last axis), shaped to broadcast against ``x``."""
    rank = x.shape.rank
    if rank <= 1:
        return tf.norm(x)
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=list(range(rank - 1)), keepdims=True))


class AdaptiveClip:
    """One adaptive clip's state (TF variables) and its clip, for one optimizer."""

    def __init__(self, config: ClipConfig) -> None:
        if not config.mode.adaptive:
            raise ValueError(f"AdaptiveClip needs an adaptive clip mode. Got {config!r} instead.")
        self.config = config
        self.variables: list[Any] = []  # the optimizer's, for agc; set before each clip
        self.built = False

    def build(self) -> None:
        """Create the state variables (eagerly, even when first called inside a tf.function)."""
        if self.built:
            return
        with tf.init_scope():
            self.changed = tf.Variable(False, trainable=False, name="cliptune_changed")
            if self.config.mode is ClipMode.AUTOCLIP:
                self.history = tf.Variable(tf.zeros([0]), shape=tf.TensorShape([None]),
                                           trainable=False, name="cliptune_history")
            if self.config.mode is ClipMode.ZCLIP:
                self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="cliptune_count")
                self.buffer = tf.Variable(tf.zeros([ZCLIP_WARMUP]), trainable=False,
                                          name="cliptune_warmup")
                self.mean = tf.Variable(0.0, trainable=False, name="cliptune_mean")
                self.var = tf.Variable(0.0, trainable=False, name="cliptune_var")
        self.built = True

    def clip(self, grads: list[Any], variables: list[Any]) -> list[tf.Tensor]:
        """The clipped gradients; ``self.changed`` says whether the clip altered them."""
        self.build()
        grads = [tf.convert_to_tensor(g) for g in grads]  # IndexedSlices to dense
        if self.config.mode is ClipMode.AGC:
            return self._agc(grads, variables)
        total = tf.norm(tf.stack([tf.norm(tf.cast(g, tf.float32)) for g in grads]))
        if self.config.mode is ClipMode.AUTOCLIP:
            limit = self._percentile(total)
            changed = total > limit
            scale = tf.where(changed, limit / total, 1.0)
        else:
            scale, changed = self._zclip(total)
        self.changed.assign(changed)
        return [g * tf.cast(scale, g.dtype) for g in grads]

    def _agc(self, grads: list[tf.Tensor], variables: list[Any]) -> list[tf.Tensor]:
        lam = self.config.threshold
        out, triggered = [], []
        for g, v in zip(grads, variables, strict=True):
            g_norm = _unit_norms(tf.cast(g, tf.float32))
            max_norm = tf.maximum(_unit_norms(tf.cast(tf.convert_to_tensor(v), tf.float32)),
                                  AGC_EPS) * lam
            trigger = g_norm > max_norm
            scale = tf.where(trigger, max_norm / tf.maximum(g_norm, AGC_GRAD_FLOOR), 1.0)
            out.append(g * tf.cast(scale, g.dtype))
            triggered.append(tf.reduce_any(trigger))
        self.changed.assign(tf.reduce_any(tf.stack(triggered)))
        return out

    def _percentile(self, total: tf.Tensor) -> tf.Tensor:
        """Append ``total`` to the history; its p-th percentile (numpy's linear rule)."""
        history = tf.concat([self.history, tf.reshape(total, [1])], 0)
        self.history.assign(history)
        ordered = tf.sort(history)
        last = tf.size(history, out_type=tf.int64) - 1
        pos = self.config.threshold / 100 * tf.cast(last, tf.float64)
        lo = tf.cast(tf.floor(pos), tf.int64)
        hi = tf.minimum(lo + 1, last)
        frac = tf.cast(pos - tf.floor(pos), tf.float32)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * frac

    def _zclip(self, total: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The zclip step, without branches (XLA friendly): the scale and whether it clips."""
        z_thres, count, mean, var = self.config.threshold, self.count, self.mean, self.var
        warm = count < ZCLIP_WARMUP
        slot = tf.reshape(tf.minimum(count, ZCLIP_WARMUP - 1), [1, 1])
        buffer = tf.where(warm, tf.tensor_scatter_nd_update(self.buffer, slot, [total]),
                          self.buffer)
        start = tf.equal(count, ZCLIP_WARMUP - 1)
        mean0 = tf.reduce_mean(buffer)
        var0 = tf.reduce_mean(tf.square(buffer - mean0))
        std = tf.sqrt(var)
        z = (total - mean) / (std + ZCLIP_EPS)
        spike = tf.logical_and(tf.logical_not(warm), z > z_thres)
        target = mean + z_thres**2 * std / tf.maximum(z, z_thres)
        kept = tf.where(spike, target, total)
        mean1 = ZCLIP_ALPHA * mean + (1 - ZCLIP_ALPHA) * kept
        var1 = ZCLIP_ALPHA * var + (1 - ZCLIP_ALPHA) * tf.square(kept - mean1)
        self.buffer.assign(buffer)
        self.mean.assign(tf.where(start, mean0, tf.where(warm, mean, mean1)))
        self.var.assign(tf.where(start, var0, tf.where(warm, var, var1)))
        self.count.assign_add(1)
        return tf.where(spike, target / total, 1.0), spike


class _AdaptiveClipMixin:
    """Clips with an :class:`AdaptiveClip` where a Keras optimizer applies ``clipnorm`` & co."""

    def __init__(self, *args: Any, cliptune_clip: ClipConfig | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = cliptune_clip if isinstance(cliptune_clip, ClipConfig) else \
            ClipConfig.from_dict(cliptune_clip, "cliptune_clip")
        self.cliptune_state = AdaptiveClip(config)

    def build(self, variables: list[Any]) -> None:
        super().build(variables)  # type: ignore[misc]
        self.cliptune_state.build()

    def _backend_apply_gradients(self, grads: list[Any], trainable_variables: list[Any]) -> Any:
        self.cliptune_state.variables = list(trainable_variables)  # for agc, in _clip_gradients
        return super()._backend_apply_gradients(grads, trainable_variables)  # type: ignore[misc]

    def _clip_gradients(self, grads: list[Any]) -> list[Any]:
        return self.cliptune_state.clip(grads, self.cliptune_state.variables)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "cliptune_clip": self.cliptune_state.config.to_dict()}  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def adaptive_optimizer_class(base: type[keras.optimizers.Optimizer]) -> type:
    """``base`` with the adaptive clip, taking ``cliptune_clip=ClipConfig(...)`` (one per base)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}AdaptiveClip", (_AdaptiveClipMixin, base),
                              {"__module__": __name__})
    return _CLASSES[base]
