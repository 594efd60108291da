"""Issue 15.5: a full disk is one clear error; the study stays consistent and readable, nothing
recorded before is lost, and once there is space again the job finishes.

The study and the MLflow store live on a small tmpfs (mounting one needs root; the test is skipped
otherwise), which trial 3 fills as another process could: every write after it fails.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

import cliptune
from tests.faults._support import JOB, cli, load, mlflow_runs, retry_of, write_job

pytestmark = pytest.mark.faults


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_is_one_error_and_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    write_job(small_disk, JOB.replace("enabled: false", "enabled: true"))
    filler = small_disk / "filler"
    done = cli(small_disk, "tune", "job.yaml", dir=tmp_path, fill=f"3:{filler}")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "RuntimeWarning: MLflow tracking" in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [
        "cliptune tune: error: The Optuna storage sqlite:///mlruns/cliptune-optuna.db "
        "cannot be written (database or disk is full): the job stopped at "
        "trial 3. What it recorded before is kept (cliptune best reads it), and a trial it could "
        "not record runs again when the job does: free some space (or bring the database back), "
        "then run the job again."], done.stderr

    study = load(small_disk)  # readable, and nothing recorded before is lost
    states = [t.state for t in study.trials]
    assert states[:3] == [TrialState.COMPLETE] * 3
    # Trial 3's end could not be written (RUNNING: the rerun fails and retries it), unless the
    # store got a few bytes back (a rolled-back journal) in time: then FAIL, and queued again.
    assert states[3:] in ([TrialState.RUNNING], [TrialState.FAIL, TrialState.WAITING]), states
    best = cli(small_disk, "best", "job.yaml")
    assert best.returncode == 0 and "best of study 'fx'" in best.stdout, best.stderr

    filler.unlink()  # space again: the job finishes, trial 3 runs again
    again = cli(small_disk, "tune", "job.yaml", dir=tmp_path)
    assert again.returncode == 0, again.stderr
    after = load(small_disk).trials
    assert [t.params for t in after[:3]] == [t.params for t in study.trials[:3]]
    assert [t.state for t in after if retry_of(t) == 3] == [TrialState.COMPLETE]
    parents, runs = mlflow_runs(small_disk)
    assert not [r for r in [*parents, *runs.values()] if r.info.status == "RUNNING"]


def test_a_train_functions_own_database_error_is_a_failed_trial(tmp_path: Path) -> None:
    """Only the study's storage failing stops the job: a database error of the train function
    itself is a failed trial like any other, and the study goes on."""

    def train(trial: cliptune.Trial) -> None:
        if trial.number == 0:
            sqlite3.connect(":memory:").execute("SELECT * FROM missing_table")
        trial.report(0, val_loss=1.0 / (trial.number + 1))

    result = cliptune.tune_loop(train, n_trials=3, seed=0, tracking=False,
                                storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert (result.n_failed, result.n_complete) == (1, 2)
    assert "OperationalError: no such table" in result.study.trials[0].user_attrs["error"]
