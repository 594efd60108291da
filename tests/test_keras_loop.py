"""A custom tf.GradientTape loop through a Trial: the clip inside a tf.function, parity with torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import cliptune  # noqa: E402
from cliptune import ClipConfig, Trial, TrialMonitor  # noqa: E402
from tests.conftest import pin_tensorflow_threads, regression_data  # noqa: E402

pin_tensorflow_threads()

X, Y = regression_data(n=64)
STEPS = 40  # past zclip's 25 warm-up steps
CONFIGS = [ClipConfig("none"), ClipConfig("value", 0.05), ClipConfig("norm", 0.2),
           ClipConfig("global_norm", 0.3), ClipConfig("autoclip", 30.0), ClipConfig("agc", 0.05),
           ClipConfig("zclip", 1.0)]


def _trial(config: ClipConfig) -> Trial:
    monitor = TrialMonitor(optuna.create_study().ask(), None)  # parity, not stability
    return Trial(config, {}, 0, 0, monitor)


def _init() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)


def _burst(i: int) -> float:
    """Every tenth batch is scaled up: a gradient spike for zclip and autoclip to act on."""
    return 3.0 if i % 10 == 9 else 1.0


def torch_run(config: ClipConfig) -> tuple[list[np.ndarray], list[float]]:
    """A two-layer linear net (out, in) in torch, SGD, the trial's clip each step."""
    w0, b0 = _init()
    trial = _trial(config)
    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    b = torch.nn.Parameter(torch.from_numpy(b0.copy()))
    v = torch.nn.Parameter(torch.ones(1, 2))
    opt = torch.optim.SGD([w, b, v], lr=0.01)
    x, y = torch.from_numpy(X * 2), torch.from_numpy(Y)
    norms = []
    for i in range(STEPS):
        xb, yb = x[(i % 4) * 16:(i % 4 + 1) * 16] * _burst(i), y[(i % 4) * 16:(i % 4 + 1) * 16]
        opt.zero_grad()
        loss = (((xb @ w.T + b) @ v.T - yb) ** 2).mean()
        loss.backward()
        norms.append(float(trial.clip_([w, b, v], loss)))
        opt.step()
    return [w.detach().numpy().T, b.detach().numpy(), v.detach().numpy().T], norms


def tf_run(config: ClipConfig) -> tuple[list[np.ndarray], list[float]]:
    """The same net in TF (kernels (in, out)), the clip inside a compiled step."""
    w0, b0 = _init()
    trial = _trial(config)
    variables = [tf.Variable(w0.T.copy()), tf.Variable(b0.copy()), tf.Variable(np.ones((2, 1),
                                                                                   np.float32))]
    opt = keras.optimizers.SGD(learning_rate=0.01)

    @tf.function(jit_compile=False)
    def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            pred = (xb @ variables[0] + variables[1]) @ variables[2]
            loss = tf.reduce_mean((pred - yb) ** 2)
        grads, norm, clipped = trial.clip(tape.gradient(loss, variables), variables)
        opt.apply_gradients(zip(grads, variables, strict=True))
        return tf.stack([loss, norm, tf.cast(clipped, tf.float32)])

    norms = []
    x, y = X * 2, Y
    for i in range(STEPS):
        loss, norm, clipped = step(x[(i % 4) * 16:(i % 4 + 1) * 16] * _burst(i),
                                   y[(i % 4) * 16:(i % 4 + 1) * 16]).numpy().tolist()
        trial.step(loss, norm, clipped > 0.5)
        norms.append(norm)
    return [v.numpy() for v in variables], norms


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.mode.value)
def test_a_compiled_tf_step_clips_exactly_as_torch_does(config: ClipConfig) -> None:
    torch_weights, torch_norms = torch_run(config)
    tf_weights, tf_norms = tf_run(config)
    assert all(math.isfinite(n) for n in torch_norms)
    np.testing.assert_allclose(tf_norms, torch_norms, rtol=2e-5)
    for a, b in zip(torch_weights, tf_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    if config.mode.value != "none":  # the clip really acted, so the parity is about clipping
        unclipped, _ = torch_run(ClipConfig("none"))
        assert max(np.abs(a - b).max() for a, b in zip(unclipped, torch_weights, strict=True)) > 1e-4


def keras_loop(trial: Trial) -> None:
    """A user's custom Keras loop: a tape, a compiled step with the trial's clip, its metrics."""
    keras.utils.set_random_seed(trial.seed or 0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    opt = keras.optimizers.SGD(learning_rate=trial.extras.get("lr", 0.05))
    variables = model.trainable_variables

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads, norm, clipped = trial.clip(tape.gradient(loss, variables), variables)
        opt.apply_gradients(zip(grads, variables, strict=True))
        return tf.stack([loss, norm, tf.cast(clipped, tf.float32)])

    data = tf.data.Dataset.from_tensor_slices((X[:48], Y[:48])).batch(16)
    for epoch in range(3):
        for xb, yb in data:
            loss, norm, clipped = train_step(xb, yb).numpy().tolist()
            trial.step(loss, norm, clipped > 0.5)
        val = float(tf.reduce_mean((model(X[48:]) - Y[48:]) ** 2))
        trial.report(epoch, val_loss=val)


def test_tune_loop_tunes_a_custom_keras_loop(mlflow_uri: str, tmp_path: Path) -> None:
    space = {"modes": {"none": {}, "global_norm": {"threshold": {"low": 0.1, "high": 3.0}},
                       "zclip": {"threshold": {"low": 1.0, "high": 3.0}}},
             "extras": {"lr": {"low": 0.01, "high": 0.1, "log": True}}}
    result = cliptune.tune_loop(keras_loop, search_space=space, n_trials=4, seed=0,
                                storage=f"sqlite:///{tmp_path / 's.db'}", study_name="k",
                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.n_complete == 4 and math.isfinite(result.best_value)
    history = result.study.best_trial.user_attrs["history"]
    assert len(history) == 3 and {"grad_norm_mean", "clip_fraction", "train_loss"} <= set(
        history[0])
    assert result.study.user_attrs["cliptune.backend"] == "user loop"


def test_an_exploding_keras_loop_is_pruned_at_its_first_nonfinite_step() -> None:
    def explode(trial: Trial) -> None:
        variables = [tf.Variable(tf.ones((4, 1)))]

        @tf.function
        def step() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((X @ variables[0]) ** 2) * 1e37
            grads, norm, _ = trial.clip(tape.gradient(loss, variables), variables)
            variables[0].assign_sub(grads[0])
            return tf.stack([loss, norm])

        for _ in range(5):
            loss, norm = step().numpy().tolist()
            trial.step(loss, norm)
        trial.report(0, val_loss=1.0)

    result = cliptune.tune_loop(explode, search_space={"modes": {"none": {}}}, n_trials=1,
                                tracking=False)
    [trial] = result.study.trials
    assert trial.user_attrs["prune_reason"] == "nonfinite"
    assert "at step 1" in trial.user_attrs["prune_detail"]
