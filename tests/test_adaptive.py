"""The adaptive clip modes (autoclip, agc, zclip): the papers' formulas, torch/Keras parity, state."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import optuna
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cliptune import ClipConfig, Clipper, SearchSpace, Tracker, clip_grads_, tune  # noqa: E402
from cliptune.backends._keras_optimizer import keras_optimizer  # noqa: E402
from cliptune.data import make_splits  # noqa: E402
from tests.conftest import pin_tensorflow_threads, regression_data, run_task  # noqa: E402

pin_tensorflow_threads()

SHAPES = [(6, 4), (6,), (3, 2, 2, 2), ()]  # torch layouts: Linear (out, in), bias, conv, a gain
STEPS = 40  # beyond zclip's 25 warm-up steps


# -- references written from the papers' formulas, in float64 numpy, torch layouts ---------------

def _global(grads: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)))


class RefAutoClip:
    """Seetharaman et al. 2020: clip to the p-th percentile of all norms so far, current included."""

    def __init__(self, p: float) -> None:
        self.p, self.history = p, []

    def __call__(self, grads: list[np.ndarray], weights: list[np.ndarray]) -> tuple[list, bool]:
        norm = _global(grads)
        self.history.append(norm)
        limit = float(np.percentile(self.history, self.p))
        scale = limit / norm if norm > limit else 1.0
        return [g * scale for g in grads], norm > limit


def _units(x: np.ndarray) -> np.ndarray:
    """Brock et al. 2021: a unit is an output row; a 0-D or 1-D parameter is one unit."""
    x = x.astype(np.float64)
    if x.ndim <= 1:
        return np.array([np.sqrt(np.sum(x**2))])
    return np.sqrt(np.sum(x.reshape(x.shape[0], -1) ** 2, axis=1))


class RefAGC:
    """||G_i|| > lam * max(||W_i||, 1e-3)  =>  G_i <- G_i * lam * max(||W_i||, 1e-3) / ||G_i||."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def __call__(self, grads: list[np.ndarray], weights: list[np.ndarray]) -> tuple[list, bool]:
        out, any_trigger = [], False
        for g, w in zip(grads, weights, strict=True):
            g_norm, max_norm = _units(g), np.maximum(_units(w), 1e-3) * self.lam
            trigger = g_norm > max_norm
            scale = np.where(trigger, max_norm / np.maximum(g_norm, 1e-6), 1.0)
            out.append(g * (scale.reshape((-1,) + (1,) * (g.ndim - 1)) if g.ndim > 1 else scale[0]))
            any_trigger |= bool(trigger.any())
        return out, any_trigger


class RefZClip:
    """Kumar et al. 2025: 25 warm-up steps, EMAs (alpha 0.97) updated with the clipped norm,
    reciprocal clipping to mean + z_thres**2 * std / z when z > z_thres."""

    def __init__(self, z_thres: float) -> None:
        self.z_thres, self.warmup, self.mean, self.var = z_thres, [], 0.0, 0.0

    def __call__(self, grads: list[np.ndarray], weights: list[np.ndarray]) -> tuple[list, bool]:
        norm = _global(grads)
        if len(self.warmup) < 25:
            self.warmup.append(norm)
            if len(self.warmup) == 25:
                self.mean, self.var = float(np.mean(self.warmup)), float(np.var(self.warmup))
            return grads, False
        std = np.sqrt(self.var)
        z = (norm - self.mean) / (std + 1e-6)
        kept = self.mean + self.z_thres**2 * std / z if z > self.z_thres else norm
        self.mean = 0.97 * self.mean + 0.03 * kept
        self.var = 0.97 * self.var + 0.03 * (kept - self.mean) ** 2
        return [g * (kept / norm) for g in grads], z > self.z_thres


REFS = {"autoclip": RefAutoClip, "agc": RefAGC, "zclip": RefZClip}
PARAMS = {"autoclip": (10.0, 50.0, 100.0), "agc": (0.01, 0.2, 10.0), "zclip": (1.0, 2.5, 50.0)}


