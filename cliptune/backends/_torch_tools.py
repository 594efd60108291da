"""What a refit needs from torch besides a trial: predictions and sample inputs (a signature)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

_PREDICT_CHUNK = 4096  # rows a forward pass at prediction time


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
