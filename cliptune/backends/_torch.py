"""cliptune's own PyTorch loop: plain supervised training, written on the public ``Trial`` API.

``TorchTask(model_fn, splits, training)`` is a train function like any user's: ``task(trial)``
builds a fresh model, trains it with ``trial.clip_`` after each backward pass and reports
``val_loss`` (and ``val_accuracy`` for the classification losses, and the user's ``metrics``)
each epoch. ``task.check(...)`` is the pass before the study that turns shape, dtype and device
mistakes into one clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cliptune.backends import call_factory, check_shapes

if TYPE_CHECKING:
    from cliptune.data import Splits
    from cliptune.settings import Training
    from cliptune.trial import Trial

_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse": nn.MSELoss,
    "cross_entropy": nn.CrossEntropyLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def build_model(model_fn: Callable[..., Any], extras: dict[str, Any],
                model: Any = None) -> nn.Module:
    """Call the factory (with the extras when it takes an argument), or take a ``model`` it has
    just returned, and check it."""
    if model is None:
        model = call_factory(model_fn, extras)
    if not isinstance(model, nn.Module):
        raise TypeError("model_fn must return a torch.nn.Module (or a Keras model). "
                        f"Got {type(model).__name__} instead.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"The model returned by model_fn ({type(model).__name__}) has no "
                         "trainable parameters; there is nothing to clip or tune.")
    return model


def make_loss(loss: str | Callable[..., Any] | None) -> Callable[..., torch.Tensor]:
    """The loss module for a name (checked by the settings), a callable as it is."""
    if loss is None:
        return nn.MSELoss()
    return loss if callable(loss) else _LOSSES[loss]()


def make_optimizer(optimizer: str | Callable[..., Any], params: list[nn.Parameter],
                   lr: float, extras: dict[str, Any]) -> torch.optim.Optimizer:
    if callable(optimizer):
        opt = optimizer(params, lr)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("An optimizer callable must return a torch.optim.Optimizer. "
                            f"Got {type(opt).__name__} instead.")
        return opt
    kwargs = {k: extras[k] for k in ("momentum", "weight_decay") if k in extras}
    return _OPTIMIZERS[optimizer](params, lr=lr, **kwargs)


def _tensors(pair: tuple[np.ndarray, np.ndarray], loss: str | Callable[..., Any] | None,
             device: str) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = pair
    x_t = torch.as_tensor(X, dtype=torch.float32 if X.dtype.kind == "f" else torch.long)
    y_dtype = torch.long if loss == "cross_entropy" else torch.float32
    if callable(loss) and y.dtype.kind in "iub":
        y_dtype = torch.long
    return x_t.to(device), torch.as_tensor(y, dtype=y_dtype).to(device)


def batches(data: Any, batch_size: int, device: str, shuffle: bool,
            generator: torch.Generator | None) -> Iterator[tuple[Any, Any]]:
    """Mini-batches: index slices of in-memory tensors, or whatever a DataLoader yields."""
    if isinstance(data, tuple):
        X, y = data
        n = len(X)
        if not shuffle:
            for start in range(0, n, batch_size):
                yield X[start:start + batch_size], y[start:start + batch_size]
            return
        order = torch.randperm(n, generator=generator, device="cpu")
        if X.device.type != "cpu":
            order = order.to(X.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield X[idx], y[idx]
        return
    loader = data
    if not isinstance(data, torch.utils.data.DataLoader):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                                             generator=generator)
    for xb, yb in loader:
        yield xb.to(device), yb.to(device)


def _correct(loss: Any, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Correct predictions in a batch, for the classification losses."""
    if loss == "cross_entropy":
        return (out.argmax(dim=1) == y).sum()
    if loss == "bce_with_logits":
        return ((out > 0) == (y > 0.5)).all(dim=-1).sum() if out.ndim > 1 else \
            ((out > 0) == (y > 0.5)).sum()
    return None


