"""The Transformers callback: end to end under tune_loop, where the clip acts, fp16/bf16, refusals."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch import nn  # noqa: E402

from cliptune import Trial, UsageError  # noqa: E402
from cliptune.integrations.transformers import ClipTuneCallback, eval_name  # noqa: E402
from tests._integrations import (  # noqa: E402
    SPACE,
    a_trial,
    check_auto_probe,
    check_fp16_overflow,
    check_stable_and_exploding,
    tune_enqueued,
)

pytestmark = pytest.mark.integrations
transformers.logging.set_verbosity_error()

STEPS = 32  # 2 epochs of 16 batches


class SpySGD(torch.optim.SGD):
    """SGD that records the global gradient norm it steps with (what the clip left)."""

    def __init__(self, params: Any, lr: float, seen: list[float]) -> None:
        super().__init__(params, lr=lr)
        self.seen = seen

    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return super().step(closure)


class Regression(nn.Module):
    """Linear regression returning ``{"loss", "logits"}``; it can turn its loss NaN at a step."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.nan_at, self.forwards = nan_at, 0
        self.losses: list[float] = []  # each training forward's loss

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        loss = nn.functional.mse_loss(out.float(), labels)
        if self.training:
            self.forwards += 1
            if self.forwards == self.nan_at:
                loss = loss * float("nan")
            self.losses.append(loss.item())
        return {"loss": loss, "logits": out}


