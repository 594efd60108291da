"""The Lightning callback: end to end under tune_loop, where the clip acts, AMP, refusals."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from torch import nn  # noqa: E402

from cliptune import Trial, UsageError  # noqa: E402
from cliptune.integrations.lightning import ClipTuneCallback  # noqa: E402
from tests._integrations import (  # noqa: E402
    SPACE,
    a_trial,
    check_auto_probe,
    check_fp16_overflow,
    check_stable_and_exploding,
    tune_enqueued,
)

pytestmark = pytest.mark.integrations

STEPS = 32  # 2 epochs of 16 batches


class SpySGD(torch.optim.SGD):
    """SGD that records the global gradient norm it steps with (what the clip left)."""

    def __init__(self, params: Any, lr: float, seen: list[float]) -> None:
        super().__init__(params, lr=lr)
        self.seen = seen

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None  # Lightning's closure runs the hooks
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        super().step()
        return loss


class Regression(pl.LightningModule):
    """Linear regression on inputs of scale 3: SGD at lr 0.2 diverges unless the step is clipped."""

    def __init__(self, lr: float = 0.2, log_as: str = "val_loss", manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.lr, self.log_as = lr, log_as
        self.automatic_optimization = not manual
        self.losses: list[float] = []  # each training step's loss
        self.seen: list[float] = []  # the gradient norm of each optimizer step taken

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log(self.log_as, nn.functional.mse_loss(self.net(x).float(), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SpySGD(self.parameters(), self.lr, self.seen)


def _loaders() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    X = 3 * torch.randn(256, 4, generator=g)
    y = X @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    data = torch.utils.data.TensorDataset(X, y)
    return (torch.utils.data.DataLoader(data, batch_size=16),
            torch.utils.data.DataLoader(data, batch_size=64))


def _fit(trial: Trial, module: Regression | None = None, validate: bool = True,
         monitor: str | None = None, **trainer_kwargs: Any) -> tuple[Regression, pl.Trainer]:
    torch.manual_seed(0)
    module = module or Regression()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[ClipTuneCallback(trial, monitor)], **trainer_kwargs)
    train, val = _loaders()
    trainer.fit(module, train, val if validate else None)
    return module, trainer


def test_stable_trial_completes_and_an_exploding_one_is_pruned_with_its_reason(
        tmp_path: Path) -> None:
    check_stable_and_exploding(lambda trial: _fit(trial), tmp_path, STEPS)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_optimizer_steps_with_the_clipped_gradients(precision: str) -> None:
    trial = a_trial("global_norm", 0.05)
    module, trainer = _fit(trial, precision=precision)
    assert len(module.seen) == trainer.global_step == trial.monitor.steps == STEPS
    assert module.seen == pytest.approx([0.05] * STEPS, rel=1e-5)
    assert trial.history[0]["grad_norm_max"] > 1.0 and trial.history[0]["clip_fraction"] == 1.0


def test_every_step_reaches_the_monitor_once_with_its_mean_loss() -> None:
    trial = a_trial("global_norm", 1.0)
    module, trainer = _fit(trial, accumulate_grad_batches=2)
    assert trial.monitor.steps == trainer.global_step == STEPS // 2
    assert trial.history[0]["train_loss"] == pytest.approx(statistics.mean(module.losses[:16]))


def test_fp16_overflow_steps_are_counted_not_pruned_and_the_clip_sees_unscaled_gradients(
        tmp_path: Path) -> None:
    # Trainer(precision="16-mixed") falls back to bf16 on CPU; the AMP plugin itself runs fp16
    # autocast with a CPU GradScaler. A huge initial scale makes the first steps overflow.
    modules: list[Regression] = []

    def train(trial: Trial) -> None:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
        modules.append(_fit(trial, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])[0])

    check_fp16_overflow(train, tmp_path, STEPS, modules)


@pytest.mark.parametrize(("manual", "trainer_kwargs", "match"), [
    (False, {"gradient_clip_val": 0.5}, r"Got gradient_clip_val=0.5 instead"),
    (True, {}, r"Got Regression.automatic_optimization=False instead of True"),
])
def test_two_clips_or_manual_optimisation_are_refused_before_training(
        tmp_path: Path, manual: bool, trainer_kwargs: dict[str, Any], match: str) -> None:
    module = Regression(manual=manual)

    def train(trial: Trial) -> None:
        _fit(trial, module, **trainer_kwargs)

    with pytest.raises(UsageError, match=match):
        tune_enqueued(train, tmp_path, [{"clip_mode": "none"}], SPACE)
    assert module.losses == []  # not one training step


def test_monitor_names_the_metric_the_module_logs() -> None:
    trial = a_trial("global_norm", 1.0)
    _fit(trial, Regression(log_as="val_mse"), monitor="val_mse")
    assert [sorted(h) for h in trial.history][0] == [
        "clip_coef_mean", "clip_fraction", "grad_norm_max", "grad_norm_mean",
        "grad_norm_postclip_mean", "steps", "train_loss", "val_loss"]
    with pytest.raises(UsageError, match=r"monitors 'val_loss', which the module did not log.*"
                                         r"holds val_mse"):
        _fit(a_trial("global_norm", 1.0), Regression(log_as="val_mse"))


def test_a_fit_without_validation_is_an_error() -> None:
    with pytest.raises(UsageError, match="saw no validation round"):
        _fit(a_trial("global_norm", 1.0), validate=False)


def test_threshold_auto_probes_the_gradients_through_the_callback() -> None:
    check_auto_probe(lambda trial: _fit(trial))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="must be the cliptune.Trial.*Got str instead"):
        ClipTuneCallback("trial")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'monitor' parameter.*Got 3 instead"):
        ClipTuneCallback(a_trial("none"), monitor=3)  # type: ignore[arg-type]
