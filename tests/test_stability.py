"""Stability rules on synthetic loss sequences, through a real Optuna trial."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

import cliptune
from cliptune import StabilityPruner, StabilityRules, TrialMonitor
from cliptune.stability import is_diverged, is_nonfinite, robust_z


def _monitor(rules: StabilityRules | None = StabilityRules(), pruner: optuna.pruners.BasePruner
             | None = None) -> TrialMonitor:
    study = optuna.create_study(pruner=pruner or StabilityPruner(optuna.pruners.NopPruner(), rules))
    return TrialMonitor(study.ask(), rules)


def _feed(monitor: TrialMonitor, losses: list[float], norm: float = 1.0) -> int:
    """Feed losses step by step; return the step at which the trial was pruned (or -1)."""
    for i, loss in enumerate(losses):
        try:
            monitor.step(loss, norm, False)
        except optuna.TrialPruned:
            return i
    return -1


def _noisy(n: int, level: float = 1.0, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(level * np.exp(rng.normal(0, 0.05, n)))


def test_pure_rules() -> None:
    assert is_nonfinite(math.nan) and is_nonfinite(math.inf) and not is_nonfinite(1e30)
    assert is_diverged(11.0, 1.0, 10.0) and not is_diverged(9.0, 1.0, 10.0)
    assert not is_diverged(1e9, 0.0, 10.0)  # no positive reference, no verdict
    assert robust_z([0.0, 0.1, -0.1, 0.05, -0.05], 1.0) > 6
    assert abs(robust_z([0.0, 0.1, -0.1, 0.05, -0.05], 0.0)) < 1e-9


def test_stable_noisy_loss_is_never_pruned() -> None:
    monitor = _monitor()
    assert _feed(monitor, _noisy(500)) == -1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_prunes_at_once(bad: float) -> None:
    monitor = _monitor()
    losses = _noisy(30)
    losses[17] = bad
    assert _feed(monitor, losses) == 17
    assert monitor.reporter.study.trials[0].user_attrs["prune_reason"] == "nonfinite"


def test_nonfinite_gradient_norm_prunes_at_once() -> None:
    monitor = _monitor()
    monitor.step(1.0, 1.0, False)
    with pytest.raises(optuna.TrialPruned, match="nonfinite: gradient norm was inf at step 2"):
        monitor.step(1.0, math.inf, False)


def test_divergence_against_the_first_loss() -> None:
    monitor = _monitor(StabilityRules(divergence_factor=5.0))
    losses = _noisy(20) + [4.0, 4.5, 6.0]
    assert _feed(monitor, losses) == 22
    attrs = monitor.reporter.study.trials[0].user_attrs
    assert attrs["prune_reason"] == "diverged" and "5 x first loss" in attrs["prune_detail"]


def test_divergence_against_the_best_epoch() -> None:
    monitor = _monitor()
    _feed(monitor, _noisy(20))
    monitor.epoch(0, {"train_loss": 0.01, "val_loss": 0.01})
    with pytest.raises(optuna.TrialPruned, match="diverged: train_loss 0.5 > 10 x best epoch"):
        monitor.epoch(1, {"train_loss": 0.5, "val_loss": 0.5})


def _learning(n: int) -> list[float]:
    """A loss that falls from 1.0 to 0.5 over 100 steps, then stays there with 5% noise."""
    return list(np.linspace(1.0, 0.5, 100)) + _noisy(n - 100, level=0.5)


def test_repeated_spikes_prune_but_one_spike_does_not() -> None:
    one = _learning(200)
    one[150] = 3.0
    assert _feed(_monitor(), one) == -1
    many = _learning(200)
    for i in (150, 160, 170):
        many[i] = 3.0
    monitor = _monitor()
    assert _feed(monitor, many) == 170
    assert monitor.reporter.study.trials[0].user_attrs["prune_reason"] == "spiking"


def test_a_converging_run_with_near_zero_noisy_loss_is_not_spiking() -> None:
    """Near zero, minibatch noise is large in log space (10x bursts on hard batches) but tiny on
    the loss's own scale: no spike. The old log-only rule pruned it."""
    rng = np.random.default_rng(1)
    start = list(np.linspace(1.0, 0.01, 100))
    tail = list(1e-3 * np.exp(rng.normal(0, 0.1, 400)))
    for i in range(150, 400, 7):
        tail[i] = 1e-2  # 10x bursts of an easy task's hard batches
    assert _feed(_monitor(), start + tail) == -1
    old = _monitor(StabilityRules(spike_min_rise=1e-12))  # the log-only rule, for contrast
    assert _feed(old, start + tail) > 0


