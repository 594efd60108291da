"""Many workers on one study: the shared total, one MLflow parent, dead workers' trials retried."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import cliptune  # noqa: E402
from cliptune._total import counts_toward_total  # noqa: E402
from cliptune.confirm import is_rerun  # noqa: E402
from cliptune.runner import SURPLUS_ATTR  # noqa: E402
from cliptune.storage import Heartbeat, open_storage, quiet_experimental  # noqa: E402
from tests.conftest import regression_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACE = {"modes": {"global_norm": {"threshold": {"low": 0.1, "high": 10.0, "log": True}},
                   "value": {"threshold": {"low": 0.01, "high": 1.0, "log": True}}}}


HOLD = "CLIPTUNE_TEST_HOLD"  # a path: the second trial's model writes it, then waits to be killed
_BUILT = [0]


class _Slow(nn.Module):
    """A linear model that takes ``delay`` seconds a batch; with ``hold`` (a path), its first
    forward pass writes that file and then blocks, so a test can kill the worker mid-trial."""

    def __init__(self, delay: float, hold: str | None = None) -> None:
        super().__init__()
        self.linear, self.delay, self.hold = nn.Linear(4, 1), delay, hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hold is not None:
            Path(self.hold).write_text("training")
            time.sleep(3600)
        time.sleep(self.delay)
        return self.linear(x)


def quick_model() -> nn.Module:
    return _Slow(0.01)


def slow_model() -> nn.Module:
    """Built once for the check pass, then once a trial: with $CLIPTUNE_TEST_HOLD set, the
    second trial (its params sampled, so it can be retried) holds in its first batch."""
    _BUILT[0] += 1
    return _Slow(0.01, os.environ.get(HOLD) if _BUILT[0] == 3 else None)


def _kwargs(**extra: Any) -> dict[str, Any]:
    return {"data": regression_data(n=160), "epochs": 2, "batch_size": 32, "lr": 0.05,
            "search_space": SPACE, "seed": 0, "tracking": False, **extra}


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The search trials that finished (surplus trials of a race and confirmation re-runs left
    out)."""
    return [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                                optuna.trial.TrialState.PRUNED,
                                                optuna.trial.TrialState.FAIL))
            if not t.user_attrs.get(SURPLUS_ATTR) and not is_rerun(t)]


@pytest.mark.subprocess
def test_n_jobs_without_storage_runs_in_processes_and_returns_in_memory() -> None:
    result = cliptune.tune(quick_model, **_kwargs(n_trials=6, n_jobs=2))
    assert len(_finished(result.study)) == 6
    assert isinstance(result.study._storage, optuna.storages.InMemoryStorage)
    assert result.best_config is not None


def test_n_jobs_needs_an_importable_factory() -> None:
    with pytest.raises(TypeError, match="model_fn must be importable"):
        cliptune.tune(lambda: nn.Linear(4, 1), **_kwargs(n_trials=2, n_jobs=2))


@pytest.mark.subprocess
@pytest.mark.slow
def test_three_workers_on_postgres_share_the_total_and_one_parent_run(mlflow_uri: str, pg_url: str,
                                                                       tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cliptune.tune(quick_model, **_kwargs(
        n_trials=12, n_jobs=3, storage=pg_url, study_name="shared", tracking=True,
        tracking_uri=uri, experiment="parallel"))
    study = optuna.load_study(study_name="shared", storage=pg_url)
    finished = _finished(study)
    assert len(finished) == 12 and counts_toward_total(study.trials) == 12
    assert len({t.number for t in finished}) == 12
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert result.n_complete + result.n_pruned + result.n_failed == 12

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("parallel")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.run_id == study.user_attrs["cliptune.mlflow_parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    reruns = [t.number for t in study.trials if is_rerun(t)]  # the confirmation of the winner
    assert len(result.best_values) == (2 if result.best_trial in {
        t.user_attrs["cliptune.confirms"] for t in study.trials if is_rerun(t)} else 1)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == \
        sorted([t.number for t in finished] + reruns)
    assert parents[0].data.params["best_clip_mode"] == result.best_config.mode.value


_WORKER = """
import sys
sys.path.insert(0, {root!r})
import cliptune
from cliptune.storage import Heartbeat
from tests.test_parallel import slow_model, _kwargs
cliptune.tune(slow_model, **_kwargs(n_trials={n}, storage={url!r}, study_name="kill",
              heartbeat=Heartbeat(1, 3)))
"""


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, None))


def _killed_trial(url: str, name: str) -> int:
    """The trial a just-killed worker left RUNNING, in its second trial with its params sampled."""
    running = _load(url, name).get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(running) == 1, [t.number for t in running]
    assert running[0].number == 1 and "clip_mode" in running[0].params
    return running[0].number


