"""Training-loop overhead: one trial trained by cliptune versus a plain hand-written torch loop.

Why: cliptune's loop adds work every step (the pre-clip norm and clip flag read off the tensors, a
``TrialMonitor`` keeping statistics and applying the stability rules) and every epoch (an Optuna
report and ``should_prune``). It must cost little next to the loop a user would write anyway.

Both sides train the same model from the same seed on the same data and batches, clip the same way
(global norm 1.0: torch's ``clip_grad_norm_`` in the plain loop, and in a second plain loop
cliptune's own kernel, so that the ratio to it is the loop and monitor alone) and compute the validation loss
every epoch. cliptune runs its built-in loop with a real ``Trial`` (stability rules on) on a trial
of an in-memory study, tracking off. A fourth candidate is the user's own loop of
``tune_loop``: the plain loop calling ``trial.clip_(params, loss)`` instead of
``clip_grad_norm_`` and ``trial.report`` each epoch (``user_ratio``: against the plain loop with
torch's clip). Whole calls are timed (model build included on
both sides) in CPU time of this process (one torch thread; other jobs on the machine do not
inflate it), interleaved, median of the repeats. ``monitor_step_us`` times ``TrialMonitor.step``
alone and ``monitor_share`` is its share of the plain loop's time: the part of the ratio that is
cliptune's per-step work, below the noise of whole calls. ``ratio_same_kernel_min`` compares the
fastest repeats instead of the medians (the least disturbed by other jobs). Tasks: an LSTM on the
adding problem (``examples/adding_rnn.py`` data) and an MLP regression.

    python -m benchmarks loop_overhead
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._common import interleaved, median, report, setup_torch, target, train_one

CLIP_T = 1.0


def _lstm_task() -> tuple[Callable[[], Any], tuple[np.ndarray, np.ndarray], int]:
    from torch import nn

    from examples.adding_rnn import make_data

    class LSTMRegressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(2, 32, batch_first=True)
            self.head = nn.Linear(32, 1)

        def forward(self, x: Any) -> Any:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    return LSTMRegressor, make_data(2560), 32


def _mlp_task() -> tuple[Callable[[], Any], tuple[np.ndarray, np.ndarray], int]:
    from torch import nn

    rng = np.random.default_rng(0)
    X = rng.normal(size=(4096, 32)).astype(np.float32)
    y = np.tanh(X @ rng.normal(size=(32, 1))).astype(np.float32)

    def make_mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 1))

    return make_mlp, (X, y), 64


TASKS = {"lstm_adding": _lstm_task, "mlp": _mlp_task}


def plain_loop(model_fn: Callable[[], Any], splits: Any, epochs: int, batch_size: int,
               lr: float, seed: int, kernel: str = "torch", trial: Any = None) -> list[float]:
    """What a user writes by hand: SGD, MSE, the clip, a validation loss every epoch.

    ``kernel="torch"`` clips with ``clip_grad_norm_``; ``"cliptune"`` with cliptune's own kernel,
    so that the difference to cliptune's loop is the loop and the monitor alone. With a ``trial``
    the loop is a ``tune_loop`` user's: ``trial.clip_(params, loss)`` and ``trial.report``.
    """
    import torch

    from cliptune import ClipConfig
    from cliptune.backends._torch_clip import clip_tensors_

    clip = ClipConfig("global_norm", CLIP_T)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = model_fn()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    loss_fn = torch.nn.MSELoss()
    X, y = (torch.as_tensor(a) for a in splits.train)
    Xv, yv = (torch.as_tensor(a) for a in splits.val)
    val_losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            if trial is not None:
                trial.clip_(params, loss)
            elif kernel == "torch":
                torch.nn.utils.clip_grad_norm_(params, CLIP_T, foreach=True)
            else:
                clip_tensors_([p.grad for p in params], clip)
            opt.step()
        model.eval()
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(Xv), batch_size):
                xb, yb = Xv[start:start + batch_size], yv[start:start + batch_size]
                total += float(loss_fn(model(xb), yb)) * len(xb)
        val_losses.append(total / len(Xv))
        if trial is not None:
            trial.report(epoch, val_loss=val_losses[-1])
    return val_losses


def cliptune_loop(model_fn: Callable[[], Any], splits: Any, epochs: int, batch_size: int,
                  lr: float, seed: int, study: Any) -> list[float]:
    """The same training through cliptune's built-in loop and a real ``Trial``."""
    from cliptune import ClipConfig, StabilityRules
    from cliptune.monitor import TrialMonitor

    monitor = TrialMonitor(study.ask(), StabilityRules())
    train_one("torch", model_fn, splits, ClipConfig("global_norm", CLIP_T), monitor, seed,
              loss="mse", optimizer="sgd", lr=lr, epochs=epochs, batch_size=batch_size)
    return [h["val_loss"] for h in monitor.history]


