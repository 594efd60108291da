"""ClipConfig and SearchSpace: validation, YAML round trips, and what the sampler is asked."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from cliptune import ClipConfig, ClipMode, SearchSpace, shipped_spaces
from cliptune.space import config_from_params


def test_clip_config_normalises_mode_and_threshold() -> None:
    config = ClipConfig("global_norm", 1)
    assert config.mode is ClipMode.GLOBAL_NORM
    assert config.threshold == 1.0 and isinstance(config.threshold, float)
    assert repr(config) == "ClipConfig(mode='global_norm', threshold=1.0)"


@pytest.mark.parametrize("threshold", [-1, 0, float("nan"), float("inf"), "1", True])
def test_clip_config_rejects_bad_thresholds(threshold: object) -> None:
    with pytest.raises(ValueError, match=r"'threshold' parameter of ClipConfig must be a positive "
                                         r"finite float\. Got .* instead"):
        ClipConfig("value", threshold)  # type: ignore[arg-type]


def test_clip_config_mode_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown clip mode 'global-norm'.*Did you mean 'global_norm'"):
        ClipConfig("global-norm", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="required for mode='norm'"):
        ClipConfig("norm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be None for mode='none'. Got 1.0"):
        ClipConfig("none", 1.0)  # type: ignore[arg-type]


def test_keras_kwargs() -> None:
    assert ClipConfig("none").keras_kwargs() == {}  # type: ignore[arg-type]
    assert ClipConfig("value", 0.5).keras_kwargs() == {"clipvalue": 0.5}  # type: ignore[arg-type]
    assert ClipConfig("norm", 2.0).keras_kwargs() == {"clipnorm": 2.0}  # type: ignore[arg-type]
    assert ClipConfig("global_norm", 3.0).keras_kwargs() == {"global_clipnorm": 3.0}  # type: ignore[arg-type]


def test_clip_config_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    ClipConfig("norm", 0.25).to_yaml(path, lr=0.01)  # type: ignore[arg-type]
    assert ClipConfig.from_yaml(path) == ClipConfig("norm", 0.25)  # type: ignore[arg-type]
    assert "lr: 0.01" in path.read_text()


def test_clip_config_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("clip: {mode: norm, treshold: 1.0}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: clip: unknown key 'treshold'.*Did you mean 'threshold'"):
        ClipConfig.from_yaml(path)
    with pytest.raises(ValueError, match="Cannot read clip config"):
        ClipConfig.from_yaml(tmp_path / "missing.yaml")


def test_shipped_spaces_load() -> None:
    spaces = shipped_spaces()
    assert {"default", "rnn", "with_lr"} <= set(spaces)
    for name in spaces:
        space = SearchSpace.shipped(name)
        assert space.name == name and space.modes
    assert "lr" in SearchSpace.shipped("with_lr").extras


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("version: 1\nmodes:\n  value: {threshold: {low: 5.0, high: 1.0, log: true}}\n",
     r"rnn.yaml: modes.value.threshold: low <= high must hold, got low=5.0, high=1.0"),
    ("version: 1\nmodes:\n  valu: {threshold: {low: 0.1, high: 1.0}}\n",
     r"rnn.yaml: modes: unknown clip mode 'valu'.*Did you mean 'value'"),
    ("version: 1\nmodez: {}\n", r"rnn.yaml: unknown key 'modez'.*Did you mean 'modes'"),
    ("version: 1\nmodes:\n  norm: {threshold: {low: 0.1, hihg: 1.0}}\n",
     r"rnn.yaml: modes.norm.threshold: unknown key 'hihg'.*Did you mean 'high'"),
    ("version: 1\nmodes:\n  norm: {threshold: {low: 0.0, high: 1.0}}\n",
     r"rnn.yaml: modes.norm.threshold: low must be > 0 for a threshold, got low=0.0"),
    ("version: 1\nmodes:\n  norm: {}\n", r"rnn.yaml: modes.norm: the key 'threshold' is required"),
    ("version: 1\nmodes:\n  none: {threshold: {low: 1, high: 2}}\n",
     r"rnn.yaml: modes.none: mode 'none' takes no threshold"),
    ("version: 2\nmodes: {none: {}}\n", r"rnn.yaml: version: only version 1 is supported, got 2"),
    ("version: 1\nmodes: {none: {}}\nextras:\n  lr: {low: x, high: 1}\n",
     r"rnn.yaml: extras.lr.low: expected a finite number, got 'x'"),
    ("version: 1\nmodes: [none]\n", r"rnn.yaml: modes: expected a non-empty mapping"),
    ("modes: {none: {}\n", r"rnn.yaml: not valid YAML"),
])
def test_search_space_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchSpace.from_yaml(_write(tmp_path, "rnn.yaml", text))


def test_search_space_resolve_forms(tmp_path: Path) -> None:
    assert SearchSpace.resolve("rnn").name == "rnn"
    path = _write(tmp_path, "mine.yaml", "version: 1\nmodes: {none: {}}\n")
    assert SearchSpace.resolve(str(path)).name == "mine"
    assert SearchSpace.resolve({"modes": {"none": {}}}).modes == {ClipMode.NONE: None}
    with pytest.raises(ValueError, match=r"unknown search space 'rnm'.*Did you mean 'rnn'"):
        SearchSpace.resolve("rnm")
    with pytest.raises(ValueError, match="Cannot read search space"):
        SearchSpace.resolve(str(tmp_path / "nope.yaml"))
    with pytest.raises(TypeError, match="'search_space' parameter of tune"):
        SearchSpace.resolve(3)  # type: ignore[arg-type]


def test_suggest_uses_a_threshold_parameter_per_mode() -> None:
    space = SearchSpace.shipped("with_lr")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        clip, extras = space.suggest(trial)
        names = set(trial.params)
        assert "clip_mode" in names and "lr" in names
        expected = {"clip_mode", "lr"} | ({f"clip_threshold_{clip.mode.value}"}
                                         if clip.mode is not ClipMode.NONE else set())
        assert names == expected
        assert config_from_params(trial.params) == (clip, extras)
        low, high = space.extras["lr"].low, space.extras["lr"].high
        assert low <= extras["lr"] <= high  # type: ignore[operator]
        seen.add(clip.mode)
        study.tell(trial, 1.0)
    assert seen == set(space.modes)


def test_extras_choices_and_ints() -> None:
    space = SearchSpace.from_dict({"modes": {"none": {}}, "extras": {
        "hidden": {"low": 4, "high": 16, "type": "int"}, "act": {"choices": ["relu", "tanh"]}}})
    trial = optuna.create_study().ask()
    _, extras = space.suggest(trial)
    assert isinstance(extras["hidden"], int) and 4 <= extras["hidden"] <= 16
    assert extras["act"] in ("relu", "tanh")
    assert space.default_extras() == {"hidden": 10, "act": "relu"}
