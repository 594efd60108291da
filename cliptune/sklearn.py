"""scikit-learn estimators that tune gradient clipping, then refit: ``fit`` runs :func:`cliptune.tune`.

``ClipTunedRegressor`` and ``ClipTunedClassifier`` search the clip (and any extras of the search
space) on a validation split of the data given to ``fit``, then train the best config on all of it
(``tune(refit=True)``); ``predict``, ``predict_proba`` and ``score`` use that refit model.

The model factory: ``model_fn(n_features, n_outputs)`` returns a fresh ``torch.nn.Module`` or Keras
model mapping ``(batch, n_features)`` inputs to ``(batch, n_outputs)`` outputs (for n-d ``X``,
such as ``(n, steps, channels)`` for a recurrent model, ``n_features`` is ``X.shape[1:]``): the regressor's
outputs are its targets (one per column of ``y``), the classifier's are logits, one per class
(trained with ``cross_entropy``). ``model_fn=None`` builds a small torch MLP (``n_features ->
hidden_units -> ReLU -> n_outputs``). The factory must be picklable for ``n_jobs > 1`` in
``tune_params`` and for pickling the estimator (a module-level function is).

Import it as ``cliptune.sklearn`` (``import cliptune`` does not load scikit-learn or a framework).

Example:
    >>> from cliptune.sklearn import ClipTunedRegressor
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> model = make_pipeline(StandardScaler(), ClipTunedRegressor(n_trials=5, random_state=0))
    >>> model.fit(X, y).score(X, y)  # doctest: +SKIP
    0.97
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from cliptune.backends import framework_of
from cliptune.plan import plan_tune
from cliptune.settings import Settings, by_name
from cliptune.tuner import run

# The settings of tune() an estimator takes, with the defaults it gives them (the constraints and
# docs are the settings' own); then the estimator's own parameters.
_TUNE_DEFAULTS = {"loss": None, "optimizer": "adam", "lr": 0.01, "epochs": 20, "batch_size": 32,
                  "search_space": "default", "n_trials": 10, "val_fraction": 0.2,
                  "tracking": False, "tracking_uri": None, "experiment": "cliptune"}
_OWN_DEFAULTS = {"hidden_units": 32, "random_state": None, "tune_params": None}


def default_mlp(n_features: int, n_outputs: int, hidden_units: int = 32) -> Any:
    """The model used when ``model_fn`` is None: a one-hidden-layer torch MLP."""
    from torch import nn

    return nn.Sequential(nn.Linear(n_features, hidden_units), nn.ReLU(),
                         nn.Linear(hidden_units, n_outputs))


def _signature() -> inspect.Signature:
    declared = by_name()
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("model_fn", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=declared[name].type)
               for name, default in _TUNE_DEFAULTS.items()]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
               for name, default in _OWN_DEFAULTS.items()]
    return inspect.Signature(params)


class _ClipTuned(BaseEstimator):
    """What the regressor and the classifier share: tuning, refitting and the forward pass."""

    def __init__(self, model_fn: Callable[..., Any] | None = None, **params: Any) -> None:
        self.model_fn = model_fn
        for name, default in {**_TUNE_DEFAULTS, **_OWN_DEFAULTS}.items():
            setattr(self, name, params.pop(name, default))
        if params:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                            f"{next(iter(params))!r}.")

    __init__.__signature__ = _signature()  # type: ignore[attr-defined]  # what get_params reads

    def _model_fn(self, X: np.ndarray, n_outputs: int) -> Callable[..., Any]:
        features = X.shape[1] if X.ndim == 2 else tuple(X.shape[1:])
        factory = self.model_fn
        if factory is None:
            if X.ndim != 2:
                raise ValueError(f"The default MLP of {type(self).__name__} takes 2-D X; X has "
                                 f"{X.ndim} dimensions. Pass a model_fn(n_features, n_outputs) "
                                 "(n_features is then X.shape[1:]).")
            return functools.partial(default_mlp, features, n_outputs, self.hidden_units)
        if callable(factory):
            return functools.partial(factory, features, n_outputs)
        raise TypeError(f"The 'model_fn' parameter of {type(self).__name__} must be a callable "
                        f"(n_features, n_outputs) -> model, or None. Got "
                        f"{type(factory).__name__} instead.")

    def _fit(self, X: np.ndarray, y: np.ndarray, loss: str | Callable[..., Any],
             n_outputs: int) -> None:
        if len(X) < 2:
            raise ValueError(f"{type(self).__name__}.fit needs at least 2 samples (some for "
                             f"validation); got {len(X)} sample.")
        seed = None if self.random_state is None else int(
            check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        kwargs = {name: getattr(self, name) for name in _TUNE_DEFAULTS}
        kwargs.update(loss=loss, seed=seed, show_progress=False, refit=True,
                      **(self.tune_params or {}))
        settings = Settings.from_kwargs("tune", kwargs, owner=type(self).__name__)
        result = run(plan_tune(self._model_fn(X, n_outputs), (X, y), settings))
        if result.model is None:
            raise RuntimeError(f"No trial of {type(self).__name__}.fit completed "
                               f"({result.n_pruned} pruned, {result.n_failed} failed), so no "
                               "model was refit. Lower lr, or give more trials or epochs.")
        self.model_ = result.model
        self.framework_ = framework_of(result.model)
        self.best_config_ = result.best_config
        self.best_params_ = result.best_params
        self.best_value_ = result.best_value
        self.trials_ = result.trials_dataframe()

    def _forward(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float32, allow_nd=True)
        X = X if X.flags.writeable else X.copy()
        if self.framework_ == "torch":
            from cliptune.backends._torch_tools import predict
        else:
            from cliptune.backends._keras_tools import predict
        return predict(self.model_, X)


class ClipTunedRegressor(RegressorMixin, _ClipTuned):
    """A regressor whose gradient clipping is tuned by cliptune, then refit on all the data.

    Args:
        model_fn: ``model_fn(n_features, n_outputs)`` returning a fresh torch or Keras model, or
            None for a small torch MLP (see the module docstring).
        loss: As in :func:`cliptune.tune`; None means ``"mse"``.
        optimizer, lr, epochs, batch_size, search_space, n_trials, val_fraction: Passed to
            :func:`cliptune.tune`.
        hidden_units: Width of the default MLP (unused with a ``model_fn``).
        random_state: Seeds the split, the sampler and training (an int, a RandomState or None).
        tracking, tracking_uri, experiment: MLflow tracking as in :func:`cliptune.tune` (off).
        tune_params: More :func:`cliptune.tune` arguments (e.g. ``{"storage": ...}``).

    Attributes:
        model_: The refit model. best_config_, best_params_, best_value_: what tuning found.
        trials_: One row a trial (:meth:`TuneResult.trials_dataframe`).
    """

    def fit(self, X: Any, y: Any) -> ClipTunedRegressor:
        """Tune the clip on a validation split of (X, y), then refit the best on all of it."""
        X, y = validate_data(self, X, y, dtype=np.float32, multi_output=True, y_numeric=True,
                             allow_nd=True)
        self._y_1d = y.ndim == 1
        Y = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
        self._fit(X, Y, self.loss or "mse", Y.shape[1])
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predictions of the refit model (float64; 1-D when ``y`` was 1-D)."""
        out = self._forward(X).astype(np.float64)
        return out.ravel() if self._y_1d else out

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.non_deterministic = self.random_state is None
        return tags


class ClipTunedClassifier(ClassifierMixin, _ClipTuned):
    """A classifier whose gradient clipping is tuned by cliptune, then refit on all the data.

    The model outputs one logit per class (``model_fn(n_features, n_classes)``), trained with
    ``cross_entropy``; labels of any type are encoded and decoded (``classes_``). The arguments
    are those of :class:`ClipTunedRegressor`; ``loss=None`` means ``"cross_entropy"``.
    """

    def fit(self, X: Any, y: Any) -> ClipTunedClassifier:
        """Tune the clip on a validation split of (X, y), then refit the best on all of it."""
        X, y = validate_data(self, X, y, dtype=np.float32, allow_nd=True)
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        self._fit(X, encoder.transform(y).astype(np.int64), self.loss or "cross_entropy",
                  len(self.classes_))
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities: the softmax of the refit model's logits (columns in ``classes_``)."""
        logits = self._forward(X).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        logits = self._forward(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(logits, axis=1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags


__all__ = ["ClipTunedClassifier", "ClipTunedRegressor", "default_mlp"]
