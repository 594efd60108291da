"""``Trial``: the handle a training loop holds for one trial of a study.

Every trial goes through one: ``tune_loop`` hands it to the user's ``train(trial)``, the built-in
loops of ``tune`` are ordinary clients of it, and the integrations (Lightning, Transformers, Keras
``fit``) call it from their callbacks. It knows no framework until a clip is asked for: the torch
and TensorFlow parts load on first use (``cliptune.backends._torch_trial``, ``_keras_trial``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cliptune._errors import UsageError
from cliptune._probe_record import add_step
from cliptune.config import ClipConfig
from cliptune.monitor import TrialMonitor

if TYPE_CHECKING:
    import optuna


class ProbeDone(Exception):
    """Raised in a probe trial when it has seen enough steps (or an epoch): the probe is over."""


class PlainReporter:
    """A reporter that is not an Optuna trial (a refit, a probe): it keeps attributes, never prunes."""

    def __init__(self) -> None:
        self.user_attrs: dict[str, Any] = {}
        self.values: dict[int, float] = {}

    def report(self, value: float, step: int) -> None:
        self.values[step] = value

    def should_prune(self) -> bool:
        return False

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


class Trial:
    """One trial, as a training loop sees it: its clip, its extras, its seed; it clips and reports.

    Attributes:
        config: The trial's :class:`ClipConfig` (mode and threshold).
        extras: The co-tuned extras of the search space, e.g. ``{"lr": 0.003, "hidden": 64}``.
        number: The trial's number in the study.
        seed: ``seed + number`` when the study is seeded, else None: seed your model with it.
        optuna_trial: The underlying ``optuna.Trial`` (for your own ``suggest_*`` calls), or None
            outside a study (a refit, a probe).

    Example:
        >>> def train(trial: cliptune.Trial) -> None:  # doctest: +SKIP
        ...     torch.manual_seed(trial.seed)
        ...     for epoch in range(5):
        ...         for xb, yb in loader:
        ...             opt.zero_grad(); loss = loss_fn(model(xb), yb); loss.backward()
        ...             trial.clip_(model.parameters(), loss)
        ...             opt.step()
        ...         trial.report(epoch, val_loss=evaluate(model))
    """

    def __init__(self, config: ClipConfig, extras: dict[str, Any], number: int,
                 seed: int | None, monitor: TrialMonitor,
                 optuna_trial: optuna.Trial | None = None,
                 probe: dict[str, Any] | None = None) -> None:
        self.config = config
        self.extras = dict(extras)
        self.number = number
        self.seed = seed
        self.optuna_trial = optuna_trial
        self.monitor = monitor
        self._probe = probe  # a probe: no clip, gradients recorded (see cliptune.probe)
        self._torch: Any = None
        self._keras: Any = None

    def __repr__(self) -> str:
        return f"Trial(number={self.number}, config={self.config!r}, extras={self.extras})"

    @property
    def metric(self) -> str:
        """The reported metric the study optimises (``val_loss`` unless ``metric=`` says)."""
        return self.monitor.metric

    @property
    def is_probe(self) -> bool:
        """Whether this trial is the gradient probe of ``threshold: auto`` (it never clips)."""
        return self._probe is not None

    # -- torch -----------------------------------------------------------------------------

    def clip_(self, parameters: Any, loss: Any = None, *, scaler: Any = None) -> Any:
        """Clip the gradients in place with the trial's clip and record the step (torch).

        Call it after ``loss.backward()`` and before ``optimizer.step()``.

        Args:
            parameters: The model's parameters (an iterable or one tensor), or the optimizer
                (then a ``scaler`` is unscaled through it when the loop has not done so).
            loss: The step's loss (tensor or float) for the stability rules; None when you
                report it with :meth:`step` instead.
            scaler: The ``torch.amp.GradScaler`` of a mixed-precision loop. The clip then acts on
                unscaled gradients (call ``scaler.unscale_(optimizer)`` first, or pass the
                optimizer), and a step the scaler will skip for inf/NaN gradients is counted
                (``skipped_steps``), not clipped and not taken for divergence.

        Returns:
            The pre-clip global L2 norm as a 0-d tensor (as ``clip_grad_norm_`` returns it).
        """
        if self._torch is None:
            from cliptune.backends._torch_trial import TorchClipState

            self._torch = TorchClipState(self.config, probe=self.is_probe)
        norm, ready = self._torch.clip_(parameters, loss, scaler)
        self._record(ready)
        return norm

    # -- TensorFlow / Keras ----------------------------------------------------------------

    def clip(self, grads: list[Any], variables: list[Any] | None = None) -> tuple[Any, Any, Any]:
        """The trial's clip for TensorFlow gradients; usable inside a ``tf.function``.

        Returns ``(clipped_grads, pre-clip global norm, clipped)`` as tensors (``None`` gradients
        stay None). Hand the norm and flag to :meth:`step` with the loss, outside the compiled
        function. ``variables`` (in the order of ``grads``) are needed by ``agc``.
        """
        if self._keras is None:
            from cliptune.backends._keras_trial import KerasClipState

            self._keras = KerasClipState(self.config, probe=self.is_probe)
        return self._keras(grads, variables)

    def keras_optimizer(self, optimizer: Any = "adam", **kwargs: Any) -> Any:
        """A Keras optimizer that applies the trial's clip and records each step's statistics,
        for ``model.fit`` with :class:`cliptune.integrations.keras.ClipTuneCallback`."""
        from cliptune.integrations.keras import trial_optimizer

        return trial_optimizer(self, optimizer, **kwargs)

    # -- any loop --------------------------------------------------------------------------

    def step(self, loss: Any, grad_norm: Any = None, clipped: Any = None, *,
             skipped: bool | None = None) -> None:
        """Record one optimisation step whose clip was applied elsewhere (or by :meth:`clip`).

        Tensors are read here (one host copy). May raise ``optuna.TrialPruned``.
        """
        post = None
        if self._keras is not None:
            if self._keras.probe:
                self._record([(_float(loss), _float(grad_norm), False, None, None,
                               self._keras.probe_values())])
                return
            post = self._keras.post_norm()
        self._record([(_float(loss), _float(grad_norm),
                       None if clipped is None else bool(clipped), skipped, post, None)])

    def report(self, epoch: int, **metrics: Any) -> None:
        """Close an epoch with the loop's metrics (``val_loss=...``, ``bpc=...``, any floats).

        The study's metric must be among them. May raise ``optuna.TrialPruned`` (unstable or
        unpromising), after which the loop must stop.
        """
        if self._torch is not None:
            self._record(self._torch.flush())
        if self._probe is not None:
            raise ProbeDone("an epoch")
        self.monitor.epoch(epoch, {k: float(v) for k, v in metrics.items()})

    def _record(self, ready: Iterable[tuple[Any, ...]]) -> None:
        for loss, norm, clipped, skipped, post, probe_values in ready:
            if self._probe is not None:
                if probe_values is None:
                    raise UsageError(
                        "'threshold: auto' sizes its ranges from the gradients, which this loop "
                        "does not show: call trial.clip_(parameters, loss) (torch) or "
                        "trial.clip(grads, variables) (TensorFlow), or give the modes explicit "
                        "ranges {low: ..., high: ...}.")
                if not add_step(self._probe, [0.0 if loss is None else loss, *probe_values]):
                    raise ProbeDone("a non-finite step")
                if len(self._probe["loss"]) >= self._probe["max_steps"]:
                    self._probe["stopped"] = "max_steps"
                    raise ProbeDone("max_steps")
                continue
            self.monitor.step(loss, norm, clipped, skipped, post)

    @property
    def history(self) -> list[dict[str, float]]:
        """The statistics of each epoch reported so far (what MLflow records)."""
        return self.monitor.history


__all__ = ["PlainReporter", "ProbeDone", "Trial"]
