"""The four fixed clip modes for torch gradients, on foreach kernels (adaptive ones: _torch_adaptive).

Scale factors follow Keras exactly (``g * t / max(norm, t)``), so both backends give the same
numbers; a zero gradient keeps a scale of 1 and no division by zero happens.

The numbers, for every dtype mix: gradients are grouped by device and dtype (as torch's own
``clip_grad_norm_`` does); norms accumulate in float32 for float16/bfloat16/float32 gradients and in
float64 when any gradient is float64 (a finite float64 norm never overflows); a scale factor stays
in that accumulation dtype and each group is multiplied by it in place, never rounded to another
tensor's dtype first; a parameter listed twice is counted and clipped once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cliptune.config import ClipConfig, ClipMode

Tensor = torch.Tensor


def unique_with_grad(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """The parameters that have a gradient, each once (in their first order)."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    seen: set[int] = set()
    out = []
    for p in parameters:
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _groups(grads: list[Tensor]) -> list[list[Tensor]]:
    """Gradients grouped by (device, dtype), for foreach kernels."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return list(groups.values())


def accumulation_dtype(grads: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def tensor_norms(grads: list[Tensor]) -> Tensor:
    """Per-tensor L2 norms as one vector (float32, or float64 if any gradient is float64), in the
    order of ``grads``, on the first gradient's device."""
    acc = accumulation_dtype(grads)
    device = grads[0].device
    first = grads[0]
    if all(g.dtype == first.dtype and g.device == device for g in grads):  # the common case
        return torch.stack(torch._foreach_norm(grads, 2, dtype=acc))
    by_id: dict[int, Tensor] = {}
    for group in _groups(grads):
        dtype = torch.float64 if group[0].dtype == torch.float64 else torch.float32
        for g, n in zip(group, torch._foreach_norm(group, 2, dtype=dtype), strict=True):
            by_id[id(g)] = n
    return torch.stack([by_id[id(g)].to(device=device, dtype=acc) for g in grads])


def scale_(grads: list[Tensor], scale: Tensor) -> None:
    """Multiply every gradient in place by one scale (kept in its own dtype)."""
    first = grads[0]
    if all(g.dtype == first.dtype and g.device == first.device for g in grads):
        torch._foreach_mul_(grads, scale.to(first.device))
        return
    for group in _groups(grads):
        torch._foreach_mul_(group, scale.to(group[0].device))


def _scale_each_(grads: list[Tensor], scales: Tensor) -> None:
    """Multiply each gradient in place by its own scale."""
    first = grads[0]
    if all(g.dtype == first.dtype and g.device == first.device for g in grads):
        torch._foreach_mul_(grads, list(scales.to(first.device).unbind()))
        return
    by_id = dict(zip((id(g) for g in grads), scales.unbind(), strict=True))
    for group in _groups(grads):
        device = group[0].device
        torch._foreach_mul_(group, [by_id[id(g)].to(device) for g in group])


def _clamp_(grads: list[Tensor], t: float, post: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Value clip, one tensor at a time so that it is read from memory once and then from cache.

    Per tensor: its min and max (whether the clamp changes anything), its norm, the clamp, and
    with ``post`` its norm after the clamp (from cache; else the post-clip norm is the pre-clip
    one, unused). On CPU this is ~9x faster than a foreach inf-norm (a slow kernel there) at 10M
    parameters (benchmarks/clip_kernels.py).
    """
    acc = accumulation_dtype(grads)
    device = grads[0].device
    zero = torch.zeros((), dtype=acc, device=device)
    norms, after, changed = [zero], [zero], [zero.bool()]
    for g in grads:
        if not g.numel():
            continue
        lo, hi = torch.aminmax(g)
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        norms.append(torch._foreach_norm([g], 2, dtype=dtype)[0].to(device=device, dtype=acc))
        changed.append(((hi > t) | (lo < -t)).to(device))
        g.clamp_(-t, t)
        if post:
            after.append(torch._foreach_norm([g], 2, dtype=dtype)[0].to(device=device, dtype=acc))
    total = torch.linalg.vector_norm(torch.stack(norms))
    return (total, torch.linalg.vector_norm(torch.stack(after)) if post else total,
            torch.stack(changed).any())


def clip_stats_(grads: list[Tensor], clip: ClipConfig, post: bool = True
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Clip ``grads`` in place; the pre-clip and post-clip global L2 norms, and whether anything
    changed, as tensors on the gradients' device (no sync). ``grads`` holds each tensor once.

    The post-clip norm is free but for ``value``, where it costs a second read of each tensor:
    ``post=False`` skips it (it is then the pre-clip norm)."""
    if not grads:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero, zero.bool()
    mode, t = clip.mode, clip.threshold
    if mode is ClipMode.VALUE:
        return _clamp_(grads, t, post)  # type: ignore[arg-type]
    norms = tensor_norms(grads)
    total = torch.linalg.vector_norm(norms)
    if mode is ClipMode.NONE:
        return total, total, torch.zeros((), dtype=torch.bool, device=total.device)
    if mode is ClipMode.NORM:
        _scale_each_(grads, t / norms.clamp_min(t))  # type: ignore[operator]
        return total, torch.linalg.vector_norm(norms.clamp_max(t)), (norms > t).any()  # type: ignore[arg-type]
    # On the CPU reading the norm costs no device sync, so a multiplication of every gradient by
    # exactly 1 (the norm within the threshold) is skipped; a NaN norm still scales, as on a GPU.
    scale = t / total.clamp_min(t)  # type: ignore[operator]  # GLOBAL_NORM
    if not (total.device.type == "cpu" and bool(total <= t)):  # type: ignore[operator]
        scale_(grads, scale)
    return total, total * scale, total > t  # type: ignore[operator]


def clip_tensors_(grads: list[Tensor], clip: ClipConfig) -> tuple[Tensor, Tensor]:
    """Clip ``grads`` in place; return the pre-clip global L2 norm and whether anything changed.

    Both results stay tensors on the gradients' device, so a caller can read them without forcing
    a device sync every step. ``grads`` must hold each tensor once.
    """
    total, _, changed = clip_stats_(grads, clip, post=False)
    return total, changed


def clip_grads_(parameters: Tensor | Iterable[Tensor], config: ClipConfig) -> float:
    """Clip the gradients of ``parameters`` in place by ``config``; return the pre-clip global norm.

    Like ``torch.nn.utils.clip_grad_norm_``, it takes a tensor or an iterable of parameters and
    skips those without a gradient; a parameter listed twice is clipped once.

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
    if config.mode.adaptive:
        raise ValueError(f"clip_grads_ is stateless; the adaptive clip mode {config.mode.value!r} "
                         "keeps state across steps: create clipper = cliptune.Clipper(config) "
                         "once and call clipper(parameters) each step.")
    total, _ = clip_tensors_([p.grad for p in unique_with_grad(parameters)], config)
    return float(total)