def test_a_net_at_chance_that_jumps_about_before_it_learns_is_not_spiking() -> None:
    """An IRNN on digits at chance (loss ln 10, nearly flat) jumps to 1.4-3.4x a few times, then
    learns and ends among the best configs: spikes count only once the loss has fallen 10% below
    its first value. Counted from the first step, the same jumps stopped it."""
    losses = _noisy(200, level=2.3, seed=3)
    for i, jump in ((53, 3.3), (57, 7.9), (67, 3.4), (84, 3.4)):
        losses[i] = jump
    learning = np.linspace(2.3, 0.8, 200) * np.exp(np.random.default_rng(4).normal(0, 0.05, 200))
    losses += list(learning)
    assert _feed(_monitor(), losses) == -1
    assert _feed(_monitor(StabilityRules(spike_min_fall=0)), losses) == 67
    late = list(losses)
    for i in (350, 360, 370):
        late[i] = 3.0  # the same jumps once it has learned: spiking
    assert _feed(_monitor(), late) == 370


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "0.1", None, False, math.nan])
def test_spike_min_fall_must_lie_in_0_1(bad: object) -> None:
    with pytest.raises(ValueError, match=r"'spike_min_fall' parameter of StabilityRules must be "
                                         r"a float in \[0, 1\)"):
        StabilityRules(spike_min_fall=bad)  # type: ignore[arg-type]


def test_a_real_spike_series_near_zero_is_still_caught() -> None:
    rng = np.random.default_rng(2)
    losses = list(np.linspace(1.0, 0.01, 100)) + list(1e-3 * np.exp(rng.normal(0, 0.1, 200)))
    for i in (200, 210, 220):
        losses[i] = 0.6  # back to 60% of the first loss: a real jump
    monitor = _monitor()
    assert _feed(monitor, losses) == 220
    assert monitor.reporter.study.trials[0].user_attrs["prune_reason"] == "spiking"


def test_skipped_steps_are_counted_and_only_a_long_run_of_them_prunes() -> None:
    monitor = _monitor(StabilityRules(max_skipped_steps=3))
    for _ in range(3):
        monitor.step(1.0, None, None, skipped=True)
    monitor.step(1.0, 1.0, False, skipped=False)
    monitor.epoch(0, {"val_loss": 1.0})
    assert monitor.history[0]["skipped_steps"] == 3
    for _ in range(3):
        monitor.step(1.0, None, None, skipped=True)
    with pytest.raises(optuna.TrialPruned, match="skipped_steps: 4 steps in a row skipped"):
        monitor.step(1.0, None, None, skipped=True)


def test_a_nonfinite_loss_on_a_skipped_step_still_prunes() -> None:
    monitor = _monitor()
    with pytest.raises(optuna.TrialPruned, match="nonfinite: loss was nan"):
        monitor.step(math.nan, None, None, skipped=True)


def test_a_missing_metric_is_a_usage_error_naming_what_was_reported() -> None:
    monitor = TrialMonitor(optuna.create_study().ask(), StabilityRules(), metric="bpc")
    with pytest.raises(cliptune.UsageError, match=r"did not report the metric 'bpc' .*it "
                                                  r"reported accuracy, val_loss"):
        monitor.epoch(0, {"val_loss": 1.0, "accuracy": 0.5})


@pytest.mark.parametrize("name", ["steps", "clip_fraction", "grad_norm_mean"])
def test_a_metric_named_like_a_statistic_of_the_steps_is_a_usage_error(name: str) -> None:
    monitor = _monitor()
    monitor.step(1.0, 2.0, False)
    with pytest.raises(cliptune.UsageError, match=f"reported {name}, which cliptune records "
                                                  "itself .* Report it under another name"):
        monitor.epoch(0, {"val_loss": 1.0, name: 123.0})
    assert monitor.history == []  # nothing half-recorded
    monitor.epoch(0, {"val_loss": 1.0, "train_loss": 0.5})  # train_loss is the loop's to give
    assert monitor.history[0]["train_loss"] == 0.5 and monitor.history[0]["steps"] == 1


def test_rules_off_lets_everything_through() -> None:
    monitor = _monitor(rules=None)
    assert _feed(monitor, [1.0, math.nan, 1e9, math.inf]) == -1


def test_epoch_reports_to_optuna_and_unpromising_prunes() -> None:
    study = optuna.create_study(pruner=StabilityPruner(optuna.pruners.ThresholdPruner(upper=1.0)))
    monitor = TrialMonitor(study.ask(), StabilityRules())
    _feed(monitor, _noisy(5))
    monitor.epoch(0, {"val_loss": 0.5})
    _feed(monitor, _noisy(5))
    with pytest.raises(optuna.TrialPruned, match="unpromising: val_loss=2 at epoch 1"):
        monitor.epoch(1, {"val_loss": 2.0})
    trial = study.trials[0]
    assert trial.intermediate_values == {0: 0.5, 1: 2.0}
    assert trial.user_attrs["prune_reason"] == "unpromising"


