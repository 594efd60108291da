"""PyTorch backend: train one trial, apply the clip, tell the monitor; nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cliptune._errors import unknown_name
from cliptune.backends import call_factory
from cliptune.backends._torch_adaptive import Clipper

if TYPE_CHECKING:
    from cliptune.backends import TrainSettings
    from cliptune.config import ClipConfig
    from cliptune.data import Splits
    from cliptune.stability import TrialMonitor

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
_SYNC_EVERY = 16  # steps between reads of the step statistics off an accelerator


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
    if loss is None:
        return nn.MSELoss()
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise unknown_name("loss", loss, _LOSSES)
    return _LOSSES[loss]()


def make_optimizer(optimizer: str | Callable[..., Any], params: list[nn.Parameter],
                   lr: float, extras: dict[str, Any]) -> torch.optim.Optimizer:
    if callable(optimizer):
        opt = optimizer(params, lr)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("An optimizer callable must return a torch.optim.Optimizer. "
                            f"Got {type(opt).__name__} instead.")
        return opt
    if optimizer not in _OPTIMIZERS:
        raise unknown_name("optimizer", optimizer, _OPTIMIZERS)
    kwargs = {k: extras[k] for k in ("momentum", "weight_decay") if k in extras}
    return _OPTIMIZERS[optimizer](params, lr=lr, **kwargs)


def _tensors(pair: tuple[np.ndarray, np.ndarray], loss: str | Callable[..., Any],
             device: str) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = pair
    x_t = torch.as_tensor(X, dtype=torch.float32 if X.dtype.kind == "f" else torch.long)
    y_dtype = torch.long if loss == "cross_entropy" else torch.float32
    if callable(loss) and y.dtype.kind in "iub":
        y_dtype = torch.long
    return x_t.to(device), torch.as_tensor(y, dtype=y_dtype).to(device)


def _batches(data: Any, settings: TrainSettings, shuffle: bool,
             generator: torch.Generator | None) -> Iterator[tuple[Any, Any]]:
    """Mini-batches: index slices of in-memory tensors, or whatever a DataLoader yields."""
    if isinstance(data, tuple):
        X, y = data
        n = len(X)
        order = torch.randperm(n, generator=generator, device="cpu") if shuffle else None
        for start in range(0, n, settings.batch_size):
            if order is None:
                yield X[start:start + settings.batch_size], y[start:start + settings.batch_size]
            else:
                idx = order[start:start + settings.batch_size].to(X.device)
                yield X[idx], y[idx]
        return
    loader = data
    if not isinstance(data, torch.utils.data.DataLoader):
        loader = torch.utils.data.DataLoader(data, batch_size=settings.batch_size,
                                             shuffle=shuffle, generator=generator)
    for xb, yb in loader:
        yield xb.to(settings.device), yb.to(settings.device)


class TorchBackend:
    """Plain supervised training: forward, loss, backward, clip, monitor, step."""

    name = "torch"

    def _prepare(self, splits: Splits, settings: TrainSettings) -> tuple[Any, Any]:
        if splits.is_arrays:
            return (_tensors(splits.train, settings.loss, settings.device),
                    _tensors(splits.val, settings.loss, settings.device))
        return splits.train, splits.val

    def check(self, model_fn: Callable[..., Any], extras: dict[str, Any], splits: Splits,
              settings: TrainSettings, model: Any = None) -> None:
        _check_device(settings.device)
        model = build_model(model_fn, extras, model).to(settings.device)
        loss_fn = make_loss(settings.loss)
        make_optimizer(settings.optimizer, list(model.parameters()), settings.lr, extras)
        train, _ = self._prepare(splits, settings)
        xb, yb = next(_batches(train, settings, shuffle=False, generator=None))
        try:
            loss = loss_fn(model(xb), yb)
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

    def train(self, model_fn: Callable[..., Any], splits: Splits, clip: ClipConfig,
              extras: dict[str, Any], settings: TrainSettings, monitor: TrialMonitor,
              seed: int | None) -> nn.Module:
        generator = None
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if seed is not None:
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
        model = build_model(model_fn, extras).to(settings.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(settings.optimizer, params, extras.get("lr", settings.lr),
                                   extras)
        loss_fn = make_loss(settings.loss)
        train, val = self._prepare(splits, settings)
        on_cpu = torch.device(settings.device).type == "cpu"
        clipper = Clipper(clip)  # an adaptive clip's state belongs to this trial only
        for epoch in range(settings.epochs):
            model.train()
            pending: list[torch.Tensor] = []
            for xb, yb in _batches(train, settings, shuffle=True, generator=generator):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                norm, clipped = clipper.clip_([p for p in params if p.grad is not None])
                if on_cpu:  # reading a CPU tensor costs no sync
                    monitor.step(loss.item(), norm.item(), bool(clipped))
                else:
                    pending.append(torch.stack([loss.detach().float(), norm, clipped.float()]))
                    if len(pending) == _SYNC_EVERY:
                        _flush(pending, monitor)
                optimizer.step()
            _flush(pending, monitor)
            monitor.epoch(epoch, None, self.evaluate(model, val, loss_fn, settings))
        return model

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any, loss_fn: Callable[..., Any],
                 settings: TrainSettings) -> float:
        """Mean loss over a split, weighted by batch size."""
        model.eval()
        total, count = torch.zeros((), device=settings.device), 0
        for xb, yb in _batches(data, settings, shuffle=False, generator=None):
            total += loss_fn(model(xb), yb).detach().float() * len(xb)
            count += len(xb)
        return float(total) / max(count, 1)

    # Beyond a trial (in _torch_tools): a probe for ``threshold: auto``, predictions, a sample.
    def probe(self, model_fn: Callable[..., Any], extras: dict[str, Any], splits: Splits,
              settings: TrainSettings, max_steps: int) -> dict[str, Any]:
        from cliptune.backends._torch_tools import probe

        return probe(self, model_fn, extras, splits, settings, max_steps)

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


def _flush(pending: list[torch.Tensor], monitor: TrialMonitor) -> None:
    """Hand buffered step statistics to the monitor with one device read."""
    if pending:
        for loss, norm, clipped in torch.stack(pending).tolist():
            monitor.step(loss, norm, clipped > 0.5)
        pending.clear()


BACKEND = TorchBackend()
