"""Loss-curve figures in the paper's style (matplotlib, PNG)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

X_LABELS = {"epoch": "epoch", "seconds": "training time (s)"}
# may be zero or negative: never on a log scale
LINEAR = {"gain_ratio", "rejected", "jitter", "train_accuracy", "test_accuracy", "val_accuracy"}


def plot_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    title: str = "",
    metrics: Sequence[str] = ("train_loss", "test_loss"),
    xs: Sequence[str] = ("epoch", "seconds"),
    log: bool = True,
) -> Path:
    """One panel per (metric, x-axis) pair, one line per run.

    Args:
        curves: run label -> rows with the keys named in ``metrics`` and ``xs``.
        path: PNG file to write (parent folders are created).
        log: log-scale y axes, except for the metrics in :data:`LINEAR`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(metrics), len(xs), figsize=(5 * len(xs), 3.6 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, x in enumerate(xs):
            ax = axes[row][col]
            for label, rows in curves.items():
                # a run without the column (no validation split, say) draws no line there
                ax.plot([r[x] for r in rows], [r.get(metric, math.nan) for r in rows], marker=".", label=label)
            ax.set_xlabel(X_LABELS.get(x, x))
            ax.set_ylabel(metric.replace("_", " "))
            if log and metric not in LINEAR:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_heatmap(
    values: Sequence[Sequence[float]],
    xs: Sequence[float],
    ys: Sequence[float],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "lam",
    ylabel: str = "alpha",
    label: str = "train loss",
) -> Path:
    """Grey-scale grid, lighter = higher (the paper's Fig. 2c), each cell annotated with its value.

    Args:
        values: ``values[j][i]`` belongs to ``(xs[i], ys[j])``; NaN cells (diverged) are left white.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.1 * len(xs) + 2.5, 0.8 * len(ys) + 1.8))
    finite = [v for row in values for v in row if v == v and v not in (float("inf"), float("-inf"))]
    # Losses span orders of magnitude (a diverged cell next to a converged one): log colours.
    norm = LogNorm() if finite and min(finite) > 0 else None
    image = ax.imshow(values, cmap="gray", origin="lower", aspect="auto", norm=norm)
    for j, row in enumerate(values):
        for i, value in enumerate(row):
            ax.text(i, j, f"{value:.3g}", ha="center", va="center", color="tab:red", fontsize=8)
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, label=label)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (110 dpi, the format its suffix names), close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
