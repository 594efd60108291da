"""Storages for many workers: URLs checked, passwords masked, schema races survived."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna
import pytest

from cliptune.storage import Heartbeat, mask_url, open_storage


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("postgresql://bob:s3cr@t@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert mask_url("postgresql+psycopg2://bob:pw@h/x") == "postgresql+psycopg2://bob:***@h/x"
    assert mask_url("postgresql://bob@h/x") == "postgresql://bob@h/x"
    assert mask_url("sqlite:///mlruns/optuna.db") == "sqlite:///mlruns/optuna.db"


@pytest.mark.parametrize(("url", "message"), [
    ("foo://x", r"Invalid storage URL 'foo://x': expected sqlite:///PATH"),
    ("optuna.db", r"Invalid storage URL 'optuna.db'"),
    ("journal:", r"A journal storage needs a file path"),
    ("journal:/nonexistent-dir/x/study.log", r"Cannot open the journal storage"),
    ("postgresql://bob:hunter2@127.0.0.1:1/none",
     r"Cannot open the Optuna storage 'postgresql://bob:\*\*\*@127.0.0.1:1/none': .*"),
])
def test_bad_storage_is_one_clear_error(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_storage(url)
    assert "hunter2" not in str(info.value)


def test_heartbeat_validation() -> None:
    with pytest.raises(ValueError, match="grace period must be an int greater than the interval"):
        Heartbeat(interval=5, grace_period=5)


def test_journal_and_sqlite_open(tmp_path: Path) -> None:
    for url in (f"journal:{tmp_path / 'j.log'}", f"sqlite:///{tmp_path / 's.db'}"):
        study = optuna.create_study(storage=open_storage(url), study_name="s")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert len(optuna.load_study(storage=open_storage(url), study_name="s").trials) == 2


def _open_and_create(url: str, barrier: mp.synchronize.Barrier, queue: mp.Queue) -> None:  # type: ignore[name-defined]
    try:
        barrier.wait(timeout=60)
        storage = open_storage(url)
        optuna.create_study(storage=storage, study_name="race", load_if_exists=True)
        queue.put("ok")
    except Exception as exc:  # reported to the test, which fails on it
        queue.put(f"{type(exc).__name__}: {exc}")


def _race(url: str, workers: int = 4) -> list[str]:
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_open_and_create, args=(url, barrier, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return results


@pytest.mark.slow
@pytest.mark.subprocess
def test_workers_starting_together_on_a_fresh_sqlite_all_survive(tmp_path: Path) -> None:
    for round_ in range(5):
        assert _race(f"sqlite:///{tmp_path / f'fresh{round_}.db'}") == ["ok"] * 4


@pytest.mark.slow
@pytest.mark.subprocess
def test_workers_starting_together_on_a_fresh_postgres_all_survive(pg_url: str) -> None:
    import psycopg

    admin = pg_url.rsplit("/", 1)[0] + "/postgres"
    base = pg_url.rsplit("/", 1)[1]
    for round_ in range(5):
        name = f"{base}_r{round_}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            assert _race(pg_url.rsplit("/", 1)[0] + f"/{name}") == ["ok"] * 4
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_psycopg2_urls_are_accepted(pg_url: str) -> None:
    pytest.importorskip("psycopg2")
    url = pg_url.replace("postgresql://", "postgresql+psycopg2://")
    study = optuna.create_study(storage=open_storage(url), study_name="p2")
    assert study.study_name == "p2"


def test_a_trial_has_beaten_before_it_trains(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna never finds a RUNNING trial without any heartbeat stale, and its heartbeat thread
    may beat after the trial has started (or a kill may come first): a rerun would then wait for
    that trial forever. Here Optuna's thread never beats; the trial has its beat all the same."""
    import sqlite3

    import cliptune

    monkeypatch.setattr(optuna.storages._heartbeat.HeartbeatThread, "_record_heartbeat",
                        staticmethod(lambda *args: None))
    db = tmp_path / "study.db"
    beats: list[int] = []

    def train(trial: cliptune.Trial) -> None:
        with sqlite3.connect(db) as conn:
            beats.append(conn.execute("SELECT COUNT(*) FROM trial_heartbeats h JOIN trials t "
                                      "ON h.trial_id = t.trial_id WHERE t.number = ?",
                                      (trial.number,)).fetchone()[0])
        trial.report(0, val_loss=1.0)

    cliptune.tune_loop(train, n_trials=2, seed=0, storage=f"sqlite:///{db}", tracking=False,
                       show_progress=False, heartbeat=Heartbeat(1, 3))
    assert beats == [1, 1]
