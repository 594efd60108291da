"""Issue 15.7: an MLflow server outage costs no training and loses no record; a server gone for
good ends the job in bounded time, saying what was not sent.

The train function itself makes the outage (it stops, resumes and kills the server's process
group at given trials), so the test needs no timing: every call the trials make while the server
is stopped would block, and MLflow's client is told to give up on a call quickly
(``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), so that a tracker that
sends from the trial loses the records of the outage.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

import cliptune
from cliptune.tracking import MlflowTracker
from tests.faults._support import MlflowServer

pytestmark = pytest.mark.faults

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
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    numbers = [int(r.data.tags["optuna.trial_number"]) for r in children]
    assert len(parents) == 1 and len(numbers) == len(set(numbers)), "a trial has two runs"
    return parents[0], dict(zip(numbers, children, strict=True))


class _Noticed(logging.Handler):
    """Set when cliptune says the store does not answer: its calls met the outage."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "does not answer" in record.getMessage():
            self.event.set()


@pytest.mark.mlflow_server
def test_an_outage_costs_no_training_and_loses_no_record(server: MlflowServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    noticed = _Noticed()
    logging.getLogger("cliptune").addHandler(noticed)
    seconds: dict[int, float] = {}

    def train(trial: cliptune.Trial) -> None:
        start = time.perf_counter()
        if trial.number == 1:
            server.signal(signal.SIGSTOP)  # the server stops answering (calls hang)
        if trial.number == 3:  # trials went on while the tracker's calls met the outage
            assert noticed.event.wait(timeout=120), "the tracker never called the server"
        if trial.number == 4:
            server.signal(signal.SIGCONT)
        for epoch in range(3):
            trial.step(1.0, 1.0)
            trial.report(epoch, val_loss=1.0 / (trial.number + 1 + epoch))
        seconds[trial.number] = time.perf_counter() - start

    try:
        result = cliptune.tune_loop(train, n_trials=6, seed=0, search_space=SPACE,
                                    tracking_uri=server.uri, show_progress=False)
    finally:
        logging.getLogger("cliptune").removeHandler(noticed)
    assert result.n_complete == 6
    parent, children = _children(server.uri)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 6
    assert sorted(children) == list(range(6))
    for number, run in children.items():  # the outage's records were kept and sent afterwards
        assert run.info.status == "FINISHED" and run.data.tags["cliptune.state"] == "COMPLETE"
        history = mlflow.MlflowClient(server.uri).get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [0, 1, 2], number
    print("seconds per trial (the server stopped in trials 1 to 3):", seconds)


@pytest.mark.mlflow_server
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


class _LostAnswer:
    """A real client whose first ``create_run`` reaches the store, but whose answer is lost."""

    def __init__(self, client: Any) -> None:
        self._client, self.lost = client, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        run = self._client.create_run(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise MlflowException("API request failed with timeout exception", INTERNAL_ERROR)
        return run


def test_a_run_whose_creation_answer_was_lost_is_created_once(tmp_path: Path) -> None:
    """Retrying a call is safe only if it cannot happen twice: a trial's run has its own key, a
    retried create first looks for it, and a twin that the store made late is removed."""
    from cliptune._mlflow_runs import RUN_KEY, TrialRun, close_orphans
    from cliptune._mlflow_sender import Sender
    from cliptune.config import ClipConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("lost")
    parent = client.create_run(experiment).info.run_id
    study = optuna.create_study(study_name="lost")
    run = TrialRun(study.ask(), parent, experiment, ClipConfig("none"), {})
    sender = Sender(_LostAnswer(client), uri, remote=True)  # remote: a timeout is an outage
    sender.submit(run.create)
    sender.submit(run.close("COMPLETE", 1.0, {"cliptune.state": "COMPLETE"}))
    assert sender.close(timeout=60) == 0 and sender.failure is None
    runs = [r for r in client.search_runs([experiment]) if r.info.run_id != parent]
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run.run_id, "FINISHED")]
    late = client.create_run(experiment, tags={**runs[0].data.tags, "cliptune.state": "RUNNING"})
    assert late.data.tags[RUN_KEY] == runs[0].data.tags[RUN_KEY]  # made after its client gave up
    assert close_orphans(client, experiment, "lost", {0: "COMPLETE"}) == []
    assert [r.info.run_id for r in client.search_runs([experiment])
            if r.info.run_id != parent] == [run.run_id]
