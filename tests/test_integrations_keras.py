"""Keras fit: the trial's optimizer and callback end to end under tune_loop, the clip's point,
the step losses, mixed precision, refusals."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cliptune import Trial, UsageError  # noqa: E402
from cliptune.backends._keras_adaptive import AdaptiveClip  # noqa: E402
from cliptune.backends._keras_trial import clip_fixed  # noqa: E402
from cliptune.integrations.keras import ClipTuneCallback, trial_optimizer  # noqa: E402
from tests._integrations import (  # noqa: E402
    SPACE,
    a_trial,
    check_auto_probe,
    check_stable_and_exploding,
    overflowed_trial,
    tune_enqueued,
)
from tests.conftest import pin_tensorflow_threads  # noqa: E402

pin_tensorflow_threads()
pytestmark = pytest.mark.integrations

LR, BATCH, STEPS = 0.2, 16, 32  # 2 epochs of 16 batches


def _data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of scale 3: SGD at lr 0.2 on their regression diverges unless the step is clipped."""
    rng = np.random.default_rng(0)
    X = (3 * rng.normal(size=(n, 4))).astype(np.float32)
    y = (X @ rng.normal(size=(4, 1)) + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
    return X, y


class StepUpdates(keras.callbacks.Callback):
    """The norm of each batch's weight update over the learning rate: the gradient SGD applied."""

    def __init__(self) -> None:
        super().__init__()
        self.norms: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._before = [w.numpy().copy() for w in self.model.trainable_weights]

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        after = [w.numpy() for w in self.model.trainable_weights]
        delta = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, self._before, strict=True)))
        self.norms.append(delta / LR)


def _model(trial: Trial, scale: float | None = None, **compile_kwargs: Any) -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    optimizer = trial.keras_optimizer("sgd", learning_rate=LR)
    if scale is not None:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=scale)
    model.compile(optimizer=optimizer, loss="mse", **{"metrics": ["mae"], **compile_kwargs})
    return model


def _fit(trial: Trial, model: Any = None, data: tuple[np.ndarray, np.ndarray] | None = None,
         metric: str | None = None, extra: list[Any] | None = None, **kwargs: Any) -> Any:
    X, y = data or _data()
    settings = {"batch_size": BATCH, "epochs": 2, "validation_data": (X[:64], y[:64]),
                "shuffle": False, "verbose": 0, **kwargs}
    model = model or _model(trial)
    return model.fit(X, y, callbacks=[ClipTuneCallback(trial, metric), *(extra or [])], **settings)


def test_stable_trial_completes_and_an_exploding_one_is_pruned_with_its_reason(
        tmp_path: Path) -> None:
    check_stable_and_exploding(lambda trial: _fit(trial), tmp_path, STEPS)


@pytest.mark.parametrize(("mode", "threshold"), [("value", 0.5), ("norm", 0.5),
                                                 ("global_norm", 0.5), ("agc", 0.01)])
def test_one_step_applies_the_trials_clip_to_the_gradients(mode: str, threshold: float) -> None:
    trial = a_trial(mode, threshold)
    model = _model(trial)
    X, y = _data(BATCH)
    before = [w.numpy().copy() for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(X))
    grads = tape.gradient(loss, model.trainable_weights)
    if mode == "agc":
        expected = AdaptiveClip(trial.config).clip(grads, model.trainable_weights)
    else:
        expected, _, _ = clip_fixed(grads, trial.config)
    _fit(trial, model, (X, y), epochs=1)
    for w, b, g in zip(model.trainable_weights, before, expected, strict=True):
        np.testing.assert_allclose(w.numpy(), b - LR * g.numpy(), rtol=1e-5, atol=1e-6)
    assert trial.history[0]["clip_fraction"] == 1.0


def test_the_rules_see_each_steps_own_loss_not_the_running_mean() -> None:
    trial = a_trial("global_norm", 1.0)
    history = _fit(trial).history
    assert trial.monitor.steps == STEPS
    assert [h["train_loss"] for h in trial.history] == pytest.approx(history["loss"], rel=1e-4)
    assert [h["train_mae"] for h in trial.history] == pytest.approx(history["mae"])


def test_a_train_step_traced_before_the_callback_still_gives_the_step_losses() -> None:
    trial = a_trial("global_norm", 1.0)
    model = _model(trial)
    X, y = _data()
    model.fit(X, y, batch_size=BATCH, verbose=0)  # traces the train step without the callback
    history = _fit(trial, model).history
    assert model.optimizer.cliptune_stats.numpy()[-1] == 0  # nothing copied in the train step
    assert [h["train_loss"] for h in trial.history] == pytest.approx(history["loss"], rel=1e-4)


