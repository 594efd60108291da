"""Smoke test of the benchmark suite at a toy size: it runs and writes a well-formed result.

No timing is asserted here; the figures belong to ``python -m benchmarks``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import clip_kernels  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402


def test_clip_kernels_writes_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = clip_kernels.run(repeats=2, sizes={"tiny": 2000}, out_dir=tmp_path)
    written = json.loads((tmp_path / "clip_kernels.json").read_text())
    assert written["name"] == "clip_kernels" and written["meta"]["torch_threads"] >= 1
    assert {r["candidate"] for r in written["rows"]} >= {"cliptune value", "torch clip_grad_norm_"}
    assert all(r["median_ms"] > 0 for r in written["rows"])
    assert [t["what"] for t in written["targets"]] == [t["what"] for t in result["targets"]]
    assert "cliptune global_norm" in capsys.readouterr().out


def test_unknown_benchmark_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clip_kernel"]) == 2
    assert "Unknown benchmark 'clip_kernel'; choose from clip_kernels" in capsys.readouterr().err


def test_stability_replay_records_every_step_and_replays_the_real_rules() -> None:
    """One real run recorded without rules: one loss per counted training step; replayed through a
    real TrialMonitor, a non-finite step stops it, and an untrained net's jumps stop it only when
    spikes count from the first step."""
    from benchmarks import stability_replay
    from benchmarks.tasks import TASKS, counting
    from cliptune import ClipConfig, StabilityRules

    task = TASKS["digits_rows"]()
    with counting(task, checked=False) as steps:
        value, losses = stability_replay.recorded_run(task, ClipConfig("global_norm", 0.5), 0)
    assert value > 0 and len(losses) == steps[0] > 0
    assert stability_replay.replay(losses + [float("nan")], StabilityRules()) == (
        "nonfinite", len(losses) + 1)
    at_chance = [2.3 * (1 + 0.01 * (i % 3)) for i in range(60)]
    for i in (30, 40, 50):
        at_chance[i] = 6.0
    assert stability_replay.replay(at_chance, StabilityRules()) is None
    assert stability_replay.replay(at_chance, StabilityRules(spike_min_fall=0)) == ("spiking", 51)


def test_retrain_noise_resolves_a_constant_and_not_a_noisy_value() -> None:
    """The measure's resolution: one config against itself is within 2% when runs agree, and
    only about as often as not when single runs spread by 30%."""
    import numpy as np

    from benchmarks.retrain_noise import p_within

    same, _ = p_within(np.full(30, 0.5), draws=500)
    noisy, q90 = p_within(np.random.default_rng(1).normal(1.0, 0.3, 30).clip(0.1), draws=500)
    assert same == 1.0 and 0.3 < noisy < 0.8 and q90 > 1.1
