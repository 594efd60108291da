"""What the core needs from torch besides a trial: a gradient probe, predictions, sample inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cliptune.backends._probe import add_step, new_record
from cliptune.backends._torch import _batches, build_model, make_loss, make_optimizer

if TYPE_CHECKING:
    from cliptune.backends import TrainSettings
    from cliptune.backends._torch import TorchBackend
    from cliptune.data import Splits

_PREDICT_CHUNK = 4096  # rows a forward pass at prediction time


def probe(backend: TorchBackend, model_fn: Callable[..., Any], extras: dict[str, Any],
          splits: Splits, settings: TrainSettings, max_steps: int) -> dict[str, Any]:
    """Train without clipping for one epoch or ``max_steps`` steps; gradient statistics per step."""
    generator = None
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
        generator = torch.Generator().manual_seed(settings.seed)
    model = build_model(model_fn, extras).to(settings.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(settings.optimizer, params, extras.get("lr", settings.lr), extras)
    loss_fn = make_loss(settings.loss)
    train, _ = backend._prepare(splits, settings)
    record = new_record()
    model.train()
    for xb, yb in _batches(train, settings, shuffle=True, generator=generator):
        if len(record["loss"]) >= max_steps:
            record["stopped"] = "max_steps"
            break
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        max_abs = torch.stack([g.abs().amax().float() for g in grads]).amax()
        if not add_step(record, torch.cat([loss.detach().float().view(1), max_abs.view(1),
                                           norms]).tolist()):
            break
        optimizer.step()
    return record


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """The model's outputs for ``X`` (in eval mode, on the model's device) as a numpy array."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(X), dtype=torch.float32 if X.dtype.kind == "f" else torch.long)
    outs = [model(x[i:i + _PREDICT_CHUNK].to(device)).float().cpu()
            for i in range(0, len(x), _PREDICT_CHUNK)]
    return torch.cat(outs).numpy()


def sample_inputs(data: Any, n: int = 5) -> np.ndarray | None:
    """A few input rows of a split (arrays, a Dataset or a DataLoader), for a model signature."""
    if isinstance(data, tuple):
        return np.asarray(data[0][:n])
    try:
        first = next(iter(data))
    except (StopIteration, TypeError):
        return None
    x = first[0] if isinstance(first, (tuple, list)) else first
    if not isinstance(x, torch.Tensor):
        return None
    x = x if isinstance(data, torch.utils.data.DataLoader) else x.unsqueeze(0)
    return x[:n].detach().cpu().numpy()