def test_a_nan_loss_is_seen_at_its_step() -> None:
    X, y = _data()
    X[5 * BATCH] = np.nan  # the sixth batch
    with pytest.raises(optuna.TrialPruned, match="nonfinite: loss was nan at step 6"):
        _fit(a_trial("global_norm", 1.0), data=(X, y))


def test_mixed_float16_overflow_steps_are_counted_not_pruned_and_the_clip_sees_unscaled_gradients(
        tmp_path: Path) -> None:
    # compile wraps the optimizer in a LossScaleOptimizer under mixed_float16; it is made here to
    # start from a scale so large that the first steps overflow float16.
    updates = StepUpdates()

    def train(trial: Trial) -> None:
        keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            _fit(trial, _model(trial, scale=2.0**24), extra=[updates])
        finally:
            keras.mixed_precision.set_global_policy("float32")

    history, skipped = overflowed_trial(train, tmp_path, STEPS)
    taken = [n for n in updates.norms if n > 0]
    assert len(taken) == STEPS - skipped  # the wrapper skipped exactly the counted steps
    assert taken == pytest.approx([0.05] * len(taken), rel=1e-3)  # t on unscaled gradients
    assert history[-1]["clip_fraction"] == 1.0 and history[-1]["grad_norm_max"] < 1e3


def test_gradient_accumulation_and_validation_freq() -> None:
    trial = a_trial("global_norm", 1.0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=trial.keras_optimizer("sgd", learning_rate=LR,
                                                  gradient_accumulation_steps=2), loss="mse")
    _fit(trial, model, validation_freq=2)
    assert trial.monitor.steps == STEPS // 2  # one step per two batches
    assert len(trial.history) == 1  # epoch 0 had no validation: reported with epoch 1


def test_a_second_clip_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"clip the gradients twice. Got global_clipnorm=1.0"):
        trial_optimizer(a_trial("none"), "sgd", global_clipnorm=1.0)
    models: list[Any] = []

    def train(trial: Trial) -> None:
        models.append(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]))
        models[-1].compile(optimizer=keras.optimizers.SGD(global_clipnorm=1.0), loss="mse")
        _fit(trial, models[-1])

    with pytest.raises(UsageError, match=r"optimizer=trial.keras_optimizer\(...\). Got SGD instead"):
        tune_enqueued(train, tmp_path, [{"clip_mode": "none"}], SPACE)
    assert int(models[0].optimizer.iterations.numpy()) == 0  # not one step


def test_setups_it_cannot_watch_are_refused_before_training() -> None:
    trial = a_trial("global_norm", 1.0)
    model = _model(trial, steps_per_execution=2)
    with pytest.raises(UsageError, match="Got steps_per_execution=2 instead"):
        _fit(trial, model)
    autoclip = a_trial("autoclip", 90.0)
    with pytest.raises(UsageError, match="jit_compile=False for autoclip"):
        _fit(autoclip, _model(autoclip, jit_compile=True))
    with pytest.raises(UsageError, match=r"made for another trial \(number 0\)"):
        _fit(Trial(trial.config, {}, 1, 0, trial.monitor), _model(trial))
    assert int(model.optimizer.iterations.numpy()) == 0


def test_metric_names_a_log_and_missing_ones_are_errors() -> None:
    trial = a_trial("global_norm", 1.0)
    history = _fit(trial, metric="val_mae").history
    assert [h["val_loss"] for h in trial.history] == pytest.approx(history["val_mae"])
    assert "val_mae" not in trial.history[0] and "train_mae" in trial.history[0]
    with pytest.raises(UsageError, match=r"reports 'val_mse', which is not in Keras's epoch logs "
                                         r"\(loss, mae, val_loss, val_mae\)"):
        _fit(a_trial("global_norm", 1.0), metric="val_mse")
    with pytest.raises(UsageError, match="saw no epoch with 'val_loss'"):
        _fit(a_trial("global_norm", 1.0), validation_data=None)


def test_threshold_auto_probes_the_gradients_through_the_callback() -> None:
    check_auto_probe(lambda trial: _fit(trial))


def test_bad_arguments_are_refused() -> None:
    trial = a_trial("none")
    with pytest.raises(TypeError, match="must be the cliptune.Trial.*Got str instead"):
        ClipTuneCallback("trial")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'metric' parameter.*Got 3 instead"):
        ClipTuneCallback(trial, metric=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown optimizer 'adma'.*Did you mean 'adam'"):
        trial_optimizer(trial, "adma")
    with pytest.raises(TypeError, match="Got <keras.src.optimizers.sgd.SGD"):
        trial_optimizer(trial, keras.optimizers.SGD())
    opt = trial_optimizer(trial, functools.partial(keras.optimizers.SGD, momentum=0.5))
    assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == 0.5
