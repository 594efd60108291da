"""The Keras backend: clip parity with torch, training semantics, tune() end to end, bad inputs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cliptune import ClipConfig, StabilityRules, Tracker, tune  # noqa: E402
from cliptune.backends import framework_of  # noqa: E402
from cliptune.backends._keras_optimizer import keras_optimizer  # noqa: E402
from cliptune.backends._keras_trial import clip_fixed  # noqa: E402
from cliptune.backends._torch_clip import clip_tensors_  # noqa: E402
from cliptune.data import make_splits  # noqa: E402
from tests.conftest import pin_tensorflow_threads, regression_data, run_task  # noqa: E402

pin_tensorflow_threads()

MODES = ("none", "value", "norm", "global_norm")


def _grad_sets() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    small = [rng.normal(size=s).astype(np.float32) for s in ((3, 4), (4,), (2, 2, 3))]
    return {
        "random": small,
        "zeros": [np.zeros_like(g) for g in small],
        "huge_among_small": [small[0] * 1e-3, small[1] * 1e4, small[2] * 1e-3],
    }


@pytest.mark.parametrize("threshold", [1e-3, 0.5, 2.0, 1e6])  # 1e6: above every norm
@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("case", list(_grad_sets()))
def test_clip_parity_with_torch(case: str, mode: str, threshold: float) -> None:
    grads = _grad_sets()[case]
    clip = ClipConfig(mode, threshold)
    torch_grads = [torch.tensor(g) for g in grads]
    torch_norm, torch_changed = clip_tensors_(torch_grads, clip)
    tf_grads = [tf.constant(g) for g in grads]
    fit_out = keras_optimizer(clip, "sgd", learning_rate=0.1)._clip_gradients(tf_grads)
    trial_out, norm, changed = clip_fixed(tf_grads, clip)  # what Trial.clip does in TF
    for t, k, c in zip(torch_grads, fit_out, trial_out, strict=True):  # rtol: 1e4-scale tensor
        np.testing.assert_allclose(t.numpy(), k.numpy(), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(t.numpy(), c.numpy(), atol=1e-6, rtol=1e-6)
    assert bool(changed) == bool(torch_changed)
    assert float(norm) == pytest.approx(float(torch_norm), rel=1e-6)


def _dense_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])


def _compiled_dense_model() -> keras.Model:
    model = _dense_model()
    model.compile(loss="mae", metrics=["mae"], jit_compile=False)
    return model


@pytest.mark.parametrize("mode", ["value", "norm", "global_norm"])
def test_one_step_matches_fit_with_the_same_optimizer(mode: str) -> None:
    X, y = regression_data(n=64)
    splits = make_splits(((X, y), (X, y)))
    clip = ClipConfig(mode, 0.05)
    ours, monitor = run_task("keras", _dense_model, splits, clip, seed=3, loss="mse",
                             optimizer="sgd", lr=0.1, epochs=1, batch_size=64)
    keras.utils.set_random_seed(3)
    ref = _dense_model()
    ref.compile(optimizer=keras_optimizer(clip, "sgd", learning_rate=0.1), loss="mse")
    ref.fit(X, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(ours.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert getattr(ours.optimizer, clip.keras_kwargs().popitem()[0]) is None  # the trial clips,
    assert monitor.history[0]["clip_fraction"] == 1.0  # once: the tiny threshold clips each step


def test_compiled_model_keeps_its_loss_metrics_and_xla_choice() -> None:
    splits = make_splits(regression_data(n=64), 0.25, 0)
    model, monitor = run_task("keras", _compiled_dense_model, splits,
                              ClipConfig("global_norm", 1.0), {"lr": 0.02}, loss=None,
                              optimizer="adam", lr=0.01, epochs=2, batch_size=16)
    assert model.loss == "mae" and model.jit_compile is False
    assert model.optimizer.global_clipnorm is None  # the trial's clip, not a second one
    assert float(model.optimizer.learning_rate) == pytest.approx(0.02)  # the 'lr' extra wins
    assert "mae" in model.evaluate(*splits.val, verbose=0, return_dict=True)
    assert len(monitor.history) == 2 and monitor.history[0]["clip_fraction"] >= 0.0


SEQ = 20


def test_eager_model_callable_loss_and_extras_factory() -> None:
    seen: list[dict[str, float]] = []

    def model_fn(extras: dict[str, float]) -> keras.Model:
        seen.append(extras)
        model = _dense_model()
        model.compile(loss="mse", run_eagerly=True)
        return model

    splits = make_splits(regression_data(n=64), 0.25, 0)
    model, monitor = run_task("keras", model_fn, splits, ClipConfig("value", 0.1),
                              {"momentum": 0.9}, loss=keras.losses.Huber(), optimizer="sgd",
                              lr=0.01, epochs=1, batch_size=16)
    assert seen == [{"momentum": 0.9}] and model.optimizer.momentum == 0.9
    assert isinstance(model.loss, keras.losses.Huber) and model.run_eagerly
    assert monitor.steps == 3 and math.isfinite(monitor.history[0]["val_loss"])


def _lstm() -> keras.Model:
    model = keras.Sequential([keras.Input((SEQ, 2)), keras.layers.LSTM(8), keras.layers.Dense(1)])
    model.compile(loss="mse", jit_compile=False)  # no XLA: compiling costs more than it saves here
    return model


def _adding(n: int, seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, size=(n, seq))
    markers = np.zeros((n, seq))
    markers[np.arange(n), rng.integers(0, seq // 2, size=n)] = 1.0
    markers[np.arange(n), rng.integers(seq // 2, seq, size=n)] = 1.0
    X = np.stack([values, markers], axis=-1).astype(np.float32)
    return X, (values * markers).sum(axis=1, keepdims=True).astype(np.float32)


def test_nonfinite_loss_stops_the_epoch_at_once() -> None:
    splits = make_splits(_adding(640), 0.2, 0)  # 16 steps an epoch
    rules = StabilityRules(divergence_factor=1e300, spike_z=1e6)
    with pytest.raises(optuna.TrialPruned, match="nonfinite: loss was") as pruned:
        run_task("keras", _lstm, splits, ClipConfig("none"), rules=rules, loss="mse",
                 optimizer="sgd", lr=1e4, epochs=3, batch_size=32)
    steps = int(str(pruned.value).rpartition("step ")[2])
    assert steps < 16  # within the first epoch


def test_tune_finds_a_stable_config_where_no_clip_explodes() -> None:
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="lstm")
    study.enqueue_trial({"clip_mode": "none"})
    study.enqueue_trial({"clip_mode": "global_norm", "clip_threshold_global_norm": 1.0})
    space = {"version": 1, "modes": {"none": {}, "value": {"threshold": {"low": 0.01, "high": 1.0}},
                                     "global_norm": {"threshold": {"low": 0.1, "high": 2.0}}}}
    result = tune(_lstm, _adding(320), loss="mse", optimizer="sgd", lr=2.0, epochs=3,
                  batch_size=32, search_space=space, n_trials=5, seed=0, storage=storage,
                  study_name="lstm", tracker=Tracker())
    frame = result.trials_dataframe()
    unclipped = frame[frame.clip_mode == "none"]
    assert len(unclipped) >= 1 and (unclipped.state == "PRUNED").all()
    assert set(unclipped.prune_reason) <= {"nonfinite", "diverged"}
    assert result.best_config is not None and result.best_config.mode.value != "none"
    assert math.isfinite(result.best_value)
    assert (frame[frame.state == "COMPLETE"].clip_mode != "none").all()
    assert result.study.user_attrs["cliptune.backend"] == "keras"


def test_mlflow_records_keras_trials_like_torch_ones(mlflow_uri: str, tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    space = {"version": 1, "modes": {"none": {}, "global_norm": {"threshold": {"choices": [1.0]}}}}
    tune(_dense_model, regression_data(n=64), epochs=2, batch_size=16, n_trials=2, seed=0,
         search_space=space, sampler=optuna.samplers.BruteForceSampler(seed=0),
         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="keras")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("keras").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["cliptune.backend"] == "keras"
    children = [r for r in runs if r not in parents]
    assert sorted(r.data.params["clip_mode"] for r in children) == ["global_norm", "none"]
    for run in children:
        assert run.data.tags["cliptune.state"] == "COMPLETE"
        for key in ("train_loss", "val_loss", "grad_norm_mean", "grad_norm_max", "clip_fraction"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == [0, 1]


def test_tf_data_datasets_and_val_pairs_train() -> None:
    X, y = regression_data(n=96)
    train = tf.data.Dataset.from_tensor_slices((X[:64], y[:64])).batch(16)
    val = tf.data.Dataset.from_tensor_slices((X[64:], y[64:])).batch(16)
    arrays = ((X[:64], y[:64]), (X[64:], y[64:]))
    for data, steps in (((train, val), 8), ({"train": train, "val": val}, 8), (arrays, 4)):
        # datasets keep their own batches; arrays use batch_size
        _, monitor = run_task("keras", _dense_model, make_splits(data), ClipConfig("norm", 1.0),
                              loss="mse", optimizer="rmsprop", lr=0.01, epochs=2, batch_size=32)
        assert monitor.steps == steps and math.isfinite(monitor.history[-1]["val_loss"])


def test_keras_optimizer_helper_and_its_errors() -> None:
    import cliptune

    opt = cliptune.keras_optimizer(ClipConfig("value", 0.5), "adamw", learning_rate=1e-3)
    assert isinstance(opt, keras.optimizers.AdamW) and opt.clipvalue == 0.5
    assert keras_optimizer(ClipConfig("none"), keras.optimizers.Lion).clipnorm is None
    with pytest.raises(ValueError, match="do not pass clipnorm=1.0"):
        keras_optimizer(ClipConfig("norm", 2.0), "sgd", clipnorm=1.0)
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'.*Did you mean 'adam'"):
        keras_optimizer(ClipConfig("none"), "adamx")
    with pytest.raises(TypeError, match="not an instance \\(SGD\\)"):
        keras_optimizer(ClipConfig("none"), keras.optimizers.SGD())
    with pytest.raises(TypeError, match="must be a ClipConfig. Got dict"):
        keras_optimizer({"mode": "none"}, "sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropped the clip arguments"):
        keras_optimizer(ClipConfig("norm", 1.0), lambda **kw: keras.optimizers.SGD())


def test_framework_detection() -> None:
    assert framework_of(_dense_model()) == "keras"


def _tune(model_fn: object, data: object = None, **kwargs: object) -> None:
    data = regression_data(n=32) if data is None else data
    tune(model_fn, data, n_trials=1, epochs=1, tracker=Tracker(), **kwargs)  # type: ignore[arg-type]


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match="must return a Keras 3 model .* Got Dense instead"):
        _tune(lambda: keras.layers.Dense(1))
    frozen = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, trainable=False)])
    with pytest.raises(ValueError, match="no trainable parameters"):
        _tune(lambda: frozen)
    wrong_width = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"(?s)failed the forward pass .*expected axis -1 .* "
                                         r"to have value 5.*inputs \(25, 4\)"):
        _tune(lambda: wrong_width)
    X, y = regression_data(n=32)
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match="contains 1 NaN or infinite values"):
        _tune(_dense_model, (X, y))
    with pytest.raises(ValueError, match="'loss' parameter of tune .*Got 'msee'.*Did you mean 'mse'"):
        _tune(_dense_model, loss="msee")
    with pytest.raises(ValueError, match="'optimizer' parameter of tune .*Got 'sdg'"):
        _tune(_dense_model, optimizer="sdg")
    with pytest.raises(TypeError, match="must return a keras.optimizers.Optimizer. Got str"):
        _tune(_dense_model, optimizer=lambda **kw: "adam")
    with pytest.raises(TypeError, match="'optimizer' parameter of tune must be one of .* or a "
                                        "callable. Got <keras"):
        _tune(_dense_model, optimizer=keras.optimizers.Adam())
    with pytest.raises(ValueError, match="dropped the clip arguments"):  # before any trial
        _tune(_dense_model, optimizer=lambda learning_rate, **clip: keras.optimizers.SGD())
    mixed = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, dtype="mixed_float16")])
    mixed.dtype_policy = "mixed_float16"
    with pytest.raises(ValueError, match="'device' parameter of tune must be 'cpu', 'cuda'.*"
                                         "Got 'tpu' instead"):
        _tune(_dense_model, device="tpu")
    if not tf.config.list_physical_devices("GPU"):
        with pytest.raises(ValueError, match="device='cuda' was asked for, but TensorFlow sees 0"):
            _tune(_dense_model, device="cuda")
    with pytest.raises(ValueError, match="Mixed precision .*'mixed_float16'"):
        _tune(lambda: mixed)


def test_bad_datasets_raise_clear_errors() -> None:
    X, y = regression_data(n=32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.tensor(X)))
    with pytest.raises(TypeError, match="needs tf.data.Dataset splits .* DataLoader instead"):
        _tune(_dense_model, (loader, loader))
    unbatched = tf.data.Dataset.from_tensor_slices((X, y))
    with pytest.raises(ValueError, match="(?s)failed the forward pass .*is batched"):
        _tune(_dense_model, (unbatched, unbatched))


def test_import_cliptune_loads_no_tensorflow() -> None:
    code = ("import sys, cliptune; cliptune.ClipConfig('none'); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'loaded'; "
            "cliptune.keras_optimizer; assert 'tensorflow' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
