"""Per-step overhead of the integration callbacks against each framework's own clipping.

Why: a user who switches from the framework's clip to cliptune's callback should not pay for it
in training time. Each framework trains the same MLP regression twice from the same seed (SGD,
batch 64, a validation pass an epoch), at two sizes: ``small`` (32 -> 256 -> 256 -> 1, 74k
parameters, 64 steps an epoch), where a step costs about a millisecond and any fixed cost per step
shows, and ``large`` (32 -> 1024 -> 1024 -> 1, 1.1M parameters, 32 steps an epoch):

- ``own``: the framework clips (global norm 1.0): Lightning ``Trainer(gradient_clip_val=1.0,
  gradient_clip_algorithm="norm")``, Transformers ``TrainingArguments(max_grad_norm=1.0)``, Keras
  ``SGD(global_clipnorm=1.0)``;
- ``cliptune``: the same clip through ``ClipTuneCallback`` (Keras: and ``trial.keras_optimizer``)
  on a trial with a real ``TrialMonitor`` (stability rules on), the framework's clip off;
- ``unclipped``: the framework's clip off and no callback (``unclipped_ratio``: over ``own``).
  What a framework does with its clip off is its own: the Transformers 5.x Trainer then still
  computes the gradient norm every step, so this bounds what any callback can reach
  (``vs_unclipped``: the callback's cost alone).

An identical epoch timer on every side stamps the CPU time of this process (one torch thread, one
TensorFlow thread; other jobs on the shared machine do not inflate it) at each epoch's start and
end; the first epoch (set-up, tracing) is left out. The candidates run interleaved, the order
rotating each repeat, and the medians of the epoch times are compared.
``overhead_us_per_step`` is the difference per optimizer step. What it is made of: Lightning, the
callback's bookkeeping and the stability rules (its clip replaces Lightning's); Transformers, also
a second gradient norm, since the Trainer computes the norm itself every step even with
``max_grad_norm=0`` (to log it); Keras, reading the step's statistics (one variable) after each
batch, which also makes Keras call the batch callbacks synchronously.

    python -m benchmarks integrations_overhead
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._common import median, report, setup_torch, target  # noqa: E402

CLIP_T, LR, BATCH, N_VAL, DIM = 1.0, 0.05, 64, 512, 32
SIZES = {"small": (256, 64), "large": (1024, 32)}  # hidden width, steps an epoch
WARMUP_EPOCHS = 1  # left out of the timings
GOAL = 1.05


def _data(n_train: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_train + N_VAL, DIM)).astype(np.float32)
    y = np.tanh(X @ rng.normal(size=(DIM, 1))).astype(np.float32)
    return X, y


def _trial() -> Any:
    """A trial with the stability rules on, its monitor reporting to an in-memory Optuna trial."""
    import optuna

    from cliptune import ClipConfig, StabilityRules, Trial, TrialMonitor

    monitor = TrialMonitor(optuna.create_study().ask(), StabilityRules())
    return Trial(ClipConfig("global_norm", CLIP_T), {}, 0, 0, monitor)


def _epoch_seconds(stamps: list[tuple[float, float]]) -> list[float]:
    return [end - start for start, end in stamps][WARMUP_EPOCHS:]


def _torch_mlp(width: int) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 1))


def lightning_epochs(kind: str, epochs: int, width: int, n_train: int) -> tuple[list[float], float]:
    """Epoch CPU seconds and the last validation loss of one Lightning fit."""
    import lightning.pytorch as pl
    import torch

    from cliptune.integrations.lightning import ClipTuneCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _torch_mlp(width)

        def training_step(self, batch: Any, i: int) -> Any:
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def validation_step(self, batch: Any, i: int) -> None:
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Timer(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.start = time.process_time()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            stamps.append((self.start, time.process_time()))

    stamps: list[tuple[float, float]] = []
    X, y = (torch.as_tensor(a) for a in _data(n_train))
    data = torch.utils.data.TensorDataset(X[:n_train], y[:n_train])
    val = torch.utils.data.TensorDataset(X[n_train:], y[n_train:])
    torch.manual_seed(0)
    ours = kind == "cliptune"
    clip = {"gradient_clip_val": CLIP_T, "gradient_clip_algorithm": "norm"} if kind == "own" else {}
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[Timer(), *([ClipTuneCallback(_trial())] if ours else [])],
                         **clip)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True),
                torch.utils.data.DataLoader(val, batch_size=N_VAL))
    return _epoch_seconds(stamps), float(trainer.callback_metrics["val_loss"])


def transformers_epochs(kind: str, epochs: int, width: int, n_train: int
                        ) -> tuple[list[float], float]:
    """Epoch CPU seconds and the last eval loss of one ``Trainer.train``."""
    import tempfile

    import torch
    import transformers

    from cliptune.integrations.transformers import ClipTuneCallback

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _torch_mlp(width)

        def forward(self, x: Any, labels: Any) -> dict[str, Any]:
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Timer(transformers.TrainerCallback):
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.process_time()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append((self.start, time.process_time()))

    stamps: list[tuple[float, float]] = []
    ours = kind == "cliptune"
    X, y = (torch.as_tensor(a) for a in _data(n_train))
    rows = [{"x": X[i], "labels": y[i]} for i in range(len(X))]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            out, num_train_epochs=epochs, per_device_train_batch_size=BATCH,
            per_device_eval_batch_size=N_VAL, learning_rate=LR, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=CLIP_T if kind == "own" else 0,
            eval_strategy="epoch", save_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=True, seed=0)
        trainer = transformers.Trainer(
            model=Model(), args=args, train_dataset=rows[:n_train], eval_dataset=rows[n_train:],
            callbacks=[Timer(), *([ClipTuneCallback(_trial())] if ours else [])])
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    last = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h][-1]
    return _epoch_seconds(stamps), float(last)


def keras_epochs(kind: str, epochs: int, width: int, n_train: int) -> tuple[list[float], float]:
    """Epoch CPU seconds and the last validation loss of one ``model.fit``."""
    import keras

    from cliptune.integrations.keras import ClipTuneCallback

    class Timer(keras.callbacks.Callback):  # epoch hooks only: batch callbacks stay async
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.process_time()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            stamps.append((self.start, time.process_time()))

    stamps: list[tuple[float, float]] = []
    X, y = _data(n_train)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"), keras.layers.Dense(1)])
    trial, ours = _trial(), kind == "cliptune"
    clip = {"global_clipnorm": CLIP_T} if kind == "own" else {}
    optimizer = (trial.keras_optimizer("sgd", learning_rate=LR) if ours else
                 keras.optimizers.SGD(learning_rate=LR, **clip))
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(X[:n_train], y[:n_train], batch_size=BATCH, epochs=epochs, verbose=0,
                        validation_data=(X[n_train:], y[n_train:]),
                        callbacks=[Timer(), *([ClipTuneCallback(trial)] if ours else [])])
    return _epoch_seconds(stamps), float(history.history["val_loss"][-1])


FRAMEWORKS: dict[str, tuple[str, Callable[..., tuple[list[float], float]]]] = {
    "lightning": ("Trainer(gradient_clip_val=1.0, gradient_clip_algorithm='norm')",
                  lightning_epochs),
    "transformers": ("TrainingArguments(max_grad_norm=1.0)", transformers_epochs),
    "keras": ("SGD(global_clipnorm=1.0)", keras_epochs),
}


def measure(framework: str, size: str, epochs: int, repeats: int) -> dict[str, Any]:
    own_clip, run_one = FRAMEWORKS[framework]
    width, steps = SIZES[size]
    kinds = ["own", "cliptune", "unclipped"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    val: dict[str, float] = {}
    for r in range(repeats):  # interleaved, the order rotating every repeat
        for kind in kinds[r % 3:] + kinds[:r % 3]:
            seconds, val[kind] = run_one(kind, epochs, width, steps * BATCH)
            times[kind] += seconds
    own, ours_s, off = (median(times[k]) for k in kinds)
    return {"framework": framework, "size": size, "own_clip": own_clip, "steps_per_epoch": steps,
            "own_epoch_s": own, "cliptune_epoch_s": ours_s, "ratio": ours_s / own,
            "ratio_min": min(times["cliptune"]) / min(times["own"]),
            "unclipped_ratio": off / own, "vs_unclipped": ours_s / off,
            "overhead_us_per_step": (ours_s - own) / steps * 1e6,
            "epochs_timed": len(times["cliptune"]), "own_val_loss": val["own"],
            "cliptune_val_loss": val["cliptune"]}


def run(epochs: int = 5, repeats: int = 7, frameworks: tuple[str, ...] = tuple(FRAMEWORKS),
        sizes: tuple[str, ...] = tuple(SIZES), out_dir: Any = None) -> dict[str, Any]:
    setup_torch()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    versions: dict[str, str] = {}
    if "transformers" in frameworks:
        import transformers

        transformers.logging.set_verbosity_error()
        versions["transformers"] = transformers.__version__
    if "lightning" in frameworks:
        import lightning

        versions["lightning"] = lightning.__version__
    if "keras" in frameworks:
        import keras
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        versions.update(tensorflow=tf.__version__, keras=keras.__version__)
    rows = [measure(name, size, epochs, repeats) for name in frameworks for size in sizes]
    targets = [target(f"{r['framework']} ({r['size']}): callback / framework's own clip per epoch",
                      r["ratio"], f"<= {GOAL}", r["ratio"] <= GOAL) for r in rows]
    meta = {"repeats": repeats, "epochs": epochs, "warmup_epochs_dropped": WARMUP_EPOCHS,
            "batch_size": BATCH, "clip": f"global_norm {CLIP_T}",
            "models": {s: f"MLP {DIM}-{w}-{w}-1, {n} steps an epoch" for s, (w, n) in SIZES.items()},
            "optimizer": f"SGD lr={LR}", "tf_threads": 1, **versions,
            "timing": "CPU time (process_time) per training epoch, median over the epochs of "
                      "interleaved repeats; ratio_min: fastest epochs"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("integrations_overhead", "Integration callbacks vs the frameworks' own clip",
                  rows, ["framework", "size", "steps_per_epoch", "own_epoch_s", "cliptune_epoch_s",
                         "ratio", "ratio_min", "unclipped_ratio", "vs_unclipped",
                         "overhead_us_per_step", "own_val_loss",
                         "cliptune_val_loss"], targets, meta, **kwargs)


if __name__ == "__main__":
    run()