def _sequence(seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Weights and STEPS gradient sets with a spike every 7th step (x20) after the warm-up."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    weights[1][:3] = 0.0  # some tiny units: the 1e-3 floor of the weight norm
    steps = []
    for k in range(STEPS):
        scale = 20.0 if k >= 25 and k % 7 == 0 else rng.uniform(0.5, 1.5)
        steps.append([(rng.normal(size=s) * scale * 0.1).astype(np.float32) for s in SHAPES])
    return weights, steps


def _torch_params(weights: list[np.ndarray]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor(w)) for w in weights]


def _run_torch(clip: ClipConfig, weights: list[np.ndarray],
               steps: list[list[np.ndarray]]) -> list[tuple[float, bool, list[np.ndarray]]]:
    params, clipper, out = _torch_params(weights), Clipper(clip), []
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        norm, changed = clipper.clip_(params)
        out.append((float(norm), bool(changed), [p.grad.numpy().copy() for p in params]))
    return out


def _to_keras(x: np.ndarray) -> np.ndarray:
    """Torch layout to Keras layout: output units last ((out, in, *k) -> (*k, in, out))."""
    return x if x.ndim <= 1 else np.transpose(x, tuple(range(2, x.ndim)) + (1, 0))


def _from_keras(x: np.ndarray) -> np.ndarray:
    return x if x.ndim <= 1 else np.transpose(x, (x.ndim - 1, x.ndim - 2) + tuple(range(x.ndim - 2)))


@pytest.mark.parametrize("mode", list(REFS))
def test_torch_clipper_matches_the_papers_formulas(mode: str) -> None:
    weights, steps = _sequence()
    for param in PARAMS[mode]:
        ref = REFS[mode](param)
        ours = _run_torch(ClipConfig(mode, param), weights, steps)  # type: ignore[arg-type]
        n_changed = 0
        for grads, (norm, changed, clipped) in zip(steps, ours, strict=True):
            expected, expected_changed = ref(grads, weights)
            assert norm == pytest.approx(_global(grads), rel=1e-6)
            assert changed is bool(expected_changed)
            n_changed += changed
            for a, b in zip(clipped, expected, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if param == PARAMS[mode][1]:  # the middle parameter clips some steps but not all
            assert 0 < n_changed < STEPS, (mode, param, n_changed)


@pytest.mark.parametrize("mode", list(REFS))
def test_keras_matches_torch_over_a_sequence(mode: str) -> None:
    weights, steps = _sequence(seed=1)
    param = PARAMS[mode][1]
    clip = ClipConfig(mode, param)  # type: ignore[arg-type]
    variables = [tf.Variable(_to_keras(w)) for w in weights]
    opt = keras_optimizer(clip, "sgd", learning_rate=0.1)
    opt.build(variables)
    step = tf.function(lambda grads: (opt.cliptune_state.clip(grads, variables),
                                      opt.cliptune_state.changed.read_value()))
    for grads, (_, changed, clipped) in zip(steps, _run_torch(clip, weights, steps), strict=True):
        keras_grads, keras_changed = step([tf.constant(_to_keras(g)) for g in grads])
        assert bool(keras_changed) is changed
        for t, k in zip(clipped, keras_grads, strict=True):
            np.testing.assert_allclose(t, _from_keras(k.numpy()), atol=1e-6, rtol=1e-6)


def test_zclip_does_not_clip_during_its_warm_up_and_autoclip_survives_zero_norms() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    zclip = Clipper(ClipConfig("zclip", 0.1))
    for k in range(25):
        p.grad = torch.full((3,), 1e6 if k == 24 else 1.0)
        zclip([p])
        assert float(p.grad[0]) == (1e6 if k == 24 else 1.0)
    autoclip = Clipper(ClipConfig("autoclip", 1.0))
    for value in (0.0, 0.0, 2.0):
        p.grad = torch.full((3,), value)
        assert autoclip(p) == pytest.approx(value * 3**0.5)
    assert torch.isfinite(p.grad).all() and float(p.grad[0]) == 0.0  # clipped to the 1st pct: 0


def test_state_is_per_clipper_and_reset_forgets_it() -> None:
    weights, steps = _sequence()
    clip = ClipConfig("zclip", 2.5)
    first = _run_torch(clip, weights, steps)
    again = _run_torch(clip, weights, steps)  # a fresh Clipper: the same numbers
    assert [c for _, c, _ in first] == [c for _, c, _ in again] and any(c for _, c, _ in first)
    params, clipper = _torch_params(weights), Clipper(ClipConfig("autoclip", 10.0))
    for grads in steps[:5]:
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        clipper(params)
    assert clipper.steps == 5 and "steps=5" in repr(clipper)
    clipper.reset()
    assert clipper.steps == 0
    a = keras_optimizer(clip, "adam").cliptune_state
    b = keras_optimizer(clip, "adam").cliptune_state
    assert a is not b and a.config == clip


def test_fixed_modes_through_a_clipper_match_clip_grads_() -> None:
    weights, steps = _sequence()
    for clip in (ClipConfig("none"), ClipConfig("value", 0.05), ClipConfig("norm", 0.3),
                 ClipConfig("global_norm", 0.5)):
        ours, ref = _torch_params(weights), _torch_params(weights)
        for p, q, g in zip(ours, ref, steps[0], strict=True):
            p.grad, q.grad = torch.tensor(g), torch.tensor(g)
        assert Clipper(clip)(ours) == clip_grads_(ref, clip)
        for p, q in zip(ours, ref, strict=True):
            assert torch.equal(p.grad, q.grad)


def _dense_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])


