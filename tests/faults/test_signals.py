"""Issue 15.3 and 15.4: SIGTERM stops a job cleanly (exit 143), and a rerun after SIGKILL closes
what the killed job left open and says what it retried.

The loop job blocks its trials on a marker file, so every signal lands in the middle of a trial.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.faults._support import (
    alive,
    cli,
    finish,
    load,
    marker,
    mlflow_runs,
    retry_of,
    start_cli,
    wait_for,
    write_job,
)

pytestmark = pytest.mark.faults
TRACKED = ("--set", "tracking.enabled=true")


def _retried(folder: Path) -> dict[int, list[TrialState]]:
    """Each trial that was run again: the states of its retries."""
    out: dict[int, list[TrialState]] = {}
    for trial in load(folder).trials:
        if retry_of(trial) is not None:
            out.setdefault(retry_of(trial), []).append(trial.state)  # type: ignore[arg-type]
    return out


def test_sigterm_records_the_trial_closes_the_runs_and_exits_143(tmp_path: Path) -> None:
    write_job(tmp_path)
    job = start_cli(tmp_path, "tune", "job.yaml", *TRACKED, block="2")
    wait_for(lambda: marker(tmp_path, "blocked-2"), "trial 2 running", job)
    job.send_signal(signal.SIGTERM)
    code, out, err = finish(job, tmp_path)
    assert code == 143, err
    assert "SIGTERM: stopping now" in err and "Traceback" not in err
    assert "Terminated (SIGTERM); the best so far in study 'fx'" in err
    assert "best of study 'fx'" in out
    trials = load(tmp_path).trials
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL]
    assert trials[2].user_attrs["error"] == "Terminated: interrupted (SIGTERM)"
    assert _retried(tmp_path) == {2: [TrialState.WAITING]}  # it runs again with the job
    parents, runs = mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert {n: r.info.status for n, r in runs.items()} == {0: "FINISHED", 1: "FINISHED",
                                                           2: "FAILED"}
    assert "Terminated" in runs[2].data.tags["cliptune.error"]
    again = cli(tmp_path, "tune", "job.yaml", *TRACKED)
    assert again.returncode == 0, again.stderr
    assert _retried(tmp_path) == {2: [TrialState.COMPLETE]}


def test_sigterm_stops_the_worker_processes_with_the_job(tmp_path: Path) -> None:
    write_job(tmp_path)
    job = start_cli(tmp_path, "tune", "job.yaml", "--workers", "2", *TRACKED, block="all")
    wait_for(lambda: marker(tmp_path, "blocked-0") and marker(tmp_path, "blocked-1"),
             "two trials running", job)
    pids = {marker(tmp_path, "blocked-0"), marker(tmp_path, "blocked-1")}
    assert job.pid in pids and len(pids) == 2
    (worker,) = pids - {job.pid}
    job.send_signal(signal.SIGTERM)  # as `kill` or a scheduler sends it: to the job alone
    code, _, err = finish(job, tmp_path)
    assert code == 143, err
    assert not alive(worker), "the worker process outlived its job"
    assert _retried(tmp_path) == {0: [TrialState.WAITING], 1: [TrialState.WAITING]}
    parents, runs = mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert {n: r.info.status for n, r in runs.items()} == {0: "FAILED", 1: "FAILED"}


def test_workers_do_not_outlive_a_killed_job(tmp_path: Path) -> None:
    write_job(tmp_path)
    job = start_cli(tmp_path, "tune", "job.yaml", "--workers", "2", *TRACKED, block="all")
    wait_for(lambda: marker(tmp_path, "blocked-0") and marker(tmp_path, "blocked-1"),
             "two trials running", job)
    (worker,) = {marker(tmp_path, "blocked-0"), marker(tmp_path, "blocked-1")} - {job.pid}
    job.kill()
    job.wait(timeout=60)
    wait_for(lambda: not alive(worker), "the worker process ending after its job was killed")
    states = {t.number: t.state for t in load(tmp_path).trials if retry_of(t) is None}
    mine = 1 - [n for n in (0, 1) if marker(tmp_path, f"blocked-{n}") == worker][0]
    assert states[1 - mine] == TrialState.FAIL  # the worker recorded its trial before leaving
    assert states[mine] == TrialState.RUNNING  # the killed job's: failed and retried later


def test_a_rerun_after_sigkill_closes_the_killed_runs_and_says_what_it_retried(
        tmp_path: Path) -> None:
    write_job(tmp_path)
    job = start_cli(tmp_path, "tune", "job.yaml", *TRACKED, block="2")
    wait_for(lambda: marker(tmp_path, "blocked-2"), "trial 2 running", job)
    # The trial's run is started by the background sender, so it may come a moment after the trial
    # itself: kill the job only once the run it should leave RUNNING exists.
    wait_for(lambda: 2 in mlflow_runs(tmp_path)[1], "trial 2's MLflow run", job)
    job.kill()
    job.wait(timeout=60)
    parents, runs = mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["RUNNING"] and runs[2].info.status == "RUNNING"
    again = cli(tmp_path, "tune", "job.yaml", *TRACKED)
    assert again.returncode == 0, again.stderr
    assert "continuing study 'fx': 2 complete; 1 RUNNING" in again.stderr
    assert "closed the MLflow runs that stopped workers left RUNNING, of trials 2" in again.stderr
    assert _retried(tmp_path) == {2: [TrialState.COMPLETE]}
    (retry,) = [t.number for t in load(tmp_path).trials if retry_of(t) == 2]  # 3 or 6: it is
    assert f"trial 2 was left RUNNING (its worker stopped, or it was interrupted): failed, and " \
           f"retried as trial {retry}" in again.stderr  # retried once stale, before trial 3 or after
    parents, runs = mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]  # the killed job's, finished now
    assert runs[2].info.status == "FAILED" and runs[2].data.tags["cliptune.state"] == "FAIL"
    assert sorted(runs) == list(range(7)) and all(
        r.info.status == "FINISHED" for n, r in runs.items() if n != 2)
