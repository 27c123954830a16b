"""``gramnewton plot RUN_DIR...``: loss curves of finished (or running) runs in the paper's style."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments.figures import plot_curves
from ..experiments.reproduce import load_curves
from ..experiments.runner import METRICS_FILE
from ..experiments.step_diagnostics import DIAGNOSTIC_COLUMNS

X_AXES = {"epoch": "epoch", "time": "seconds"}
LOSSES = ["train_loss", "test_loss", "running_loss", "train_rmse", "test_rmse", "val_loss", "val_rmse"]
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
        choices=LOSSES + list(DIAGNOSTIC_COLUMNS),
        help="y axis (repeatable; default train_loss and test_loss); val_* exist in runs with "
        "data.validation_fraction; the GGN diagnostics columns are per-epoch summaries (NaN for other optimizers)",
    )
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help=f"add panels of GGN's per-epoch {', '.join(DIAGNOSTICS)} (rejected-step count)",
    )
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    xs = [X_AXES[x] for x in (args.x or ["epoch", "time"])]
    metrics = args.metric or ["train_loss", "test_loss"]
    if args.diagnostics:
        metrics = [*metrics, *(m for m in DIAGNOSTICS if m not in metrics)]
    for run in args.runs:
        if not (run / METRICS_FILE).is_file():
            raise FileNotFoundError(f"no {METRICS_FILE} in {run}: not a run folder (make one with gramnewton train)")
    path = plot_curves(load_curves(args.runs), args.out, title=args.title, metrics=metrics, xs=xs, log=args.log)
    print(f"wrote {path}")
    return 0
