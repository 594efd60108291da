"""Job files: one YAML with everything a tuning job needs, validated before anything runs.

A job file (every key but ``model`` and ``data`` is optional)::

    model: examples.adding_rnn:make_model    # module:attribute, imported from the job's folder or cwd
    data: examples.adding_rnn:make_data      # a callable returning what tune() accepts, or the data
    loss: mse
    optimizer: {name: sgd, lr: 0.3}
    epochs: 8
    batch_size: 32
    search_space: rnn                        # a shipped name or a path relative to the job file
    n_trials: 20                             # the study's total: a rerun only adds what is missing
    timeout: null
    seed: 0
    study: {name: adding-rnn, storage: null} # null: sqlite:///mlruns/cliptune-optuna.db (resumable)
                                             # heartbeat: {interval: 10, grace_period: 30} seconds
    tracking: {uri: null, experiment: adding-rnn, enabled: true}
    refit: false                             # true: train the best config on all the data and
                                             # log the model to the MLflow parent run
    probe_steps: 200                         # most steps of the probe for `threshold: auto`

Every problem is a :class:`JobError` of one line naming the file and the key.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cliptune import storage as _storage
from cliptune._errors import did_you_mean
from cliptune.space import SearchSpace, shipped_spaces

DEFAULT_STORAGE = "sqlite:///mlruns/cliptune-optuna.db"


class JobError(ValueError):
    """A bad job file or option; the message is one line naming the file and the key."""


def _no_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


# Floats are lax so that YAML's ``1e-3`` (read as a string by YAML 1.1) still parses; the rest strict.
PositiveFloat = Annotated[float, Field(gt=0, strict=False), BeforeValidator(_no_bool)]
PositiveInt = Annotated[int, Field(gt=0)]
Reference = Annotated[str, Field(pattern=r"^[\w.]+:[\w.]+$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OptimizerSpec(_Section):
    name: str = "sgd"
    lr: PositiveFloat = 0.01


class HeartbeatSpec(_Section):
    interval: PositiveInt = 10
    grace_period: PositiveInt = 30


class StudySpec(_Section):
    name: str | None = None
    storage: str | None = None
    heartbeat: HeartbeatSpec = HeartbeatSpec()


class TrackingSpec(_Section):
    enabled: bool = True
    uri: str | None = None
    experiment: str = "cliptune"


class JobSpec(_Section):
    """The schema of a job file; defaults are those of :func:`cliptune.tune`."""

    model: Reference
    data: Reference
    loss: str | None = None  # None: "mse", or a compiled Keras model's own loss
    optimizer: OptimizerSpec = OptimizerSpec()
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    search_space: str = "default"
    n_trials: PositiveInt = 20
    timeout: PositiveFloat | None = None
    seed: int | None = None
    metric: Literal["val_loss", "train_loss"] = "val_loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    objective: Literal["last", "best"] = "last"
    val_fraction: Annotated[float, Field(gt=0, lt=1, strict=False)] = 0.2
    device: str = "cpu"
    study: StudySpec = StudySpec()
    tracking: TrackingSpec = TrackingSpec()
    refit: bool = False
    probe_steps: PositiveInt = 200


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section at ``loc`` (for 'did you mean')."""
    model: type[BaseModel] = JobSpec
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _error_line(source: str, error: Any) -> str:
    """One pydantic error as one line: ``job.yaml: optimizer.lr: expected ..., got ...``."""
    loc = tuple(error["loc"])
    key = ".".join(map(str, loc))
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return (f"{source}: {key}: unknown key {loc[-1]!r}; expected one of "
                f"{', '.join(map(repr, allowed))}.{did_you_mean(str(loc[-1]), allowed)}")
    if error["type"] == "missing":
        return f"{source}: {key}: this key is required."
    if error["type"] == "string_pattern_mismatch":
        return f"{source}: {key}: expected 'module:attribute', got {error['input']!r}."
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}
    if error["type"] in bounds:
        limit = next(iter(error["ctx"].values()))
        return f"{source}: {key}: expected a number {bounds[error['type']]} {limit}, got {error['input']!r}."
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    if "got " not in message:
        message += f", got {error['input']!r}"
    return f"{source}: {key}: {message}."


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply an override like ``optimizer.lr=0.1`` to the parsed file."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise JobError(f"--set {dotted}: {part!r} is not a section.")
        node = child
    node[last] = value


