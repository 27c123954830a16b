"""``gramnewton predict PATH...``: the predictions of trained runs on a split of their data set, to CSV.

A PATH is a run folder (``gramnewton train``'s ``--out``) or a sweep folder (``gramnewton
sweep``'s ``--out``: its chosen point's run, or that point's fold runs with ``--folds``). All the
runs the PATHs name are averaged into one model (a regression's predictions, a classifier's
probabilities: :mod:`gramnewton.lab.experiments.predictions`). The command prints that model's
loss on the split and writes one row per sample (:func:`~gramnewton.lab.experiments.predictions.prediction_table`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ..data.classification import is_classification
from ..experiments.predictions import (
    ENSEMBLE_AVERAGES,
    MODEL_CHOICES,
    PREDICTION_SPLITS,
    load_ensemble,
    predict,
    prediction_table,
    write_predictions,
)
from ..experiments.runner import CONFIG_FILE
from ..experiments.sweep import SUMMARY_FILE, chosen_runs
from ..experiments.training import evaluate, task_loss


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict a split of the data with trained runs (averaged) and write the predictions as CSV"
    )
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a run folder, or a sweep folder (its chosen point's runs); the models of all are averaged",
    )
    p.add_argument(
        "--split",
        choices=PREDICTION_SPLITS,
        default="test",
        help="the test set (default) or the whole training set, validation rows included",
    )
    p.add_argument(
        "--model",
        choices=MODEL_CHOICES,
        default="auto",
        help="each run's best-validation model (best.pt), its last (checkpoint.pt), or auto: best.pt where "
        "the run kept one (default)",
    )
    p.add_argument(
        "--average",
        choices=ENSEMBLE_AVERAGES,
        help="what several models average (default: a regression's outputs, a classifier's probabilities)",
    )
    p.add_argument(
        "--out", type=Path, help="CSV to write (default: PATH/predictions-<split>.csv for one PATH; needed for more)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    runs = [run for path in args.paths for run in run_folders(path)]
    out = output_path(args)
    ensemble, dataset, files = load_ensemble(runs, args.split, args.model, args.average)
    loss, accuracy = evaluate(ensemble, dataset, task_loss(dataset))
    header, table = prediction_table(dataset, predict(ensemble, dataset))
    write_predictions(out, header, table)
    if is_classification(dataset):
        quality = f"cross-entropy {loss:.4g}, accuracy {accuracy:.4g}"
    else:
        unit = f" {dataset.scale.unit}" if dataset.scale.unit else ""
        quality = f"MSE {loss:.4g} (normalised targets), RMSE {dataset.scale.rmse_in_unit(loss):.4g}{unit}"
    models = ", ".join(f"{count} {file}" for file, count in Counter(files).items())
    averaged = f" averaged ({ensemble.average})" if len(runs) > 1 else ""
    print(f"{args.split} split, {len(dataset)} samples, {len(runs)} model(s){averaged} ({models}): {quality}")
    print(f"wrote {out}")
    return 0


def run_folders(path: Path) -> list[Path]:
    """The run folders ``path`` names: itself (a run folder) or a sweep's chosen runs
    (:func:`~gramnewton.lab.experiments.sweep.chosen_runs`)."""
    if (path / CONFIG_FILE).is_file():
        return [path]
    if (path / SUMMARY_FILE).is_file():
        return chosen_runs(path)
    raise FileNotFoundError(
        f"{path} is neither a run folder ({CONFIG_FILE}) nor a sweep folder ({SUMMARY_FILE}): "
        "give what gramnewton train or gramnewton sweep wrote (--out)"
    )


def output_path(args: argparse.Namespace) -> Path:
    """``--out``, or ``PATH/predictions-<split>.csv`` for one PATH; an existing file only with ``--overwrite``."""
    if args.out is None and len(args.paths) > 1:
        raise ValueError(f"{len(args.paths)} paths: name the predictions file with --out")
    out = args.out or args.paths[0] / f"predictions-{args.split}.csv"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name a file")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it, or another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no folder {out.parent} to write {out.name} in")
    return out