def test_no_verdict_at_the_last_epoch_a_complete_trial_reached() -> None:
    """Pruning at the last report saves no step: the trial completes with its value instead."""
    study = optuna.create_study(pruner=StabilityPruner(optuna.pruners.ThresholdPruner(upper=1.0)))
    done = study.ask()
    for epoch in range(3):
        done.report(0.5, epoch)
    study.tell(done, 0.5)
    late = TrialMonitor(study.ask(), StabilityRules())
    late.epoch(0, {"val_loss": 0.9})
    late.epoch(1, {"val_loss": 0.8})
    late.epoch(2, {"val_loss": 2.0})  # above the threshold, but at epoch 2: the last one
    assert late.value() == 2.0 and study.trials[1].user_attrs.get("prune_reason") is None
    early = TrialMonitor(study.ask(), StabilityRules())
    with pytest.raises(optuna.TrialPruned, match="unpromising: val_loss=2 at epoch 1"):
        early.epoch(1, {"val_loss": 2.0})  # before the last epoch: stopped, steps saved
    dead = TrialMonitor(study.ask(), StabilityRules())
    with pytest.raises(optuna.TrialPruned, match="nonfinite"):
        dead.epoch(2, {"val_loss": math.nan})  # a non-finite value is never a complete one


def test_epoch_statistics_and_objective() -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    study = optuna.create_study()
    monitor = TrialMonitor(study.ask(), StabilityRules(), objective="best",
                           on_epoch=lambda e, s: seen.append((e, s)))
    for loss, norm, clipped in [(1.0, 2.0, True), (3.0, 4.0, False)]:
        monitor.step(loss, norm, clipped)
    monitor.epoch(0, {"val_loss": 0.7})
    monitor.step(1.0, 1.0, False)
    monitor.epoch(1, {"val_loss": 0.9})
    assert seen[0] == (0, {"train_loss": 2.0, "val_loss": 0.7, "grad_norm_mean": 3.0,
                           "grad_norm_max": 4.0, "clip_fraction": 0.5, "steps": 2.0})
    assert seen[1][1]["steps"] == 3.0  # all epochs so far: the trial's cost
    assert monitor.value() == 0.7  # best epoch
    monitor.objective = "last"
    assert monitor.value() == 0.9


def test_pruned_mid_epoch_still_hands_over_the_partial_epoch() -> None:
    seen: list[dict[str, float]] = []
    study = optuna.create_study()
    monitor = TrialMonitor(study.ask(), StabilityRules(), on_epoch=lambda e, s: seen.append(s))
    monitor.step(1.0, 5.0, False)
    with pytest.raises(optuna.TrialPruned):
        monitor.step(math.nan, 7.0, True)
    assert len(seen) == 1 and seen[0]["grad_norm_max"] == 7.0 and seen[0]["clip_fraction"] == 0.5


def test_stability_pruner_wraps_and_validates() -> None:
    assert isinstance(StabilityPruner().pruner, optuna.pruners.MedianPruner)
    with pytest.raises(TypeError, match="'pruner' parameter of StabilityPruner must be an Optuna"):
        StabilityPruner("median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'divergence_factor' parameter of StabilityRules must be > 1"):
        StabilityRules(divergence_factor=0.5)
    with pytest.raises(ValueError, match="'window' parameter of StabilityRules must be an int >= 1"):
        StabilityRules(window=0)


def _with_a_best_trial(rules: StabilityRules = StabilityRules()) -> optuna.Study:
    study = optuna.create_study(pruner=StabilityPruner(optuna.pruners.NopPruner(), rules))
    best = study.ask()
    for epoch, value in enumerate([1.0, 0.5, 0.3, 0.2, 0.15]):
        best.report(value, epoch)
    study.tell(best, 0.15)
    return study


def test_a_flat_trial_far_above_the_best_at_the_same_epoch_is_plateaued() -> None:
    """A dead net (flat at chance) stops with its reason; a slow but improving one does not."""
    study = _with_a_best_trial()
    slow = TrialMonitor(study.ask(), StabilityRules())
    for epoch, value in enumerate([2.0, 1.6, 1.3, 1.1, 0.9]):  # worse, but still learning
        slow.epoch(epoch, {"val_loss": value})
    flat_near = TrialMonitor(study.ask(), StabilityRules())
    for epoch in range(5):  # flat, but not 2x the best: the median pruner's to judge
        flat_near.epoch(epoch, {"val_loss": 0.28})
    dead = TrialMonitor(study.ask(), StabilityRules())
    dead.epoch(0, {"val_loss": 2.30})
    with pytest.raises(optuna.TrialPruned, match="plateaued: val_loss=2.29 at epoch 1"):
        dead.epoch(1, {"val_loss": 2.29})  # one flat epoch at chance, far above the best
    assert study.trials[-1].user_attrs["prune_reason"] == "plateaued"
    patient = TrialMonitor(_with_a_best_trial(StabilityRules(plateau_epochs=3)).ask(),
                           StabilityRules(plateau_epochs=3))
    for epoch in range(3):
        patient.epoch(epoch, {"val_loss": 2.30})
    with pytest.raises(optuna.TrialPruned, match="plateaued: val_loss=2.3 at epoch 3"):
        patient.epoch(3, {"val_loss": 2.30})
