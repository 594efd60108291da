"""The four clip modes for torch gradients, on foreach kernels.

Scale factors follow Keras exactly (``g * t / max(norm, t)``), so both backends give the same
numbers; a zero gradient keeps a scale of 1 and no division by zero happens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cliptune.config import ClipConfig, ClipMode

Tensor = torch.Tensor


def _grads(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _norms(grads: list[Tensor]) -> Tensor:
    """Per-tensor L2 norms as one float32 vector."""
    return torch.stack([n.float() for n in torch._foreach_norm(grads)])


def clip_tensors_(grads: list[Tensor], clip: ClipConfig) -> tuple[Tensor, Tensor]:
    """Clip ``grads`` in place; return the pre-clip global L2 norm and whether anything changed.

    Both results stay tensors on the gradients' device, so a caller can read them without forcing
    a device sync every step.
    """
    if not grads:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.bool()
    norms = _norms(grads)
    total = torch.linalg.vector_norm(norms)
    mode, t = clip.mode, clip.threshold
    if mode is ClipMode.NONE:
        return total, torch.zeros((), dtype=torch.bool, device=total.device)
    if mode is ClipMode.VALUE:
        # The largest element decides whether the clamp changes anything.
        peak = torch.stack([n.float() for n in torch._foreach_norm(grads, float("inf"))]).max()
        for g in grads:  # one in-place pass per tensor (torch's foreach clamp makes two)
            g.clamp_(-t, t)
        return total, peak > t
    if mode is ClipMode.NORM:
        scales = t / norms.clamp_min(t)
        torch._foreach_mul_(grads, list(scales.to(grads[0].dtype).unbind()))
        return total, (norms > t).any()
    scale = t / total.clamp_min(t)  # GLOBAL_NORM
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total, total > t


def clip_grads_(parameters: Tensor | Iterable[Tensor], config: ClipConfig) -> float:
    """Clip the gradients of ``parameters`` in place by ``config``; return the pre-clip global norm.

    Like ``torch.nn.utils.clip_grad_norm_``, it takes a tensor or an iterable of parameters and
    skips those without a gradient.

    Example:
        >>> import torch
        >>> from cliptune import ClipConfig, clip_grads_
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> w.grad = torch.full((4,), 3.0)
        >>> clip_grads_([w], ClipConfig("global_norm", 1.0))
        6.0
        >>> w.grad
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    if not isinstance(config, ClipConfig):
        raise TypeError("The 'config' parameter of clip_grads_ must be a ClipConfig. "
                        f"Got {type(config).__name__} instead.")
    total, _ = clip_tensors_(_grads(parameters), config)
    return float(total)
