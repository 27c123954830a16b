"""Loss-curve figures in the paper's style (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

X_LABELS = {"epoch": "epoch", "seconds": "training time (s)"}


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = "",
                metrics: Sequence[str] = ("train_loss", "test_loss"), xs: Sequence[str] = ("epoch", "seconds"),
                log: bool = True) -> Path:
    """One panel per (metric, x-axis) pair, one line per run.

    Args:
        curves: run label -> rows with the keys named in ``metrics`` and ``xs``.
        path: PNG file to write (parent folders are created).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(metrics), len(xs), figsize=(5 * len(xs), 3.6 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, x in enumerate(xs):
            ax = axes[row][col]
            for label, rows in curves.items():
                ax.plot([r[x] for r in rows], [r[metric] for r in rows], marker=".", label=label)
            ax.set_xlabel(X_LABELS.get(x, x))
            ax.set_ylabel(metric.replace("_", " "))
            if log:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
