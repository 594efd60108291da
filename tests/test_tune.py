"""tune() end to end on PyTorch: data forms, bad input, failures, resuming, seeding, learning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import cliptune  # noqa: E402
from cliptune import ClipConfig, ClipMode  # noqa: E402
from tests.conftest import regression_data  # noqa: E402

FAST = {"epochs": 2, "batch_size": 32, "lr": 0.05, "tracking": False}


def linear() -> nn.Module:
    return nn.Linear(4, 1)


def _tune(model_fn: Any = linear, data: Any = None, **kwargs: Any) -> cliptune.TuneResult:
    args = {**FAST, "n_trials": 4, "seed": 0, **kwargs}
    return cliptune.tune(model_fn, regression_data() if data is None else data, **args)


def test_tune_end_to_end_returns_a_usable_result() -> None:
    result = _tune(n_trials=6)
    assert isinstance(result.best_config, ClipConfig)
    assert result.n_complete + result.n_pruned + result.n_failed == 6
    assert result.best_value == pytest.approx(result.study.best_value)
    assert result.best_params == result.study.best_params
    df = result.trials_dataframe()
    assert list(df.columns[:5]) == ["number", "state", "clip_mode", "clip_threshold", "value"]
    assert "prune_reason" in df.columns and len(df) == 6
    assert set(df["clip_mode"]) <= {m.value for m in ClipMode}


def test_data_forms_are_all_accepted() -> None:
    X, y = regression_data()
    pairs = ((X[:200], y[:200]), (X[200:], y[200:]))
    tensors = torch.utils.data.TensorDataset(torch.from_numpy(X[:200]), torch.from_numpy(y[:200]))
    val_tensors = torch.utils.data.TensorDataset(torch.from_numpy(X[200:]), torch.from_numpy(y[200:]))
    forms = [
        (X, y),
        pairs,
        {"train": pairs[0], "val": pairs[1]},
        (tensors, val_tensors),
        (torch.utils.data.DataLoader(tensors, batch_size=16), torch.utils.data.DataLoader(val_tensors)),
        (torch.from_numpy(X), torch.from_numpy(y)),
    ]
    for data in forms:
        result = _tune(data=data, n_trials=1, search_space={"modes": {"global_norm": {
            "threshold": {"low": 1.0, "high": 2.0}}}})
        assert result.n_complete == 1, data


def test_one_argument_factory_receives_the_extras() -> None:
    seen: list[dict[str, Any]] = []

    def make(extras: dict[str, Any]) -> nn.Module:
        seen.append(extras)
        return nn.Sequential(nn.Linear(4, extras["hidden"]), nn.Tanh(), nn.Linear(extras["hidden"], 1))

    space = {"modes": {"norm": {"threshold": {"low": 0.1, "high": 10, "log": True}}},
             "extras": {"hidden": {"low": 2, "high": 8, "type": "int"},
                        "lr": {"low": 0.001, "high": 0.1, "log": True}}}
    result = _tune(make, search_space=space, n_trials=3)
    assert seen[0] == {"hidden": 5, "lr": pytest.approx(0.01)}  # the pre-study check
    assert len(seen) == 4  # the factory runs once before the study, then once a trial
    assert [s["hidden"] for s in seen[1:]] == [t.params["hidden"] for t in result.study.trials]
    assert set(result.best_extras) == {"hidden", "lr"}


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.w


X_OK, Y_OK = regression_data()
X_NAN = X_OK.copy()
X_NAN[3, 1] = np.nan


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"model_fn": 3}, TypeError, "'model_fn' parameter of tune must be a callable"),
    ({"model_fn": nn.Linear(4, 1)}, TypeError, r"model_fn is a model \(Linear\), but tune needs a "
     r"factory that returns a fresh model for each trial: pass lambda: Linear\(...\)"),
    ({"model_fn": lambda: "model"}, TypeError, "model_fn must return a torch.nn.Module .*Got str"),
    ({"model_fn": lambda a, b: linear()}, TypeError, "model_fn must take no argument or one"),
    ({"model_fn": _Frozen}, ValueError, "has no trainable parameters"),
    ({"model_fn": lambda: nn.Linear(3, 1)}, ValueError,
     r"One training batch failed the forward pass or the loss.*inputs of shape \(32, 4\)"),
    ({"data": (X_OK, Y_OK[:100])}, ValueError, "same length. Got 256 samples in X and 100 in y"),
    ({"data": (X_NAN, Y_OK)}, ValueError, r"data\[0\] contains 1 NaN or infinite values"),
    ({"data": "table.csv"}, ValueError, "data must be \\(X, y\\) arrays"),
    ({"loss": "mae"}, ValueError, "'loss' parameter of tune must be one of 'mse'.* Got 'mae'"),
    ({"optimizer": "adan"}, ValueError,
     "'optimizer' parameter of tune must be one of .*Got 'adan' instead. Did you mean 'adam'"),
    ({"search_space": {"modes": {"clip": {}}}}, ValueError, "unknown clip mode 'clip'"),
    ({"search_space": "nope.yaml"}, ValueError, "Cannot read search space 'nope.yaml'"),
    ({"n_trials": 0}, ValueError, "'n_trials' parameter of tune must be an int >= 1. Got 0"),
    ({"epochs": -1}, ValueError, "'epochs' parameter of tune must be an int >= 1. Got -1"),
    ({"batch_size": 0}, ValueError, "'batch_size' parameter of tune must be an int >= 1"),
    ({"lr": -0.1}, ValueError, "'lr' parameter of tune must be a positive finite float"),
    ({"metric": "val_acc"}, ValueError, "unknown 'metric' value 'val_acc'"),
    ({"objective": "mean"}, ValueError,
     "'objective' parameter of tune must be one of 'last', 'best'. Got 'mean'"),
    ({"val_fraction": 1.5}, ValueError, "'val_fraction' parameter of tune must be a float in"),
    ({"device": "gpu0"}, ValueError, "'device' parameter of tune must be a torch device"),
])
def test_bad_input_fails_before_any_trial(tmp_path: Path, kwargs: dict[str, Any], error: type,
                                          message: str) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(error, match=message):
        _tune(storage=storage, study_name="s", **kwargs)
    assert optuna.study.get_all_study_names(storage) == []  # nothing was started


def test_a_failing_trial_is_recorded_and_the_study_goes_on() -> None:
    calls = {"n": 0}

    def flaky() -> nn.Module:
        calls["n"] += 1
        if calls["n"] == 3:  # call 1 is the pre-study check; the second trial fails
            raise RuntimeError("out of memory (simulated)")
        return linear()

    result = _tune(flaky, n_trials=4)
    states = [t.state for t in result.study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and result.n_failed == 1
    failed = next(t for t in result.study.trials if t.state == optuna.trial.TrialState.FAIL)
    assert failed.user_attrs["error"] == "RuntimeError: out of memory (simulated)"
    assert len(states) == 4


def test_every_trial_failing_raises_with_the_first_error() -> None:
    calls = {"n": 0}

    def broken() -> nn.Module:
        calls["n"] += 1
        if calls["n"] > 1:  # let the pre-study check pass
            raise RuntimeError(f"boom {calls['n']}")
        return linear()

    with pytest.raises(RuntimeError, match="All 3 trials failed; the first error was: RuntimeError: boom 2"):
        _tune(broken, n_trials=3)


def test_n_trials_is_the_study_total_and_a_rerun_continues(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = [t.params for t in _tune(n_trials=3, storage=storage, study_name="job").study.trials]
    assert len(first) == 3
    again = _tune(n_trials=3, storage=storage, study_name="job")
    assert len(again.study.trials) == 3  # finished: nothing to add
    more = _tune(n_trials=5, storage=storage, study_name="job")
    assert [t.number for t in more.study.trials] == [0, 1, 2, 3, 4]
    assert [t.params for t in more.study.trials[:3]] == first


def test_same_seed_same_trials_and_best_config() -> None:
    a, b = _tune(n_trials=5, seed=7), _tune(n_trials=5, seed=7)
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]
    assert [t.value for t in a.study.trials] == [t.value for t in b.study.trials]
    assert a.best_config == b.best_config
    c = _tune(n_trials=5, seed=8)
    assert [t.params for t in c.study.trials] != [t.params for t in a.study.trials]


def test_unstable_trials_are_pruned_with_their_reason() -> None:
    result = _tune(lambda: nn.Linear(4, 1), lr=5.0, n_trials=2, search_space={"modes": {"none": {}}})
    assert result.n_pruned == 2 and result.best_config is None
    reasons = set(result.trials_dataframe()["prune_reason"])
    assert reasons <= {"nonfinite", "diverged", "spiking"}


def test_sampler_learns_to_avoid_the_unstable_region() -> None:
    """SGD at lr=2 on least squares oscillates; a global-norm clip above ~1 lets it blow up.

    Summed over three seeded studies of 40 trials, the last 15 trials of each hit the unstable
    region less than half as often as the first 15 (10 of which are TPE's random start-up).
    """
    X, y = regression_data(n=128, d=8, seed=1)
    space = {"modes": {"global_norm": {"threshold": {"low": 0.01, "high": 100.0, "log": True}}}}
    early = late = 0
    for seed in range(3):
        result = cliptune.tune(lambda: nn.Linear(8, 1), (X, y), lr=2.0, epochs=3, batch_size=128,
                               search_space=space, n_trials=40, seed=seed, tracking=False,
                               pruner=optuna.pruners.NopPruner())
        unstable = [t.user_attrs.get("prune_reason") in ("nonfinite", "diverged", "spiking")
                    for t in result.study.trials]
        early, late = early + sum(unstable[:15]), late + sum(unstable[-15:])
        assert result.best_config.threshold < 1.0
    assert early >= 8, early  # the task really has an unstable region
    assert late < early / 2, (early, late)


def test_objective_best_takes_the_best_epoch_and_last_the_last() -> None:
    """A metric that falls, then rises: the best epoch and the last one differ."""
    def train(trial: cliptune.Trial) -> None:
        for epoch, value in enumerate([3.0, 1.0, 2.0]):
            trial.report(epoch, val_loss=value)

    space = {"modes": {"none": {}}}
    best = cliptune.tune_loop(train, objective="best", search_space=space, n_trials=1,
                              tracking=False)
    last = cliptune.tune_loop(train, objective="last", search_space=space, n_trials=1,
                              tracking=False)
    assert best.best_value == 1.0 and last.best_value == 2.0
    maximized = cliptune.tune_loop(train, objective="best", direction="maximize",
                                   search_space=space, n_trials=1, tracking=False)
    assert maximized.best_value == 3.0


def test_tune_logs_and_leaves_logging_config_to_the_user(mlflow_uri: str, caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """Library code logs (the CLI configures the output); Optuna's verbosity is the user's."""
    import logging

    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        _tune(n_trials=1, search_space="auto", tracking=True)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert logging.getLogger("cliptune").handlers == []  # no handler of its own
    assert "auto threshold ranges from a probe" in caplog.text
    assert "tracking the tuning job in MLflow" in caplog.text
    assert "cliptune" not in capsys.readouterr().err  # nothing printed past logging


@pytest.mark.subprocess
def test_import_cliptune_loads_no_framework() -> None:
    code = ("import sys, cliptune; cliptune.ClipConfig('value', 1.0); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'tensorflow', 'keras', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="device='cuda' was asked for, but this torch"):
        _tune(device="cuda")


def test_the_study_counts_the_training_steps_it_spent() -> None:
    """Every trial's training steps (pruned ones and re-runs too; none for a duplicate) add up to
    the training-mode forward passes the models ran, counted outside cliptune."""
    forwards = [0]

    def counted() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        model.register_forward_pre_hook(
            lambda module, args: forwards.__setitem__(0, forwards[0] + module.training))
        return model

    exploding = {"modes": {"none": {}, "global_norm": {"threshold": {"low": 0.01, "high": 0.1}}}}
    steady = {"modes": {"global_norm": {"threshold": {"low": 1.0, "high": 2.0}}}}
    frames = []
    for lr, space in ((0.9, exploding), (0.05, steady)):  # no clip diverges; all train alike
        forwards[0] = 0
        result = _tune(counted, n_trials=8, lr=lr, epochs=3, search_space=space, confirm=2)
        frame = result.trials_dataframe()
        assert result.n_steps == frame["steps"].sum() > 0
        assert forwards[0] == result.n_steps + 1  # + tune()'s one check pass before the study
        assert result.counts_line().endswith(f"; {result.n_steps} training steps")
        frames.append(frame)
    blown, alike = frames
    full = blown["steps"].max()
    assert (blown.loc[blown["state"] == "PRUNED", "steps"].between(1, full - 1)).any()
    assert (blown.loc[blown["role"].str.startswith("duplicate of"), "steps"] == 0).all()
    assert (alike.loc[alike["role"].str.startswith("re-run of"), "steps"] == full).any()
