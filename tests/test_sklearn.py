"""cliptune.sklearn: scikit-learn's estimator checks, cross_val_score, a Pipeline, params, seeds."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from cliptune import ClipConfig  # noqa: E402
from cliptune.sklearn import ClipTunedClassifier, ClipTunedRegressor  # noqa: E402
from tests.conftest import regression_data  # noqa: E402

FAST: dict[str, Any] = {"n_trials": 1, "epochs": 5, "lr": 0.05, "random_state": 0}

# Why one of scikit-learn's checks is expected to fail (it runs, and is reported xfail).
EXPECTED_FAILURES = {
    "check_methods_subset_invariance": "float32 torch matmuls round differently for different "
    "batch sizes on some CPUs (about 1e-7 relative), above the check's atol=1e-7; the classifier's "
    "argmax is immune (test_a_rows_prediction_does_not_depend_on_its_batch checks it at float32's "
    "precision)",
}


def expected_failed_checks(estimator: Any) -> dict[str, str]:
    return EXPECTED_FAILURES if isinstance(estimator, ClipTunedRegressor) else {}


@parametrize_with_checks([ClipTunedRegressor(**FAST), ClipTunedClassifier(**FAST)],
                         expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


def test_fit_tunes_refits_and_scores_in_a_pipeline() -> None:
    X, y = regression_data(n=200)
    model = make_pipeline(StandardScaler(), ClipTunedRegressor(n_trials=2, epochs=10,
                                                               lr=0.05, random_state=0))
    assert model.fit(X, y.ravel()).score(X, y.ravel()) > 0.9
    regressor = model[-1]
    assert isinstance(regressor.best_config_, ClipConfig) and regressor.n_features_in_ == 4
    assert len(regressor.trials_) == 2 and regressor.predict(X[:3]).shape == (3,)
    again = make_pipeline(StandardScaler(), ClipTunedRegressor(n_trials=2, epochs=10, lr=0.05,
                                                               random_state=0)).fit(X, y.ravel())
    np.testing.assert_array_equal(again.predict(X), model.predict(X))  # seeded by random_state


def test_classifier_in_cross_val_score_with_string_labels() -> None:
    X, y = make_classification(n_samples=150, n_features=5, n_informative=3, n_classes=3,
                               random_state=0)
    labels = np.array(["a", "b", "c"])[y]
    clf = ClipTunedClassifier(n_trials=1, epochs=8, lr=0.05, random_state=0)
    scores = cross_val_score(make_pipeline(StandardScaler(), clf), X, labels, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.6
    fitted = clone(clf).fit(X, labels)
    proba = fitted.predict_proba(X[:4])
    assert proba.shape == (4, 3) and np.allclose(proba.sum(axis=1), 1.0)
    assert list(fitted.classes_) == ["a", "b", "c"]
    assert set(fitted.predict(X)) <= {"a", "b", "c"}


def test_params_and_a_custom_model_fn() -> None:
    from torch import nn

    built: list[tuple[int, int]] = []

    def model_fn(n_features: int, n_outputs: int) -> nn.Module:
        built.append((n_features, n_outputs))
        return nn.Linear(n_features, n_outputs)

    reg = ClipTunedRegressor(model_fn, n_trials=1, epochs=2, search_space="auto")
    assert reg.get_params()["model_fn"] is model_fn and reg.get_params()["search_space"] == "auto"
    assert reg.set_params(epochs=3, random_state=1).epochs == 3
    X, y = regression_data(n=64)
    reg.fit(X, np.hstack([y, 2 * y]))  # two targets: two outputs
    assert set(built) == {(4, 2)} and reg.predict(X).shape == (64, 2)
    with pytest.raises(TypeError, match="'model_fn' parameter of ClipTunedRegressor must be a "
                                        "callable .* Got int instead"):
        ClipTunedRegressor(3).fit(X, y)


def test_a_rows_prediction_does_not_depend_on_its_batch() -> None:
    """What check_methods_subset_invariance asks, at float32's precision (its atol=1e-7 is below
    float32 rounding on some CPUs, hence the expected failure above); dropout proves eval mode."""
    from torch import nn

    def model_fn(n_features: int, n_outputs: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_features, 32), nn.Dropout(0.5), nn.Tanh(),
                             nn.Linear(32, n_outputs))

    X, y = regression_data(n=200)
    reg = ClipTunedRegressor(model_fn, **FAST).fit(X, y.ravel())
    reg.model_.train()  # as a user who trained it further would leave it
    full = reg.predict(X)
    for rows in (slice(0, 1), slice(3, 40), slice(150, 200)):
        np.testing.assert_allclose(reg.predict(X[rows]), full[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reg.predict(X), full)


def test_import_cliptune_does_not_load_sklearn_estimators() -> None:
    code = ("import sys, cliptune; print(sorted(m for m in sys.modules if m in "
            "('cliptune.sklearn', 'sklearn.base', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _GRUHead:
    """model_fn(n_features, n_outputs) for (n, steps, channels) input: a GRU, then a linear head."""

    def __call__(self, n_features: tuple[int, int], n_outputs: int) -> Any:
        from torch import nn

        steps, channels = n_features

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.gru = nn.GRU(channels, 8, batch_first=True)
                self.head = nn.Linear(8, n_outputs)

            def forward(self, x: Any) -> Any:
                return self.head(self.gru(x)[0][:, -1])

        return Net()


def test_three_dimensional_inputs_for_recurrent_models_in_cross_val_score() -> None:
    """(n, steps, channels) X, as a recurrent model takes it: was 'Found array with dim 3'."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6, 2)).astype(np.float32)
    y = (X[:, :, 0].sum(axis=1) > 0).astype(int)
    scores = cross_val_score(ClipTunedClassifier(_GRUHead(), **FAST), X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.6
    regressor = ClipTunedRegressor(_GRUHead(), **FAST).fit(X, X[:, :, 1].sum(axis=1))
    assert regressor.predict(X[:5]).shape == (5,)
    with pytest.raises(ValueError, match="The default MLP of ClipTunedRegressor takes 2-D X; X has "
                                         "3 dimensions"):
        ClipTunedRegressor(**FAST).fit(X, y)
