"""A character-level LSTM language model in your own training loop, its clipping tuned by cliptune.

The text is real and offline: source files of Python's own standard library. The loop is the kind
people write for language models: truncated backpropagation through time over parallel streams of
text with the hidden state carried from chunk to chunk, plain SGD with a high learning rate and a
one-cycle schedule, and bits per character (bpc) on held-out text as the objective. At this
learning rate the LSTM's gradients explode without clipping. Three lines make it a cliptune trial
(marked ``# cliptune``). Run it:

    python examples/char_lstm.py            # tune, then re-train the winner against the baselines
    cliptune tune examples/char_lstm.yaml   # the same study as a CLI job
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import optuna
import torch
from torch import nn

import cliptune

FILES = ("argparse.py", "difflib.py", "textwrap.py", "heapq.py", "calendar.py", "pprint.py")

SEQ, STREAMS, EPOCHS, LR = 64, 32, 3, 30.0


def load_text() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Train and validation character codes (bytes), 90% / 10% of the files in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / name).read_bytes() for name in FILES)
    codes = torch.tensor(list(data), dtype=torch.long)
    cut = int(0.9 * len(codes))
    return codes[:cut], codes[cut:], 256


def streams(codes: torch.Tensor, n: int) -> torch.Tensor:
    """The text as ``n`` parallel streams, shape (n, length)."""
    length = len(codes) // n
    return codes[: n * length].view(n, length)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


@torch.no_grad()
def bits_per_char(model: CharLSTM, data: torch.Tensor) -> float:
    """Mean cross-entropy on ``data`` (streams), carried state, in bits per character."""
    model.eval()
    state, total, count = None, 0.0, 0
    for i in range(0, data.shape[1] - 1, SEQ):
        x, y = data[:, i:i + SEQ], data[:, i + 1:i + 1 + SEQ]
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train()
    return total / count / math.log(2)


def train(trial: cliptune.Trial) -> None:
    """One trial: the user's loop, with cliptune's three lines."""
    torch.set_num_threads(1)
    torch.manual_seed(trial.seed or 0)
    train_codes, val_codes, vocab = load_text()
    train_data, val_data = streams(train_codes, STREAMS), streams(val_codes, 8)
    model = CharLSTM(vocab, hidden=trial.extras.get("hidden", 128))
    opt = torch.optim.SGD(model.parameters(), lr=trial.extras.get("lr", LR))
    steps = EPOCHS * math.ceil((train_data.shape[1] - 1) / SEQ)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=trial.extras.get("lr", LR),
                                                total_steps=steps)
    for epoch in range(EPOCHS):
        state = None
        for i in range(0, train_data.shape[1] - 1, SEQ):
            x, y = train_data[:, i:i + SEQ], train_data[:, i + 1:i + 1 + SEQ]
            x = x[:, : y.shape[1]]
            opt.zero_grad()
            logits, state = model(x, state)
            state = tuple(s.detach() for s in state)  # truncated BPTT: carry, do not backprop
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            trial.clip_(model.parameters(), loss)  # cliptune: the trial's clip, watched
            opt.step()
            sched.step()
        trial.report(epoch, bpc=bits_per_char(model, val_data))  # cliptune: the epoch's metric


def retrain(config: cliptune.ClipConfig, seeds: range) -> list[str]:
    """Validation bpc of ``config`` trained from fresh seeds, outside the study (or why the
    stability rules stopped it)."""
    results = []
    for seed in seeds:
        reporter = cliptune.trial.PlainReporter()
        monitor = cliptune.TrialMonitor(reporter, cliptune.StabilityRules(), metric="bpc")
        try:
            train(cliptune.Trial(config, {}, number=0, seed=seed, monitor=monitor))
            results.append(f"{monitor.history[-1]['bpc']:.3f}")
        except optuna.TrialPruned:
            results.append(f"blew up ({reporter.user_attrs['prune_reason']})")
    return results


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = cliptune.tune_loop(train, search_space="rnn", n_trials=16, metric="bpc", seed=0,  # cliptune
                                experiment="char-lstm")
    print(result.summary())
    fresh = range(100, 103)
    for name, config in [("tuned", result.best_config),
                         ("global_norm 1.0", cliptune.ClipConfig("global_norm", 1.0)),
                         ("no clip", cliptune.ClipConfig("none"))]:
        print(f"{name:>16}: validation bpc on fresh seeds {', '.join(retrain(config, fresh))}")
