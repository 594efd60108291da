"""Per-epoch cost of cliptune's instrumented Keras training versus plain ``model.fit``.

Both train the LSTM of ``examples/keras_lstm.py`` with the same clipping optimizer (SGD, global
norm 1.0), the same batches per epoch and a validation pass per epoch. cliptune's loop also
measures the pre-clip gradient norm and clip flag every step and feeds a real ``TrialMonitor``.
``fit`` runs twice: on the arrays (Keras's own data adapter, what most users write) and on the
same ``tf.data`` pipeline cliptune builds (the loop's cost alone). Repeats are interleaved, the
order rotating each repeat, so drifting machine load hits all alike; the first two epochs of
each run (tracing, XLA compilation of each batch shape) are left out; medians are reported.

    python -m benchmarks keras_overhead

Times are CPU time of this process per epoch (the machine is shared; other jobs do not inflate
it), wall time as a check. Writes ``benchmarks/results/keras_overhead.json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, report, setup_torch, target  # noqa: E402

CLIP_T = 1.0
LR = 0.3
BATCH = 32
WARMUP_EPOCHS = 2  # left out of the timings
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _stamp() -> dict[str, float]:
    return {name: clock() for name, clock in CLOCKS.items()}


def _epoch_times(stamps: list[dict[str, float]]) -> dict[str, list[float]]:
    """Seconds of each epoch after the warm-up ones, by clock."""
    return {c: [b[c] - a[c] for a, b in zip(stamps[:-1], stamps[1:], strict=True)][WARMUP_EPOCHS:]
            for c in CLOCKS}


def _monitor(trial: Any) -> Any:
    """A real TrialMonitor (stability rules on) that also stamps the end of each epoch."""
    from cliptune import StabilityRules, TrialMonitor

    class TimedMonitor(TrialMonitor):
        def epoch(self, epoch: int, metrics: Any = None) -> None:
            super().epoch(epoch, metrics)
            self.stamps.append(_stamp())

    monitor = TimedMonitor(trial, StabilityRules())
    monitor.stamps = [_stamp()]
    return monitor


def run_cliptune(splits: Any, epochs: int, jit: bool, study: Any) -> dict[str, list[float]]:
    from benchmarks._common import train_one
    from cliptune import ClipConfig
    from examples.keras_lstm import make_model

    def model_fn() -> Any:
        model = make_model()
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit)  # cliptune swaps the optimizer
        return model

    monitor = _monitor(study.ask())
    train_one("keras", model_fn, splits, ClipConfig("global_norm", CLIP_T), monitor, seed=0,
              loss="mse", optimizer="sgd", lr=LR, epochs=epochs, batch_size=BATCH)
    return _epoch_times(monitor.stamps)


def run_fit(splits: Any, epochs: int, jit: bool, tf_data: bool) -> dict[str, list[float]]:
    """``model.fit`` on the arrays (its own adapter), or on cliptune's tf.data pipeline."""
    import keras
    import tensorflow as tf

    from cliptune import ClipConfig, keras_optimizer
    from examples.keras_lstm import make_model

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            stamps.append(_stamp())

    keras.utils.set_random_seed(0)
    model = make_model()
    model.compile(optimizer=keras_optimizer(ClipConfig("global_norm", CLIP_T), "sgd",
                                            learning_rate=LR), loss="mse", jit_compile=jit)
    stamps = [_stamp()]
    if tf_data:
        train = tf.data.Dataset.from_tensor_slices(splits.train).shuffle(
            len(splits.train[0]), seed=0).batch(BATCH).prefetch(2)
        val = tf.data.Dataset.from_tensor_slices(splits.val).batch(BATCH).prefetch(2)
        model.fit(train, epochs=epochs, validation_data=val, shuffle=False, verbose=0,
                  callbacks=[EpochTimer()])
    else:
        model.fit(*splits.train, batch_size=BATCH, epochs=epochs, validation_data=splits.val,
                  shuffle=True, verbose=0, callbacks=[EpochTimer()])
    return _epoch_times(stamps)


def measure(jit: bool, splits: Any, epochs: int, repeats: int, study: Any) -> dict[str, Any]:
    runs = {"cliptune": lambda: run_cliptune(splits, epochs, jit, study),
            "fit": lambda: run_fit(splits, epochs, jit, tf_data=False),
            "fit_tf_data": lambda: run_fit(splits, epochs, jit, tf_data=True)}
    times: dict[str, dict[str, list[float]]] = {n: {c: [] for c in CLOCKS} for n in runs}
    names = list(runs)
    for r in range(repeats):  # interleaved, the order rotating every repeat
        for name in names[r % 3:] + names[:r % 3]:
            for clock, values in runs[name]().items():
                times[name][clock] += values
    med = {n: {c: median(v) for c, v in by_clock.items()} for n, by_clock in times.items()}
    return {"jit_compile": jit, "cliptune_epoch_s": med["cliptune"]["cpu"],
            "fit_epoch_s": med["fit"]["cpu"], "fit_tf_data_epoch_s": med["fit_tf_data"]["cpu"],
            "ratio": med["cliptune"]["cpu"] / med["fit"]["cpu"],
            "ratio_vs_fit_tf_data": med["cliptune"]["cpu"] / med["fit_tf_data"]["cpu"],
            "ratio_wall": med["cliptune"]["wall"] / med["fit"]["wall"],
            "epochs_timed": len(times["fit"]["cpu"])}


def run(repeats: int = 5, epochs: int = 5, samples: int = 2048, threads: int = 1,
        out_dir: Any = None) -> dict[str, Any]:
    setup_torch()
    import keras
    import optuna
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from cliptune.data import make_splits
    from examples.keras_lstm import make_data

    splits = make_splits(make_data(samples), 0.2, 0)
    study = optuna.create_study()
    rows = [measure(jit, splits, epochs, repeats, study) for jit in (False, True)]
    worst = max(max(r["ratio"], r["ratio_vs_fit_tf_data"]) for r in rows)
    targets = [target("cliptune / model.fit per epoch (worst of XLA on/off, arrays/tf.data)",
                      worst, "<= 1.10", worst <= 1.10)]
    meta = {"repeats": repeats, "epochs": epochs, "warmup_epochs_dropped": WARMUP_EPOCHS,
            "train_samples": len(splits.train[0]), "batch_size": BATCH,
            "clip": f"global_norm {CLIP_T}", "optimizer": f"sgd lr={LR}",
            "model": "examples.keras_lstm:make_model", "tf_threads": threads,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "timing": "CPU time (process_time) per epoch, median over the epochs of interleaved "
                      "repeats; ratio_wall: the same with wall time"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("keras_overhead", "Training-loop overhead (Keras)", rows,
                  ["jit_compile", "cliptune_epoch_s", "fit_epoch_s", "fit_tf_data_epoch_s",
                   "ratio", "ratio_vs_fit_tf_data", "ratio_wall", "epochs_timed"],
                  targets, meta, **kwargs)


if __name__ == "__main__":
    run()
