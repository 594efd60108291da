"""Turn what the user passes as ``data`` into a train and a validation split.

Accepted forms:

- ``(X, y)`` arrays: split with scikit-learn's ``train_test_split`` (``val_fraction``, seeded);
- ``((X_train, y_train), (X_val, y_val))`` or ``{"train": (X, y), "val": (X, y)}``;
- a pair (or ``{"train", "val"}`` dict) of framework datasets: torch ``Dataset``/``DataLoader``,
  ``tf.data.Dataset``; these pass through to the backend as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Splits:
    """Training and validation data: ``(X, y)`` numpy pairs, or framework datasets."""

    train: Any
    val: Any

    @property
    def is_arrays(self) -> bool:
        return isinstance(self.train, tuple)

    def merged(self) -> Any:
        """Train and validation arrays together (for a refit); arrays only."""
        if not self.is_arrays:
            raise ValueError("Merging train and validation data needs (X, y) arrays.")
        return tuple(np.concatenate([a, b]) for a, b in zip(self.train, self.val, strict=True))


def _is_array(obj: object) -> bool:
    return hasattr(obj, "shape") and hasattr(obj, "__len__") or isinstance(obj, list)


def _is_dataset(obj: object) -> bool:
    """Framework datasets, recognised by duck typing so no framework is imported."""
    if _is_array(obj) or isinstance(obj, (tuple, dict, str, bytes)):
        return False
    return hasattr(obj, "__iter__") or hasattr(obj, "__getitem__")


def _as_pair(obj: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2
            and _is_array(obj[0]) and _is_array(obj[1])):
        raise ValueError(f"{where} must be an (X, y) pair of arrays. Got {_describe(obj)} instead.")
    X, y = (_to_numpy(a, f"{where}[{i}]") for i, a in enumerate(obj))
    if len(X) != len(y):
        raise ValueError(f"{where}: X and y must have the same length. Got {len(X)} samples in X "
                         f"and {len(y)} in y.")
    if len(X) == 0:
        raise ValueError(f"{where}: X and y are empty; at least one sample is needed.")
    return X, y


def _to_numpy(a: Any, where: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim == 0:
        raise ValueError(f"{where} must have at least one dimension (one row per sample). "
                         f"Got a scalar instead.")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{where} must be numeric. Got dtype {arr.dtype} instead.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise ValueError(f"{where} contains {bad} NaN or infinite values; clean the data first.")
    return arr


def _describe(obj: object) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return type(obj).__name__


def make_splits(data: Any, val_fraction: float = 0.2, seed: int | None = None) -> Splits:
    """Validate ``data`` and return its :class:`Splits` (see the module docstring)."""
    if not (isinstance(val_fraction, float) and 0.0 < val_fraction < 1.0):
        raise ValueError("The 'val_fraction' parameter of tune must be a float in (0, 1). "
                         f"Got {val_fraction!r} instead.")
    if isinstance(data, dict):
        if set(data) != {"train", "val"}:
            raise ValueError("data as a dict must have exactly the keys 'train' and 'val'. "
                             f"Got {sorted(map(str, data))} instead.")
        return _pair_of_splits(data["train"], data["val"])
    if isinstance(data, (tuple, list)) and len(data) == 2:
        first, second = data
        if _is_array(first) and _is_array(second):
            from sklearn.model_selection import train_test_split

            X, y = _as_pair(data, "data")
            if len(X) < 2:
                raise ValueError("data needs at least 2 samples to split off a validation set.")
            X_tr, X_val, y_tr, y_val = train_test_split(X, y, test_size=val_fraction,
                                                        random_state=seed)
            return Splits((X_tr, y_tr), (X_val, y_val))
        return _pair_of_splits(first, second)
    raise ValueError("data must be (X, y) arrays, ((X_train, y_train), (X_val, y_val)), "
                     "{'train': ..., 'val': ...} or a pair of datasets. "
                     f"Got {_describe(data)} instead.")


def _pair_of_splits(train: Any, val: Any) -> Splits:
    if _is_dataset(train) and _is_dataset(val):
        return Splits(train, val)
    return Splits(_as_pair(train, "data train split"), _as_pair(val, "data val split"))
