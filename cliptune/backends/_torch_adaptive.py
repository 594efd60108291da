"""Stateful clipping for torch: :class:`Clipper`, for the fixed and the adaptive modes.

Every result stays a tensor on the gradients' device (no device sync a step); only the number of
steps is kept on the host. The adaptive rules (autoclip, agc, zclip), their sources and constants
are in ``_adaptive_rules``. Torch specifics: the autoclip history grows by doubling; an agc unit is
a row of a weight (dim 0: Linear ``(out, in)``, conv ``(out, in, ...)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cliptune.backends._adaptive_rules import (
    AGC_EPS,
    AGC_GRAD_FLOOR,
    ZCLIP_ALPHA,
    ZCLIP_EPS,
    ZCLIP_WARMUP,
)
from cliptune.backends._torch_clip import clip_stats_, scale_, tensor_norms, unique_with_grad
from cliptune.config import ClipConfig, ClipMode

Tensor = torch.Tensor


def unit_norms(x: Tensor) -> Tensor:
    """L2 norm of each output unit (dim 0) of a torch parameter; a 0-D or 1-D one is one unit.

    Accumulated in float32 (float64 for a float64 tensor)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, dtype=dtype).reshape(1)
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=dtype)


def agc_(params: list[Tensor], lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """Unit-wise adaptive clip of ``params``' gradients in place; the pre- and post-clip global
    norms, and whether anything changed."""
    squares, after, changed = [], [], []
    acc = torch.float64 if any(p.grad.dtype == torch.float64 for p in params) else torch.float32
    for p in params:
        g = p.grad
        g_norm = unit_norms(g)
        max_norm = unit_norms(p.detach()).to(g_norm.dtype).clamp_min(AGC_EPS) * lam
        trigger = g_norm > max_norm
        scale = torch.where(trigger, max_norm / g_norm.clamp_min(AGC_GRAD_FLOOR), 1.0)
        shape = (-1,) + (1,) * (g.ndim - 1) if g.ndim > 1 else ()
        g.mul_(scale.reshape(shape))  # in the norm's dtype; the product is rounded once
        squares.append(g_norm.to(acc).square().sum())
        after.append((g_norm * scale).to(acc).square().sum())
        changed.append(trigger.any())
    return (torch.stack(squares).sum().sqrt(), torch.stack(after).sum().sqrt(),
            torch.stack(changed).any())


def _scale_(grads: list[Tensor], total: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
    """Scale ``grads`` so their global norm is at most ``limit``; the norm after, and whether
    anything changed. Unlike a fixed threshold, ``limit`` may be 0 (a history of zero norms): no
    0/0 then."""
    changed = total > limit
    scale_(grads, torch.where(changed, limit / total, 1.0))
    return torch.minimum(total, limit), changed


class Clipper:
    """A stateful gradient clipper for a torch training loop, called like ``clip_grads_``.

    Fixed modes are stateless and behave exactly as :func:`cliptune.clip_grads_`; adaptive modes
    (``autoclip``, ``agc``, ``zclip``) keep their state here, so use one Clipper per training run.

    Example:
        >>> import torch
        >>> from cliptune import Clipper, ClipConfig
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> clipper = Clipper(ClipConfig("autoclip", 50))
        >>> for g in (1.0, 3.0):  # global norms 2 and 6; the median of (2, 6) is 4
        ...     w.grad = torch.full((4,), g)
        ...     norm = clipper([w])
        >>> norm, round(float(torch.linalg.vector_norm(w.grad)), 4)
        (6.0, 4.0)
    """

    def __init__(self, config: ClipConfig) -> None:
        if not isinstance(config, ClipConfig):
            raise TypeError("The 'config' parameter of Clipper must be a ClipConfig. "
                            f"Got {type(config).__name__} instead.")
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the state (history, moving averages), as for a fresh training run."""
        self.steps = 0
        self._history: Tensor | None = None  # autoclip: pre-clip norms, grown by doubling
        self._mean: Tensor | None = None  # zclip EMAs
        self._var: Tensor | None = None

    def __repr__(self) -> str:
        return f"Clipper({self.config!r}, steps={self.steps})"

    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> float:
        """Clip the gradients of ``parameters`` in place; return the pre-clip global norm."""
        total, _, _ = self.clip_stats_(unique_with_grad(parameters))
        return float(total)

    def clip_(self, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Clip the gradients of ``params`` (each once, all with a gradient) in place.

        Returns the pre-clip global norm and whether anything changed, as tensors on the
        gradients' device (no sync).
        """
        total, _, changed = self.clip_stats_(params)
        return total, changed

    def clip_stats_(self, params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`clip_`, with the post-clip global norm in the middle."""
        mode = self.config.mode
        if not mode.adaptive:
            return clip_stats_([p.grad for p in params], self.config)
        if not params:
            zero = torch.zeros((), dtype=torch.float32)
            return zero, zero, zero.bool()
        self.steps += 1
        if mode is ClipMode.AGC:
            return agc_(params, self.config.threshold)  # type: ignore[arg-type]
        grads = [p.grad for p in params]
        total = torch.linalg.vector_norm(tensor_norms(grads))
        if mode is ClipMode.AUTOCLIP:
            return total, *_scale_(grads, total, self._percentile(total))
        return total, *self._zclip_(grads, total)

    def _percentile(self, total: Tensor) -> Tensor:
        """Append ``total`` to the history; its p-th percentile (numpy's linear rule)."""
        n = self.steps
        if self._history is None or self._history.numel() < n:
            grown = total.new_empty(max(64, 2 * n))
            if self._history is not None:
                grown[: n - 1] = self._history[: n - 1]
            self._history = grown
        self._history[n - 1] = total
        ordered = torch.sort(self._history[:n]).values
        pos = self.config.threshold / 100 * (n - 1)  # type: ignore[operator]
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    def _zclip_(self, grads: list[Tensor], total: Tensor) -> tuple[Tensor, Tensor]:
        """The zclip step (see the module docstring); the norm after it, and whether it clipped."""
        if self.steps <= ZCLIP_WARMUP:
            if self._history is None:
                self._history = total.new_empty(ZCLIP_WARMUP)
            self._history[self.steps - 1] = total
            if self.steps == ZCLIP_WARMUP:
                self._mean = self._history.mean()
                self._var = (self._history - self._mean).square().mean()
            return total, torch.zeros((), dtype=torch.bool, device=total.device)
        z_thres, mean, var = self.config.threshold, self._mean, self._var
        std = var.sqrt()  # type: ignore[union-attr]
        z = (total - mean) / (std + ZCLIP_EPS)
        spike = z > z_thres
        target = mean + z_thres**2 * std / torch.maximum(z, total.new_tensor(z_thres))  # type: ignore[operator]
        kept = torch.where(spike, target, total)
        scale_(grads, torch.where(spike, target / total, 1.0))
        self._mean = ZCLIP_ALPHA * mean + (1 - ZCLIP_ALPHA) * kept  # type: ignore[operator]
        self._var = ZCLIP_ALPHA * var + (1 - ZCLIP_ALPHA) * (kept - self._mean).square()  # type: ignore[operator]
        return kept, spike
