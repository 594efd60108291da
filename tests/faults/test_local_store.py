"""Issue 15.8: workers on one machine track reliably on the default local store (sqlite).

Four workers run while another process holds the store locked for longer than MLflow waits for
a busy sqlite store (20 s), as a long query of ``mlflow ui`` or a backup can: the store refuses a
write with "database is locked". The trials go on, and once the store is free every record of
every worker is in it. The lock is released only after the store has refused a write.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from cliptune.result import SURPLUS_ATTR
from tests.faults._support import JOB, load, marker, mlflow_runs, start_cli, wait_for, write_job
from tests.faults._support import finish as finish_cli

pytestmark = pytest.mark.faults


def test_four_workers_track_every_trial_though_the_store_is_locked(tmp_path: Path) -> None:
    write_job(tmp_path, JOB.replace("n_trials: 6", "n_trials: 8").replace("enabled: false",
                                                                          "enabled: true"))
    # One epoch a trial: the median rule starts at the second, so no trial is pruned for having
    # finished after a better one (the order four released workers finish in is a race).
    job = start_cli(tmp_path, "tune", "job.yaml", "--workers", "4", block="0,1,2,3", epochs=1)
    wait_for(lambda: all(marker(tmp_path, f"blocked-{n}") for n in range(4)),
             "four workers in a trial", job, timeout=300)
    assert len({marker(tmp_path, f"blocked-{n}") for n in range(4)}) == 4
    store = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=60)
    store.execute("BEGIN EXCLUSIVE")  # another process holds the store
    try:
        (tmp_path / "release").touch()
        wait_for(lambda: "database is locked" in (tmp_path / "err.txt").read_text(),
                 "the store refusing a write", job, timeout=300)
        wait_for(lambda: all(marker(tmp_path, f"started-{n}") for n in range(8)),
                 "every trial starting while the store is locked", job, timeout=300)
    finally:
        store.execute("COMMIT")
        store.close()
    code, _, err = finish_cli(job, tmp_path, timeout=300)
    assert code == 0, err
    assert "not tracked" not in err and "Traceback" not in err
    ran = [t for t in load(tmp_path).trials if not t.user_attrs.get(SURPLUS_ATTR)]  # see runner
    assert [t.state for t in ran] == [TrialState.COMPLETE] * 8
    parents, runs = mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(runs) == list(range(8)), err  # what the job said, should a worker's runs be missing
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert all(r.data.metrics["value"] == pytest.approx(1 / (n + 1), abs=0.01)
               for n, r in runs.items())


def test_the_end_waits_on_while_a_slow_store_keeps_answering(tmp_path: Path) -> None:
    """The end's wait counts from the store's last answer, not from its own start: a store that
    answers each call but slowly (four workers taking turns on one sqlite file after a lock) gets
    every record, in order, though sending them takes twice that wait."""
    import mlflow

    from cliptune._mlflow_sender import Sender

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("slow")).info.run_id
    sender = Sender(client, uri, remote=False)

    def slow(step: int) -> Callable[[Any], None]:
        def call(c: Any) -> None:
            time.sleep(0.6)  # the store's turn comes late
            c.log_metric(run, "m", float(step), step=step)
        return call

    for step in range(8):
        sender.submit(slow(step))
    start = time.monotonic()
    assert sender.close(2.0) == 0
    assert time.monotonic() - start > 4.0  # 8 x 0.6 s: the wait went on past its 2 s
    assert [m.value for m in client.get_metric_history(run, "m")] == [float(s) for s in range(8)]


def test_the_end_waits_while_other_workers_calls_are_answered(tmp_path: Path) -> None:
    """A worker whose turn on a sqlite store's lock comes after the other workers' queued calls
    (found starved in a full run: three of four workers gave up and their trials' runs were
    missing) waits on while the store answers them, and gives up once nobody is answered."""
    import threading

    import mlflow

    from cliptune._mlflow_sender import Sender
    from cliptune._mlflow_store import mark_answered, sqlite_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("turns")).info.run_id
    others_done = threading.Event()

    def other_worker() -> None:  # holds the lock for 4 s, its calls answered meanwhile
        with sqlite_lock(uri):
            for _ in range(8):
                time.sleep(0.5)
                mark_answered(uri)
        others_done.set()

    holder = threading.Thread(target=other_worker)
    holder.start()
    time.sleep(0.2)
    sender = Sender(client, uri, remote=False)
    sender.submit(lambda c: c.log_metric(run, "m", 1.0, step=0))
    start = time.monotonic()
    assert sender.close(1.5) == 0  # 4 s in all, though it waits 1.5 s on an unanswering store
    assert others_done.is_set() and time.monotonic() - start > 3.0
    assert [m.value for m in client.get_metric_history(run, "m")] == [1.0]
    holder.join()

    blocked = threading.Event()

    def stuck_worker() -> None:  # holds the lock and is never answered
        with sqlite_lock(uri):
            blocked.wait(10)

    stuck = threading.Thread(target=stuck_worker)
    stuck.start()
    time.sleep(1.6)  # the last answer is older than the timeout
    sender = Sender(client, uri, remote=False)
    sender.submit(lambda c: c.log_metric(run, "m", 2.0, step=1))
    start = time.monotonic()
    assert sender.close(1.5) == 1  # nobody answered: it gives up after its timeout
    assert time.monotonic() - start < 4.0
    blocked.set()
    stuck.join()
