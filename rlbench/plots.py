"""The report's PNG plots, drawn with matplotlib (Agg: no display needed) from run records.

Curves of several seeds are put on one x grid before they are averaged: on the step axis every
seed logs the same steps; on the samples and wall-time axes each seed has its own x values,
so each is interpolated onto a grid over the range all seeds cover. A line is the mean over
seeds and its band runs from the lowest to the highest seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlbench.records import RunRecord

#: (metric, title) of the learning-curve panels.
PANELS = (
    ("eval/accuracy", "eval accuracy (greedy)"),
    ("train/reward_mean", "reward"),
    ("train/entropy", "token entropy"),
    ("train/kl", "KL to the reference"),
)
#: (file suffix, x label, cost metric or None for the step).
X_AXES = (
    ("step", "rollout step", None),
    ("samples", "completions sampled", "cost/samples"),
    ("wall", "wall time (s)", "cost/wall_s"),
)
GRID = 60


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported late and headless
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cost_before(record: RunRecord, metric: str, step: int, inclusive: bool) -> float:
    """The cumulative cost ``metric`` when ``step`` was logged: training metrics of step s come
    after step s's samples (``inclusive``), an eval at step s before them."""
    value = 0.0
    for s, v in record.curve(metric):
        if s < step or (inclusive and s == step):
            value = v
        else:
            break
    return value


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(0, np.arange(1, len(values) + 1) - window)]) / counts


def window_for(points: int) -> int:
    """Per-step training metrics are noisy: average over about 1/30 of the run."""
    return max(1, points // 30)


def xy(record: RunRecord, metric: str, cost: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A record's curve of ``metric`` against the step or the cumulative ``cost``; per-step
    training metrics smoothed (``window_for``), evaluations as they are."""
    points = record.curve(metric)
    ys = np.array([v for _, v in points], dtype=float)
    if not metric.startswith("eval/"):
        ys = smooth(ys, window_for(len(ys)))
    if cost is None:
        return np.array([s for s, _ in points], dtype=float), ys
    inclusive = not metric.startswith("eval/")
    return np.array([cost_before(record, cost, s, inclusive) for s, _ in points], dtype=float), ys


def band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...] | None:
    """(x, mean, low, high) of several seeds' curves on a shared grid; None when they share no x range."""
    curves = [(x, y) for x, y in curves if len(x) > 0]
    if not curves:
        return None
    if len(curves) == 1:
        x, y = curves[0]
        return x, y, y, y
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    same_x = all(len(x) == len(curves[0][0]) and np.array_equal(x, curves[0][0]) for x, _ in curves)
    if same_x:
        grid = curves[0][0]
        stacked = np.stack([y for _, y in curves])
    else:
        if hi <= lo:
            return None
        grid = np.linspace(lo, hi, GRID)
        stacked = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def learning_curves(
    groups: dict[str, list[RunRecord]], axis: tuple[str, str, str | None], title: str, path: Path
) -> Path:
    """Four panels (accuracy, reward, entropy, KL) of each algorithm's runs against one x axis."""
    plt = _pyplot()
    _, xlabel, cost = axis
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for panel, (metric, label) in zip(axes.flat, PANELS):
        for colour, (algorithm, records) in enumerate(groups.items()):
            drawn = band([xy(r, metric, cost) for r in records])
            if drawn is None:
                continue
            x, mean, low, high = drawn
            line = panel.plot(x, mean, label=f"{algorithm} (n={len(records)})", color=f"C{colour}")[0]
            panel.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        panel.set_title(label)
        panel.set_xlabel(xlabel)
        panel.grid(alpha=0.3)
    axes.flat[0].legend(loc="best", fontsize=8)
    fig.suptitle(
        f"{title}: mean over seeds, band from lowest to highest seed "
        f"(training metrics: moving average over 1/30 of the run)"
    )
    return _save(fig, plt, path)


def robustness(
    by_algorithm: dict[str, list[tuple[float, float, float, float]]], noise_field: str, title: str, path: Path
) -> Path:
    """Final eval accuracy against the injected noise level per algorithm: ``(level, mean, CI
    low, CI high)`` points (a level without a finished run is left out of its line; a NaN CI,
    too few runs for one, draws the point without a bar)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for colour, (algorithm, points) in enumerate(by_algorithm.items()):
        if not points:
            continue
        level, mean, low, high = (np.array(column) for column in zip(*points))
        ax.errorbar(
            level,
            mean,
            yerr=[mean - low, high - mean],
            marker="o",
            capsize=3,
            label=algorithm,
            color=f"C{colour}",
        )
    ax.set_xlabel(f"reward_noise.{noise_field}")
    ax.set_ylabel("final eval accuracy")
    ax.set_title(f"{title}: robustness to reward noise (mean; bars: 95% t-interval, from 3 runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def pass_at_k(curves: dict[str, tuple[list[int], list[float]]], title: str, path: Path) -> Path:
    """pass@k against k (log scale) per algorithm at the final eval, and for the warm start."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    colour = 0  # the algorithms' colours of the other plots; the warm start in black
    for name, (ks, values) in curves.items():
        if name == "warm start":
            ax.plot(ks, values, marker="o", label=name, linestyle="--", color="black")
        else:
            if ks:  # an algorithm without a finished run keeps its colour, draws nothing
                ax.plot(ks, values, marker="o", label=name, color=f"C{colour}")
            colour += 1
    ax.set_xscale("log", base=2)
    ks = curves["warm start"][0]
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k (unbiased estimate)")
    ax.set_title(f"{title}: pass@k, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig: object, plt: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return path