class Pairs(torch.utils.data.Dataset):
    """Inputs of scale 3: SGD at lr 0.2 on their regression diverges unless the step is clipped."""

    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = 3 * torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _args(tmp_path: Path, **kwargs: Any) -> Any:
    settings = dict(num_train_epochs=2, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                    learning_rate=0.2, lr_scheduler_type="constant", max_grad_norm=0,
                    eval_strategy="epoch", save_strategy="no", logging_strategy="no",
                    report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
    return transformers.TrainingArguments(str(tmp_path / "out"), **{**settings, **kwargs})


def _trainer(trial: Trial, tmp_path: Path, model: nn.Module | None = None,
             metric: str | None = None, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = model or Regression()
    model.seen = []  # type: ignore[assignment]
    return transformers.Trainer(
        model=model, args=_args(tmp_path, **kwargs), train_dataset=Pairs(), eval_dataset=Pairs(64),
        optimizers=(SpySGD(model.parameters(), 0.2, model.seen), None),
        callbacks=[ClipTuneCallback(trial, metric)])


def test_stable_trial_completes_and_an_exploding_one_is_pruned_with_its_reason(
        tmp_path: Path) -> None:
    check_stable_and_exploding(lambda trial: _trainer(trial, tmp_path).train(), tmp_path, STEPS)


@pytest.mark.parametrize("precision", [{}, {"bf16": True}])
def test_the_optimizer_steps_with_the_clipped_gradients(tmp_path: Path,
                                                        precision: dict[str, bool]) -> None:
    trial = a_trial("global_norm", 0.05)
    trainer = _trainer(trial, tmp_path, **precision)
    trainer.train()
    assert len(trainer.model.seen) == trainer.state.global_step == trial.monitor.steps == STEPS
    assert trainer.model.seen == pytest.approx([0.05] * STEPS, rel=1e-5)
    assert trial.history[0]["grad_norm_max"] > 1.0 and trial.history[0]["clip_fraction"] == 1.0
    assert trial.history[0]["train_loss"] == pytest.approx(statistics.mean(
        trainer.model.losses[:16]))


def test_a_nan_loss_is_seen_at_its_step_although_the_trainer_filters_it(tmp_path: Path) -> None:
    trial = a_trial("global_norm", 1.0)
    trainer = _trainer(trial, tmp_path, Regression(nan_at=5), logging_nan_inf_filter=True)
    with pytest.raises(optuna.TrialPruned, match="nonfinite: loss was nan at step 5"):
        trainer.train()
    assert trainer.model._forward_hooks == {}  # the callback's hook left with the trial


def test_fp16_overflow_steps_are_counted_not_pruned_and_the_clip_sees_unscaled_gradients(
        tmp_path: Path) -> None:
    # On CPU, TrainingArguments(fp16=True) gets no GradScaler and no fp16 autocast from accelerate
    # (it scales on accelerators only), so the test gives the Trainer's Accelerator a CPU scaler
    # and turns its AMP on before train(): from there accelerate drives fp16 as on a GPU. A huge
    # initial scale makes the first steps overflow.
    models: list[Regression] = []

    def train(trial: Trial) -> None:
        trainer = _trainer(trial, tmp_path, fp16=True)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
        trainer.accelerator.native_amp = True
        models.append(trainer.model)
        trainer.train()

    check_fp16_overflow(train, tmp_path, STEPS, models)


def test_gradients_still_scaled_at_the_hook_are_unscaled_before_the_clip(tmp_path: Path) -> None:
    # transformers 4.45 reaches on_pre_optimizer_step with max_grad_norm=0 before anything unscaled
    # the gradients (5.24 unscales them to log their norm). Driven here as that Trainer drives it:
    # fp16 autocast, accelerate's AcceleratedOptimizer over a CPU GradScaler, no unscale_ of ours.
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    args = _args(tmp_path)  # (TrainingArguments resets accelerate's process state)
    accelerator = Accelerator(cpu=True)  # the process state AcceleratedOptimizer reads
    torch.manual_seed(0)
    trial, model, data, seen = a_trial("global_norm", 0.05), Regression(), Pairs(), []
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    optimizer = AcceleratedOptimizer(SpySGD(model.parameters(), 0.2, seen), scaler=scaler)
    callback = ClipTuneCallback(trial)
    callback.on_train_begin(args, None, None, model=model)
    for i in range(STEPS):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(data.x[8 * i:8 * i + 8], data.y[8 * i:8 * i + 8])["loss"]
        scaler.scale(loss).backward()
        callback.on_pre_optimizer_step(args, None, None, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
    skipped = trial.monitor.skipped_steps
    assert accelerator.state.mixed_precision == "no"  # the scaler above, not accelerate's
    assert 0 < skipped < STEPS and len(seen) == STEPS - skipped
    assert seen == pytest.approx([0.05] * len(seen), rel=1e-4)


def test_max_grad_norm_is_refused_before_training(tmp_path: Path) -> None:
    models: list[Regression] = []

    def train(trial: Trial) -> None:
        models.append(Regression())
        _trainer(trial, tmp_path, models[-1], max_grad_norm=1.0).train()

    with pytest.raises(UsageError, match=r"set max_grad_norm=0. Got max_grad_norm=1.0 instead"):
        tune_enqueued(train, tmp_path, [{"clip_mode": "none"}], SPACE)
    assert models[0].forwards == 0  # not one training step


def test_metric_names_the_eval_metric_and_the_others_are_reported_as_val(tmp_path: Path) -> None:
    def mae(p: Any) -> dict[str, float]:
        return {"mae": float(abs(p.predictions - p.label_ids).mean())}

    trial = a_trial("global_norm", 1.0)
    trainer = _trainer(trial, tmp_path, metric="eval_mae", num_train_epochs=1)
    trainer.compute_metrics = mae
    trainer.train()
    (evaluation,) = [h for h in trainer.state.log_history if "eval_mae" in h]
    assert trial.history[0]["val_loss"] == pytest.approx(evaluation["eval_mae"])
    assert "val_runtime" not in trial.history[0] and eval_name("val_accuracy") == "eval_accuracy"
    with pytest.raises(UsageError, match=r"reports 'eval_nope', which the evaluation did not "
                                         r"return \(it returned eval_loss\)"):
        _trainer(a_trial("global_norm", 1.0), tmp_path, metric="eval_nope",
                 num_train_epochs=1).train()


def test_tiny_bert_from_a_config_with_gradient_accumulation(tmp_path: Path) -> None:
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16, num_labels=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (64, 8), generator=g)
    data = [{"input_ids": i, "labels": (i[0] > 16).long()} for i in ids]
    torch.manual_seed(0)
    trial = a_trial("global_norm", 1.0)
    trainer = transformers.Trainer(
        model=transformers.BertForSequenceClassification(config),
        args=_args(tmp_path, num_train_epochs=1, gradient_accumulation_steps=2, learning_rate=1e-3,
                   per_device_train_batch_size=8),
        train_dataset=data, eval_dataset=data[:16], callbacks=[ClipTuneCallback(trial)])
    out = trainer.train()
    assert trial.monitor.steps == trainer.state.global_step == 4
    assert trial.history[0]["train_loss"] == pytest.approx(out.training_loss, rel=1e-5)
    assert trial.history[0]["val_loss"] == pytest.approx(trainer.state.log_history[0]["eval_loss"])


def test_training_without_evaluation_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="saw no evaluation"):
        _trainer(a_trial("global_norm", 1.0), tmp_path, eval_strategy="no", num_train_epochs=1).train()


def test_threshold_auto_probes_the_gradients_through_the_callback(tmp_path: Path) -> None:
    check_auto_probe(lambda trial: _trainer(trial, tmp_path).train())


def test_a_trainer_without_the_hook_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(transformers.TrainerCallback, "on_pre_optimizer_step")  # as before 4.45
    with pytest.raises(ImportError, match=r"which transformers added in 4.45.*Got transformers"):
        ClipTuneCallback(a_trial("none"))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="must be the cliptune.Trial.*Got str instead"):
        ClipTuneCallback("trial")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'metric' parameter.*Got 3 instead"):
        ClipTuneCallback(a_trial("none"), metric=3)  # type: ignore[arg-type]
