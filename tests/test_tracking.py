"""MLflow tracking against real stores: a local sqlite store, a real ``mlflow server``, PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

import cliptune
from cliptune.config import ClipConfig
from cliptune.plots import write_plots
from cliptune.storage import mask_url
from cliptune.tracking import MlflowTracker, Tracker
from tests.conftest import regression_data

torch = pytest.importorskip("torch")
mlflow = pytest.importorskip("mlflow")

EPOCHS = 3
# Brute force over 2 modes x 3 cases: 6 trials, each case twice, in a seeded order.
SPACE = {"version": 1,
         "modes": {"none": {}, "global_norm": {"threshold": {"choices": [1.0]}}},
         "extras": {"case": {"choices": ["ok", "fail", "explode"]}}}
CHILD_METRICS = ("train_loss", "val_loss", "grad_norm_mean", "grad_norm_max", "clip_fraction",
                 "steps")
PLOTS = {"grad_norms.png", "optimization_history.png", "val_loss_curves.png",
         "value_by_threshold.png"}


def make_model(extras: dict[str, Any]) -> torch.nn.Module:
    """``ok`` trains, ``fail`` raises (FAIL), ``explode`` has a NaN loss at once (PRUNED)."""
    if extras["case"] == "fail":
        raise RuntimeError("model_fn failed on purpose")
    model = torch.nn.Linear(4, 1)
    if extras["case"] == "explode":
        with torch.no_grad():
            model.weight.fill_(float("nan"))
    return model


def run_job(tmp_path: Path, **kwargs: Any) -> cliptune.TuneResult:
    kwargs.setdefault("storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    return cliptune.tune(make_model, regression_data(n=128), epochs=EPOCHS, n_trials=6, seed=0,
                         search_space=SPACE, sampler=optuna.samplers.BruteForceSampler(seed=0),
                         pruner=optuna.pruners.NopPruner(), batch_size=32, **kwargs)


def runs_of(client: Any, experiment: str = "cliptune") -> tuple[Any, list[Any]]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return parents[0], [r for r in runs if r is not parents[0]]


def check_job_record(client: Any, result: cliptune.TuneResult, tmp_path: Path) -> None:
    """The parent run and its nested runs hold what DESIGN.md (Tracking) promises."""
    parent, children = runs_of(client)
    assert result.n_complete == result.n_pruned == result.n_failed == 2
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cliptune.study"] == result.study.study_name
    assert parent.data.tags["cliptune.backend"] == "torch"
    params = parent.data.params
    assert params["model"] == "tests.test_tracking:make_model" and params["epochs"] == str(EPOCHS)
    assert params["storage"].startswith("sqlite:///") and params["n_trials"] == "6"
    assert params["best_clip_mode"] == result.best_config.mode.value
    assert params["best_case"] == "ok"
    assert parent.data.metrics["best_value"] == pytest.approx(result.best_value)
    assert (parent.data.metrics["n_complete"], parent.data.metrics["n_pruned"],
            parent.data.metrics["n_failed"]) == (2, 2, 2)
    assert parent.data.metrics["n_steps"] == result.n_steps > 0  # what the job cost
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "plots"} <= top
    assert {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")} == PLOTS
    local = client.download_artifacts(parent.info.run_id, "best_config.yaml", str(tmp_path))
    assert ClipConfig.from_yaml(local) == result.best_config

    assert len(children) == 6
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == list(range(6))
    for trial in result.study.trials:
        run = by_number[trial.number]
        tags, case = run.data.tags, trial.params["case"]
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["clip_mode"] == trial.params["clip_mode"]
        assert run.data.params["case"] == case
        assert ("clip_threshold" in run.data.params) == (trial.params["clip_mode"] != "none")
        expected = {"ok": ("COMPLETE", "FINISHED"), "explode": ("PRUNED", "KILLED"),
                    "fail": ("FAIL", "FAILED")}[case]
        assert (tags["cliptune.state"], run.info.status) == expected
        ending = {"ok": "", "explode": " · pruned: nonfinite", "fail": " · failed"}[case]
        assert run.info.run_name.startswith(f"trial-{trial.number} ")  # how it ended, in the table
        assert run.info.run_name.endswith(ending) and (ending or "·" not in run.info.run_name)
        assert "**before** the clip" in tags["mlflow.note.content"]  # the run's description
        if case == "ok":
            for key in CHILD_METRICS:
                history = client.get_metric_history(run.info.run_id, key)
                assert [m.step for m in history] == list(range(EPOCHS))
            assert run.data.metrics["value"] == pytest.approx(trial.value)
        elif case == "explode":
            assert tags["cliptune.prune_reason"] == "nonfinite"
        else:
            assert "model_fn failed on purpose" in tags["cliptune.error"]


def test_sqlite_store_by_default(mlflow_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    result = run_job(tmp_path)
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlruns").is_dir()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_job_record(client, result, tmp_path)
    parent, _ = runs_of(client)
    exp_id = parent.info.experiment_id
    link = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{parent.info.run_id}"
    assert f"{link}?workflowType=machine_learning" in caplog.text  # the UI's model-training mode
    assert "`mlflow ui` in this folder" in caplog.text


def test_history_in_user_attrs_makes_plots_without_mlflow(tmp_path: Path) -> None:
    result = run_job(tmp_path, tracking=False)
    assert not (tmp_path / "mlflow.db").exists()
    ok = [t for t in result.study.trials if t.params["case"] == "ok"]
    assert [len(t.user_attrs["history"]) for t in ok] == [EPOCHS, EPOCHS]
    paths = write_plots(result.study, tmp_path / "figs")
    assert {p.name for p in paths} == PLOTS
    assert all(p.stat().st_size > 1000 for p in paths)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1, polled until healthy (at most 90 s), then stopped."""
    from urllib.request import urlopen

    port, folder = _free_port(), tmp_path / "server"
    folder.mkdir()
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start:\n"
                                + (folder / "server.log").read_text()[-2000:])
                time.sleep(0.25)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_real_mlflow_server_over_rest(tmp_path: Path, mlflow_server: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    uri = mlflow_server
    result = run_job(tmp_path, tracking_uri=uri)
    check_job_record(mlflow.MlflowClient(uri), result, tmp_path)
    assert f"{uri}/#/experiments/" in caplog.text
    assert not (tmp_path / "mlflow.db").exists()


def test_store_failing_mid_study_warns_and_the_study_goes_on(mlflow_uri: str, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    calls = []

    def model_fn() -> torch.nn.Module:
        calls.append(1)
        if len(calls) == 4:  # calls: probe, check, trial 0, trial 1 (its runs vanish meanwhile)
            client = mlflow.MlflowClient(uri)
            client.delete_experiment(client.get_experiment_by_name("cliptune").experiment_id)
        return torch.nn.Linear(4, 1)

    with pytest.warns(RuntimeWarning, match="rest of this tuning job is not tracked.*keeps every"):
        result = cliptune.tune(model_fn, regression_data(n=128), epochs=2, n_trials=4, seed=0,
                               tracking_uri=uri, batch_size=32, storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert len(result.study.trials) == 4 and result.n_failed == 0
    assert all("history" in t.user_attrs for t in result.study.trials)


def test_unreachable_server_fails_before_any_trial(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(ValueError, match=f"Cannot record the tuning job in MLflow at tracking URI "
                                         f"'{uri}'.*tracking=False"):
        run_job(tmp_path, tracking_uri=uri, storage=storage, study_name="s")
    assert optuna.get_all_study_names(storage) == []  # nothing created: tracking is checked first


def test_tracking_uri_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    cliptune.tune(lambda: torch.nn.Linear(4, 1), regression_data(n=64), epochs=1, n_trials=1,
                  experiment="from-env", batch_size=32)
    assert (tmp_path / "env.db").is_file() and not (tmp_path / "mlflow.db").exists()
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'env.db'}").get_experiment_by_name("from-env")


@pytest.fixture
def postgres_url(pg_url: str) -> Callable[[str], str]:
    """A fresh PostgreSQL database (trust auth), as a URL with a given password."""
    return lambda password: pg_url.replace("postgresql://postgres@",
                                           f"postgresql+psycopg://postgres:{password}@")


def test_postgres_storage_password_is_never_logged(mlflow_uri: str, tmp_path: Path,
                                                   postgres_url: Callable[[str], str]) -> None:
    secret = "s3cret-Pa55word"
    result = run_job(tmp_path, storage=postgres_url(secret))  # trust auth ignores the password
    assert result.n_complete == 2
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = runs_of(client)
    assert parent.data.params["storage"] == mask_url(postgres_url(secret))
    assert ":***@127.0.0.1" in parent.data.params["storage"]
    for run in [parent, *children]:
        logged = [*run.data.params.items(), *run.data.tags.items()]
        assert not [kv for kv in logged if secret in kv[0] or secret in kv[1]]
    files = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]
    assert len(files) >= 6 and not [p for p in files if secret.encode() in p.read_bytes()]


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
    ("mysql+pymysql://u:p@ss@h:3306/d", "mysql+pymysql://u:***@h:3306/d"),
    ("postgresql://u@h/d?password=secret&sslmode=require",
     "postgresql://u@h/d?password=***&sslmode=require"),
    ("sqlite:///optuna.db", "sqlite:///optuna.db"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_bad_tracking_arguments() -> None:
    data = regression_data(n=64)
    with pytest.raises(TypeError, match="'tracker' parameter of tune must be a cliptune Tracker"):
        cliptune.tune(lambda: torch.nn.Linear(4, 1), data, tracker="mlflow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'experiment' parameter of tune.*Got ''"):
        cliptune.tune(lambda: torch.nn.Linear(4, 1), data, experiment="")
    with pytest.raises(ValueError, match="'flush_every_s' parameter.*Got -1"):
        MlflowTracker(flush_every_s=-1)
    assert type(cliptune.tune(lambda: torch.nn.Linear(4, 1), data, epochs=1, n_trials=1,
                              tracker=Tracker()).study) is optuna.Study


def _study_with_thresholds(thresholds: list[float]) -> optuna.Study:
    study = optuna.create_study()
    for i, t in enumerate(thresholds):
        study.add_trial(optuna.trial.create_trial(
            params={"clip_mode": "global_norm", "clip_threshold_global_norm": t},
            distributions={"clip_mode": optuna.distributions.CategoricalDistribution(
                ["global_norm"]), "clip_threshold_global_norm":
                optuna.distributions.FloatDistribution(1e-3, 1e3, log=True)},
            value=1.0 + 0.1 * i))
    return study


@pytest.mark.parametrize("thresholds", [[0.04, 0.05, 0.06, 0.07, 0.09], [0.012, 0.5, 30.0, 95.0],
                                        [0.31, 0.33, 0.36]])
def test_threshold_axis_labels_never_run_together(thresholds: list[float]) -> None:
    """value_by_threshold.png printed every minor tick of a short log axis (0.040.050.06...)."""
    from cliptune.plots import plot_value_by_threshold

    fig = plot_value_by_threshold(_study_with_thresholds(thresholds))
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.xaxis.get_majorticklabels() + ax.xaxis.get_minorticklabels()
              if t.get_text() and t.get_visible()]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    low, high = ax.get_xlim()
    inside = [b for b, t in zip(boxes, labels, strict=True) if low <= float(t.get_text()) <= high]
    assert len(inside) >= 1  # something tells where the thresholds are
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:], strict=False)), \
        [t.get_text() for t in labels]