def _wait_for_hold(marker: Path, process: subprocess.Popen, timeout: float = 240.0) -> None:
    """Wait until the worker's second trial is training (it wrote ``marker`` and holds)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert process.poll() is None, "the worker ended before its second trial"
        assert time.monotonic() < deadline, "the worker never reached its second trial"
        time.sleep(0.1)


def _kill_then_finish(url: str, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=str(ROOT), n=5, url=url))
    marker = tmp_path / "holding"
    worker = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL,
                              env={**os.environ, HOLD: str(marker)})
    try:
        _wait_for_hold(marker, worker)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        killed = _killed_trial(url, "kill")
        done_before = [t.number for t in _load(url, "kill").trials
                       if t.state == optuna.trial.TrialState.COMPLETE]
        cliptune.tune(slow_model, **_kwargs(n_trials=5, storage=url, study_name="kill",
                                            heartbeat=Heartbeat(1, 3)))
    finally:
        worker.kill()
    study = _load(url, "kill")
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed].state == optuna.trial.TrialState.FAIL
    with quiet_experimental():
        retries = [t for t in study.trials
                   if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert len(retries) == 1 and retries[0].state != optuna.trial.TrialState.FAIL
    assert retries[0].params == by_number[killed].params  # the same trial, run again
    assert all(by_number[n].state == optuna.trial.TrialState.COMPLETE for n in done_before)
    assert counts_toward_total(study.trials) == 5
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_on_postgres(pg_url: str,
                                                                  tmp_path: Path) -> None:
    _kill_then_finish(pg_url, tmp_path)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_on_a_journal(tmp_path: Path) -> None:
    _kill_then_finish(f"journal:{tmp_path / 'study.log'}", tmp_path)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_killed_cli_job_is_finished_by_running_it_again(tmp_path: Path) -> None:
    (tmp_path / "slowjob.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.test_parallel import slow_model\n"
        "from tests.conftest import regression_data\n"
        "def make_data():\n    return regression_data(n=160)\n")
    job = tmp_path / "job.yaml"
    job.write_text("model: slowjob:slow_model\ndata: slowjob:make_data\nepochs: 2\nbatch_size: 32\n"
                   "optimizer: {name: sgd, lr: 0.05}\nn_trials: 4\nseed: 0\n"
                   "study: {name: resumable, heartbeat: {interval: 1, grace_period: 3}}\n"
                   "tracking: {enabled: false}\nsearch_space: rnn\n")
    url = f"sqlite:///{tmp_path / 'mlruns' / 'cliptune-optuna.db'}"
    command = [sys.executable, "-m", "cliptune", "tune", str(job)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    marker = tmp_path / "holding"
    first = subprocess.Popen(command, cwd=tmp_path, env={**env, HOLD: str(marker)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_hold(marker, first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        killed = _killed_trial(url, "resumable")
    finally:
        first.kill()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="resumable", storage=url)
    assert study.trials[killed].state == optuna.trial.TrialState.FAIL
    assert counts_toward_total(study.trials) == 4
    assert "best of study 'resumable'" in again.stdout


def _start_tracker(uri: str, barrier: Any, queue: Any) -> None:
    from cliptune.tracking import MlflowTracker

    try:
        barrier.wait(timeout=60)
        study = optuna.create_study()
        MlflowTracker(uri, "race").start(study, {"model": "m"})
        queue.put("ok")
    except Exception as exc:  # reported to the test, which fails on it
        queue.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.subprocess
@pytest.mark.slow
def test_workers_starting_together_on_a_fresh_mlflow_store_all_survive(tmp_path: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for round_ in range(2):
        uri = f"sqlite:///{tmp_path / f'mlflow{round_}.db'}"
        barrier, queue = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_start_tracker, args=(uri, barrier, queue)) for _ in range(3)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=180) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        assert results == ["ok"] * 3


@pytest.mark.subprocess
def test_unreachable_database_is_one_clear_error_with_exit_2(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: tests.test_parallel:quick_model\ndata: tests.conftest:regression_data\n"
                   "study: {storage: 'postgresql://bob:hunter2@127.0.0.1:1/none'}\n")
    out = subprocess.run([sys.executable, "-m", "cliptune", "worker", str(job), "--no-tracking"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Cannot open the Optuna storage 'postgresql://bob:***@127.0.0.1:1/none'" \
        in lines[0], out.stderr
    assert "hunter2" not in out.stderr


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_a_surplus_trial_fails_quietly_and_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers can create a trial for the last slot at once; the later one is recorded FAIL
    without running, and neither Optuna's warning nor a traceback reaches the user."""
    from cliptune.plan import plan_loop
    from cliptune.runner import SurplusTrial, TrialRunner
    from cliptune.settings import Settings
    from cliptune.tracking import Tracker

    ran: list[int] = []
    plan = plan_loop(lambda trial: ran.append(trial.number),
                     Settings.from_kwargs("tune_loop", {"n_trials": 1, "tracking": False}))
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0))  # the other worker took the last slot
    runner = TrialRunner(plan, cliptune.StabilityPruner(), Tracker(), None)
    records = _Records()
    monkeypatch.setattr(logging.getLogger("optuna"), "handlers", [records])
    monkeypatch.setattr(logging.getLogger("optuna"), "level", logging.WARNING)
    with pytest.raises(SurplusTrial):
        study.optimize(runner, n_trials=1)
    surplus = study.trials[1]
    assert surplus.state is optuna.trial.TrialState.FAIL and surplus.user_attrs[SURPLUS_ATTR]
    assert ran == [] and counts_toward_total(study.trials) == 1
    assert not any("Trial 1 failed" in line or "Traceback" in line for line in records.lines)
    study.optimize(lambda trial: float("nan"), n_trials=1)  # other failures are still reported
    assert any(line.startswith("Trial 2 failed") for line in records.lines)
