"""Issue 15.9 and 13.2: a tracking store that cannot be used is one line before any study exists,
with every password masked; ``http://user:password@host`` works as it does for MLflow's client.

The server with credentials is MLflow's own ``--app-name basic-auth`` (Flask-WTF, from
``mlflow[auth]``, in the dev extras), or a plain server that ignores them when that is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest

from tests.faults._support import MlflowServer, cli, default_storage, free_port, write_job

pytestmark = pytest.mark.faults

SECRET = "Sup3r-Secret-Pw0rd"
TRACKED = ("--set", "tracking.enabled=true", "--experiment", "auth")


def _basic_auth_available() -> bool:
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A server that asks for bob's password (or, without Flask-WTF, one that ignores it)."""
    folder = tmp_path_factory.mktemp("auth-server")
    if not _basic_auth_available():
        server = MlflowServer(folder)
    else:
        (folder / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
            f"admin_username = bob\nadmin_password = {SECRET}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        server = MlflowServer(folder, app="basic-auth", env={
            "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "cliptune-tests"})
    yield server
    server.kill()


def _with_password(server: MlflowServer, password: str) -> str:
    return server.uri.replace("http://", f"http://bob:{password}@")


@pytest.mark.mlflow_server
def test_a_password_in_the_tracking_uri_works_and_is_never_shown(tmp_path: Path,
                                                                  auth_server: MlflowServer) -> None:
    write_job(tmp_path)
    done = cli(tmp_path, "tune", "job.yaml", "--n-trials", "2", "--tracking-uri",
               _with_password(auth_server, SECRET), *TRACKED)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert f"{auth_server.uri}/#/experiments/" in done.stderr  # the links, without credentials
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "bob", SECRET
    try:
        client = mlflow.MlflowClient(auth_server.uri)
        runs = client.search_runs([client.get_experiment_by_name("auth").experiment_id])
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3


@pytest.mark.mlflow_server
@pytest.mark.skipif(not _basic_auth_available(), reason="needs mlflow[auth] (Flask-WTF)")
def test_a_wrong_password_is_one_line_before_any_study(tmp_path: Path,
                                                       auth_server: MlflowServer) -> None:
    write_job(tmp_path)
    done = cli(tmp_path, "tune", "job.yaml", "--tracking-uri",
               _with_password(auth_server, "Wr0ng-Pa55"), *TRACKED)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("cliptune: study 'fx'"), done.stderr
    assert "tracking URI 'http://bob:***@127.0.0.1" in lines[1]
    assert "Check the user and password in the URI" in lines[1]
    assert "Wr0ng-Pa55" not in done.stderr
    assert optuna.get_all_study_names(default_storage(tmp_path)) == []


@pytest.mark.parametrize("command", ["tune", "worker"])
def test_an_unreachable_server_is_one_line_before_any_study(tmp_path: Path, command: str) -> None:
    write_job(tmp_path)
    uri = f"http://bob:{SECRET}@127.0.0.1:{free_port()}"
    done = cli(tmp_path, command, "job.yaml", "--tracking-uri", uri, *TRACKED)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"cliptune {command}: error: job.yaml: Cannot record the tuning job "
                            "in MLflow at tracking URI 'http://bob:***@127.0.0.1:"), done.stderr
    assert "no MLflow server answers" in error and "tracking=False" in error
    assert SECRET not in done.stderr + done.stdout
    assert optuna.get_all_study_names(default_storage(tmp_path)) == []


def test_a_database_uri_without_its_driver_gets_the_install_hint(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")  # the hint names what to install; pg8000 must be missing
    if __import__("importlib").util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed")
    write_job(tmp_path)
    done = cli(tmp_path, "tune", "job.yaml", "--tracking-uri",
               f"postgresql+pg8000://bob:{SECRET}@127.0.0.1:5432/mlflow", *TRACKED)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert ("The MLflow tracking URL 'postgresql+pg8000://bob:***@127.0.0.1:5432/mlflow' needs a "
            "database driver that is not installed (pg8000; for PostgreSQL: pip install "
            "'cliptune[postgres]'") in error, done.stderr
    assert SECRET not in done.stderr
