"""tune(refit=True): the best config trained on all the data, returned, and logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

torch = pytest.importorskip("torch")
mlflow = pytest.importorskip("mlflow")
from torch import nn  # noqa: E402

import cliptune  # noqa: E402
from cliptune import cli  # noqa: E402
from cliptune.backends._torch import TorchTask  # noqa: E402
from cliptune.jobs import Job, JobError  # noqa: E402
from cliptune.probe import PROBE_ATTR  # noqa: E402
from cliptune.tracking import Tracker  # noqa: E402
from tests.conftest import regression_data  # noqa: E402

X, Y = regression_data(n=160)
SPACE = {"modes": {"none": {}, "global_norm": {"threshold": {"low": 0.5, "high": 5.0}}}}
FAST = {"epochs": 3, "batch_size": 32, "lr": 0.05, "n_trials": 3, "seed": 0,
        "search_space": SPACE, "tracking": False}


class Recorder(Tracker):
    """Keeps what the tuner hands to ``model_refit``."""

    def __init__(self) -> None:
        self.refits: list[tuple[Any, ...]] = []

    def model_refit(self, model: Any, framework: str, sample: Any, output: Any,
                    tags: dict[str, str]) -> None:
        self.refits.append((model, framework, sample, output, tags))


def parent_run(uri: str, experiment: str) -> Any:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent


def mse(model: nn.Module) -> float:
    with torch.no_grad():
        return float(((model(torch.from_numpy(X)) - torch.from_numpy(Y)) ** 2).mean())


def test_refit_trains_the_best_config_on_train_plus_validation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    train = TorchTask.__call__

    def spy(self: TorchTask, trial: Any) -> Any:
        seen.append(len(self.splits.train[0]))
        return train(self, trial)

    monkeypatch.setattr(TorchTask, "__call__", spy)
    recorder = Recorder()
    result = cliptune.tune(lambda: nn.Linear(4, 1), (X, Y), refit=True, tracker=recorder,
                           **{k: v for k, v in FAST.items() if k != "tracking"})
    trained = [t for t in result.study.trials if "cliptune.duplicate_of" not in t.user_attrs]
    assert seen == [128] * len(trained) + [160]  # the trials on the train split, the refit on all
    assert isinstance(result.model, nn.Linear)
    assert mse(result.model) < 0.5 * mse(nn.Linear(4, 1)) and mse(result.model) < 1.0
    [(model, framework, sample, output, tags)] = recorder.refits
    assert model is result.model and framework == "torch"
    assert sample.shape == (5, 4) and output.shape == (5, 1)
    assert tags["cliptune.refit_data"] == "train+val"
    assert tags["cliptune.refit_trial"] == str(result.study.best_trial.number)
    assert cliptune.tune(lambda: nn.Linear(4, 1), (X, Y), **FAST).model is None  # refit is opt-in


def test_datasets_refit_on_the_train_split_only() -> None:
    data = tuple(torch.utils.data.TensorDataset(torch.from_numpy(a), torch.from_numpy(b))
                 for a, b in ((X[:128], Y[:128]), (X[128:], Y[128:])))
    recorder = Recorder()
    result = cliptune.tune(lambda: nn.Linear(4, 1), data, refit=True, tracker=recorder,
                           **{k: v for k, v in FAST.items() if k != "tracking"})
    [(model, _, sample, _, tags)] = recorder.refits
    assert model is result.model and tags["cliptune.refit_data"] == "train"
    assert sample.shape == (1, 4)  # one item of a Dataset


def test_no_completed_trial_means_no_refit() -> None:
    with pytest.warns(RuntimeWarning, match="No trial completed, so there is no best config to "
                                            "refit; result.model is None"):
        result = cliptune.tune(lambda: nn.Linear(4, 1), regression_data(), refit=True,
                               **{**FAST, "lr": 5.0, "search_space": {"modes": {"none": {}}}})
    assert result.model is None and result.n_pruned == 3


class _Breaks(nn.Linear):
    """Trains well in the trials; the refit (after the study's last trial) goes NaN."""

    broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (float("nan") if _Breaks.broken else 1.0)


def test_a_nonfinite_refit_is_an_error() -> None:
    _Breaks.broken = False

    def after(study: Any, trial: Any) -> None:
        _Breaks.broken = len(study.trials) == FAST["n_trials"]

    with pytest.raises(RuntimeError, match=r"The refit with the best config \(ClipConfig\(.*from "
                                           r"trial \d\) on the train\+val data was unstable: "
                                           "nonfinite"):
        cliptune.tune(lambda: _Breaks(4, 1), (X, Y), refit=True, callbacks=[after], **FAST)
    with pytest.raises(TypeError, match="'refit' parameter of tune must be a bool. Got 'yes'"):
        cliptune.tune(lambda: nn.Linear(4, 1), (X, Y), refit="yes", **FAST)  # type: ignore[arg-type]


def test_keras_refit_logs_a_keras_model(mlflow_uri: str, tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")

    def dense() -> Any:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(jit_compile=False)
        return model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cliptune.tune(dense, (X, Y), refit=True, tracking_uri=uri,
                           **{**FAST, "tracking": True, "n_trials": 1, "epochs": 1})
    assert isinstance(result.model, keras.Model)
    parent = parent_run(uri, "cliptune")
    model_uri = parent.data.tags["cliptune.model_uri"]
    assert mlflow.models.get_model_info(model_uri).signature is not None
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(uri):
        loaded = mlflow.keras.load_model(model_uri)
    assert np.allclose(loaded.predict(X, verbose=0), result.model.predict(X, verbose=0), atol=1e-6)


JOB = """\
model: tests.test_refit:linear
data: tests.test_refit:make_data
optimizer: {name: sgd, lr: 0.05}
epochs: 2
batch_size: 32
search_space: auto
n_trials: 2
seed: 0
refit: true
probe_steps: 3
study: {name: refit-job, storage: "sqlite:///optuna.db"}
tracking: {uri: "sqlite:///mlflow.db", experiment: refit-job}
"""


def linear() -> nn.Module:
    return nn.Linear(4, 1)


def make_data() -> tuple[np.ndarray, np.ndarray]:
    return X, Y


def test_job_key_refit_and_the_cli(mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    _, kwargs = Job.load(job).arguments()
    assert kwargs["refit"] is True and kwargs["probe_steps"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(JOB.replace("refit: true", "refit: maybe"))
    with pytest.raises(JobError, match="bad.yaml: refit: "):
        Job.load(bad)
    assert cli.main(["tune", str(job)]) == 0
    out, err = capsys.readouterr()
    assert "auto threshold ranges from a probe: value [" in err and "3 steps in" in err
    assert "the refit model is logged as models:/" in err
    assert "# auto threshold ranges: value [" in out  # the summary shows the resolved ranges
    assert cli.main(["best", str(job)]) == 0
    assert "# auto threshold ranges: value [" in capsys.readouterr().out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = parent_run(uri, "refit-job")
    assert parent.info.status == "FINISHED"
    tags, params = parent.data.tags, parent.data.params
    assert tags["cliptune.refit_data"] == "train+val" and params["refit"] == "True"
    assert params["probe_steps"] == "3" and params["auto_range_global_norm"].startswith("[")
    model_uri = tags["cliptune.model_uri"]
    signature = mlflow.models.get_model_info(model_uri).signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 4)
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(uri):
        loaded = mlflow.pytorch.load_model(model_uri)
    study = optuna.load_study(study_name="refit-job", storage="sqlite:///optuna.db")
    assert mse(loaded) < 1.0 and study.user_attrs[PROBE_ATTR]["steps"] == 3
