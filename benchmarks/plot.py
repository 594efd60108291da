"""Turn ``benchmarks/results/*.json`` into ``docs/benchmarks.md`` and ``docs/search_quality.png``.

Why generated: the page must show the figures of the last run and nothing else, so it is rebuilt
from the JSON files rather than edited by hand. What the numbers do not say (why a target is missed) is
written by hand in ``NOTES`` below, keyed by section.

    python -m benchmarks.plot
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, ROOT, table

DOCS = ROOT / "docs"
SECTIONS = [  # (result name, columns shown), in the order of ``python -m benchmarks``
    ("clip_kernels", ["set", "candidate", "median_ms", "vs_clip_grad_value_", "vs_clip_grad_norm_"]),
    ("loop_overhead", ["task", "steps", "plain_s", "plain_cliptune_kernel_s", "cliptune_s", "ratio",
                       "ratio_same_kernel", "ratio_same_kernel_min", "user_loop_s", "user_ratio",
                       "monitor_step_us", "same_val_losses"]),
    ("threads", []),
    ("keras_overhead", []),  # [] shows every column
    ("integrations_overhead", ["framework", "size", "steps_per_epoch", "own_epoch_s",
                               "cliptune_epoch_s", "ratio", "ratio_min", "overhead_us_per_step",
                               "own_val_loss", "cliptune_val_loss"]),
    ("tracking_overhead", []),
    ("tuner_overhead", ["config", "trial_ms", "train_ms", "outside_ms", "optuna_ms", "mlflow_ms",
                        "residual_ms", "cliptune_own_ms"]),
    ("parallel_scaling", []),
    ("pruning_savings", ["task", "pruning", "steps", "steps_vs_off", "best_value", "best_vs_off",
                         "complete", "pruned", "failed", "prune_reasons", "plateau_replay", "seconds"]),
    ("search_quality", ["task", "tune_chosen", "grid_chosen", "best_default", "chosen_tune_vs_grid",
                        "tune_vs_best_default", "steps_vs_grid", "tune_steps", "grid_steps",
                        "adaptive_vs_tune", "adaptive_default_vs_fixed", "adaptive_chosen"]),
]
NOTES: dict[str, str] = {  # section name (or "summary") -> Markdown, written after a run
    "summary": """\
The machine is a 2-core VM, shared with other jobs while most of these ran (load average 3 to 4;
tuner_overhead, pruning_savings and parallel_scaling were re-run on a quiet machine, load under
1), so wall-clock figures that wait on the disk (SQLite, MLflow) move by 2x from run to run; the
CPU-bound comparisons are interleaved and, for the training loops, timed in the process's CPU
time.""",
    "clip_kernels": """\
**Value mode misses its target** (about 1.0-1.1x torch's `clip_grad_value_` at 10M instead of
0.6x; about 2-3x, +0.4 ms, at 1M). The target assumed a clamp alone: torch's foreach
`clip_grad_value_` makes two read-write passes and one `clamp_` per tensor makes one. cliptune's
value mode must also return the pre-clip global norm (the monitor's gradient statistics and the
non-finite rule read it) and whether anything changed, which costs two more reads of every
gradient: an L2 norm and a min/max. They now run tensor by tensor so that the clamp finds the
tensor in cache, but on this CPU the reductions are compute-bound on one thread (0.12-0.16 ns per
element even from cache), so they are not free. Against torch doing the same work
(`get_total_norm` + `clip_grad_value_`) the value clip is about 0.7x at 10M. The clip it replaces
(foreach inf-norm, a slow kernel on CPU) took 7-10x torch's time: the last row. At 1M the
per-tensor loop's dispatch (4 small ops x 50 tensors) is most of the cost. A flag derived from
the norms alone (e.g. pre- versus post-clip norm) would save a pass but can miss a change lost in
float rounding, so it was not used. Per-tensor norm and global norm meet their targets
(`_foreach_norm` + one `_foreach_mul_`, the same passes as torch).""",
    "loop_overhead": """\
`ratio` compares with the loop a user writes with torch's `clip_grad_norm_` (whose Python
dispatch costs more than cliptune's kernel, hence ratios below 1); `ratio_same_kernel` with the
same loop calling cliptune's kernel, so it is the loop and the monitor alone. The monitor's step
costs about 1.5 us, under 0.2% of a step here; the whole-call ratios move by about +-4% from run
to run on this shared machine (see the min-based column), so the 1.03 target sits at the noise
floor: earlier runs measured 1.00-1.03.""",
    "integrations_overhead": """\
