"""What the faults tests share: the CLI in a subprocess, waiting on marker files, a real MLflow server.

Every wait here is for an event (a marker file, a process that exits, a server that answers), with
a generous bound that only a broken run reaches; no test asserts on durations.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
SPACE_LINE = f"search_space: {Path(__file__).resolve().parent / 'space.yaml'}"  # see the file
JOB = f"""\
train: tests.faults.loopjob:train
n_trials: 6
seed: 0
{SPACE_LINE}
study: {{name: fx, heartbeat: {{interval: 1, grace_period: 3}}}}
tracking: {{enabled: false}}
"""


def environment(folder: Path, **knobs: Any) -> dict[str, str]:
    """The CLI's environment: this checkout first on the path, the loop job's knobs (FX_*)."""
    env = {k: v for k, v in os.environ.items()
           if k != "MLFLOW_TRACKING_URI" and not k.startswith("FX_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FX_DIR=str(folder))
    env.update({f"FX_{key.upper()}": str(value) for key, value in knobs.items()})
    return env


def write_job(folder: Path, text: str = JOB, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def cli(folder: Path, *args: str, timeout: float = 240, **knobs: Any
        ) -> subprocess.CompletedProcess[str]:
    """``python -m cliptune ARGS`` in ``folder``, to its end."""
    return subprocess.run([sys.executable, "-m", "cliptune", *args], cwd=folder,
                          env=environment(folder, **knobs), capture_output=True, text=True,
                          timeout=timeout)


def start_cli(folder: Path, *args: str, **knobs: Any) -> subprocess.Popen[str]:
    """``python -m cliptune ARGS`` started in ``folder``; its output goes to out.txt and err.txt."""
    out = open(folder / "out.txt", "w")  # noqa: SIM115 (the child holds them; closed on exit)
    err = open(folder / "err.txt", "w")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "cliptune", *args], cwd=folder,
                            env=environment(folder, **knobs), stdout=out, stderr=err, text=True)


def finish(proc: subprocess.Popen[str], folder: Path, timeout: float = 240) -> tuple[int, str, str]:
    """Wait for a process from :func:`start_cli`; its status, stdout and stderr."""
    code = proc.wait(timeout=timeout)
    return code, (folder / "out.txt").read_text(), (folder / "err.txt").read_text()


def wait_for(check: Callable[[], T], what: str, proc: subprocess.Popen[str] | None = None,
             timeout: float = 180) -> T:
    """Poll ``check`` until it returns something true; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"{what} never happened")


def marker(folder: Path, name: str) -> int | None:
    """The pid in a marker file of the loop job, or None while it is not written."""
    path = folder / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def default_storage(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'cliptune-optuna.db'}"


def load(folder: Path, name: str = "fx", url: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url or default_storage(folder))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` in its own process group (so that a test can stop, resume or kill
    all its processes), on a free port, polled until it answers."""

    def __init__(self, folder: Path, app: str | None = None, env: dict[str, str] | None = None
                 ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.folder = free_port(), folder
        self.uri = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                   str(self.port), "--workers", "1", "--backend-store-uri",
                   f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                   str(folder / "artifacts")]
        if app:
            command += ["--app-name", app]
        self._log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed in kill)
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=folder, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        wait_for(self.answers, "the MLflow server answering", timeout=120,
                 proc=self.proc)  # type: ignore[arg-type]

    def answers(self) -> bool:
        from urllib.request import urlopen

        try:
            with urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                self.signal(signum)
            except ProcessLookupError:  # the whole group is gone already
                break
        self.proc.wait(timeout=30)
        self._log.close()


def mlflow_runs(folder: Path) -> tuple[list[Any], dict[int, Any]]:
    """The parent runs, and the nested run of each trial, in the folder's default MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cliptune").experiment_id],
                              max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, {int(r.data.tags["optuna.trial_number"]): r for r in runs
                     if "mlflow.parentRunId" in r.data.tags}


def retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial that ``trial`` runs again, if it is a retry."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
