"""What every benchmark shares: one torch thread, the machine's description, interleaved timing,
a plain-text table and the JSON file under ``benchmarks/results/``.

Ratios are what these scripts report, not absolute times: the machine is shared, so the candidates
of a comparison are timed side by side, in alternating order, and the median of the repeats kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
THREADS = 1  # torch intra-op threads: the 2-core machine is shared, and one thread is repeatable
if str(ROOT) not in sys.path:  # ``examples`` lives at the top of the checkout
    sys.path.insert(0, str(ROOT))


def setup_torch() -> None:
    """Pin torch to ``THREADS`` threads and quiet Optuna."""
    import optuna
    import torch

    torch.set_num_threads(THREADS)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and library versions, stored with every result."""
    import optuna
    import torch

    info: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "torch": torch.__version__, "optuna": optuna.__version__}
    try:
        import mlflow

        info["mlflow"] = mlflow.__version__
    except ImportError:
        pass
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def interleaved(candidates: dict[str, Callable[[], Any]], repeats: int,
                before: Callable[[], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each candidate over ``repeats`` rounds, the order rotating every round.

    ``before`` runs untimed ahead of every call (to restore inputs, for instance). ``clock`` may be
    ``time.process_time`` for single-threaded compute: the CPU time of this process, which the
    other jobs on a shared machine do not inflate (wall time does, by whole time slices).
    """
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before()
            start = clock()
            candidates[name]()
            times[name].append(clock() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table; floats with 4 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool) or v is None:
            return "-" if v is None else str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def report(name: str, title: str, rows: list[dict[str, Any]], columns: Sequence[str],
           targets: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path = RESULTS) -> dict[str, Any]:
    """Print the table and the targets, write ``<out_dir>/<name>.json``, return what was written."""
    result = {"name": name, "title": title, "meta": {**machine(), **meta}, "rows": rows,
              "targets": targets}
    m = result["meta"]
    print(f"\n== {title} ==")
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread), "
          f"optuna {m['optuna']}")
    print(table(rows, columns))
    for t in targets:
        print(f"target {t['what']}: {t['measured']:.4g} (goal {t['goal']}) -> "
              f"{'met' if t['met'] else 'MISSED'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written to {path}")
    return result


def target(what: str, measured: float, goal: str, met: bool) -> dict[str, Any]:
    return {"what": what, "measured": measured, "goal": goal, "met": bool(met)}


def train_one(framework: str, model_fn: Callable[..., Any], splits: Any, clip: Any, monitor: Any,
              seed: int | None, extras: dict[str, Any] | None = None, **training: Any) -> Any:
    """One trial of cliptune's built-in loop (``framework`` "torch" or "keras"), as ``tune`` runs
    it: the task called with a real ``Trial`` whose monitor is ``monitor``. Returns the model."""
    from cliptune.backends import make_task
    from cliptune.settings import Training
    from cliptune.trial import Trial

    task = make_task(framework, model_fn, splits, Training(**training), threads=None)
    return task(Trial(clip, extras or {}, 0, seed, monitor))
