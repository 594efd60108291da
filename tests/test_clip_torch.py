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


# -- the numbers, for every dtype and mix (issue 13.3; compared with torch's own functions) ------

DTYPES = {"float32": [torch.float32] * 4, "float16": [torch.float16] * 4,
          "bfloat16": [torch.bfloat16] * 4, "float64": [torch.float64] * 4,
          "bf16 first, then float32": [torch.bfloat16, torch.float32, torch.float32, torch.float32],
          "float32 and float64": [torch.float32, torch.float64, torch.float32, torch.float64],
          "float16 and bfloat16": [torch.float16, torch.bfloat16, torch.float16, torch.bfloat16]}
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _typed(dtypes: list[torch.dtype], scale: float = 3.0) -> list[torch.nn.Parameter]:
    params = _params(scale=scale)
    for p, dtype in zip(params, dtypes, strict=True):
        p.data, p.grad = p.data.to(dtype), p.grad.to(dtype)
    return params


def _exact(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """float64 copies: torch's own functions on them give the exact reference for any mix (on a
    mix, torch rounds a bfloat16 tensor's norm to bfloat16 before combining: ~0.1% off)."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.data.double().clone())
        q.grad = p.grad.double().clone()  # a copy even when it is float64 already
        out.append(q)
    return out


@pytest.mark.parametrize("mix", list(DTYPES))
@pytest.mark.parametrize("t", [0.5, 4.0])
def test_global_norm_matches_torch_for_every_dtype_mix(mix: str, t: float) -> None:
    ours = _typed(DTYPES[mix])
    ref = _exact(ours)
    norm = clip_grads_(ours, ClipConfig("global_norm", t))
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, t)
    assert norm == pytest.approx(float(ref_norm), rel=1e-6)  # accumulated in float32 or float64
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad.to(a.grad.dtype), rtol=TOL[a.grad.dtype],
                                   atol=1e-6)
    if len(set(DTYPES[mix])) == 1:  # one dtype: torch's own clip in that dtype agrees too
        same = _typed(DTYPES[mix])
        torch.nn.utils.clip_grad_norm_(same, t)
        for a, b in zip(ours, same, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=TOL[a.grad.dtype], atol=1e-6)


@pytest.mark.parametrize("mix", list(DTYPES))
def test_norm_and_value_match_torch_per_tensor_for_every_dtype_mix(mix: str) -> None:
    ours, ref = _typed(DTYPES[mix]), _typed(DTYPES[mix])
    clip_grads_(ours, ClipConfig("norm", 1.0))
    for a, b in zip(ours, ref, strict=True):
        torch.nn.utils.clip_grad_norm_([b], 1.0)  # torch's clip of one tensor on its own
        torch.testing.assert_close(a.grad, b.grad, rtol=TOL[a.grad.dtype], atol=1e-6)
        assert float(torch.linalg.vector_norm(a.grad.float())) <= 1.0 * (1 + TOL[a.grad.dtype])
    ours, ref = _typed(DTYPES[mix]), _typed(DTYPES[mix])
    clip_grads_(ours, ClipConfig("value", 0.7))
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_the_scale_is_not_rounded_to_the_first_gradients_dtype() -> None:
    """bf16 first: a scale rounded to bf16 is up to 0.2% off; the float32 tensors must be exact."""
    params = _typed(DTYPES["bf16 first, then float32"])
    before = [p.grad.double() for p in params]
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                         for g in before])))
    clip_grads_(params, ClipConfig("global_norm", 1.0))
    for p, g0 in zip(params[1:], before[1:], strict=True):
        torch.testing.assert_close(p.grad.double(), g0 / total, rtol=1e-6, atol=0)
    norm_params = _typed(DTYPES["bf16 first, then float32"])
    clip_grads_(norm_params, ClipConfig("norm", 0.3))
    for p in norm_params[1:]:  # a float32 tensor is never left above its threshold
        assert float(torch.linalg.vector_norm(p.grad)) <= 0.3 * (1 + 1e-6)


def test_a_finite_float64_norm_above_float32_range_stays_finite() -> None:
    """Squeezed through float32, a norm above ~1.8e19 squared to inf and zeroed every gradient."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.full((4,), 1e20, dtype=torch.float64)
    norm = clip_grads_([p], ClipConfig("global_norm", 1.0))
    assert norm == pytest.approx(2e20, rel=1e-12)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5, dtype=torch.float64))
    half = torch.nn.Parameter(torch.zeros(10_000, dtype=torch.float16))
    half.grad = torch.full((10_000,), 1000.0, dtype=torch.float16)  # norm 1e5 > float16's 65504
    assert clip_grads_([half], ClipConfig("none")) == pytest.approx(1e5, rel=1e-3)


def test_a_parameter_listed_twice_is_clipped_once() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = clip_grads_([p, p], ClipConfig("norm", 1.5))
    assert norm == pytest.approx(6.0)  # counted once
    torch.testing.assert_close(p.grad, torch.full((4,), 0.75))  # scaled once, to norm 1.5
    q = torch.nn.Parameter(torch.zeros(4))
    q.grad = torch.full((4,), 3.0)
    assert clip_grads_([q, q], ClipConfig("global_norm", 1.5)) == pytest.approx(6.0)
    torch.testing.assert_close(q.grad, torch.full((4,), 0.75))


@pytest.mark.parametrize(("mode", "t"), [("none", None), ("value", 0.2), ("norm", 0.5),
                                          ("global_norm", 0.8), ("autoclip", 50.0),
                                          ("agc", 0.01), ("zclip", 1.0)])
def test_the_post_clip_norm_is_the_norm_after_the_clip(mode: str, t: float | None) -> None:
    from cliptune import Clipper

    clipper = Clipper(ClipConfig(mode, t))  # type: ignore[arg-type]
    for step in range(30):  # past zclip's warm-up
        params = _params(seed=step, scale=1.0 + (step == 29) * 5)
        pre, post, _ = clipper.clip_stats_(params)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                      for p in params]))
        assert float(post) == pytest.approx(float(after), rel=1e-5)
        assert float(post) <= float(pre) * (1 + 1e-6)


def test_on_the_cpu_a_global_norm_within_the_threshold_writes_nothing() -> None:
    """Scaling by exactly 1 is skipped on the CPU (reading the norm there costs no device sync):
    the tensors' version counters move only when the clip changes them, and NaN still scales."""
    small, big = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    small.grad, big.grad = torch.full((4,), 0.1), torch.full((4,), 3.0)  # joint norm ~6.0
    before = [small.grad._version, big.grad._version]
    assert clip_grads_([small, big], ClipConfig("global_norm", 10.0)) == pytest.approx(6.0033, rel=1e-4)
    assert [small.grad._version, big.grad._version] == before
    torch.testing.assert_close(big.grad, torch.full((4,), 3.0))
    clip_grads_([small, big], ClipConfig("global_norm", 0.5))
    assert [small.grad._version, big.grad._version] == [v + 1 for v in before]
    torch.testing.assert_close(big.grad, torch.full((4,), 3.0 * 0.5 / 6.0033), rtol=1e-4, atol=0)
    nan = torch.nn.Parameter(torch.zeros(2))
    nan.grad = torch.tensor([float("nan"), 1.0])
    clip_grads_([nan], ClipConfig("global_norm", 1.0))  # scaled by NaN, as torch's own clip does
    assert torch.isnan(nan.grad).all()
