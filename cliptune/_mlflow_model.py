"""Log a refit model to an MLflow run with its framework's flavor and a signature."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from typing import Any

_FLAVORS = {  # pickle: any module loads back, and no example input is needed
    "torch": ("pytorch", [("torch",)], {"serialization_format": "pickle"}),
    "keras": ("keras", [("keras",), ("tensorflow", "tensorflow-cpu")], {}),
}


def _pins(packages: list[tuple[str, ...]]) -> list[str]:
    """Requirements pinned here, so MLflow does not infer them in a slow subprocess."""
    pins = []
    for candidates in packages:
        for dist in candidates:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                pins.append(f"{dist}=={importlib.metadata.version(dist)}")
                break
    return pins


def log_model(tracking_uri: str, run_id: str, model: Any, framework: str, sample: Any,
              output: Any) -> tuple[str, str]:
    """``mlflow.pytorch``/``mlflow.keras.log_model`` into run ``run_id``; the model URI and flavor.

    The flavors' ``log_model`` needs the fluent API's active run; MLflow's own context manager puts
    the global tracking URI back afterwards.
    """
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    name, packages, extra = _FLAVORS[framework]
    flavor = importlib.import_module(f"mlflow.{name}")
    signature = None if sample is None else infer_signature(sample, output)
    with _use_tracking_uri(tracking_uri), mlflow.start_run(
            run_id=run_id, nested=mlflow.active_run() is not None):
        info = flavor.log_model(model, name="model", signature=signature,
                                pip_requirements=_pins(packages), **extra)
    return info.model_uri, name
