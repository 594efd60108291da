"""Issue 15.2: a changed job never continues its old study silently.

Another search space, epochs, seed or learning rate is refused before any work (one line: start a
new study, or continue with ``continue_changed``); a continued study records each version of its
settings, and each version gets its own MLflow parent run; a space Optuna cannot mix with the
study's trials (other clip modes) is refused whatever the flag.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from torch import nn

import cliptune
from tests.conftest import regression_data
from tests.faults._support import cli, load, write_job

pytestmark = pytest.mark.faults

SPACE = {"modes": {"global_norm": {"threshold": {"low": 0.1, "high": 10.0, "log": True}},
                   "value": {"threshold": {"low": 0.01, "high": 1.0, "log": True}}}}
WITH_LR = {**SPACE, "extras": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}}
WIDER = {"modes": {**SPACE["modes"], "value": {"threshold": {"low": 0.01, "high": 5.0,
                                                                 "log": True}}}}


def _model() -> nn.Module:
    return nn.Linear(4, 1)


def _tune(tmp_path: Path, **settings: Any) -> cliptune.TuneResult:
    kwargs = {"epochs": 1, "batch_size": 32, "n_trials": 2, "seed": 0, "search_space": SPACE,
              "storage": f"sqlite:///{tmp_path / 'study.db'}", "study_name": "s",
              "tracking": False, **settings}
    return cliptune.tune(_model, regression_data(n=64), **kwargs)


@pytest.mark.parametrize(("change", "said"), [
    ({"epochs": 2}, r"epochs 1 -> 2"),
    ({"seed": 1}, r"seed 0 -> 1"),
    ({"lr": 0.05}, r"lr 0.01 -> 0.05"),
    ({"search_space": WITH_LR}, r"search space extras added: lr"),
    ({"search_space": WIDER}, r"search space modes.value \{threshold:\{low:0.01,high:1.0,log:true"
                              r"\}\} -> \{threshold:\{low:0.01,high:5.0"),
])
def test_a_changed_job_is_refused_before_any_work(tmp_path: Path, change: dict[str, Any],
                                                  said: str) -> None:
    _tune(tmp_path)
    with pytest.raises(ValueError, match=rf"Study 's' was run with other settings \({said}.*\)\. "
                                         r"Start a new study .*continue_changed=True"):
        _tune(tmp_path, n_trials=4, **change)
    assert len(load(tmp_path, "s", f"sqlite:///{tmp_path / 'study.db'}").trials) == 2


def test_a_continued_change_is_recorded_and_tracked_as_a_new_version(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _tune(tmp_path, tracking=True, tracking_uri=uri)
    result = _tune(tmp_path, n_trials=4, epochs=2, search_space=WITH_LR, continue_changed=True,
                   tracking=True, tracking_uri=uri)
    assert len(result.study.trials) == 4
    runs = result.study.user_attrs["cliptune.runs"]
    assert [r["first_trial"] for r in runs] == [0, 2]
    assert [r["settings"]["epochs"] for r in runs] == [1, 2]
    assert runs[1]["changed"] == ["search space extras added: lr", "epochs 1 -> 2"]
    assert all("lr" in t.params for t in result.study.trials[2:])
    client = mlflow.MlflowClient(uri)
    parents = [r for r in client.search_runs(
        [client.get_experiment_by_name("cliptune").experiment_id])
        if "mlflow.parentRunId" not in r.data.tags]
    assert sorted((p.data.params["job_version"], p.data.params["epochs"], p.info.status)
                  for p in parents) == [("1", "1", "FINISHED"), ("2", "2", "FINISHED")]


def test_other_clip_modes_cannot_share_a_study_even_when_asked(tmp_path: Path) -> None:
    _tune(tmp_path)
    adaptive = {"modes": {**SPACE["modes"], "autoclip": {"threshold": {"low": 1.0, "high": 50.0}}}}
    with pytest.raises(ValueError, match=r"cannot continue study 's': its parameter 'clip_mode' "
                                         r"was sampled from \[global_norm, value\] and would now be "
                                         r"from \[global_norm, value, autoclip\]; Optuna cannot mix"):
        _tune(tmp_path, n_trials=4, search_space=adaptive, continue_changed=True)


def test_the_cli_refuses_added_adaptive_modes_with_one_line(tmp_path: Path) -> None:
    """The reported fault: trials FAILed with 'CategoricalDistribution does not support dynamic
    value space' and the job exited 0."""
    write_job(tmp_path)
    assert cli(tmp_path, "tune", "job.yaml", "--n-trials", "2").returncode == 0
    for extra in ([], ["--continue-changed"]):
        done = cli(tmp_path, "tune", "job.yaml", "--set", "search_space=adaptive", "--n-trials",
                   "4", *extra)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cliptune tune: error: job.yaml: ")
        assert "search space modes added: none, autoclip, agc, zclip" in lines[0] or \
            "its parameter 'clip_mode'" in lines[0]
    assert [t.state.name for t in load(tmp_path).trials] == ["COMPLETE"] * 2
    done = cli(tmp_path, "tune", "job.yaml", "--set", "seed=5")  # a finished study: refused too
    assert done.returncode == 2 and "seed 0 -> 5" in done.stderr, done.stderr


def test_each_run_of_a_tracked_job_closes_its_own_parent_run(tmp_path: Path) -> None:
    """A rerun with more trials found a new best and failed with MLflow's 'Changing param values
    is not allowed', since it logged it into the first run's finished parent."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a tracking failure warns
        first = _tune(tmp_path, tracking=True, tracking_uri=uri)
        second = _tune(tmp_path, n_trials=4, tracking=True, tracking_uri=uri)
    assert second.best_config != first.best_config  # so the first parent cannot take it
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cliptune").experiment_id])
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags),
                     key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]
    assert [p.data.metrics["best_value"] for p in parents] == [first.best_value, second.best_value]
    assert len(runs) == 2 + 4


class _BrokenSampler(optuna.samplers.RandomSampler):
    def sample_independent(self, *args: Any) -> Any:
        raise RuntimeError("the sampler broke")


def test_trials_failing_before_training_count_as_failed(tmp_path: Path) -> None:
    """A trial whose sampling failed was FAIL in the study, but the job still succeeded."""
    with pytest.raises(RuntimeError, match="All 2 trials failed; the first error was: "
                                           "RuntimeError: the sampler broke"):
        _tune(tmp_path, sampler=_BrokenSampler(), baselines=False)  # every trial samples