@pytest.mark.parametrize(("mode", "param"), [("autoclip", 20.0), ("agc", 0.01), ("zclip", 1.0)])
def test_keras_training_matches_fit_with_keras_optimizer(mode: str, param: float) -> None:
    X, y = regression_data(n=64)
    clip = ClipConfig(mode, param)  # type: ignore[arg-type]
    data = tf.data.Dataset.from_tensor_slices((X, y)).batch(8)  # the same batches in both
    ours, monitor = run_task("keras", _dense_model, make_splits((data, data)), clip, seed=3,
                             rules=None, loss="mse", optimizer="sgd", lr=0.1, epochs=4, batch_size=8)
    keras.utils.set_random_seed(3)
    ref = _dense_model()
    ref.compile(optimizer=keras_optimizer(clip, "sgd", learning_rate=0.1), loss="mse",
                jit_compile=False)
    ref.fit(data, epochs=4, shuffle=False, verbose=0)
    for a, b in zip(ours.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    if mode == "zclip":  # 32 steps, 7 after the warm-up, with falling norms: no spike to clip
        assert int(ref.optimizer.cliptune_state.count.numpy()) == 32
    else:
        assert any(h["clip_fraction"] > 0 for h in monitor.history), monitor.history


def test_parameter_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"\(percentile for mode='autoclip'\) must be in "
                                         r"\(0, 100\]. Got 120 instead"):
        ClipConfig("autoclip", 120)
    with pytest.raises(ValueError, match=r"must be in \(0, 100\]. Got 0 instead"):
        ClipConfig("autoclip", 0)
    with pytest.raises(ValueError, match=r"\(lambda for mode='agc'\) must be a positive finite "
                                         "float. Got -1 instead"):
        ClipConfig("agc", -1)
    with pytest.raises(ValueError, match=r"\(z_thres for mode='zclip'\) .* Got nan instead"):
        ClipConfig("zclip", float("nan"))
    with pytest.raises(ValueError, match="is required for mode='zclip'"):
        ClipConfig("zclip")
    with pytest.raises(ValueError, match=r"a.yaml: modes.autoclip.threshold: .* Got 150.0 instead"):
        SearchSpace.from_dict({"modes": {"autoclip": {"threshold": {"low": 1, "high": 150}}}},
                              "a.yaml")
    with pytest.raises(ValueError, match=r"'agc' cannot be expressed as Keras optimizer "
                                         r"arguments; .*cliptune.keras_optimizer\(config"):
        ClipConfig("agc", 0.1).keras_kwargs()
    with pytest.raises(ValueError, match="clip_grads_ is stateless; .*'autoclip'.*cliptune.Clipper"):
        clip_grads_(torch.zeros(1), ClipConfig("autoclip", 10))
    with pytest.raises(TypeError, match="'config' parameter of Clipper must be a ClipConfig. Got str"):
        Clipper("agc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'zclip' needs an optimizer name, a Keras optimizer class"):
        keras_optimizer(ClipConfig("zclip", 2.0), lambda **kw: keras.optimizers.SGD(**kw))


