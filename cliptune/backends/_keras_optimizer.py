"""``keras_optimizer``: a Keras optimizer that applies a clip config itself, for ``model.fit``.

Fixed modes use the optimizer's own arguments (``clipvalue``, ``clipnorm``, ``global_clipnorm``
from :meth:`ClipConfig.keras_kwargs`), whose formula is the one cliptune's kernels follow; the
adaptive modes live in a subclass of the optimizer's class that keeps the clip's state
(``_keras_adaptive``). So a tuned config means the same thing in a user's ``model.fit``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras

from cliptune._errors import unknown_name
from cliptune.config import ClipConfig

OPTIMIZERS: dict[str, type[keras.optimizers.Optimizer]] = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "rmsprop": keras.optimizers.RMSprop,
}
_EXTRA_KWARGS = {"sgd": ("momentum", "weight_decay"), "rmsprop": ("momentum", "weight_decay"),
                 "adam": ("weight_decay",), "adamw": ("weight_decay",)}
CLIP_ARGS = ("clipvalue", "clipnorm", "global_clipnorm")


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
    given = sorted(set(kwargs) & set(CLIP_ARGS))
    if given:
        raise ValueError(f"keras_optimizer takes the clip from 'config'; do not pass {given[0]}="
                         f"{kwargs[given[0]]!r} as well.")
    if isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError("The 'optimizer' parameter must be a name or an optimizer class or "
                        f"factory, not an instance ({type(optimizer).__name__}): each trial "
                        "needs a fresh optimizer with its own clip.")
    if not callable(optimizer):
        if optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", optimizer, OPTIMIZERS)
        optimizer = OPTIMIZERS[optimizer]
    if config.mode.adaptive:
        return _adaptive_optimizer(config, optimizer, kwargs)
    opt = optimizer(**kwargs, **config.keras_kwargs())
    if not isinstance(opt, keras.optimizers.Optimizer):
        raise TypeError("An optimizer callable must return a keras.optimizers.Optimizer. "
                        f"Got {type(opt).__name__} instead.")
    wanted = config.keras_kwargs()
    if any(getattr(opt, arg, None) != wanted.get(arg) for arg in CLIP_ARGS):
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
    """The optimizer of a trial: the clip, the learning rate and the extras it takes."""
    kwargs = {}
    if isinstance(optimizer, str):
        kwargs = {k: extras[k] for k in _EXTRA_KWARGS.get(optimizer, ()) if k in extras}
    return keras_optimizer(clip, optimizer, learning_rate=lr, **kwargs)
