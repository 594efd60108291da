"""Issue 14: what a study tries first (baselines, warm starts), the robust winner (the best configs
re-trained on fresh seeds, chosen by their mean) and multi-fidelity pruning, on real studies.

The train functions are user loops whose value is a function of the trial's config and number, so
that each test knows which config is really best and which one was only lucky.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import cliptune
from cliptune import ClipConfig, Trial, cli
from cliptune.confirm import CONFIRMS_ATTR, resolve
from cliptune.first_trials import BASELINE_ATTR, TRANSFERRED_ATTR

NO_CLIP = {"clip_mode": "none"}
GN_1 = {"clip_mode": "global_norm", "clip_threshold_global_norm": 1.0}
QUIET = {"tracking": False, "show_progress": False}


def _loop(value: Callable[[Trial], float], epochs: int = 2) -> Callable[[Trial], None]:
    """A user loop that reports ``value(trial)`` every epoch."""
    def train(trial: Trial) -> None:
        for epoch in range(epochs):
            trial.report(epoch, val_loss=value(trial))

    return train


def by_threshold(trial: Trial) -> float:
    """Lower is better the closer a global-norm threshold is to 0.3; no clip and others do worse."""
    c = trial.config
    if c.mode.value != "global_norm":
        return 5.0
    return 1.0 + math.log10(c.threshold / 0.3) ** 2


def _studies(url: str) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(url)]


# -- baselines -----------------------------------------------------------------------------------

def test_the_usual_configs_are_tried_first_and_marked() -> None:
    result = cliptune.tune_loop(_loop(by_threshold), n_trials=5, seed=0, **QUIET)
    first, second, *rest = result.study.trials
    assert first.params == NO_CLIP and first.user_attrs[BASELINE_ATTR] == "no clip"
    assert second.params == GN_1 and second.user_attrs[BASELINE_ATTR] == "global_norm 1.0"
    assert not any(BASELINE_ATTR in t.user_attrs for t in rest)
    roles = list(result.trials_dataframe()["role"])
    assert roles == ["baseline: no clip", "baseline: global_norm 1.0"] + ["search"] * 3


def test_the_result_is_never_worse_than_a_baseline() -> None:
    """No clip is best here and lies where a sampler rarely looks; tried first, it wins."""
    result = cliptune.tune_loop(
        _loop(lambda t: 0.5 if t.config.mode.value == "none" else by_threshold(t)),
        n_trials=4, seed=0, search_space="default", **QUIET)
    assert result.best_params == NO_CLIP and result.best_value == 0.5


def test_baselines_can_be_chosen_or_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    off = cliptune.tune_loop(_loop(by_threshold), n_trials=2, seed=0, baselines=False, **QUIET)
    assert not any(BASELINE_ATTR in t.user_attrs for t in off.study.trials)
    with caplog.at_level(logging.INFO, logger="cliptune"):
        mine = cliptune.tune_loop(
            _loop(by_threshold), n_trials=3, seed=0, **QUIET,
            baselines=[ClipConfig("norm", 2.0), {"mode": "value", "threshold": 50.0}])
    assert mine.study.trials[0].params == {"clip_mode": "norm", "clip_threshold_norm": 2.0}
    assert mine.study.trials[0].user_attrs[BASELINE_ATTR] == repr(ClipConfig("norm", 2.0))
    assert not any(BASELINE_ATTR in t.user_attrs for t in mine.study.trials[1:])
    assert "outside the search space; not tried first" in caplog.text  # value 50 > its 10
    assert "configs tried first: 1 baseline(s)" in caplog.text
    with pytest.raises(ValueError, match="baselines"):
        cliptune.tune_loop(_loop(by_threshold), baselines=[{"mode": "sideways"}], **QUIET)


def test_the_probes_norm_is_a_baseline_where_a_probe_ran() -> None:
    pytest.importorskip("torch")
    from torch import nn

    from tests.conftest import regression_data

    result = cliptune.tune(lambda: nn.Linear(4, 1), regression_data(), epochs=2, n_trials=3,
                           search_space="auto", seed=0, **QUIET)
    probe = result.study.user_attrs["cliptune.probe"]
    named = {t.user_attrs.get(BASELINE_ATTR): t.params for t in result.study.trials}
    assert named["probe mean norm"] == {"clip_mode": "global_norm", "clip_threshold_global_norm":
                                        float(f"{probe['global_norm_mean']:.4g}")}


# -- warm start ----------------------------------------------------------------------------------

def test_a_warm_start_from_a_best_config_yaml(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    path.write_text("clip:\n  mode: global_norm\n  threshold: 0.3\n")
    result = cliptune.tune_loop(_loop(by_threshold), n_trials=4, seed=0, warm_start=str(path),
                                **QUIET)
    first = result.study.trials[0]
    assert first.params == {"clip_mode": "global_norm", "clip_threshold_global_norm": 0.3}
    assert first.user_attrs[TRANSFERRED_ATTR] == str(path)
    assert result.best_trial == 0 and result.best_value == 1.0
    assert list(result.trials_dataframe()["role"])[:3] == [
        f"from {path}", "baseline: no clip", "baseline: global_norm 1.0"]


def test_a_warm_start_from_a_study_carries_its_best_configs_not_its_values(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'small.db'}"
    small = cliptune.tune_loop(_loop(by_threshold), n_trials=6, seed=0, storage=url,
                               study_name="small", baselines=False, **QUIET)
    best3 = sorted((t for t in small.study.trials if t.state is TrialState.COMPLETE),
                   key=lambda t: t.value)[:3]
    for source in (small, "small@" + url):  # a TuneResult, and a study in a storage
        big = cliptune.tune_loop(_loop(lambda t: 10 * by_threshold(t)), n_trials=5, seed=1,
                                 warm_start=source, **QUIET)
        carried = big.study.trials[:3]
        assert [t.params for t in carried] == [t.params for t in best3]
        assert [t.user_attrs[TRANSFERRED_ATTR] for t in carried] == [
            f"small#{t.number}" for t in best3]
        assert [t.value for t in carried] == pytest.approx([10 * t.value for t in best3])
        assert BASELINE_ATTR in big.study.trials[3].user_attrs


def test_a_wrong_warm_start_is_an_error_before_anything_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="other", storage=url)
    for source, message in (("missing.yaml", "warm_start: Cannot read clip config 'missing.yaml'"),
                            ("nobody@" + url, "warm_start: no study 'nobody' in that storage")):
        with pytest.raises(ValueError, match=message):
            cliptune.tune_loop(_loop(by_threshold), storage=url, study_name="job",
                               warm_start=source, **QUIET)
    assert _studies(url) == ["other"]
    with pytest.raises(TypeError, match="warm_start"):
        cliptune.tune_loop(_loop(by_threshold), warm_start=3, **QUIET)


@pytest.mark.subprocess
def test_a_warm_start_from_a_result_works_with_worker_processes() -> None:
    small = cliptune.tune_loop(_loop(by_threshold), n_trials=3, seed=0, baselines=False, **QUIET)
    result = cliptune.tune_loop(train_by_threshold, n_trials=6, seed=0, n_jobs=2,
                                warm_start=small, **QUIET)
    carried = [t for t in result.study.trials if TRANSFERRED_ATTR in t.user_attrs]
    assert len(carried) == 3 and all(t.state is TrialState.COMPLETE for t in carried)


def train_by_threshold(trial: Trial) -> None:  # module level: worker processes import it
    _loop(by_threshold)(trial)


# -- the robust winner ---------------------------------------------------------------------------

LUCKY, STEADY = ClipConfig("global_norm", 0.5), ClipConfig("global_norm", 2.0)


def _lucky_once(seeds: list[int | None]) -> Callable[[Trial], float]:
    """LUCKY scores 0.18 on its first run and 0.3 after; STEADY 0.2 every time."""
    def value(trial: Trial) -> float:
        seeds.append(trial.seed)
        if trial.config == LUCKY:
            return 0.18 if trial.number == 0 else 0.3
        return 0.2

    return value


def test_the_winner_is_the_best_mean_over_fresh_seeds(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    seeds: list[int | None] = []
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = cliptune.tune_loop(_loop(_lucky_once(seeds), epochs=1), n_trials=2, seed=10,
                                baselines=[LUCKY, STEADY], confirm=2, confirm_seeds=2,
                                storage=url, study_name="robust", **QUIET)
    trials = result.study.trials
    assert [t.user_attrs.get(CONFIRMS_ATTR) for t in trials] == [None, None, 0, 0, 1, 1]
    assert seeds == [10, 11, 12, 13, 14, 15]  # seed + trial number: the re-runs' are fresh
    assert result.best_config == STEADY and result.best_trial == 1
    assert result.best_values == [0.2, 0.2, 0.2] and result.best_value == pytest.approx(0.2)
    assert result.best_std == 0.0
    assert (result.n_complete, result.n_pruned, result.n_failed) == (2, 0, 0)  # re-runs apart
    assert list(result.trials_dataframe()["role"])[2:] == ["re-run of 0"] * 2 + ["re-run of 1"] * 2
    assert cli.main(["best", "--study", "robust", "--storage", url]) == 0
    assert "trial 1, value 0.2 (mean of 3 runs on different seeds, std 0)" in capsys.readouterr().out
    summary = result.summary().splitlines()  # what the examples print: the CLI's own lines
    assert summary[-2:] == ["2 trials: 2 complete, 0 pruned, 0 failed",
                            f"best: {STEADY} (trial 1), value 0.2 (mean of 3 runs on different "
                            "seeds, std 0)"]


def test_a_re_run_that_blows_up_loses_its_config_the_title(mlflow_uri: str) -> None:
    def value(trial: Trial) -> float:
        if trial.config == LUCKY:
            return 0.1 if trial.number == 0 else math.nan  # unstable: fine once, then NaN
        return 0.11

    result = cliptune.tune_loop(_loop(value), n_trials=2, seed=0, baselines=[LUCKY, STEADY],
                                confirm=2, tracking_uri=mlflow_uri, experiment="robust",
                                show_progress=False)
    rerun = result.study.trials[2]
    assert rerun.state is TrialState.PRUNED and rerun.user_attrs["prune_reason"] == "nonfinite"
    assert result.best_config == STEADY and result.best_values == [0.11, 0.11]
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("robust")
    parent = next(r for r in client.search_runs([experiment.experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.metrics["best_value"] == pytest.approx(0.11)
    assert parent.data.metrics["best_n_runs"] == 2 and parent.data.metrics["best_value_std"] == 0
    assert parent.data.params["best_clip_threshold"] == "2.0"


def test_confirmation_is_on_by_default_for_tune_only() -> None:
    assert resolve("auto", 10, user_loop=False) == 3
    assert resolve("auto", 9, user_loop=False) == 0  # too few trials to pick among
    assert resolve("auto", 50, user_loop=True) == 0  # a user's loop may be expensive: ask
    assert resolve(2, 3, user_loop=True) == 2
    loop = cliptune.tune_loop(_loop(by_threshold), n_trials=4, seed=0, **QUIET)
    assert not any(CONFIRMS_ATTR in t.user_attrs for t in loop.study.trials)
    with pytest.raises(ValueError, match="confirm"):
        cliptune.tune_loop(_loop(by_threshold), confirm=-1, **QUIET)


# -- multi-fidelity ------------------------------------------------------------------------------

def test_multi_fidelity_halves_with_the_stability_rules_on() -> None:
    def value(trial: Trial) -> float:
        return math.nan if trial.number == 9 else by_threshold(trial)

    def learning(trial: Trial) -> None:  # improving every epoch: never plateaued
        for epoch in range(9):
            trial.report(epoch, val_loss=value(trial) * (1 + 0.1 * (8 - epoch)))

    result = cliptune.tune_loop(learning, n_trials=10, seed=0, multi_fidelity=True, **QUIET)
    pruner = result.study.pruner
    assert isinstance(pruner, cliptune.StabilityPruner)
    assert isinstance(pruner.pruner, optuna.pruners.SuccessiveHalvingPruner)
    reasons = {t.number: t.user_attrs.get("prune_reason") for t in result.study.trials
               if t.state is TrialState.PRUNED}
    assert reasons.pop(9) == "nonfinite"
    assert reasons and set(reasons.values()) == {"unpromising"}
    short = [len(t.intermediate_values) for t in result.study.trials
             if t.number in reasons]
    assert max(short) < 9  # stopped on a short budget
    mine = optuna.pruners.NopPruner()
    chosen = cliptune.tune_loop(_loop(by_threshold), n_trials=2, multi_fidelity=True,
                                pruner=mine, **QUIET)
    assert chosen.study.pruner.pruner is mine  # a pruner replaces both


# -- duplicates ----------------------------------------------------------------------------------

THREE_POINTS = {"modes": {"none": {}, "global_norm": {"threshold": {"choices": [0.3, 3.0]}}}}


def test_a_repeated_config_takes_its_twins_outcome_untrained(mlflow_uri: str) -> None:
    trained: dict[int, ClipConfig] = {}

    def value(trial: Trial) -> float:
        trained[trial.number] = trial.config
        return math.nan if trial.config.mode.value == "none" else by_threshold(trial)

    result = cliptune.tune_loop(_loop(value), n_trials=9, seed=0, search_space=THREE_POINTS,
                                confirm=0, tracking_uri=mlflow_uri, experiment="dups",
                                show_progress=False)
    trials = result.study.trials
    assert len(trials) == 9  # a duplicate counts toward n_trials
    assert len(trained) == len({str(c) for c in trained.values()}) <= 3  # each trained once
    twins = {t.number: t.user_attrs["cliptune.duplicate_of"] for t in trials
             if "cliptune.duplicate_of" in t.user_attrs}
    assert twins and set(twins) == set(range(9)) - set(trained)
    for number, twin in twins.items():
        this, first = trials[number], trials[twin]
        assert this.params == first.params and this.state == first.state and twin < number
        assert this.value == first.value  # None for a pruned pair
        if this.state is TrialState.PRUNED:
            assert this.user_attrs["prune_reason"] == first.user_attrs["prune_reason"] == \
                "nonfinite"
            assert this.intermediate_values == first.intermediate_values
    roles = result.trials_dataframe().set_index("number")["role"]
    assert {roles[n] for n in twins} == {f"duplicate of {t}" for t in twins.values()}
    assert "duplicate of" not in result.best_table()  # each config once
    assert result.best_trial == trials[result.best_trial].number and result.best_value == \
        pytest.approx(1.0)  # global_norm 0.3, trained once
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("dups").experiment_id])
    named = {int(r.data.tags["optuna.trial_number"]): r for r in runs
             if "mlflow.parentRunId" in r.data.tags}
    for number, twin in twins.items():
        assert named[number].data.tags["cliptune.duplicate_of"] == str(twin)
        assert f"duplicate of {twin}" in named[number].info.run_name


def test_re_runs_and_loops_with_their_own_params_always_train() -> None:
    calls: list[int] = []

    def close(trial: Trial) -> None:  # two configs within reach of each other: both re-run
        calls.append(trial.number)
        trial.report(0, val_loss={None: 5.0, 0.3: 1.0, 3.0: 1.1}[trial.config.threshold])

    every = [ClipConfig("none"), ClipConfig("global_norm", 0.3), ClipConfig("global_norm", 3.0)]
    result = cliptune.tune_loop(close, n_trials=6, seed=0, search_space=THREE_POINTS, confirm=2,
                                baselines=every, **QUIET)
    trials = result.study.trials
    reruns = [t.number for t in trials if CONFIRMS_ATTR in t.user_attrs]
    assert len(reruns) == 2 and calls == [0, 1, 2, *reruns]  # the re-runs repeat, and train
    assert all("cliptune.duplicate_of" in t.user_attrs for t in trials[3:6])  # the sampled ones
    calls.clear()

    def own_params(trial: Trial) -> None:
        calls.append(trial.number)
        lr = trial.optuna_trial.suggest_float("lr", 0.01, 0.1)  # the loop's own param
        trial.report(0, val_loss=by_threshold(trial) + lr)

    result = cliptune.tune_loop(own_params, n_trials=6, seed=0, search_space=THREE_POINTS,
                                **QUIET)
    assert calls == [t.number for t in result.study.trials]  # every trial trained
    assert not any("cliptune.duplicate_of" in t.user_attrs for t in result.study.trials)
