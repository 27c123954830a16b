"""``gramnewton plot RUN_DIR...``: loss curves of finished (or running) runs in the paper's style."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backend_bases import FigureCanvasBase

from ..experiments.figures import plot_curves
from ..experiments.metrics import read_rows
from ..experiments.runner import METRICS_FILE, run_labels
from ..experiments.step_diagnostics import DIAGNOSTIC_COLUMNS

X_AXES = {"epoch": "epoch", "time": "seconds"}
LOSSES = ["train_loss", "test_loss", "running_loss", "train_rmse", "test_rmse", "val_loss", "val_rmse"]
ACCURACIES = ["train_accuracy", "test_accuracy", "val_accuracy"]  # classification runs' columns
DIAGNOSTICS = ["alpha", "gain_ratio", "rejected"]  # what --diagnostics adds


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="plot train and test loss of run folders (metrics.csv)")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "--x",
        choices=sorted(X_AXES),
        action="append",
        help="x axis: epoch or time (training seconds); repeat for both (default both)",
    )
    p.add_argument("--log", action="store_true", help="log-scale losses")
    p.add_argument(
        "--metric",
        action="append",
        choices=LOSSES + ACCURACIES + list(DIAGNOSTIC_COLUMNS),
        help="y axis (repeatable; default train_loss and test_loss); *_rmse exist in regression runs, "
        "*_accuracy in classification runs, val_* in runs with data.validation_fraction; the GGN "
        "diagnostics columns are per-epoch summaries (NaN for other optimizers)",
    )
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help=f"add panels of GGN's per-epoch {', '.join(DIAGNOSTICS)} (rejected-attempt count, retries included)",
    )
    p.add_argument("--title", default="")
    p.add_argument(
        "--out", type=Path, default=Path("curves.png"), help="PNG to write (.png is added to a name without a suffix)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = figure_path(args.out)
    xs = [X_AXES[x] for x in (args.x or ["epoch", "time"])]
    metrics = args.metric or ["train_loss", "test_loss"]
    if args.diagnostics:
        metrics = [*metrics, *(m for m in DIAGNOSTICS if m not in metrics)]
    for run in args.runs:
        if not (run / METRICS_FILE).is_file():
            raise FileNotFoundError(f"no {METRICS_FILE} in {run}: not a run folder (make one with gramnewton train)")
    # Every file is read and checked before anything is drawn: a bad one writes no figure.
    curves = {
        label: read_metrics(run / METRICS_FILE, columns=[*xs, *metrics], required=xs)
        for label, run in zip(run_labels(args.runs), args.runs)
    }
    absent = [m for m in metrics if not any(m in rows[0] for rows in curves.values())]
    if absent:  # a panel without a line: say why instead of drawing it
        raise ValueError(
            f"no run given has a {', '.join(absent)} column: *_rmse are logged by regression runs, "
            "*_accuracy by classification runs, val_* by runs with data.validation_fraction > 0"
        )
    path = plot_curves(curves, out, title=args.title, metrics=metrics, xs=xs, log=args.log)
    print(f"wrote {path}")
    return 0


def figure_path(out: Path) -> Path:
    """The file that ``savefig(out)`` writes: matplotlib adds ``.png`` to a name without a suffix
    (``--out r/notes`` wrote ``r/notes.png`` while ``wrote r/notes`` was printed), and fails, after
    all the reading and drawing, on a suffix it has no writer for; a folder is refused up front."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the PNG to write, e.g. --out {out / 'curves.png'}")
    if not out.suffix:
        return out.with_name(out.name + ".png")
    if out.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"--out {out}: matplotlib writes no {out.suffix} files; name a .png (or .pdf, .svg) file")
    return out


def read_metrics(path: Path, *, columns: Sequence[str], required: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a run's metrics.csv (:func:`~gramnewton.lab.experiments.metrics.read_rows`, which
    refuses a line ``gramnewton train`` would not write), the ``columns`` it has as numbers;
    ``required`` (the x axes) must be there and finite.

    Raises:
        ValueError: naming the file (and the line): see ``read_rows``; no rows; a ``required``
            column missing or not finite.
    """
    rows = read_rows(path, numeric=columns)
    header = list(rows[0]) if rows else []
    missing = [c for c in required if rows and c not in header]
    if missing:
        raise ValueError(
            f"{path}, line 1: no {', '.join(missing)} column in the header "
            f"({', '.join(header[:4])}{', ...' * (len(header) > 4)}): "
            "not a metrics.csv written by gramnewton train"
        )
    if not rows:
        raise ValueError(f"{path} has a header but no rows: the run has logged no evaluation yet (plot it later)")
    for line, row in enumerate(rows, 2):
        for column in required:
            if not math.isfinite(row[column]):
                raise ValueError(f"{path}, row {line - 1}: {column} is {row[column]}, an x axis needs a finite number")
    return rows
