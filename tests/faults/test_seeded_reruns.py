"""Issue 15.1: a seeded study samples new points when it is continued or shared, and the same
history gives the same next trial (the sampler is seeded from (seed, trial number))."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cliptune._study import default_sampler
from cliptune.result import SURPLUS_ATTR
from cliptune.space import SearchSpace
from cliptune.storage import quiet_experimental
from tests.faults._support import JOB, SPACE_LINE, cli, load, marker, start_cli, wait_for, write_job

pytestmark = pytest.mark.faults

# No mode without a threshold: two trials with the same params can only come from a replay.
SPACE = """\
version: 1
modes:
  value:       {threshold: {low: 0.001, high: 10.0, log: true}}
  global_norm: {threshold: {low: 0.01, high: 100.0, log: true}}
extras:
  lr: {low: 1.0e-4, high: 1.0e-1, log: true}
"""


def _sampled(study: optuna.Study) -> list[tuple[tuple[str, object], ...]]:
    """The params of every trial the sampler chose (a retry repeats a trial's params on purpose;
    a surplus trial of a race between workers has none)."""
    with quiet_experimental():
        retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
        return [tuple(sorted(t.params.items())) for t in study.trials
                if retry_of(t) is None and not t.user_attrs.get(SURPLUS_ATTR)]


def _seeded_job(folder: Path, n_trials: int) -> None:
    """Every trial sampled (no baselines, whose configs are fixed, not sampled)."""
    (folder / "space.yaml").write_text(SPACE)
    write_job(folder, JOB.replace(SPACE_LINE, "search_space: space.yaml")
              .replace("n_trials: 6", f"n_trials: {n_trials}") + "baselines: false\n")


def test_a_killed_seeded_job_samples_new_points_when_it_is_run_again(tmp_path: Path) -> None:
    _seeded_job(tmp_path, n_trials=6)
    first = start_cli(tmp_path, "tune", "job.yaml", block="3")
    try:
        wait_for(lambda: marker(tmp_path, "blocked-3"), "trial 3 started", first)
    finally:
        first.kill()
        first.wait(timeout=60)
    before = _sampled(load(tmp_path))
    again = cli(tmp_path, "tune", "job.yaml")
    assert again.returncode == 0, again.stderr
    study = load(tmp_path)
    assert sum(t.state is TrialState.COMPLETE for t in study.trials) == 6
    sampled = _sampled(study)
    assert sampled[:len(before)] == before and len(sampled) > len(before)
    assert len(set(sampled)) == len(sampled), "the rerun replayed the first run's samples"


def test_workers_started_on_their_own_sample_no_config_twice(tmp_path: Path, pg_url: str) -> None:
    _seeded_job(tmp_path, n_trials=9)
    workers = []
    for i in range(3):  # each in its own folder (its out.txt, err.txt), markers in tmp_path
        (tmp_path / str(i)).mkdir()
        workers.append(start_cli(tmp_path / str(i), "worker", str(tmp_path / "job.yaml"),
                                 "--storage", pg_url, barrier=3, dir=tmp_path))
    for i, worker in enumerate(workers):  # the barrier: each runs a trial while the others do
        assert worker.wait(timeout=240) == 0, (tmp_path / str(i) / "err.txt").read_text()
    study = load(tmp_path, url=pg_url)
    ran = [t for t in study.trials if not t.user_attrs.get(SURPLUS_ATTR)]  # a race's extra trial
    assert len({marker(tmp_path, f"started-{t.number}") for t in ran}) == 3  # runs nothing
    sampled = _sampled(study)
    assert len(sampled) == 9 and len(set(sampled)) == 9, "workers sampled the same configs"


def _ask(history: list[optuna.trial.FrozenTrial], seed: int, space: SearchSpace) -> dict:
    study = optuna.create_study(sampler=default_sampler(seed))
    study.add_trials(history)
    trial = study.ask()
    space.suggest(trial)
    return trial.params


def test_the_same_history_gives_the_same_next_trial() -> None:
    space = SearchSpace.from_dict(yaml.safe_load(SPACE))

    def objective(trial: optuna.Trial) -> float:
        config, extras = space.suggest(trial)
        return abs(config.threshold - 1.0) + extras["lr"]

    study = optuna.create_study(sampler=default_sampler(0))
    study.optimize(objective, n_trials=12)  # past the 10 random start-up trials of the TPE
    history = study.trials
    assert _ask(history, 0, space) == _ask(history, 0, space) != _ask(history, 1, space)
    assert _ask(history[:5], 0, space) == _ask(history[:5], 0, space)  # in the start-up phase too