@dataclass
class TorchTask:
    """Train one trial of ``tune(model_fn, data)`` on torch: a train function for the runner."""

    model_fn: Callable[..., Any]
    splits: Splits
    training: Training
    threads: int | None = None
    name: str = "torch"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def with_splits(self, splits: Splits) -> TorchTask:
        return replace(self, splits=splits)

    def _data(self) -> tuple[Any, Any]:
        """The splits as device tensors (once per process), or the user's datasets."""
        if not self.splits.is_arrays:
            return self.splits.train, self.splits.val
        cache = self.__dict__.get("_cache")
        if cache is None:
            t = self.training
            cache = self.__dict__["_cache"] = (_tensors(self.splits.train, t.loss, t.device),
                                               _tensors(self.splits.val, t.loss, t.device))
        return cache

    def check(self, extras: dict[str, Any], model: Any = None) -> None:
        """One forward/backward pass on one batch, turning framework errors into clear ones."""
        t = self.training
        _check_device(t.device)
        model = build_model(self.model_fn, extras, model).to(t.device)
        loss_fn = make_loss(t.loss)
        make_optimizer(t.optimizer, list(model.parameters()), t.lr, extras)
        train, _ = self._data()
        xb, yb = next(batches(train, t.batch_size, t.device, shuffle=False, generator=None))
        try:
            out = model(xb)
            check_shapes(t.loss, tuple(out.shape), tuple(yb.shape))
            loss = loss_fn(out, yb)
        except Exception as exc:  # shape and dtype mismatches surface here, before the study
            raise ValueError(
                f"One training batch failed the forward pass or the loss: {exc} "
                f"(inputs of shape {tuple(xb.shape)}, targets of shape {tuple(yb.shape)}). "
                "Check that the model's input and output match the data and the loss."
            ) from exc
        if loss.ndim != 0:
            raise ValueError(f"The loss must return a scalar. Got shape {tuple(loss.shape)}; "
                             "use a reduction such as 'mean'.")
        loss.backward()

    def __call__(self, trial: Trial) -> nn.Module:
        t = self.training
        if self.threads:
            torch.set_num_threads(self.threads)
        generator = None
        if trial.seed is not None:
            torch.manual_seed(trial.seed)
            generator = torch.Generator().manual_seed(trial.seed)
        model = build_model(self.model_fn, trial.extras).to(t.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(t.optimizer, params, trial.extras.get("lr", t.lr), trial.extras)
        loss_fn = make_loss(t.loss)
        train, val = self._data()
        for epoch in range(t.epochs):
            model.train()
            for xb, yb in batches(train, t.batch_size, t.device, True, generator):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                trial.clip_(params, loss)
                optimizer.step()
            trial.report(epoch, **self.evaluate(model, val, loss_fn))
        return model

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any, loss_fn: Callable[..., Any]) -> dict[str, float]:
        """Validation metrics: the mean loss (weighted by batch size), accuracy, the user's."""
        t = self.training
        model.eval()
        total, correct, count = torch.zeros((), device=t.device), None, 0
        outs, ys = [], []
        for xb, yb in batches(data, t.batch_size, t.device, shuffle=False, generator=None):
            out = model(xb)
            total += loss_fn(out, yb).detach().float() * len(xb)
            count += len(xb)
            right = _correct(t.loss, out, yb)
            if right is not None:
                correct = right if correct is None else correct + right
            if t.metrics:
                outs.append(out)
                ys.append(yb)
        metrics = {"val_loss": float(total) / max(count, 1)}
        if correct is not None:
            metrics["val_accuracy"] = float(correct) / max(count, 1)
        if t.metrics:
            out, y = torch.cat(outs), torch.cat(ys)
            metrics.update({f"val_{name}": float(fn(out, y)) for name, fn in t.metrics.items()})
        return metrics

    def predict(self, model: nn.Module, X: np.ndarray) -> np.ndarray:
        from cliptune.backends._torch_tools import predict

        return predict(model, X)

    def sample_inputs(self, data: Any, n: int = 5) -> np.ndarray | None:
        from cliptune.backends._torch_tools import sample_inputs

        return sample_inputs(data, n)


def _check_device(device: str) -> None:
    """A device torch knows and this machine has, before any work."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError("The 'device' parameter of tune must be a torch device such as 'cpu', "
                         f"'cuda' or 'cuda:1'. Got {device!r} instead.") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if kind in available and not available[kind]():
        raise ValueError(f"device={device!r} was asked for, but this torch ({torch.__version__}) "
                         f"has no {kind} device here. Use device='cpu'.")