def read_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read, override and validate a job file; a :class:`JobError` for the first problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JobError(f"Cannot read job file {str(path)!r}: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        raise JobError(f"{path.name}: not valid YAML ({' '.join(str(exc).split())}).") from None
    if not isinstance(raw, dict):
        raise JobError(f"{path.name}: expected a mapping of job keys, got {type(raw).__name__}.")
    for dotted, value in (overrides or {}).items():
        _set(raw, dotted, value)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise JobError("\n".join(_error_line(path.name, e) for e in exc.errors())) from None


def import_reference(reference: str, where: str, folder: Path | None = None) -> Any:
    """Import ``module:attr`` with the job's folder and the cwd on ``sys.path``."""
    for entry in (os.getcwd(), os.fspath(folder) if folder else None):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise JobError(f"{where}: cannot import module {module_name!r} (searched the job's "
                           f"folder, the working folder and sys.path).") from None
        raise JobError(f"{where}: importing {module_name!r} failed: {exc}.") from None
    except Exception as exc:
        raise JobError(f"{where}: importing {module_name!r} raised {type(exc).__name__}: {exc}") \
            from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise JobError(f"{where}: {module_name!r} has no attribute {attr!r}."
                           f"{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    return obj


def storage_url(spec: JobSpec) -> str:
    """The job's Optuna storage URL (by default a SQLite file under ./mlruns)."""
    return DEFAULT_STORAGE if spec.study.storage is None else spec.study.storage


def open_storage(url: str, where: str, must_exist: bool = False,
                 heartbeat: _storage.Heartbeat | None = None) -> optuna.storages.BaseStorage:
    """Open (for ``tune``, create) the job's Optuna storage; a bad URL is a :class:`JobError`.

    ``must_exist`` is for reading commands: a SQLite file that is not there is an error rather
    than a new, empty database.
    """
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        database = Path(url.removeprefix("sqlite:///"))
        if must_exist and not database.exists():
            raise JobError(f"{where}: no Optuna database at {str(database)!r}; run "
                           "`cliptune tune JOB.yaml` first.")
        if url == DEFAULT_STORAGE:
            database.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = _storage.open_storage(url, None if must_exist else heartbeat)
    except (ValueError, TypeError) as exc:
        raise JobError(f"{where}: {exc}") from None
    return storage  # type: ignore[return-value]  # never None for a URL


def load_study(storage: optuna.storages.BaseStorage, name: str, where: str) -> optuna.Study:
    """An existing study, or a :class:`JobError` naming the studies that are there."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        there = ", ".join(map(repr, names)) if names else "none"
        raise JobError(f"{where}: no study {name!r} in this storage; studies there: {there}."
                       f"{did_you_mean(name, names)}") from None


def resolve_space(value: str, folder: Path, where: str) -> SearchSpace:
    """A shipped name, or a YAML path relative to the job file."""
    try:
        if value in shipped_spaces() and not value.endswith((".yaml", ".yml")):
            return SearchSpace.shipped(value)
        path = Path(value) if Path(value).is_absolute() else folder / value
        if not path.exists() and not value.endswith((".yaml", ".yml")):
            return SearchSpace.shipped(value)  # an unknown name: the 'did you mean' error
        return SearchSpace.from_yaml(path)
    except (ValueError, TypeError) as exc:
        raise JobError(f"{where}: {exc}") from None


@dataclass
class Job:
    """A validated job file, with the study it belongs to."""

    path: Path
    spec: JobSpec

    @classmethod
    def load(cls, path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Job:
        """Read and validate the job; the search space is checked too (it is cheap)."""
        job = cls(Path(path), read_spec(path, overrides))
        job.search_space()
        return job

    @property
    def source(self) -> str:
        return self.path.name

    @property
    def study_name(self) -> str:
        return self.spec.study.name or self.path.stem

    def heartbeat(self) -> _storage.Heartbeat:
        """The study's heartbeat (how soon a dead worker's trial is retried)."""
        beat = self.spec.study.heartbeat
        try:
            return _storage.Heartbeat(beat.interval, beat.grace_period)
        except ValueError as exc:
            raise JobError(f"{self.source}: study.heartbeat: {exc}") from None

    def search_space(self) -> SearchSpace:
        return resolve_space(self.spec.search_space, self.path.resolve().parent,
                             f"{self.source}: search_space")

    def _import(self, key: str, reference: str) -> Any:
        return import_reference(reference, f"{self.source}: {key}", self.path.resolve().parent)

    def tune_kwargs(self) -> dict[str, Any]:
        """Everything :func:`cliptune.tune` needs; imports the model and builds the data."""
        spec = self.spec
        model_fn = self._import("model", spec.model)
        if not callable(model_fn):
            raise JobError(f"{self.source}: model: {spec.model!r} must be a callable returning a "
                           f"fresh model. Got {type(model_fn).__name__} instead.")
        data = self._import("data", spec.data)
        if callable(data):
            try:
                data = data()
            except Exception as exc:
                raise JobError(f"{self.source}: data: {spec.data} raised "
                               f"{type(exc).__name__}: {exc}") from None
        loss: Any = spec.loss
        if loss is not None and ":" in loss:
            loss = self._import("loss", loss)
        name = spec.optimizer.name
        optimizer: Any = self._import("optimizer.name", name) if ":" in name else name
        return dict(model_fn=model_fn, data=data, loss=loss, optimizer=optimizer,
                    lr=spec.optimizer.lr, epochs=spec.epochs, batch_size=spec.batch_size,
                    search_space=self.search_space(), n_trials=spec.n_trials,
                    timeout=spec.timeout, seed=spec.seed, metric=spec.metric,
                    direction=spec.direction, objective=spec.objective,
                    val_fraction=spec.val_fraction, device=spec.device,
                    study_name=self.study_name, refit=spec.refit, probe_steps=spec.probe_steps)


__all__ = ["DEFAULT_STORAGE", "Job", "JobError", "JobSpec", "import_reference", "load_study",
           "open_storage", "read_spec", "storage_url"]
