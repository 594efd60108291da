"""Issue 15.7: an MLflow server outage costs no training and loses no record; a server gone for
good ends the job in bounded time, saying what was not sent.

The train function itself makes the outage (it stops, resumes and kills the server's process
group at given trials), so the test needs no timing: every call the trials make while the server
is stopped would block, and MLflow's client is told to give up on a call quickly
(``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), so that a tracker that
sends from the trial loses the records of the outage.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

import cliptune
from cliptune.tracking import MlflowTracker
from tests.faults._support import MlflowServer

pytestmark = [pytest.mark.faults, pytest.mark.mlflow_server]

SPACE = {"modes": {"global_norm": {"threshold": {"low": 0.1, "high": 10.0, "log": True}}}}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "server")
    yield server
    server.kill()


def _children(uri: str) -> tuple[Any, dict[int, Any]]:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cliptune").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return parents[0], {int(r.data.tags["optuna.trial_number"]): r for r in runs
                        if "mlflow.parentRunId" in r.data.tags}


def test_an_outage_costs_no_training_and_loses_no_record(server: MlflowServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    seconds: dict[int, float] = {}

    def train(trial: cliptune.Trial) -> None:
        start = time.perf_counter()
        if trial.number == 1:
            server.signal(signal.SIGSTOP)  # the server stops answering (calls hang)
        if trial.number == 4:
            server.signal(signal.SIGCONT)
        for epoch in range(3):
            trial.step(1.0, 1.0)
            trial.report(epoch, val_loss=1.0 / (trial.number + 1 + epoch))
        seconds[trial.number] = time.perf_counter() - start

    result = cliptune.tune_loop(train, n_trials=6, seed=0, search_space=SPACE,
                                tracking_uri=server.uri, show_progress=False)
    assert result.n_complete == 6
    parent, children = _children(server.uri)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 6
    assert sorted(children) == list(range(6))
    for number, run in children.items():  # the outage's records were kept and sent afterwards
        assert run.info.status == "FINISHED" and run.data.tags["cliptune.state"] == "COMPLETE"
        history = mlflow.MlflowClient(server.uri).get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [0, 1, 2], number
    print("seconds per trial (the server stopped during trials 1-3):", seconds)


def test_a_server_gone_for_good_ends_the_job_and_says_what_was_not_sent(
        server: MlflowServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    def train(trial: cliptune.Trial) -> None:
        if trial.number == 2:
            server.kill()
        trial.report(0, val_loss=1.0 / (trial.number + 1))

    tracker = MlflowTracker(server.uri, flush_timeout_s=1.0)
    result = cliptune.tune_loop(train, n_trials=4, seed=0, search_space=SPACE, tracker=tracker,
                                show_progress=False)
    assert result.n_complete == 4  # the study has every result
    assert "does not answer" in caplog.text
    assert "were not sent" in caplog.text and "left RUNNING" in caplog.text
