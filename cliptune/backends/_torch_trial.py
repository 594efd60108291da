"""The torch side of ``Trial.clip_``: the clip's state, mixed precision, and when to read the device.

A ``GradScaler`` multiplies the loss, so the gradients are scaled until ``scaler.unscale_``: a clip
before it would act on thresholds x scale. ``clip_`` therefore unscales through an optimizer it is
given, or checks that the loop did; a step whose gradients hold inf/NaN (the scaler will skip it) is
not clipped (an adaptive clip's history would take the inf) and is recorded as skipped. The
scaler's bookkeeping is private torch API, read only here.

On CPU each step's statistics are read at once (no sync cost); on an accelerator they are kept on
the device and read every ``SYNC_EVERY`` steps and at each report, with one copy.
"""

from __future__ import annotations

from typing import Any

import torch

from cliptune.backends._torch_adaptive import Clipper
from cliptune.backends._torch_clip import tensor_norms, unique_with_grad
from cliptune.config import ClipConfig

SYNC_EVERY = 16


def _scaler_states(scaler: Any) -> dict[int, dict[str, Any]]:
    return scaler._per_optimizer_states  # keyed by id(optimizer); "stage", "found_inf_per_device"


def unscaled_states(scaler: Any, optimizer: torch.optim.Optimizer | None) -> list[dict[str, Any]]:
    """Make sure the gradients are unscaled; the scaler's state of their optimizer(s) (none when
    the scaler is disabled)."""
    from torch.amp.grad_scaler import OptState

    if not scaler.is_enabled():
        return []
    states = _scaler_states(scaler)
    if optimizer is not None:
        if states[id(optimizer)]["stage"] is OptState.READY:
            scaler.unscale_(optimizer)
        return [states[id(optimizer)]]
    unscaled = [s for s in states.values() if s["stage"] is OptState.UNSCALED]
    if not unscaled:
        raise RuntimeError(
            "trial.clip_(..., scaler=scaler) came before scaler.unscale_(optimizer): the gradients "
            "are still multiplied by the loss scale, so the clip would act on scaled gradients. "
            "Call scaler.unscale_(optimizer) first, or pass the optimizer: "
            "trial.clip_(optimizer, loss, scaler=scaler).")
    return unscaled


def _found_inf(states: list[dict[str, Any]]) -> bool:
    """Whether unscaling found inf/NaN gradients: the scaler will skip the step (one sync, which
    ``scaler.step`` makes anyway)."""
    return any(float(v.item()) > 0 for s in states for v in s["found_inf_per_device"].values())


class TorchClipState:
    """One trial's torch clip: a :class:`Clipper` (adaptive state included) and unread statistics."""

    def __init__(self, config: ClipConfig, probe: bool = False) -> None:
        self.clipper = Clipper(config)
        self.probe = probe
        self._pending: list[torch.Tensor] = []

    def clip_(self, parameters: Any, loss: Any, scaler: Any) -> tuple[torch.Tensor, list[tuple]]:
        """Clip in place; the pre-clip norm and the steps whose statistics are ready to record."""
        optimizer = parameters if isinstance(parameters, torch.optim.Optimizer) else None
        if optimizer is not None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
        params = unique_with_grad(parameters)
        if self.probe:
            return self._probe(params, loss)
        states = [] if scaler is None else unscaled_states(scaler, optimizer)
        if states and _found_inf(states):  # the scaler skips this step
            return (torch.tensor(float("inf")),
                    [(_read(loss), None, None, True, None, None)])
        norm, post, clipped = self.clipper.clip_stats_(params)
        if states:
            return norm, [(_read(loss), float(norm), bool(clipped), False, float(post), None)]
        if norm.device.type == "cpu":
            return norm, [(_read(loss), norm.item(), bool(clipped.item()), None, post.item(),
                           None)]
        lost = torch.tensor(float("nan"), device=norm.device) if loss is None else loss.detach()
        self._pending.append(torch.stack([lost.float().reshape(()), norm.float(),
                                          clipped.float(), post.float(), torch.tensor(
                                              loss is None, dtype=torch.float32,
                                              device=norm.device)]))
        return norm, self.flush() if len(self._pending) >= SYNC_EVERY else []

    def flush(self) -> list[tuple]:
        """The statistics kept on the device, read with one copy."""
        if not self._pending:
            return []
        rows = torch.stack(self._pending).tolist()
        self._pending.clear()
        return [(None if no_loss > 0.5 else loss, norm, clipped > 0.5, None, post, None)
                for loss, norm, clipped, post, no_loss in rows]

    def _probe(self, params: list[torch.Tensor], loss: Any) -> tuple[torch.Tensor, list[tuple]]:
        """No clip: per-tensor norms and the largest |g| for the ``threshold: auto`` probe."""
        grads = [p.grad for p in params if p.grad.numel()]
        if not grads:
            return torch.zeros(()), []
        norms = tensor_norms(grads).float()
        max_abs = torch.stack([g.abs().amax().float().to(norms.device) for g in grads]).amax()
        total = torch.linalg.vector_norm(norms)
        values = torch.cat([max_abs.reshape(1), norms]).tolist()
        return total, [(_read(loss), float(total), False, None, float(total), values)]


def _read(loss: Any) -> float | None:
    if loss is None:
        return None
    return loss.item() if isinstance(loss, torch.Tensor) else float(loss)