Both sides train to the same validation loss (same seed, same clip). Over three runs of the final
code on this shared machine the ratios were: Lightning 0.99-1.03, Keras 1.00-1.05, Transformers
1.06-1.09 on the small MLP and 1.00-1.10 on the large one; `ratio_min` (fastest epochs) moves as
much, so +-5% is the noise here. **Lightning** meets the target: its callback replaces Lightning's
clip one for one, and what is left is the step's bookkeeping and the stability rules. **Keras**
meets it: the callback reads one variable a batch (the optimizer copies the loss tracker into it
inside the train step), about 30 us, and Keras then calls batch callbacks synchronously.
**Transformers misses it on the small MLP** for a reason outside the callback: the 5.x Trainer
computes the gradient norm itself every step even with `max_grad_norm=0` (it logs `grad_norm`
through `accelerator.clip_grad_norm_(params, inf)`, which also multiplies every gradient by 1), and
no callback is given that norm, so the trial's clip is a second pass over the gradients: about one
`clip_grad_norm_` a step (45-90 us on the small MLP, whose steps take about 1 ms; 4.45 did not
compute the norm).""",
    "tuner_overhead": """\
**The 20 ms and 60 ms targets are missed**, mostly by Optuna's and MLflow's own costs on this
disk. The direct measurements: the three MLflow calls of a tracked trial alone (`mlflow_ms`:
create the nested run, one `log_batch`, terminate; a sqlite transaction each) take 22-24 ms here
(up to 90 ms under heavier load; the issue measured ~13 ms), already over 20 ms; a bare Optuna
loop on SQLite replaying the same reports and `should_prune` calls (`optuna_ms`) takes 45-60 ms.
Since the first run, the worker loop of `cliptune/runner.py` reads all trials only when the study
nears its total (a cheap `get_n_trials` count otherwise), which took SQLite from 107 to 85 ms a
trial with tracking; the residual left on SQLite (13-17 ms) is mostly the Optuna heartbeat that
`tune()` turns on for storage URLs, which is what lets a rerun finish a crashed job. cliptune's own
Python (`cliptune_own_ms`, profiled self time, an upper bound) is 0.25 ms a trial without
tracking and 0.8 ms with MLflow tracking: under the 1 ms target.""",
    "parallel_scaling": """\
**Missed, barely: 2 workers run 1.69x the trials per minute of the best single worker (target
1.7x)**, on 96 trials of the adding problem (`python -m benchmarks parallel_scaling`). Earlier runs
gave 1.29x on 32 trials and 1.58x on 96, before the workers were handed the parent's
train/validation split instead of splitting again (which imported scikit-learn, 1.3 s, in each).
What is left: the second worker is a spawned process that imports torch (1.5 s) and the job
before its first trial while the first worker already trains; both share one SQLite file, whose
writes (trial state, reports, heartbeats) take the database lock in turn; and at the end the
first worker to finish waits for the other's last trial. A single worker gains nothing from a
second torch thread on this small RNN (0.89x): processes are the way to use the cores.""",
    "pruning_savings": """\
**Missed: the default pruning runs 0.58-0.76 of the steps of no pruning (median 0.70 over the
three tasks; target 0.6), at no cost in the best value (equal within 0.2%, and 13% better on
deep_tanh).** Most of the savings come from the MedianPruner, which now waits one warm-up epoch
(it waited two in the first run, which gave 0.76/0.81), so a pruned trial still runs at least 2
of its 6 epochs. The stability rules fire only on NaN or a 10x divergence, while these nets mostly
fail without either: the IRNNs' ReLUs die and the loss plateaus at the mean predictor (adding) or
at chance (digits), which only the MedianPruner sees. Where the loss does turn NaN (deep_tanh),
the rules stop those trials at once (6 of 30) and also steer the search: without them an
exploded trial ends FAIL (its value is NaN), which TPE ignores, so the unpruned study kept
sampling "no clip" (20 of its 30 trials failed) and found a worse best value.""",
    "search_quality": """\
**Missed on digits_rows (1.23x) and at the limit on adding_irnn (1.05x): tune()'s 20 trials do
not reach within 1.05x of the grid's best on every task.** Part of it is luck in the oracle: a
best value is the minimum of noisy runs (`seed_spread`, the run-to-run spread of one
configuration, is 7-14% here), and the grid takes its minimum over 25 fully trained runs, tune()
over 20 partly pruned ones. Re-training both chosen configurations on 3 fresh seeds
(`chosen_tune_vs_grid`) puts tune() ahead on deep_tanh (0.86x) but still about 1.1x behind on
the other two, about one seed spread: 20 trials, 10 of them random start-up trials, over four
modes and four decades of threshold find the right region but not always the best threshold in
it. tune() beats the best of the four fixed defaults on two tasks of three (by 15% and 35%) and
loses by 4% on deep_tanh, where per-tensor norm 1.0 happens to be near the best; it spends half
to two thirds of the grid's training steps.""",
}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _targets(result: dict[str, Any]) -> list[str]:
    return [f"- {'met' if t['met'] else '**missed**'}: {t['what']} = {t['measured']:.4g} "
            f"(target {t['goal']})" for t in result.get("targets", [])]


