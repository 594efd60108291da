"""The figures of a tuning job, drawn from the Optuna study alone (matplotlib, Agg, PNG).

Each trial's per-epoch statistics live in its user attribute ``history`` (a list of dicts with
``train_loss``, ``val_loss``, ``grad_norm_mean``, ``grad_norm_max``, ``clip_fraction``), so the
figures need no MLflow: the tracker logs them to the parent run, ``cliptune report`` writes them
to a folder. Figures are built with :class:`matplotlib.figure.Figure`, not pyplot, so drawing
leaves no global state and needs no display.

Example:
    >>> from cliptune.plots import write_plots
    >>> write_plots(result.study, "plots")  # doctest: +SKIP
    [PosixPath('plots/val_loss_curves.png'), ...]
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from cliptune.config import ClipMode
from cliptune.space import config_from_params

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MODE_COLORS = {ClipMode.NONE: "#7f7f7f", ClipMode.VALUE: "#1f77b4", ClipMode.NORM: "#2ca02c",
               ClipMode.GLOBAL_NORM: "#d62728", ClipMode.AUTOCLIP: "#9467bd", ClipMode.AGC: "#8c564b",
               ClipMode.ZCLIP: "#e377c2"}
_SIZE = (7.0, 4.2)


def _trials(study: optuna.Study) -> list[tuple[FrozenTrial, ClipMode, float | None]]:
    """Finished trials that have a clip, with their mode and threshold."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and (
                "clip_mode" in t.params):
            clip, _ = config_from_params(t.params)
            out.append((t, clip.mode, clip.threshold))
    return out


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mode_legend(ax: Axes, modes: set[ClipMode], pruned: bool = False,
                 best_line: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=MODE_COLORS[m], label=m.value) for m in ClipMode if m in modes]
    if pruned:
        handles.append(Line2D([], [], color="black", marker="x", ls="--", label="pruned"))
    if best_line and handles:
        handles.append(Line2D([], [], color="black", label="best so far"))
    if handles:
        ax.legend(handles=handles, fontsize="small")
    else:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)


def _log_if_positive(ax: Axes, axis: str, values: list[float]) -> None:
    if values and min(values) > 0:
        _log_axis(ax, axis)


_MINOR_LABELS = (2, 3, 5, 7)  # mantissas of the minor ticks labelled on a short log axis


def _log_axis(ax: Axes, axis: str) -> None:
    """A log axis labelled with plain numbers (0.3, 2, 40), not 3x10^-1.

    Minor ticks are labelled only on an axis shorter than a decade (where few or no major ticks
    show), and then only at 2, 3, 5 and 7 times a power of ten, so labels never run together.
    """
    from matplotlib.ticker import FuncFormatter

    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target = ax.yaxis if axis == "y" else ax.xaxis

    def minor(value: float, _: int) -> str:
        low, high = target.get_view_interval()
        if low <= 0 or high <= 0 or abs(math.log10(high / low)) >= 1:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
        return f"{value:g}" if mantissa in _MINOR_LABELS else ""

    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(minor))
    low, high = sorted(target.get_data_interval())
    if low > 0 and math.log10(high / low) < 1:  # a short axis: reach a labelled tick each side
        (ax.set_ylim if axis == "y" else ax.set_xlim)(_labelled(low, math.floor) / 1.05,
                                                      _labelled(high, math.ceil) * 1.05)


def _labelled(value: float, rounding: Any) -> float:
    """The nearest power of ten times 1, 2, 3, 5 or 7 at or below (floor) / above (ceil) value."""
    exponent = math.floor(math.log10(value))
    steps = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1)
             for m in (1, *_MINOR_LABELS)]
    if rounding is math.floor:
        return max(v for v in steps if v <= value * (1 + 1e-9))
    return min(v for v in steps if v >= value * (1 - 1e-9))


