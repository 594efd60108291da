"""``python -m benchmarks [NAME ...]``: run every benchmark, or the named ones, one process each.

Each runs in its own process so that one framework's threads and caches do not leak into the
next's timings (and TensorFlow is loaded only by the Keras benchmark).
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks._common import ROOT

ORDER = ["clip_kernels", "loop_overhead", "threads", "keras_overhead", "integrations_overhead",
         "tracking_overhead", "tuner_overhead", "parallel_scaling", "pruning_savings", "stability_replay",
         "search_quality", "retrain_noise"]


def available() -> list[str]:
    """The benchmarks present in this checkout (the Keras one needs its own file)."""
    return [n for n in ORDER if (ROOT / "benchmarks" / f"{n}.py").exists()]


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    known = available()
    if any(n in ("-h", "--help") for n in names):
        print(f"usage: python -m benchmarks [NAME ...]\nbenchmarks: {', '.join(known)}\n"
              "then: python -m benchmarks.plot (writes docs/benchmarks.md)")
        return 0
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"Unknown benchmark {unknown[0]!r}; choose from {', '.join(known)}.", file=sys.stderr)
        return 2
    failed = []
    for name in names or known:
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT)
        print(f"[{name}: {time.perf_counter() - start:.0f} s{'' if code == 0 else ', FAILED'}]")
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
