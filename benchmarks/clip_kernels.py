"""Clip kernels: cliptune's value, norm and global-norm clips versus torch's own, on CPU.

Why: a clip runs every training step, so it must cost no more than what people use without
cliptune. Two parameter sets, ~1M and ~10M parameters over 50 tensors (25 weight matrices of
heavy-tailed sizes and 25 biases, like a real model), float32. Before every timed call the
gradients are restored from a copy (untimed), so each candidate clips the same values and finds them
where a backward pass leaves them (in cache when they fit). Candidates:

- ``torch clip_grad_value_`` (foreach; two passes, clamp_min then clamp_max, and no norm);
- ``torch get_total_norm + clip_grad_value_``: torch doing what cliptune's value mode does;
- ``torch clip_grad_norm_(foreach=True)``;
- ``cliptune value / norm / global_norm`` (``clip_tensors_``: also return the pre-clip norm and
  whether anything changed);
- ``_foreach_mul_``: one read-write pass, the memory-traffic floor of any clip.

    python -m benchmarks clip_kernels
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import interleaved, median, report, setup_torch, target

SIZES = {"1M": 1_000_000, "10M": 10_000_000}


def make_grads(total: int, n_tensors: int = 50, seed: int = 0) -> list[Any]:
    """Half heavy-tailed weight matrices, half biases, about ``total`` elements in all."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_weights = n_tensors // 2
    weights = torch.rand(n_weights, generator=gen) ** 3 + 0.02
    sizes = (weights / weights.sum() * total * 0.99).long().tolist()
    sizes += torch.randint(64, 2048, (n_tensors - n_weights,), generator=gen).tolist()
    return [torch.randn(s, generator=gen) for s in sizes]


def _value_before(grads: list[Any], t: float) -> tuple[Any, Any]:
    """cliptune's value clip before this benchmark: foreach 2-norm, foreach inf-norm, clamp_."""
    import torch

    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    peak = torch.stack(torch._foreach_norm(grads, float("inf"))).max()
    for g in grads:
        g.clamp_(-t, t)
    return total, peak > t


def measure(total: int, repeats: int) -> dict[str, Any]:
    """Median milliseconds of every candidate on one parameter set, timed interleaved."""
    import torch

    from cliptune import ClipConfig
    from cliptune.backends._torch_clip import clip_tensors_

    source = make_grads(total)
    params = [torch.nn.Parameter(torch.empty_like(s)) for s in source]
    for p, s in zip(params, source, strict=True):
        p.grad = s.clone()
    grads = [p.grad for p in params]
    value_t, norm_t = 0.5, 0.1  # every tensor is clipped: the most work each mode can do
    value, norm, global_norm = (ClipConfig("value", value_t), ClipConfig("norm", norm_t),
                                ClipConfig("global_norm", norm_t))

    def torch_value_with_norm() -> None:
        torch.nn.utils.get_total_norm(grads, foreach=True)
        torch.nn.utils.clip_grad_value_(params, value_t, foreach=True)

    candidates = {
        "torch clip_grad_value_": lambda: torch.nn.utils.clip_grad_value_(params, value_t,
                                                                          foreach=True),
        "torch total norm + clip_grad_value_": torch_value_with_norm,
        "torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, norm_t,
                                                                        foreach=True),
        "cliptune value": lambda: clip_tensors_(grads, value),
        "cliptune norm": lambda: clip_tensors_(grads, norm),
        "cliptune global_norm": lambda: clip_tensors_(grads, global_norm),
        "_foreach_mul_ (floor)": lambda: torch._foreach_mul_(grads, 0.5),
        "cliptune value before (inf-norm)": lambda: _value_before(grads, value_t),
    }
    times = interleaved(candidates, repeats, before=lambda: torch._foreach_copy_(grads, source))
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    return {"params": sum(s.numel() for s in source), "tensors": len(source), "ms": ms}


def run(repeats: int = 61, sizes: dict[str, int] | None = None, out_dir: Any = None) -> dict[str, Any]:
    setup_torch()
    sizes = sizes or SIZES
    measured = {label: measure(n, repeats) for label, n in sizes.items()}
    rows = []
    ref_value, ref_norm = "torch clip_grad_value_", "torch clip_grad_norm_"
    for label, m in measured.items():
        ms = m["ms"]
        for name, t in ms.items():
            rows.append({"set": label, "params": m["params"], "candidate": name, "median_ms": t,
                         "vs_clip_grad_value_": t / ms[ref_value],
                         "vs_clip_grad_norm_": t / ms[ref_norm]})
    big = measured[list(sizes)[-1]]["ms"]
    big_label = list(sizes)[-1]
    value_ratio = big["cliptune value"] / big[ref_value]
    global_ratio = max(m["ms"]["cliptune global_norm"] / m["ms"][ref_norm] for m in measured.values())
    norm_ratio = max(m["ms"]["cliptune norm"] / m["ms"][ref_norm] for m in measured.values())
    targets = [
        target(f"cliptune value / torch clip_grad_value_ at {big_label}", value_ratio, "<= 0.6",
               value_ratio <= 0.6),
        target("cliptune global_norm / torch clip_grad_norm_ (worst set)", global_ratio, "<= 1.05",
               global_ratio <= 1.05),
        target("cliptune norm / torch clip_grad_norm_ (worst set)", norm_ratio, "<= 1.0",
               norm_ratio <= 1.0),
    ]
    meta = {"repeats": repeats, "dtype": "float32", "value_threshold": 0.5, "norm_threshold": 0.1,
            "timing": "median of interleaved repeats; gradients restored untimed before each call"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("clip_kernels", "Clip kernels (CPU, float32)", rows,
                  ["set", "candidate", "median_ms", "vs_clip_grad_value_", "vs_clip_grad_norm_"],
                  targets, meta, **kwargs)


if __name__ == "__main__":
    run()
