"""tune_loop(train): the user's own torch loop through a Trial, on real storages and MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import cliptune  # noqa: E402
from cliptune import ClipConfig, Trial  # noqa: E402
from tests.conftest import regression_data  # noqa: E402

X, Y = regression_data(n=192)
SPACE = {"modes": {"none": {}, "global_norm": {"threshold": {"low": 0.05, "high": 5.0, "log": True}}},
         "extras": {"lr": {"low": 0.01, "high": 0.2, "log": True}}}


def sequence_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A long sequence cut into consecutive chunks (truncated BPTT): predict the next value."""
    gen = torch.Generator().manual_seed(seed)
    series = torch.sin(torch.linspace(0, 60, 641)) + 0.1 * torch.randn(641, generator=gen)
    xs, ys = series[:-1].reshape(4, 160), series[1:].reshape(4, 160)
    return [(xs[:, i:i + 20, None], ys[:, i:i + 20, None]) for i in range(0, 160, 20)]


class Recurrent(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.rnn(x, h)
        return self.head(out), h


def train_bptt(trial: Trial) -> None:
    """A user's loop: carried hidden state, a schedule, the trial's clip, a user metric."""
    torch.manual_seed(trial.seed)
    model = Recurrent()
    opt = torch.optim.Adam(model.parameters(), lr=trial.extras.get("lr", 0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=8, gamma=0.5)
    batches = sequence_batches()
    for epoch in range(3):
        hidden = None
        for xb, yb in batches[:-2]:
            opt.zero_grad()
            out, hidden = model(xb, hidden)
            hidden = hidden.detach()
            loss = nn.functional.mse_loss(out, yb)
            loss.backward()
            trial.clip_(model.parameters(), loss)
            opt.step()
            sched.step()
        with torch.no_grad():
            val = [nn.functional.mse_loss(model(xb, None)[0], yb) for xb, yb in batches[-2:]]
        val_loss = float(torch.stack(val).mean())
        trial.report(epoch, val_loss=val_loss, rmse=math.sqrt(val_loss))


def linear_loop(trial: Trial, lr: float | None = None, epochs: int = 3,
                metrics: Any = None) -> nn.Module:
    """A plain full-batch loop on a linear regression; ``metrics(model)`` -> reported metrics."""
    torch.manual_seed(trial.seed or 0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr or trial.extras.get("lr", 0.05))
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    for epoch in range(epochs):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            trial.clip_(model.parameters(), loss)
            opt.step()
        with torch.no_grad():
            mse = float(nn.functional.mse_loss(model(x), y))
        trial.report(epoch, **(metrics(model) if metrics else {"val_loss": mse}))
    return model


def test_a_users_bptt_loop_is_tuned_and_tracked(mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cliptune.tune_loop(train_bptt, search_space=SPACE, n_trials=5, metric="rmse", seed=0,
                                storage=f"sqlite:///{tmp_path / 's.db'}", study_name="bptt",
                                tracking_uri=uri, experiment="loop")
    assert result.n_complete + result.n_pruned + result.n_failed == 5 and result.n_failed == 0
    assert isinstance(result.best_config, ClipConfig) and "lr" in result.best_extras
    best = result.study.best_trial
    assert best.value == pytest.approx(best.user_attrs["history"][-1]["rmse"])
    assert set(result.trials_dataframe().columns) >= {"clip_mode", "clip_threshold", "lr", "value"}
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("loop").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["train"] == "tests.test_tune_loop:train_bptt"
    assert parent.data.params["backend"] == "user loop"
    child = next(r for r in runs if r.data.tags.get("optuna.trial_number") == str(best.number))
    for key in ("rmse", "val_loss", "train_loss", "grad_norm_mean", "clip_fraction"):
        assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [0, 1, 2]
    again = cliptune.tune_loop(train_bptt, search_space=SPACE, n_trials=6, metric="rmse", seed=0,
                               storage=f"sqlite:///{tmp_path / 's.db'}", study_name="bptt",
                               tracking=False)
    assert len(again.study.trials) == 6  # a rerun adds only what is missing


def test_the_clip_is_the_trials_and_the_norm_is_the_pre_clip_one() -> None:
    seen: list[tuple[float, float]] = []

    def train(trial: Trial) -> None:
        model = nn.Linear(4, 1)
        loss = nn.functional.mse_loss(model(torch.from_numpy(X) * 50), torch.from_numpy(Y))
        loss.backward()
        expected = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten()
                                                             for p in model.parameters()])))
        norm = trial.clip_(model.parameters(), loss)
        after = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten()
                                                          for p in model.parameters()])))
        seen.append((float(norm), expected))
        assert after == pytest.approx(min(expected, trial.config.threshold), rel=1e-5)
        trial.report(0, val_loss=float(loss))

    space = {"modes": {"global_norm": {"threshold": {"choices": [0.5]}}}}
    result = cliptune.tune_loop(train, search_space=space, n_trials=1, tracking=False)
    assert seen[0][0] == pytest.approx(seen[0][1], rel=1e-6) and seen[0][1] > 0.5
    [epoch] = result.study.trials[0].user_attrs["history"]  # which norm is which, per epoch
    assert epoch["grad_norm_mean"] == pytest.approx(seen[0][1], rel=1e-6)  # pre-clip
    assert epoch["grad_norm_postclip_mean"] == pytest.approx(0.5, rel=1e-6)
    assert epoch["clip_coef_mean"] == pytest.approx(0.5 / seen[0][1], rel=1e-6)
    assert epoch["clip_fraction"] == 1.0


