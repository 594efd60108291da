"""The TensorFlow side of ``Trial.clip``: the trial's clip on a list of gradients, graph-friendly.

The fixed modes follow the torch kernels exactly (``g * t / max(norm, t)``; norms accumulated in
float32, float64 for float64 gradients; scales applied in that dtype, one per gradient for
``norm``), so a custom ``tf.GradientTape`` loop, cliptune's Keras loop and the torch side agree.
The adaptive modes keep their state in TF variables (``_keras_adaptive.AdaptiveClip``). Everything
is built from TF ops and variables created under ``init_scope``, so the clip can be called inside
a ``tf.function`` (XLA too, but for autoclip, whose history grows).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from cliptune.backends._keras_adaptive import AdaptiveClip
from cliptune.config import ClipConfig, ClipMode


def _dense(g: Any) -> tf.Tensor:
    return tf.convert_to_tensor(g)  # IndexedSlices (embeddings) become dense


def _acc(grads: list[tf.Tensor]) -> tf.DType:
    return tf.float64 if any(g.dtype == tf.float64 for g in grads) else tf.float32


def tensor_norms(grads: list[tf.Tensor]) -> tf.Tensor:
    """Per-tensor L2 norms as one vector in the accumulation dtype."""
    acc = _acc(grads)
    return tf.stack([tf.cast(tf.norm(tf.cast(g, tf.float64 if g.dtype == tf.float64
                                                 else tf.float32)), acc) for g in grads])


def clip_fixed(grads: list[tf.Tensor], config: ClipConfig) -> tuple[list[tf.Tensor], tf.Tensor,
                                                                     tf.Tensor]:
    """A fixed mode on dense gradients: (clipped, pre-clip global norm, changed)."""
    out, total, _, changed = clip_fixed_stats(grads, config)
    return out, total, changed


def clip_fixed_stats(grads: list[tf.Tensor], config: ClipConfig
                     ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor, tf.Tensor]:
    """As :func:`clip_fixed`, with the post-clip global norm before the flag."""
    norms = tensor_norms(grads)
    total = tf.norm(norms)
    mode, t = config.mode, config.threshold
    if mode is ClipMode.NONE:
        return grads, total, total, tf.constant(False)
    if mode is ClipMode.VALUE:
        changed = tf.reduce_any(tf.stack([tf.reduce_max(tf.abs(g)) > t for g in grads]))
        out = [tf.clip_by_value(g, -t, t) for g in grads]
        return out, total, tf.norm(tensor_norms(out)), changed
    if mode is ClipMode.NORM:
        scales = t / tf.maximum(norms, t)
        out = [tf.cast(tf.cast(g, scales.dtype) * scales[i], g.dtype) for i, g in enumerate(grads)]
        return out, total, tf.norm(tf.minimum(norms, t)), tf.reduce_any(norms > t)
    scale = t / tf.maximum(total, t)  # GLOBAL_NORM
    out = [tf.cast(tf.cast(g, scale.dtype) * scale, g.dtype) for g in grads]
    return out, total, total * scale, total > t


class KerasClipState:
    """One trial's TensorFlow clip (adaptive state included), callable in a ``tf.function``."""

    def __init__(self, config: ClipConfig, probe: bool = False) -> None:
        self.config = config
        self.probe = probe
        self.adaptive = AdaptiveClip(config) if config.mode.adaptive else None
        self._probe_vars: tf.Variable | None = None
        self._post: tf.Variable | None = None  # the last post-clip norm, read by Trial.step

    def __call__(self, grads: list[Any], variables: list[Any] | None = None
                 ) -> tuple[list[Any], tf.Tensor, tf.Tensor]:
        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return grads, tf.constant(0.0), tf.constant(False)
        dense = [_dense(grads[i]) for i in present]
        if self.probe:
            self._record_probe(dense)
            total = tf.norm(tensor_norms(dense))
            return grads, total, tf.constant(False)
        if self.adaptive is not None:
            if variables is None and self.config.mode is ClipMode.AGC:
                raise ValueError("trial.clip(grads, variables): agc scales each unit's gradient "
                                 "by its weight's norm, so it needs the variables as well.")
            picked = None if variables is None else [variables[i] for i in present]
            total = tf.norm(tensor_norms(dense))
            clipped = self.adaptive.clip(dense, picked if picked is not None else dense)
            changed = self.adaptive.changed.read_value()
            post = tf.norm(tensor_norms(clipped))
        else:
            clipped, total, post, changed = clip_fixed_stats(dense, self.config)
        self._keep_post(post)
        out = list(grads)
        for i, g in zip(present, clipped, strict=True):
            out[i] = g
        return out, tf.cast(total, tf.float32) if total.dtype != tf.float64 else total, changed

    def _keep_post(self, post: tf.Tensor) -> None:
        if self._post is None:
            with tf.init_scope():
                self._post = tf.Variable(0.0, trainable=False, name="cliptune_post_norm")
        self._post.assign(tf.cast(post, tf.float32))

    def post_norm(self) -> float | None:
        """The post-clip global norm of the last clip (one host read; ``value()`` first halves its
        cost, to about 9 us)."""
        return None if self._post is None else float(self._post.value().numpy())

    def _record_probe(self, dense: list[tf.Tensor]) -> None:
        """Keep ``[max |g|, *per-tensor norms]`` in a variable that the trial reads after the step."""
        norms = tf.cast(tensor_norms(dense), tf.float32)
        max_abs = tf.reduce_max(tf.stack([tf.cast(tf.reduce_max(tf.abs(g)), tf.float32)
                                          for g in dense]))
        values = tf.concat([tf.reshape(max_abs, [1]), norms], 0)
        if self._probe_vars is None:
            with tf.init_scope():
                self._probe_vars = tf.Variable(tf.zeros([len(dense) + 1]), trainable=False,
                                               name="cliptune_probe")
        self._probe_vars.assign(values)

    def probe_values(self) -> list[float]:
        """What the last probe step saw: ``[max |g|, *per-tensor norms]``."""
        return self._probe_vars.value().numpy().tolist() if self._probe_vars is not None else [0.0]
