"""The command line, run as users run it: ``python -m cliptune ...`` in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cliptune import ClipConfig, cli
from cliptune.jobs import DEFAULT_STORAGE, Job

REPO = Path(__file__).resolve().parent.parent

# torch is imported inside the factories, so jobs that fail validation never load it.
TINY_MODULE = '''
import numpy as np

CALLS = [0]


def make_model():
    from torch import nn
    return nn.Linear(4, 1)


def make_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(96, 4)).astype("float32")
    return X, (X @ np.arange(1, 5, dtype="float32")[:, None])


def make_slow_data():
    X, y = make_data()
    return X.repeat(400, axis=0), y.repeat(400, axis=0)


class _Breaks:
    """Passes the pre-study check, then fails every training step."""

    def __new__(cls):
        from torch import nn

        class Broken(nn.Linear):
            def forward(self, x):
                CALLS[0] += 1
                if CALLS[0] > 1:
                    raise RuntimeError("boom")
                return super().forward(x)

        return Broken(4, 1)


make_broken_model = _Breaks


def train(trial):
    """A user's own loop (a tune_loop job): a linear model, the trial's clip, its metric."""
    import torch
    from torch import nn

    X, y = (torch.from_numpy(a) for a in make_data())
    torch.manual_seed(trial.seed or 0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for epoch in range(2):
        for i in range(0, len(X), 32):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(X[i:i + 32]), y[i:i + 32])
            loss.backward()
            trial.clip_(model.parameters(), loss)
            opt.step()
        with torch.no_grad():
            trial.report(epoch, mae=float((model(X) - y).abs().mean()))
'''

JOB = """\
model: tinymod:make_model
data: tinymod:make_data
optimizer: {name: sgd, lr: 0.05}
epochs: 2
batch_size: 32
search_space: default
n_trials: 3
seed: 0
study: {name: tiny}
tracking: {enabled: false}
"""


def run_cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "cliptune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_job(folder: Path, text: str = JOB, name: str = "job.yaml") -> Path:
    (folder / "tinymod.py").write_text(TINY_MODULE)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def load(folder: Path, name: str = "tiny") -> optuna.Study:
    storage = DEFAULT_STORAGE.replace("sqlite:///", f"sqlite:///{folder}/")
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory,
          _migrated_mlflow_db: Path) -> tuple[Path, list[subprocess.CompletedProcess[str]]]:
    """A job run to 3 trials (tracked), then resumed to 5 (in the default ./mlruns storage)."""
    import shutil

    folder = tmp_path_factory.mktemp("tuned")
    write_job(folder)
    shutil.copy(_migrated_mlflow_db, folder / "mlflow.db")
    first = run_cli(folder, "tune", "job.yaml", "--set", "tracking.enabled=true",
                    "--tracking-uri", "sqlite:///mlflow.db", "--experiment", "cli-test")
    params_before = [(t.number, t.params, t.value) for t in load(folder).trials]
    second = run_cli(folder, "tune", "job.yaml", "--n-trials", "5")
    (folder / "before.json").write_text(json.dumps(params_before))
    return folder, [first, second]


@pytest.mark.subprocess
@pytest.mark.slow
def test_tune_runs_the_job_and_prints_the_best(tuned: tuple[Path, list]) -> None:
    folder, (first, _) = tuned
    assert first.returncode == 0, first.stderr
    assert "3 trials: " in first.stdout
    assert "clip_mode" in first.stdout and "# torch: " in first.stdout
    assert "cliptune.clip_grads_(" in first.stdout
    assert (folder / "mlruns" / "cliptune-optuna.db").exists()
    assert "3/3" in first.stderr  # the progress bar


@pytest.mark.subprocess
def test_tune_passes_the_tracking_options(tuned: tuple[Path, list]) -> None:
    from mlflow.tracking import MlflowClient

    folder, _ = tuned
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("cli-test")
    assert experiment is not None
    assert len(client.search_runs([experiment.experiment_id])) == 4  # the job and its 3 trials


@pytest.mark.subprocess
def test_rerun_with_more_trials_adds_only_the_missing_ones(tuned: tuple[Path, list]) -> None:
    folder, (_, second) = tuned
    assert second.returncode == 0, second.stderr
    trials = load(folder).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    before = json.loads((folder / "before.json").read_text())
    assert [[t.number, t.params, t.value] for t in trials[:3]] == before


@pytest.mark.subprocess
def test_best_prints_yaml_and_json(tuned: tuple[Path, list]) -> None:
    folder, _ = tuned
    best = load(folder).best_trial
    as_yaml = run_cli(folder, "best", "job.yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    (folder / "best.yaml").write_text(as_yaml.stdout)
    clip = ClipConfig.from_yaml(folder / "best.yaml")
    assert clip.mode.value == best.params["clip_mode"]
    assert "keras.optimizers.SGD(learning_rate=0.05" in as_yaml.stdout
    as_json = run_cli(folder, "best", "--study", "tiny", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["trial"] == best.number and document["value"] == pytest.approx(best.value)
    assert document["clip"]["mode"] == best.params["clip_mode"]
    assert "cliptune.clip_grads_(model.parameters(), " in document["apply"]["torch"]
    assert document["apply"]["keras"].startswith("keras.optimizers.SGD(learning_rate=0.05")  # as YAML


@pytest.mark.subprocess
def test_rerunning_a_finished_job_says_so_at_once(tuned: tuple[Path, list]) -> None:
    folder, _ = tuned
    again = run_cli(folder, "tune", "job.yaml", "--n-trials", "5", "--no-tracking")
    assert again.returncode == 0, again.stderr
    assert "study 'tiny' in sqlite:///mlruns/cliptune-optuna.db already has its 5 trials; " \
           "nothing to run (raise --n-trials to run more)" in again.stderr
    assert "5 trials: " in again.stdout and len(load(folder).trials) == 5


@pytest.mark.subprocess
def test_report_writes_trials_csv(tuned: tuple[Path, list]) -> None:
    import pandas as pd

    folder, _ = tuned
    done = run_cli(folder, "report", "job.yaml", "--out", "report")
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(folder / "report" / "trials.csv")
    assert list(frame["number"]) == [0, 1, 2, 3, 4]
    assert {"state", "clip_mode", "clip_threshold", "value"} <= set(frame.columns)
    if (REPO / "cliptune" / "plots.py").exists():
        assert list((folder / "report").rglob("*.png"))


@pytest.mark.subprocess
def test_best_of_a_missing_study_names_the_studies_there(tuned: tuple[Path, list]) -> None:
    folder, _ = tuned
    done = run_cli(folder, "best", "--study", "tinny")
    assert done.returncode == 2
    assert re.search(r"no study 'tinny' .*'tiny'.*Did you mean 'tiny'\?", done.stderr)


BAD_SPACE = "version: 1\nmodes: {norm: {threshold: {low: -1, high: 2}}}\n"


@pytest.mark.parametrize(("change", "extra_args", "message"), [
    ({"optimizer": {"name": "sgd", "lrr": 0.1}}, [],
     r"job.yaml: optimizer.lrr: unknown key 'lrr'; .*Did you mean 'lr'\?"),
    ({"epochs": "eight"}, [], r"job.yaml: epochs: expected an int >= 1, got 'eight'"),
    ({"n_trials": 0}, [], r"job.yaml: n_trials: expected an int >= 1, got 0"),
    ({"model": "nosuchmod:make_model"}, [], r"job.yaml: model: cannot import module 'nosuchmod'"),
    ({"model": "tinymod:make_modle"}, [],
     r"job.yaml: model: 'tinymod' has no attribute 'make_modle'. Did you mean 'make_model'\?"),
    ({"model": "tinymod.make_model"}, [], r"job.yaml: model: expected 'module:attribute'"),
    ({"search_space": "bad_space.yaml"}, [],
     r"job.yaml: search_space: bad_space.yaml: modes.norm.threshold: low must be > 0"),
    ({"search_space": "rnnn"}, [], r"job.yaml: search_space: unknown search space 'rnnn'.*'rnn'\?"),
    ({}, ["--storage", "notaurl"], r"--storage: Invalid storage URL 'notaurl'"),
    ({"study": {"storage": "sqlite:////no/such/dir/x.db"}}, [],
     r"job.yaml: study.storage: Cannot open the Optuna storage 'sqlite:////no/such/dir/x.db'"),
    ({}, ["--set", "epochs"], r"--set: expected key=value"),
    ({}, ["--set", "tracking.experimnt=x"], r"tracking.experimnt: unknown key .*'experiment'\?"),
    ({"optimizer": {"name": "adan", "lr": 0.1}}, [],
     r"job.yaml: optimizer.name: expected one of 'sgd', 'adam', .*Did you mean 'adam'\?"),
    ({"loss": "msee"}, [], r"job.yaml: loss: expected one of 'mse', .*Did you mean 'mse'\?"),
    ({"workers": 0}, [], r"job.yaml: workers: expected an int >= 1, got 0"),
])
def test_bad_jobs_fail_with_one_line_and_status_2(tmp_path: Path, change: dict, extra_args: list[str],
                                                  message: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """In-process: what a subprocess would add is the entry point, tested once below."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the job's folder goes on it
    monkeypatch.delitem(sys.modules, "tinymod", raising=False)
    raw = yaml.safe_load(JOB) | change
    write_job(tmp_path, yaml.safe_dump(raw))
    (tmp_path / "bad_space.yaml").write_text(BAD_SPACE)
    assert cli.main(["tune", "job.yaml", *extra_args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert not (tmp_path / "mlruns" / "cliptune-optuna.db").exists() or not optuna.get_all_study_names(
        DEFAULT_STORAGE.replace("sqlite:///", f"sqlite:///{tmp_path}/"))  # nothing created


@pytest.mark.subprocess
def test_a_bad_job_through_the_entry_point_is_one_line_and_status_2(tmp_path: Path) -> None:
    write_job(tmp_path, JOB.replace("epochs: 2", "epochs: eight"))
    done = run_cli(tmp_path, "tune", "job.yaml")
    assert done.returncode == 2
    assert done.stderr.strip() == ("cliptune tune: error: job.yaml: epochs: expected an int >= 1, "
                                   "got 'eight'.")


LOOP_JOB = """\
train: tinymod:train
metric: mae
search_space: rnn
n_trials: 3
seed: 0
study: {name: loop}
tracking: {enabled: false}
"""


@pytest.mark.subprocess
def test_a_job_with_a_train_function_tunes_the_users_loop(tmp_path: Path) -> None:
    write_job(tmp_path, LOOP_JOB)
    done = run_cli(tmp_path, "tune", "job.yaml")
    assert done.returncode == 0, done.stderr
    study = load(tmp_path, "loop")
    assert len(study.trials) == 3 and study.user_attrs["cliptune.backend"] == "user loop"
    assert study.best_value == pytest.approx(study.best_trial.user_attrs["history"][-1]["mae"])
    assert "3 trials: " in done.stdout


@pytest.mark.parametrize(("extra", "message"), [
    ("model: tinymod:make_model\n", "job.yaml: model: a job gives either train .* not both"),
    ("loss: mse\n", "job.yaml: loss: this key sets cliptune's own loop; with train: your loop"),
    ("optimizer: {lr: 0.1}\n", "job.yaml: optimizer.lr: this key sets cliptune's own loop"),
])
def test_a_train_job_refuses_built_in_loop_keys(tmp_path: Path, extra: str, message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_job(tmp_path, LOOP_JOB + extra)
    assert cli.main(["tune", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_a_missing_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_job(tmp_path, "model: tinymod:make_model\n")
    assert cli.main(["tune", "job.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("cliptune tune: error: job.yaml: data: this key is "
                                               "required.")


@pytest.mark.subprocess
def test_every_trial_failing_exits_1(tmp_path: Path) -> None:
    write_job(tmp_path, JOB.replace("make_model", "make_broken_model").replace("n_trials: 3",
                                                                               "n_trials: 2"))
    done = run_cli(tmp_path, "tune", "job.yaml")
    assert done.returncode == 1, done.stderr
    assert re.search(r"error: All 2 trials failed; the first error was: RuntimeError: boom",
                     done.stderr)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX")
@pytest.mark.subprocess
@pytest.mark.slow
def test_ctrl_c_stops_after_the_running_trial(tmp_path: Path) -> None:
    write_job(tmp_path, JOB.replace("make_data", "make_slow_data").replace("n_trials: 3",
                                                                           "n_trials: 50"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "cliptune", "tune", "job.yaml"], cwd=tmp_path,
                            env=env | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    db = tmp_path / "mlruns" / "cliptune-optuna.db"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists() and any(t.state is TrialState.RUNNING for t in _trials(tmp_path)):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Stopping after the running trial is recorded" in err
    trials = load(tmp_path).trials
    assert 1 <= len(trials) < 50
    finished = [t for t in trials if t.state is not TrialState.WAITING]  # baselines may wait
    assert finished and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in finished)
    assert "best of study 'tiny'" in out


def _trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        return load(folder).trials
    except Exception:  # the study or its schema is being created; the next poll sees it
        return []


@pytest.mark.subprocess
def test_spaces_lists_and_prints(tmp_path: Path) -> None:
    listing = run_cli(tmp_path, "spaces")
    assert listing.returncode == 0
    assert re.search(r"^rnn\s+Recurrent nets", listing.stdout, re.MULTILINE)
    one = run_cli(tmp_path, "spaces", "rnn")
    assert one.returncode == 0 and yaml.safe_load(one.stdout)["modes"]
    unknown = run_cli(tmp_path, "spaces", "rn")
    assert unknown.returncode == 2 and "Did you mean 'rnn'?" in unknown.stderr


@pytest.mark.parametrize("command", ["tune", "best", "report", "spaces", "ui"])
def test_every_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.subprocess
def test_python_dash_m_shows_help(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--help")
    assert done.returncode == 0 and "cliptune tune examples/adding_rnn.yaml" in done.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.mlflow_server
@pytest.mark.subprocess
@pytest.mark.slow
def test_ui_says_where_once_the_server_answers_and_masks_passwords(tmp_path: Path) -> None:
    """A real ``mlflow ui``: the URL (in the UI's model-training mode) is printed only once the
    server answers; the store URI's password never appears."""
    from urllib.request import urlopen

    port = _free_port()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "cliptune", "ui", "--port", str(port),
                             "--tracking-uri", store], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("MLflow UI for") or not line:
                break
        assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in lines[-1]
        with urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:  # it answers now
            assert answer.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)  # reads what it still writes: a full pipe would stall it
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # no server of it outlives the test
    secret = subprocess.Popen([sys.executable, "-m", "cliptune", "ui", "--port", str(_free_port()),
                               "--tracking-uri", "postgresql://bob:hunter2@127.0.0.1:1/none"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    first = secret.stderr.readline()
    time.sleep(3)  # let the server say something too
    secret.send_signal(signal.SIGINT)
    out, err = secret.communicate(timeout=60)
    assert "postgresql://bob:***@127.0.0.1:1/none" in first
    assert "hunter2" not in first + out + err


@pytest.mark.parametrize("name", ["adding_rnn.yaml", "keras_lstm.yaml"])
def test_shipped_example_jobs_are_valid(name: str) -> None:
    job = Job.load(REPO / "examples" / name)
    assert job.get("search_space").name == "rnn" and job.references["model"].startswith("examples.")