def user_loop(model_fn: Callable[[], Any], splits: Any, epochs: int, batch_size: int,
              lr: float, seed: int, study: Any) -> list[float]:
    """The plain loop a user writes, with ``trial.clip_(params, loss)`` in place of
    ``clip_grad_norm_`` and ``trial.report`` each epoch: what ``tune_loop`` costs a user's loop."""
    from cliptune import ClipConfig, StabilityRules, Trial
    from cliptune.monitor import TrialMonitor

    monitor = TrialMonitor(study.ask(), StabilityRules())
    trial = Trial(ClipConfig("global_norm", CLIP_T), {}, 0, seed, monitor)
    plain_loop(model_fn, splits, epochs, batch_size, lr, seed, trial=trial)
    return [h["val_loss"] for h in monitor.history]


def monitor_step_us(n: int = 20000) -> float:
    """CPU microseconds of one ``TrialMonitor.step`` (rules on, a noisy loss), timed alone."""
    import optuna

    from cliptune import StabilityRules
    from cliptune.monitor import TrialMonitor

    monitor = TrialMonitor(optuna.create_study().ask(), StabilityRules())
    losses = np.random.default_rng(0).uniform(1.0, 1.1, n).tolist()
    start = time.process_time()
    for loss in losses:
        monitor.step(loss, 2.0, True)
    return (time.process_time() - start) / n * 1e6


def measure(task: str, epochs: int, repeats: int) -> dict[str, Any]:
    import optuna

    from cliptune.data import make_splits

    model_fn, data, batch_size = TASKS[task]()
    splits = make_splits(data, 0.2, 0)
    study = optuna.create_study()
    lr = 0.05
    runs: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain_loop(model_fn, splits, epochs, batch_size, lr, 0),
        "plain_ck": lambda: plain_loop(model_fn, splits, epochs, batch_size, lr, 0, "cliptune"),
        "cliptune": lambda: cliptune_loop(model_fn, splits, epochs, batch_size, lr, 0, study),
        "user": lambda: user_loop(model_fn, splits, epochs, batch_size, lr, 0, study),
    }
    reference = runs["plain"]()  # also a warm-up of each
    same = np.allclose(reference, runs["cliptune"](), rtol=1e-4)
    same = same and np.allclose(reference, runs["user"](), rtol=1e-4)
    times = interleaved(runs, repeats, clock=time.process_time)
    plain, plain_ck, ours, user = (median(times[k]) for k in ("plain", "plain_ck", "cliptune",
                                                                 "user"))
    steps = epochs * -(-len(splits.train[0]) // batch_size)
    return {"task": task, "epochs": epochs, "steps": steps, "plain_s": plain,
            "plain_cliptune_kernel_s": plain_ck, "cliptune_s": ours, "ratio": ours / plain,
            "ratio_same_kernel": ours / plain_ck,
            "ratio_same_kernel_min": min(times["cliptune"]) / min(times["plain_ck"]),
            "user_loop_s": user, "user_ratio": user / plain,
            "overhead_us_per_step": (ours - plain_ck) / steps * 1e6, "same_val_losses": bool(same)}


def run(epochs: int = 2, repeats: int = 31, tasks: tuple[str, ...] = tuple(TASKS),
        out_dir: Any = None) -> dict[str, Any]:
    setup_torch()
    rows = [measure(task, epochs, repeats) for task in tasks]
    step_us = monitor_step_us()
    for row in rows:
        row["monitor_step_us"] = step_us
        row["monitor_share"] = step_us * 1e-6 * row["steps"] / row["plain_s"]
    worst = max(max(r["ratio"], r["ratio_same_kernel"]) for r in rows)
    user = max(r["user_ratio"] for r in rows)
    targets = [target("cliptune / plain loop (worst task and kernel)", worst, "<= 1.03",
                      worst <= 1.03),
               target("user loop with trial.clip_ / with clip_grad_norm_ (worst task)", user,
                      "<= 1.03", user <= 1.03)]
    meta = {"repeats": repeats, "clip": f"global_norm {CLIP_T}", "optimizer": "sgd",
            "timing": "CPU time (process_time) of the whole training call, median of "
                                 "interleaved repeats"}
    kwargs = {} if out_dir is None else {"out_dir": out_dir}
    return report("loop_overhead", "Training-loop overhead (torch)", rows,
                  ["task", "steps", "plain_s", "plain_cliptune_kernel_s", "cliptune_s", "ratio",
                   "ratio_same_kernel", "ratio_same_kernel_min", "user_loop_s", "user_ratio",
                   "overhead_us_per_step",
                   "monitor_step_us", "monitor_share",
                   "same_val_losses"], targets, meta, **kwargs)


if __name__ == "__main__":
    run()
