"""The train function of the faults tier's jobs: no framework, markers on disk, knobs from FX_*.

- ``FX_DIR``: the folder of the markers; ``started-N`` holds the pid of the process running trial N.
- ``FX_BLOCK``: ``all`` or trial numbers (``2,5``): those trials write ``blocked-N`` and wait until
  the file ``release`` exists, so that a test can signal a process in the middle of a trial.
- ``FX_BARRIER``: N: the first trial of each process waits until N processes have started one.
- ``FX_EPOCHS``: epochs each trial reports (default 2).
- ``FX_FILL``: ``N:PATH``: trial N fills the disk of PATH (writes PATH until the disk is full), as
  another process could, waits for the writes in flight to give their journals' pages back and
  takes those too, then reports as usual.

A trial is worth ``1 / (number + 1)`` (plus a little for its threshold): every new trial is the
best so far, so the best of a study changes whenever it runs more trials.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

_SEEN: list[int] = []  # trials this process has run


def _wait_until(done: Any) -> None:
    while not done():
        time.sleep(0.02)


def train(trial: Any) -> None:
    folder = Path(os.environ.get("FX_DIR", "."))
    (folder / f"started-{trial.number}").write_text(str(os.getpid()))
    barrier = int(os.environ.get("FX_BARRIER", "0"))
    if barrier and not _SEEN:
        (folder / f"arrived-{os.getpid()}").touch()
        _wait_until(lambda: len(list(folder.glob("arrived-*"))) >= barrier)
    _SEEN.append(trial.number)
    block = os.environ.get("FX_BLOCK", "")
    if block == "all" or str(trial.number) in block.split(","):
        (folder / f"blocked-{trial.number}").write_text(str(os.getpid()))
        _wait_until((folder / "release").exists)
    fill = os.environ.get("FX_FILL", "")
    if fill and int(fill.partition(":")[0]) == trial.number:
        _fill(Path(fill.partition(":")[2]))
    threshold = trial.config.threshold or 1.0
    value = 1.0 / (trial.number + 1) + 1e-3 * abs(math.log(threshold))
    for epoch in range(int(os.environ.get("FX_EPOCHS", "2"))):
        trial.step(1.0, threshold)
        trial.report(epoch, val_loss=value + 1e-3 / (epoch + 1))


def _fill(path: Path) -> None:
    _fill_up(path, "wb")
    # A write in flight when the disk filled (MLflow's sender, Optuna's heartbeat) gives its
    # journal's pages back when it fails: wait until none is left, and take those pages too, so
    # that the disk stays full for every write after (a journal made on a full disk holds none).
    _wait_until(lambda: not any(path.parent.glob("**/*-journal")))
    _fill_up(path, "ab")


def _fill_up(path: Path, mode: str) -> None:
    chunk = b"\0" * 65536
    with open(path, mode, buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError:  # ENOSPC: the disk is full
            pass
        try:
            while True:  # the last bytes too
                handle.write(b"\0")
        except OSError:
            pass