def plot_search_quality(result: dict[str, Any], path: Path) -> None:
    """Per task: the re-trained value of each approach's chosen config over the grid's chosen one,
    and the training steps tune() spent over the grid's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tasks = [r["task"] for r in rows]
    cap = 3.0
    per_seed = result["meta"]["per_seed"]
    series = {"tune() (defaults)": "tune_chosen", "best fixed default": "best_default",
              "no clip": "default no clip"}

    def ratio(task: str, key: str) -> float:  # median over seeds of value / grid's chosen
        return statistics.median(r[key] / r["grid_chosen"] for r in per_seed if r["task"] == task)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series.items()):
        ratios = [ratio(task, key) for task in tasks]
        shown = [min(v, cap) if math.isfinite(v) else cap for v in ratios]
        bars = left.bar([j + (i - 1) * width for j in range(len(tasks))], shown, width,
                        label=label)
        for bar, v in zip(bars, ratios, strict=True):
            if not math.isfinite(v) or v > cap:
                left.annotate("blew up" if not math.isfinite(v) else f"{v:.1f}",
                              (bar.get_x() + bar.get_width() / 2, cap), ha="center", va="bottom",
                              fontsize=8)
    left.axhline(1.0, color="black", lw=1, ls="--", label="grid's chosen (25 configs)")
    left.axhline(1.02, color="grey", lw=0.8, ls=":", label="1.02x target")
    left.set_xticks(range(len(tasks)), tasks, fontsize=8)
    left.set_ylabel("re-trained value / grid's chosen (lower is better)")
    left.set_ylim(0, cap * 1.12)
    left.set_title("Chosen config, re-trained on 3 fresh seeds (median of 3 seeds)")
    left.legend(fontsize=8)
    right.bar(range(len(tasks)), [r["steps_vs_grid"] for r in rows], 0.5,
              label="tune(): steps / grid's steps")
    right.axhline(0.5, color="grey", lw=0.8, ls=":", label="0.5 target")
    right.set_xticks(range(len(tasks)), tasks, fontsize=8)
    right.set_ylabel("training steps, over the grid's")
    right.set_title("Training steps spent (re-runs included)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render() -> str:
    notes = NOTES
    lines = ["# Benchmarks", "",
             "Generated by `python -m benchmarks.plot` from `benchmarks/results/*.json`, which "
             "`python -m benchmarks` writes (`python -m benchmarks NAME` for one). Each table is "
             "one run; the figures of a comparison were measured side by side in that run "
             "(interleaved repeats, medians), so ratios are the figures to read, not absolute "
             "times, on a shared machine.", ""]
    first = next((r for n, _ in SECTIONS if (r := _load(n)) is not None and "cpu" in r.get("meta", {})),
                 None)
    if first is not None:
        m = first["meta"]
        lines += [f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} pinned to "
                  f"{m['torch_threads']} thread (`torch.set_num_threads(1)`), optuna {m['optuna']}"
                  + (f", mlflow {m['mlflow']}" if "mlflow" in m else "") + f", Python {m['python']}.",
                  ""]
    glance = [f"| {name} | {t['what']} | {t['measured']:.4g} | {t['goal']} | "
              f"{'met' if t['met'] else '**missed**'} |"
              for name, _ in SECTIONS if (r := _load(name)) is not None for t in r.get("targets", [])]
    if glance:
        lines += ["## Targets at a glance", "", "| benchmark | figure | measured | target | |",
                  "|---|---|---|---|---|", *glance, ""]
    if "summary" in notes:
        lines += [notes["summary"], ""]
    for name, columns in SECTIONS:
        result = _load(name)
        if result is None:
            continue
        title = result.get("title", name.replace("_", " ").capitalize())
        lines += [f"## {title}", "", f"`python -m benchmarks {name}` "
                  f"(`benchmarks/{name}.py`; its docstring says what is measured and how).", ""]
        if name == "search_quality":
            lines += ["![search quality](search_quality.png)", ""]
        shown = [c for c in columns if any(c in r for r in result["rows"])] or list(result["rows"][0])
        lines += ["```", table(result["rows"], shown), "```", ""]
        lines += _targets(result)
        if name in notes:
            lines += ["", notes[name]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    quality = _load("search_quality")
    if quality is not None:
        plot_search_quality(quality, DOCS / "search_quality.png")
    (DOCS / "benchmarks.md").write_text(render())
    print(f"written {DOCS / 'benchmarks.md'}" + (" and search_quality.png" if quality else ""))


if __name__ == "__main__":
    main()