def test_maximize_a_users_accuracy() -> None:
    def accuracy(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            right = ((model(torch.from_numpy(X)) > 0) == (torch.from_numpy(Y) > 0)).float().mean()
        return {"accuracy": float(right)}

    result = cliptune.tune_loop(lambda t: linear_loop(t, metrics=accuracy), search_space=SPACE,
                                n_trials=4, metric="accuracy", direction="maximize", seed=1,
                                tracking=False)
    values = [t.value for t in result.study.trials if t.value is not None]
    assert result.best_value == max(values) and result.study.direction.name == "MAXIMIZE"
    with pytest.raises(ValueError, match="metric 'accuracy' of tune_loop reads like a score to "
                                         "maximise; pass direction='maximize'"):
        cliptune.tune_loop(linear_loop, metric="accuracy", tracking=False)


def test_usage_errors_stop_the_study_after_one_trial(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(cliptune.UsageError, match="did not report the metric 'bpc' .*it reported "
                                                  "val_loss"):
        cliptune.tune_loop(linear_loop, metric="bpc", n_trials=5, storage=storage,
                           study_name="a", tracking=False)
    trials = optuna.load_study(study_name="a", storage=storage).trials
    [trial] = [t for t in trials if t.state is not optuna.trial.TrialState.WAITING]
    assert trial.state is optuna.trial.TrialState.FAIL and "'bpc'" in trial.user_attrs["error"]

    def silent(trial: Trial) -> None:
        pass

    with pytest.raises(cliptune.UsageError, match="reported no epoch"):
        cliptune.tune_loop(silent, n_trials=5, storage=storage, study_name="b", tracking=False)
    ran = [t for t in optuna.load_study(study_name="b", storage=storage).trials
           if t.state is not optuna.trial.TrialState.WAITING]
    assert len(ran) == 1


@pytest.mark.parametrize(("train", "error", "message"), [
    ("train.py", TypeError, "'train' parameter of tune_loop must be a callable train\\(trial\\). "
                            "Got str instead"),
    (lambda: None, TypeError, "'train' parameter of tune_loop must take one argument"),
    (lambda trial, other: None, TypeError, "must take one argument"),
])
def test_bad_train_functions_fail_before_anything(tmp_path: Path, train: Any, error: type,
                                                 message: str) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(error, match=message):
        cliptune.tune_loop(train, storage=storage, study_name="s", tracking=False)
    assert optuna.get_all_study_names(storage) == []
    with pytest.raises(TypeError, match="tune_loop\\(\\) got an unexpected keyword argument "
                                        "'epochs'"):
        cliptune.tune_loop(linear_loop, epochs=3)


def test_an_exploding_config_is_pruned_with_its_reason() -> None:
    space = {"modes": {"none": {}}}
    result = cliptune.tune_loop(lambda t: linear_loop(t, lr=5.0), search_space=space,
                                n_trials=2, tracking=False)
    assert result.n_pruned == 2 and result.best_config is None
    assert set(result.trials_dataframe()["prune_reason"]) <= {"nonfinite", "diverged", "spiking"}


def test_the_optuna_trial_takes_the_users_own_suggestions() -> None:
    def train(trial: Trial) -> None:
        depth = trial.optuna_trial.suggest_int("depth", 1, 3)
        trial.report(0, val_loss=float(depth))

    result = cliptune.tune_loop(train, search_space={"modes": {"none": {}}}, n_trials=3, seed=0,
                                tracking=False)
    assert {"clip_mode", "depth"} <= set(result.best_params)
    assert result.best_value == min(t.params["depth"] for t in result.study.trials)


def test_auto_thresholds_probe_the_users_loop() -> None:
    space = {"modes": {"global_norm": {"threshold": "auto"}, "norm": {"threshold": "auto"}}}
    result = cliptune.tune_loop(linear_loop, search_space=space, n_trials=2, seed=0,
                                probe_steps=4, tracking=False)
    info = result.study.user_attrs["cliptune.probe"]
    assert (info["steps"], info["stopped"]) == (4, "max_steps")
    low, high = info["ranges"]["global_norm"]
    assert high / low == pytest.approx(20.0) and info["global_norm_mean"] > 0

    def norm_only(trial: Trial) -> None:
        trial.step(1.0, grad_norm=2.0)
        trial.report(0, val_loss=1.0)

    with pytest.raises(cliptune.UsageError, match="'threshold: auto' sizes its ranges from the "
                                                  "gradients"):
        cliptune.tune_loop(norm_only, search_space=space, n_trials=1, tracking=False)


def test_mixed_precision_overflow_steps_are_counted_not_pruned() -> None:
    """fp16 autocast and a GradScaler on CPU: the first steps overflow at a huge loss scale and
    are skipped by the scaler; the trial counts them and completes."""

    def train(trial: Trial) -> None:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
        x, y = torch.from_numpy(X), torch.from_numpy(Y)
        for epoch in range(3):
            for i in range(0, len(x), 32):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
                scaler.scale(loss).backward()
                trial.clip_(opt, loss, scaler=scaler)  # unscales through the optimizer
                scaler.step(opt)
                scaler.update()
            trial.report(epoch, val_loss=float(nn.functional.mse_loss(model(x), y)))

    space = {"modes": {"global_norm": {"threshold": {"choices": [1.0]}}}}
    result = cliptune.tune_loop(train, search_space=space, n_trials=1, tracking=False)
    [trial] = result.study.trials
    assert trial.state is optuna.trial.TrialState.COMPLETE
    history = trial.user_attrs["history"]
    assert history[0]["skipped_steps"] > 0 and history[-1]["skipped_steps"] == 0
    assert "grad_norm_max" in history[-1]  # skipped steps (inf norms) stay out of the statistics
    assert all(math.isfinite(h["grad_norm_max"]) for h in history if "grad_norm_max" in h)


def test_a_clip_before_unscale_is_refused() -> None:
    def train(trial: Trial) -> None:
        model = nn.Linear(4, 1)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(model(torch.from_numpy(X)).sum()).backward()
        trial.clip_(model.parameters(), scaler=scaler)

    with pytest.raises(RuntimeError, match="came before scaler.unscale_\\(optimizer\\)"):
        cliptune.tune_loop(train, search_space={"modes": {"none": {}}}, n_trials=1,
                           tracking=False)


def quick_train(trial: Trial) -> None:
    """Module level, so that worker processes can import it."""
    linear_loop(trial, epochs=2)


@pytest.mark.subprocess
def test_workers_run_a_users_loop(tmp_path: Path) -> None:
    storage = f"journal:{tmp_path / 'study.log'}"
    result = cliptune.tune_loop(quick_train, search_space=SPACE, n_trials=6, n_jobs=2, seed=0,
                                storage=storage, study_name="w", tracking=False)
    finished = [t for t in result.study.trials if t.state.is_finished()]
    assert len(finished) == 6 and result.best_config is not None
    with pytest.raises(TypeError, match="the train function must be importable"):
        cliptune.tune_loop(lambda t: linear_loop(t), n_trials=2, n_jobs=2, tracking=False)


def test_tune_gains_accuracy_and_maximize_for_classification() -> None:
    rng = np.random.default_rng(0)
    Xc = rng.normal(size=(256, 4)).astype(np.float32)
    yc = (Xc[:, 0] + Xc[:, 1] > 0).astype(np.int64)
    result = cliptune.tune(lambda: nn.Linear(4, 2), (Xc, yc), loss="cross_entropy", lr=0.1,
                           epochs=3, batch_size=32, n_trials=3, seed=0, metric="val_accuracy",
                           tracking=False)
    assert result.study.direction.name == "MAXIMIZE"
    history = result.study.best_trial.user_attrs["history"]
    assert 0.5 < history[-1]["val_accuracy"] <= 1.0 and result.best_value == history[-1][
        "val_accuracy"]
    with pytest.raises(ValueError, match="unknown 'metric' value 'val_accuracy'"):
        cliptune.tune(lambda: nn.Linear(4, 1), (X, Y), metric="val_accuracy", tracking=False)