def test_keras_optimizer_takes_classes_and_partials_for_adaptive_modes() -> None:
    import functools

    opt = keras_optimizer(ClipConfig("agc", 0.05), functools.partial(keras.optimizers.SGD,
                                                                     momentum=0.9),
                          learning_rate=0.01)
    assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == 0.9
    assert opt.global_clipnorm is None and opt.get_config()["cliptune_clip"] == {
        "mode": "agc", "threshold": 0.05}
    assert type(opt).from_config(opt.get_config()).cliptune_state.config == ClipConfig("agc", 0.05)
    assert isinstance(keras_optimizer(ClipConfig("autoclip", 5), keras.optimizers.Lion),
                      keras.optimizers.Lion)


def _torch_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_tune_with_the_adaptive_space_runs_every_mode() -> None:
    space = SearchSpace.shipped("adaptive")
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="adaptive")
    for mode, rng in space.modes.items():
        params = {"clip_mode": mode.value}
        if rng is not None:
            params[f"clip_threshold_{mode.value}"] = rng.midpoint()
        study.enqueue_trial(params)
    result = tune(_torch_model, regression_data(n=96), search_space="adaptive", epochs=2,
                  batch_size=16, n_trials=len(space.modes), seed=0, storage=storage,
                  study_name="adaptive", tracking=False, show_progress=False,
                  pruner=optuna.pruners.NopPruner())  # every mode trains to the end
    frame = result.trials_dataframe()
    assert sorted(frame.clip_mode) == sorted(m.value for m in space.modes)
    assert (frame.state == "COMPLETE").all()
    assert result.best_config is not None


def test_tune_keras_runs_the_adaptive_modes() -> None:
    space = {"version": 1, "modes": {"autoclip": {"threshold": {"choices": [10.0]}},
                                     "agc": {"threshold": {"choices": [0.05]}},
                                     "zclip": {"threshold": {"choices": [2.5]}}}}
    result = tune(_dense_model, regression_data(n=64), search_space=space, epochs=2,
                  batch_size=16, n_trials=3, seed=0, tracker=Tracker(), show_progress=False,
                  sampler=optuna.samplers.BruteForceSampler(seed=0),
                  pruner=optuna.pruners.NopPruner())
    frame = result.trials_dataframe()
    assert sorted(frame.clip_mode) == ["agc", "autoclip", "zclip"]
    assert (frame.state == "COMPLETE").all()


def test_import_cliptune_loads_no_torch_and_exports_clipper_lazily() -> None:
    code = ("import sys, cliptune; assert 'torch' not in sys.modules, 'loaded'; "
            "assert 'Clipper' in cliptune.__all__; cliptune.Clipper; assert 'torch' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_each_torch_trial_starts_a_fresh_clip_state() -> None:
    splits = make_splits(regression_data(n=64), 0.25, 0)
    models = [run_task("torch", _torch_model, splits, ClipConfig("zclip", 1.0), rules=None,
                       loss="mse",
                       optimizer="sgd", lr=0.05, epochs=3, batch_size=4)[0]  # 36 steps: past warm-up
              for _ in range(2)]
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_cli_one_liners_use_a_clipper_and_keras_optimizer_for_adaptive_modes() -> None:
    from types import SimpleNamespace

    from cliptune._cli_show import _one_liners

    result = SimpleNamespace(best_config=ClipConfig("zclip", 2.345678), best_extras={"lr": 0.01},
                             study=SimpleNamespace(user_attrs={}))
    lines = _one_liners(result)  # type: ignore[arg-type]
    assert lines["torch"].startswith("clipper = cliptune.Clipper(ClipConfig(mode='zclip', "
                                     "threshold=2.346))")
    assert lines["keras"] == ("cliptune.keras_optimizer(ClipConfig(mode='zclip', threshold=2.346), "
                              "'adam', learning_rate=0.01)")
