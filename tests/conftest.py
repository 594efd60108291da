"""Shared test setup: quiet TensorFlow, one thread per framework (torch and TF share 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import optuna
import pytest

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """Pin torch to one thread when it is loaded (it oversubscribes 2 cores beside TF)."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder, so nothing (mlflow.db, mlruns/) lands in the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def pin_tensorflow_threads() -> None:
    """torch beside TF on 2 cores: one thread each, set before TF runs its first op."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF was already initialised by an earlier test module
        pass


def regression_data(n: int = 256, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small linear-regression task: y = X w + noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 1)).astype(np.float32)
    y = (X @ w + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
    return X, y


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:
        return False


def require_postgres() -> None:
    """Skip without a PostgreSQL on 127.0.0.1:5432, but fail in CI (CI=true), where one runs."""
    if _pg_available():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432, and CI must run its tests.")
    pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require_postgres()
    import uuid

    import psycopg

    name = f"cliptune_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory: pytest.TempPathFactory):
    """An MLflow sqlite store migrated once per session (a fresh store migrates for ~1.5 s)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, _migrated_mlflow_db) -> str:
    """A fresh MLflow store for one test at ./mlflow.db (the default store of the test's folder),
    copied from the session's migrated one."""
    import shutil

    shutil.copy(_migrated_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


_MARK_BY_FIXTURE = {"pg_url": "postgres", "postgres_url": "postgres",
                    "mlflow_server": "mlflow_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers follow from what a test uses: a PostgreSQL database, a real MLflow server."""
    for item in items:
        for fixture, marker in _MARK_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(autouse=True)
def _cliptune_logs_reach_caplog() -> None:
    """The CLI (run in-process by some tests) stops propagation of cliptune's logger; undo it."""
    import logging

    logger = logging.getLogger("cliptune")
    logger.propagate = True
    logger.setLevel(logging.INFO)
    logger.handlers.clear()


def run_task(framework: str, model_fn, splits, clip, extras=None, rules="default", seed=0,
             **training):
    """Train one trial in cliptune's built-in loop of ``framework``, through a real Trial handle.

    Returns the model and the trial's monitor (its reporter is a real Optuna trial)."""
    from cliptune import StabilityRules, TrialMonitor
    from cliptune.backends import make_task
    from cliptune.settings import Training
    from cliptune.trial import Trial

    task = make_task(framework, model_fn, splits, Training(**training), threads=None)
    monitor = TrialMonitor(optuna.create_study().ask(),
                           StabilityRules() if rules == "default" else rules)
    model = task(Trial(clip, extras or {}, 0, seed, monitor))
    return model, monitor
