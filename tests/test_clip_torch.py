"""The torch clip kernels against independent references."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cliptune import ClipConfig, clip_grads_  # noqa: E402
from cliptune.backends._torch_clip import clip_tensors_  # noqa: E402


def _params(seed: int = 0, scale: float = 1.0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(7, 5), (5,), (3, 4, 2), (1,)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=gen) * scale
        params.append(p)
    return params


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("t", [0.05, 0.5, 3.0, 100.0])
def test_value_matches_torch_clip_grad_value(t: float) -> None:
    ours, ref = _params(), _params()
    norm = clip_grads_(ours, ClipConfig("value", t))
    torch.nn.utils.clip_grad_value_(ref, t)
    for a, b in zip(_grads(ours), _grads(ref), strict=True):
        torch.testing.assert_close(a, b)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads(_params())]))
    assert norm == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("t", [0.05, 0.5, 3.0, 100.0])
def test_global_norm_matches_torch_clip_grad_norm(t: float) -> None:
    ours, ref = _params(), _params()
    norm = clip_grads_(ours, ClipConfig("global_norm", t))
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, t)
    assert norm == pytest.approx(float(ref_norm), rel=1e-6)
    for a, b in zip(_grads(ours), _grads(ref), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # torch adds 1e-6 to the norm


@pytest.mark.parametrize("t", [0.05, 0.5, 3.0, 100.0])
def test_norm_clips_each_tensor_on_its_own(t: float) -> None:
    ours, before = _params(), _grads(_params())
    clip_grads_(ours, ClipConfig("norm", t))
    for g, g0 in zip(_grads(ours), before, strict=True):
        n0 = float(torch.linalg.vector_norm(g0))
        expected = g0 * (t / n0) if n0 > t else g0
        torch.testing.assert_close(g, expected)


def test_none_leaves_gradients_alone_and_reports_the_norm() -> None:
    ours = _params(scale=10.0)
    before = _grads(ours)
    norm = clip_grads_(ours, ClipConfig("none"))
    for a, b in zip(_grads(ours), before, strict=True):
        assert torch.equal(a, b)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))))


@pytest.mark.parametrize(("mode", "t", "changed"), [
    ("none", None, False), ("value", 100.0, False), ("value", 0.1, True),
    ("norm", 100.0, False), ("norm", 0.1, True), ("global_norm", 100.0, False),
    ("global_norm", 0.1, True),
])
def test_clipped_flag_says_whether_anything_changed(mode: str, t: float | None, changed: bool) -> None:
    params = _params()
    before = _grads(params)
    _, clipped = clip_tensors_([p.grad for p in params], ClipConfig(mode, t))  # type: ignore[arg-type]
    assert bool(clipped) is changed
    assert any(not torch.equal(a, b) for a, b in zip(_grads(params), before, strict=True)) is changed


def test_zero_gradients_and_missing_grads_are_safe() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.zeros(3)
    q = torch.nn.Parameter(torch.zeros(2))  # no grad at all
    for mode in ("value", "norm", "global_norm"):
        assert clip_grads_([p, q], ClipConfig(mode, 1.0)) == 0.0  # type: ignore[arg-type]
        assert torch.equal(p.grad, torch.zeros(3)) and q.grad is None
    assert clip_grads_([q], ClipConfig("global_norm", 1.0)) == 0.0  # type: ignore[arg-type]


def test_accepts_a_single_tensor_and_rejects_a_non_config() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert clip_grads_(p, ClipConfig("global_norm", 1.0)) == pytest.approx(6.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5))
    with pytest.raises(TypeError, match="'config' parameter of clip_grads_ must be a ClipConfig"):
        clip_grads_(p, {"mode": "value"})  # type: ignore[arg-type]


def test_one_huge_tensor_among_small_ones() -> None:
    small = [torch.nn.Parameter(torch.zeros(10)) for _ in range(3)]
    for s in small:
        s.grad = torch.full((10,), 1e-3)
    huge = torch.nn.Parameter(torch.zeros(10))
    huge.grad = torch.full((10,), 1e6)
    clip_grads_([*small, huge], ClipConfig("norm", 1.0))
    assert float(torch.linalg.vector_norm(huge.grad)) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(small[0].grad, torch.full((10,), 1e-3))
