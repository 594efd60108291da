"""``threshold: auto``: the probe's statistics, the range rule, reuse on resume, early stops, errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import cliptune  # noqa: E402
from cliptune import ClipMode, SearchSpace  # noqa: E402
from cliptune.backends import make_task  # noqa: E402
from cliptune.data import Splits  # noqa: E402
from cliptune.probe import PROBE_ATTR, auto_ranges, describe, job_params, probe_gradients  # noqa: E402
from cliptune.settings import Training  # noqa: E402
from cliptune.space import ParamRange  # noqa: E402
from tests.conftest import regression_data  # noqa: E402

AUTO = {"modes": {"none": {}, "value": {"threshold": "auto"}, "norm": {"threshold": "auto"},
                  "global_norm": {"threshold": "auto"}}}
X, Y = regression_data(n=160)
SPLITS = ((X[:128], Y[:128]), (X[128:], Y[128:]))


def zero_linear() -> nn.Module:
    """w = 0, b = 0: the first MSE gradient is known in closed form (see expected_gradient)."""
    model = nn.Linear(4, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def expected_gradient(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """d/dw, d/db of mean((Xw + b - y)^2) at w = 0, b = 0: -2/n X^T y and -2 mean(y)."""
    X64, y64 = X.astype(np.float64), y.astype(np.float64)
    return -2.0 / len(X) * X64.T @ y64[:, 0], -2.0 * float(y64.mean())


def _probe(framework: str, model_fn: Any, splits: Splits, **training: Any) -> dict[str, Any]:
    """The probe of a built-in loop: its train function run by a probe trial."""
    task = make_task(framework, model_fn, splits, Training(**training), threads=None)
    return probe_gradients(task, {}, seed=0, max_steps=200)


def _tune(**kwargs: Any) -> cliptune.TuneResult:
    args = {"search_space": AUTO, "n_trials": 2, "epochs": 1, "batch_size": 128, "lr": 1e-9,
            "seed": 0, "tracking": False, **kwargs}
    return cliptune.tune(kwargs.pop("model_fn", zero_linear), kwargs.pop("data", SPLITS),
                         **{k: v for k, v in args.items() if k not in ("model_fn", "data")})


def test_auto_ranges_follow_the_rule_on_a_known_gradient(caplog: pytest.LogCaptureFixture) -> None:
    """One full-batch step on a zero linear model: every statistic is a closed-form number."""
    gw, gb = expected_gradient(*SPLITS[0])
    global_norm = math.sqrt(float(gw @ gw) + gb * gb)
    tensor_norms = [float(np.linalg.norm(gw)), abs(gb)]
    max_abs = max(float(np.abs(gw).max()), abs(gb))

    result = _tune()
    info = result.study.user_attrs[PROBE_ATTR]
    assert (info["steps"], info["stopped"]) == (1, "epoch")  # one batch is one epoch
    assert info["global_norm_mean"] == pytest.approx(global_norm, rel=1e-5)
    assert info["tensor_norm_mean"] == pytest.approx(np.mean(tensor_norms), rel=1e-5)
    assert info["max_abs_mean"] == pytest.approx(max_abs, rel=1e-5)
    ranges = info["ranges"]
    assert ranges["global_norm"] == pytest.approx([0.5 * global_norm, 10 * global_norm], rel=1e-5)
    assert ranges["norm"] == pytest.approx([0.5 * np.mean(tensor_norms), 10 * max(tensor_norms)],
                                           rel=1e-5)
    assert ranges["value"] == pytest.approx([0.1 * max_abs, 10 * max_abs], rel=1e-5)
    assert info["seconds"] >= 0 and "global_norm: [0.5, 10]" in info["rule"]
    # The study samples from those ranges, and records the space it really searched.
    for trial in result.study.trials:
        mode = trial.params["clip_mode"]
        if mode != "none":
            dist = trial.distributions[f"clip_threshold_{mode}"]
            assert [dist.low, dist.high] == pytest.approx(ranges[mode]) and dist.log
    recorded = result.study.user_attrs["cliptune.search_space"]["modes"]["global_norm"]
    assert recorded["threshold"]["low"] == pytest.approx(0.5 * global_norm, rel=1e-5)
    assert "auto threshold ranges from a probe: value [" in caplog.text


def test_the_rule_itself_and_zero_gradients() -> None:
    stats = {"global_norm_mean": 2.0, "tensor_norm_mean": 1.0, "tensor_norm_max_mean": 1.5,
             "max_abs_mean": 0.3}
    ranges = auto_ranges(stats, [ClipMode.VALUE, ClipMode.NORM, ClipMode.GLOBAL_NORM])
    assert ranges[ClipMode.GLOBAL_NORM] == ParamRange(1.0, 20.0, log=True)
    assert ranges[ClipMode.NORM] == ParamRange(0.5, 15.0, log=True)
    assert ranges[ClipMode.VALUE] == pytest.approx(ParamRange(0.03, 3.0, log=True))
    with pytest.raises(ValueError, match="saw only zero gradients.*mode 'value'"):
        auto_ranges({**stats, "max_abs_mean": 0.0}, [ClipMode.VALUE])


def test_probe_stops_at_max_steps_and_reports_its_cost(caplog: pytest.LogCaptureFixture) -> None:
    result = _tune(batch_size=8, probe_steps=5, model_fn=lambda: nn.Linear(4, 1), lr=0.01)
    info = result.study.user_attrs[PROBE_ATTR]
    assert (info["steps"], info["stopped"]) == (5, "max_steps")
    assert "5 steps in" in describe(info) and "stopped at max_steps" in describe(info)
    params = job_params(info)
    assert params["probe_steps"] == 5 and set(params) >= {
        "probe_seconds", "auto_range_value", "auto_range_norm", "auto_range_global_norm"}
    assert "(probe without clipping: 5 steps in" in caplog.text


def test_a_resumed_study_reuses_the_recorded_ranges(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import cliptune.probe

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = _tune(storage=storage, study_name="s")
    recorded = first.study.user_attrs[PROBE_ATTR]

    def no_probe(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("a resumed study must not probe again")

    caplog.clear()
    with monkeypatch.context() as patch:
        patch.setattr(cliptune.probe, "probe_gradients", no_probe)
        again = _tune(storage=storage, study_name="s", n_trials=4, seed=1, lr=0.01,  # other data
                      continue_changed=True)
    assert again.study.user_attrs[PROBE_ATTR] == recorded and len(again.study.trials) == 4
    for trial in again.study.trials:
        mode = trial.params["clip_mode"]
        if mode != "none":
            dist = trial.distributions[f"clip_threshold_{mode}"]
            assert [dist.low, dist.high] == pytest.approx(recorded["ranges"][mode])
    assert "recorded by the study's probe" in caplog.text
    grown = {"modes": {"value": {"threshold": "auto"}}}
    first_only_global = _tune(storage=storage, study_name="t",
                              search_space={"modes": {"global_norm": {"threshold": "auto"}}})
    assert list(first_only_global.study.user_attrs[PROBE_ATTR]["ranges"]) == ["global_norm"]
    with pytest.raises(ValueError, match=r"also asks 'auto' for \['value'\]; the search space of "
                                         "a running study cannot change"):
        _tune(storage=storage, study_name="t", search_space=grown)


def test_a_probe_that_goes_nonfinite_stops_early() -> None:
    X_big = (X * 30).astype(np.float32)
    splits = Splits((X_big, Y), (X_big[:16], Y[:16]))
    record = _probe("torch", lambda: nn.Linear(4, 1), splits, loss="mse", lr=0.5, epochs=1,
                    batch_size=8)
    assert record["stopped"] == "nonfinite"
    assert 0 < len(record["loss"]) < len(X) // 8  # stopped before the epoch's end
    assert all(math.isfinite(v) for v in record["global_norm"])
    with pytest.warns(RuntimeWarning, match=r"went non-finite at step \d+; the auto ranges come "
                                            r"from its first \d+ steps"):
        _tune(data=((X_big, Y), (X_big[:16], Y[:16])), batch_size=8, lr=0.5, n_trials=1,
              model_fn=lambda: nn.Linear(4, 1))


class _NanOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float("nan")


def test_probe_errors() -> None:
    with pytest.raises(ValueError, match="went non-finite at its first step, without clipping. "
                                         "Lower the learning rate"):
        _tune(model_fn=_NanOut)
    with pytest.raises(ValueError, match="'probe_steps' parameter of tune must be an int >= 1. "
                                         "Got 0 instead"):
        _tune(probe_steps=0)
    with pytest.raises(ValueError, match="saw only zero gradients"):
        _tune(data=((np.zeros((32, 4), np.float32), np.zeros((32, 1), np.float32)),
                    SPLITS[1]), model_fn=zero_linear)


def test_auto_in_search_space_files(tmp_path: Path) -> None:
    shipped = SearchSpace.shipped("auto")
    assert shipped.auto_modes == [ClipMode.VALUE, ClipMode.NORM, ClipMode.GLOBAL_NORM]
    assert ClipMode.NONE in shipped.modes
    assert shipped.to_dict()["modes"]["norm"] == {"threshold": "auto"}
    path = tmp_path / "space.yaml"
    path.write_text("modes:\n  value: {threshold: automatic}\n")
    with pytest.raises(ValueError, match=r"space.yaml: modes.value.threshold: expected a mapping "
                                         r"like \{low: 0.01, high: 10.0, log: true\} or 'auto', "
                                         r"got 'automatic'"):
        SearchSpace.from_yaml(path)
    path.write_text("modes:\n  none: {threshold: auto}\n")
    with pytest.raises(ValueError, match="space.yaml: modes.none: mode 'none' takes no threshold"):
        SearchSpace.from_yaml(path)
    with pytest.raises(RuntimeError, match="clip_threshold_value is 'auto' and was not resolved"):
        shipped.modes[ClipMode.VALUE].suggest(None, "clip_threshold_value")  # type: ignore[arg-type]


def test_keras_probe_sees_the_same_gradient() -> None:
    keras = pytest.importorskip("keras")

    def zero_dense() -> Any:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(
            1, kernel_initializer="zeros", bias_initializer="zeros")])
        model.compile(jit_compile=False)
        return model

    record = _probe("keras", zero_dense, Splits(*SPLITS), loss="mse", lr=1e-9, epochs=1,
                    batch_size=128)
    gw, gb = expected_gradient(*SPLITS[0])
    assert (len(record["loss"]), record["stopped"]) == (1, "epoch")
    assert record["global_norm"][0] == pytest.approx(math.sqrt(float(gw @ gw) + gb * gb), rel=1e-5)
    assert record["tensor_norms"][0] == pytest.approx([np.linalg.norm(gw), abs(gb)], rel=1e-5)
    assert record["max_abs"][0] == pytest.approx(max(np.abs(gw).max(), abs(gb)), rel=1e-5)


def test_only_the_steps_before_the_gradients_explode_count() -> None:
    from cliptune.probe import healthy_steps

    assert healthy_steps([3.9, 16.0, 106.0, 2.4e3, 3e18]) == 2  # 106 > 10 x median(3.9, 16)
    assert healthy_steps([1.0, 2.0, 1.5, 9.0, 1.2]) == 5  # noisy, never a 10x jump
    assert healthy_steps([5.0]) == 1