def _integer_x(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _metric(study: optuna.Study) -> str:
    """The metric the study optimises (recorded with the job), ``val_loss`` by default."""
    return (study.user_attrs.get("cliptune.job") or {}).get("metric") or "val_loss"


def plot_val_loss_curves(study: optuna.Study) -> Figure:
    """The study's metric (validation loss by default) by epoch of every trial, coloured by clip
    mode; pruned trials end in an x."""
    metric = _metric(study)
    title = "Validation loss" if metric == "val_loss" else metric
    fig, ax = _figure(f"{title} by epoch", "epoch", metric)
    modes, seen, any_pruned = set(), [], False
    for t, mode, _ in _trials(study):
        points = [(e, h[metric]) for e, h in enumerate(t.user_attrs.get("history", []))
                  if math.isfinite(h.get(metric, math.nan))]
        if not points:
            continue
        modes.add(mode)
        xs, ys = zip(*points, strict=True)
        seen.extend(ys)
        pruned = t.state is not TrialState.COMPLETE
        ax.plot(xs, ys, color=MODE_COLORS[mode], alpha=0.45 if pruned else 0.85, lw=1.2,
                ls="--" if pruned else "-")
        if pruned:
            any_pruned = True
            ax.plot(xs[-1], ys[-1], "x", color="black", ms=6)
    _log_if_positive(ax, "y", seen)
    _integer_x(ax)
    _mode_legend(ax, modes, any_pruned)
    return fig


def plot_value_by_threshold(study: optuna.Study) -> Figure:
    """Each complete trial's value against its clip threshold, by mode (log x axis).

    The best value of each mode is ringed; ``none`` (no threshold) is a dashed line at its best.
    """
    fig, ax = _figure("Trial value by clip threshold", "clip threshold (log)", "value")
    minimize = study.direction.name == "MINIMIZE"
    best = min if minimize else max
    modes: set[ClipMode] = set()
    values: list[float] = []
    for mode in ClipMode:
        done = [(th, t.value) for t, m, th in _trials(study)
                if m is mode and t.state is TrialState.COMPLETE and math.isfinite(t.value)]
        if not done:
            continue
        modes.add(mode)
        values.extend(v for _, v in done)
        color = MODE_COLORS[mode]
        if mode is ClipMode.NONE:
            ax.axhline(best(v for _, v in done), color=color, ls="--", lw=1.2)
            continue
        xs, ys = zip(*sorted(done), strict=True)
        ax.scatter(xs, ys, color=color, s=22, alpha=0.8)
        top = best(done, key=lambda p: p[1])
        ax.scatter(*top, s=110, facecolors="none", edgecolors=color, linewidths=1.6)
    if modes - {ClipMode.NONE}:
        _log_axis(ax, "x")
    _log_if_positive(ax, "y", values)
    _mode_legend(ax, modes)
    return fig


def plot_optimization_history(study: optuna.Study) -> Figure:
    """Each complete trial's value by trial number, with the best so far as a step line."""
    fig, ax = _figure("Optimisation history", "trial", "value")
    better = (lambda a, b: a < b) if study.direction.name == "MINIMIZE" else (lambda a, b: a > b)
    best_x, best_y, best = [], [], None
    modes = set()
    for t, mode, _ in sorted(_trials(study), key=lambda item: item[0].number):
        if t.state is TrialState.COMPLETE and math.isfinite(t.value):
            modes.add(mode)
            ax.scatter(t.number, t.value, color=MODE_COLORS[mode], s=22)
            if best is None or better(t.value, best):
                best = t.value
            best_x.append(t.number)
            best_y.append(best)
    if best_x:
        ax.step(best_x, best_y, where="post", color="black", lw=1.2, label="best so far")
    _log_if_positive(ax, "y", _finite(best_y))
    _integer_x(ax)
    _mode_legend(ax, modes, best_line=bool(best_x))
    return fig


def plot_grad_norms(study: optuna.Study) -> Figure:
    """Histogram of the pre-clip global gradient norm (each epoch's mean and max), by clip mode."""
    import numpy as np

    fig, ax = _figure("Pre-clip gradient norm", "global gradient norm (log)", "epochs")
    by_mode: dict[ClipMode, dict[str, list[float]]] = {}
    for t, mode, _ in _trials(study):
        hist = t.user_attrs.get("history", [])
        norms = by_mode.setdefault(mode, {"mean": [], "max": []})
        norms["mean"] += _finite([h.get("grad_norm_mean") for h in hist])
        norms["max"] += _finite([h.get("grad_norm_max") for h in hist])
    every = [v for n in by_mode.values() for v in n["mean"] + n["max"] if v > 0]
    modes = {m for m, n in by_mode.items() if n["mean"]}
    if every:
        low, high = min(every), max(every)
        bins = np.geomspace(low, high * 1.0001, 30) if high > low else np.array([low / 2, low * 2])
        for mode in sorted(modes, key=list(ClipMode).index):
            color = MODE_COLORS[mode]
            ax.hist([v for v in by_mode[mode]["mean"] if v > 0], bins=bins, color=color, alpha=0.45)
            ax.hist([v for v in by_mode[mode]["max"] if v > 0], bins=bins, color=color,
                    histtype="step", lw=1.4)
        _log_axis(ax, "x")
        ax.text(0.99, 0.97, "filled: epoch mean, outline: epoch max", ha="right", va="top",
                fontsize="small", transform=ax.transAxes)
    _mode_legend(ax, modes)
    return fig


PLOTS = {
    "val_loss_curves": plot_val_loss_curves,
    "value_by_threshold": plot_value_by_threshold,
    "optimization_history": plot_optimization_history,
    "grad_norms": plot_grad_norms,
}


def write_plots(study: optuna.Study, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write every figure of ``study`` as ``<out_dir>/<name>.png`` and return the paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, plot in PLOTS.items():
        path = folder / f"{name}.png"
        plot(study).savefig(path, format="png")
        paths.append(path)
    return paths


__all__ = ["PLOTS", "plot_grad_norms", "plot_optimization_history", "plot_val_loss_curves",
           "plot_value_by_threshold", "write_plots"]
