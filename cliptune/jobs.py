"""Job files: one YAML with everything a tuning job needs, checked before anything runs.

A job file trains either cliptune's own loop (``model`` and ``data``) or the user's (``train``)::

    model: examples.adding_rnn:make_model    # module:attribute, imported from the job's folder or cwd
    data: examples.adding_rnn:make_data      # a callable returning what tune() accepts, or the data
    # train: examples.char_lstm:train        # instead of model/data: your train(trial), tune_loop
    loss: mse
    optimizer: {name: sgd, lr: 0.3}
    epochs: 8
    search_space: rnn                        # a shipped name or a path relative to the job file
    n_trials: 20                             # the study's total: a rerun only adds what is missing
    seed: 0
    study: {name: adding-rnn, storage: null} # null: sqlite:///mlruns/cliptune-optuna.db (resumable)
    tracking: {uri: null, experiment: adding-rnn, enabled: true}

The keys and their constraints are those of :mod:`cliptune.settings` (``optimizer.lr`` is
``lr``, ``study.name`` is ``study_name``, ``workers`` is ``n_jobs``, ...). Every problem is a
:class:`JobError` of one line naming the file and the key.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from cliptune import _checks
from cliptune import storage as _storage
from cliptune._errors import did_you_mean
from cliptune.settings import BUILT_IN, job_keys

DEFAULT_STORAGE = "sqlite:///mlruns/cliptune-optuna.db"
_REFERENCES = ("model", "data", "train")
_REFERENCE = re.compile(r"^[\w.]+:[\w.]+$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class JobError(ValueError):
    """A bad job file or option; the message is one line naming the file and the key."""


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


def _flatten(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The file's keys as dotted names (``optimizer.lr``), each known; sections must be mappings."""
    keys = job_keys()
    sections: dict[str, list[str]] = {}
    for dotted in keys:
        if "." in dotted:
            head, _, tail = dotted.partition(".")
            sections.setdefault(head, []).append(tail)
    top = [*_REFERENCES, *(k for k in keys if "." not in k), *sections]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in sections:
            if not isinstance(value, Mapping):
                raise JobError(f"{source}: {key}: expected a mapping of "
                               f"{', '.join(map(repr, sections[key]))}, got {value!r}.")
            for sub, sub_value in value.items():
                if sub not in sections[key]:
                    raise JobError(f"{source}: {key}.{sub}: unknown key {sub!r}; expected one of "
                                   f"{', '.join(map(repr, sections[key]))}."
                                   f"{did_you_mean(str(sub), sections[key])}")
                out[f"{key}.{sub}"] = sub_value
        elif key in top:
            out[key] = value
        else:
            raise JobError(f"{source}: {key}: unknown key {key!r}; expected one of "
                           f"{', '.join(map(repr, top))}.{did_you_mean(key, top)}")
    return out


def _value(dotted: str, f: Any, value: Any, source: str, folder: Path) -> Any:
    """One job value through its setting's constraint; a one-line error naming the key."""
    check = f.metadata["check"]
    if isinstance(value, str) and getattr(check, "number", False) and _NUMBER.match(value):
        value = float(value)  # YAML 1.1 reads 1e-3 as text
    if f.name in ("loss", "optimizer") and isinstance(value, str) and ":" in value:
        return value  # a reference, imported (and checked) when the job runs
    if f.name == "search_space" and isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else folder / value
        if path.exists() or value.endswith((".yaml", ".yml")):
            value = str(path)
    try:
        return check(value)
    except _checks.Invalid as exc:
        raise JobError(f"{source}: {dotted}: expected {exc.expected}, got "
                       f"{_checks.describe(value)}.{exc.hint}") from None
    except (ValueError, TypeError) as exc:
        raise JobError(f"{source}: {dotted}: {exc}") from None


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


@dataclass
class Job:
    """A checked job file: its settings by name, its references, the study it belongs to."""

    path: Path
    values: dict[str, Any]  # setting name -> checked value (only the keys the file sets)
    references: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Job:
        """Read, override and check the job file; a :class:`JobError` for the first problem."""
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
        source, folder, keys = path.name, path.resolve().parent, job_keys()
        flat = _flatten(raw, source)
        references = {k: flat.pop(k) for k in _REFERENCES if k in flat}
        for key, ref in references.items():
            if not isinstance(ref, str) or not _REFERENCE.match(ref):
                raise JobError(f"{source}: {key}: expected 'module:attribute', got {ref!r}.")
        _check_kind(source, references, flat, keys)
        values = {keys[k].name: _value(k, keys[k], v, source, folder) for k, v in flat.items()}
        return cls(path, values, references)

    @property
    def source(self) -> str:
        return self.path.name

    @property
    def own_loop(self) -> bool:
        """Whether the job trains the user's ``train`` function (``tune_loop``)."""
        return "train" in self.references

    @property
    def study_name(self) -> str:
        return self.values.get("study_name") or self.path.stem

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def heartbeat(self) -> _storage.Heartbeat | None:
        return self.values.get("heartbeat", _storage.Heartbeat())

    def _import(self, key: str, reference: str) -> Any:
        return import_reference(reference, f"{self.source}: {key}", self.path.resolve().parent)

    def arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional arguments and settings of ``tune``/``tune_loop``; imports the references
        and builds the data."""
        kwargs = {**self.values, "study_name": self.study_name}
        for name in ("loss", "optimizer"):
            value = kwargs.get(name)
            if isinstance(value, str) and ":" in value:
                key = "optimizer.name" if name == "optimizer" else name
                kwargs[name] = self._import(key, value)
        if self.own_loop:
            return (self._callable("train"),), kwargs
        data = self._import("data", self.references["data"])
        if callable(data):
            try:
                data = data()
            except Exception as exc:
                raise JobError(f"{self.source}: data: {self.references['data']} raised "
                               f"{type(exc).__name__}: {exc}") from None
        return (self._callable("model"), data), kwargs

    def _callable(self, key: str) -> Any:
        obj = self._import(key, self.references[key])
        if not callable(obj):
            raise JobError(f"{self.source}: {key}: {self.references[key]!r} must be callable. "
                           f"Got {type(obj).__name__} instead.")
        return obj


def _check_kind(source: str, references: dict[str, str], flat: dict[str, Any],
                keys: dict[str, Any]) -> None:
    """``model`` and ``data``, or ``train``: one or the other, and no built-in-loop keys with
    ``train``."""
    if "train" in references:
        both = [k for k in ("model", "data") if k in references]
        if both:
            raise JobError(f"{source}: {both[0]}: a job gives either train (your own loop) or "
                           "model and data (cliptune's loop), not both.")
        built_in = [k for k in flat if keys[k].metadata["takes"] <= BUILT_IN]
        if built_in:
            raise JobError(f"{source}: {built_in[0]}: this key sets cliptune's own loop; with "
                           "train: your loop sets it itself.")
        return
    for key in ("model", "data"):
        if key not in references:
            hint = " (or train: module:function for your own loop)" if key == "model" else ""
            raise JobError(f"{source}: {key}: this key is required{hint}.")


def storage_url(job: Job) -> str:
    """The job's Optuna storage URL (by default a SQLite file under ./mlruns)."""
    url = job.get("storage")
    return DEFAULT_STORAGE if url is None else url


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


__all__ = ["DEFAULT_STORAGE", "Job", "JobError", "import_reference", "load_study",
           "open_storage", "storage_url"]
