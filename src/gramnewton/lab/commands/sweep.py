"""``gramnewton sweep CONFIG --grid KEY=[V1, V2, ...]``: one run per grid point, the point of least
validation loss chosen (:mod:`gramnewton.lab.experiments.sweep`); with ``--folds`` the test loss
of the chosen point's fold models averaged is printed too; with ``--refit`` the choice is then
trained on the whole training set (``<out>/refit``).

A point whose optimizer gives up (a GGN step that is not finite at any damping) is reported as
failed and the sweep goes on; any other error ends it, and ``--resume`` continues where it ended
(finished points are read, not retrained).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from ...solve import NonFiniteError, SingularGramError
from ..experiments.config import load_config
from ..experiments.runner import check_run_folder
from ..experiments.sweep import (
    REFIT_FOLDER,
    SweepPoint,
    check_sweep_folder,
    fold_ensemble_test,
    parse_axes,
    plot_summary,
    point_summary,
    refit_config,
    summarise,
    sweep_points,
    write_summary,
)
from .train import add_overrides, config_path, train_with_progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a config at every point of a grid and choose on the validation split"
    )
    p.add_argument("config", type=config_path, help="TOML experiment file, or the name of a packaged config")
    p.add_argument(
        "--grid",
        dest="axes",
        action="append",
        default=[],
        metavar="KEY=[V1, V2, ...]",
        help="a grid axis: a config key and a TOML array of its values, e.g. --grid 'optimizer.lr=[1e-3, 3e-3]' "
        "(repeatable: every combination is run)",
    )
    add_overrides(p, "override a config value for every point, e.g. --set data.validation_fraction=0.2 (repeatable)")
    p.add_argument(
        "--folds",
        type=_positive,
        default=1,
        metavar="K",
        help="cross-validate: run each point on K validation folds (data.validation_fold 0 to K-1, at most "
        "round(1 / data.validation_fraction)) and choose on their mean validation loss (default 1: one split)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="then train the chosen point on the whole training set (validation rows included) for the epochs "
        "of its lowest validation loss, into <out>/refit",
    )
    p.add_argument("--out", type=Path, help="sweep folder, one run folder per point (default sweeps/<config name>)")
    replace = p.add_mutually_exclusive_group()
    replace.add_argument("--resume", action="store_true", help="continue a sweep: finished points are kept")
    replace.add_argument(
        "--overwrite", action="store_true", help="replace the runs of this grid's points (other files stay)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("gramnewton sweep runs its points one after another in one process: start it without torchrun")
    config = load_config(args.config, args.overrides)
    axes = parse_axes(args.axes)
    points = sweep_points(config, axes, args.folds)
    out = args.out or Path("sweeps") / args.config.stem
    # the whole folder first (an occupied one is refused before anything trains), then each run's
    check_sweep_folder(out, resume=args.resume, overwrite=args.overwrite)
    for point in points:
        for folder, run_config in point.runs:
            check_run_folder(out / folder, resume=args.resume, overwrite=args.overwrite, config=run_config)
    if args.refit:  # its config waits for the choice; an occupied folder is refused now all the same
        check_run_folder(out / REFIT_FOLDER, resume=args.resume, overwrite=args.overwrite)
    failures: dict[str, str] = {}
    for number, point in enumerate(points, 1):
        for folder, run_config in point.runs:
            desc = f"{number}/{len(points)} {folder}"
            try:
                train_with_progress(run_config, out / folder, resume=args.resume, overwrite=args.overwrite, desc=desc)
            except KeyboardInterrupt:
                print(f"\ninterrupted at {desc}: continue the sweep with --resume")
                return 130
            except (SingularGramError, NonFiniteError) as error:  # the point fails, its other folds untrained
                failures[point.folder] = " ".join(str(error).split())
                print(f"{desc}: failed ({failures[point.folder]})")
                break
        else:
            print(f"{number}/{len(points)} {point.folder}: {_describe(point_summary(out, point))}")
    rows = summarise(out, points, failures)
    name = config["name"] or args.config.stem
    print(_table(rows, [axis.key for axis in axes]))
    if not any(row["chosen"] for row in rows):
        path = write_summary(out, rows)
        raise ValueError(f"no point of the sweep reached a finite validation loss (each point's row: {path})")
    chosen = next(row for row in rows if row["chosen"])
    chosen_point = points[rows.index(chosen)]
    sets = " ".join(f"--set '{key}={_toml(value)}'" for key, value in chosen_point.overrides)
    split = f"mean over {args.folds} validation folds" if args.folds > 1 else "the validation split"
    print(f"{name}: chosen on {split}: {chosen['point']} ({_describe(chosen)}); train it with {sets}")
    written = [write_summary(out, rows), plot_summary(out, rows, axes, title=name)]
    print(f"wrote {', '.join(map(str, written))}")
    if args.folds > 1:
        print(_describe_ensemble(out, chosen_point))
    if args.refit:
        config = refit_config(chosen_point, chosen)
        epochs = config["train"]["epochs"]
        desc = f"refit {chosen['point']} on the whole training set, {epochs} epochs"
        try:
            last = train_with_progress(
                config, out / REFIT_FOLDER, resume=args.resume, overwrite=args.overwrite, desc=desc
            )[-1]
        except KeyboardInterrupt:
            print("\ninterrupted at the refit: continue it with --resume")
            return 130
        print(f"{desc}: test loss {last['test_loss']:.4g} (in {out / REFIT_FOLDER})")
    return 0


def _describe(row: dict[str, Any]) -> str:
    """``"val loss <v> at epoch <e>, test loss <t> there"`` of a summary row."""
    if not math.isfinite(row["val_loss"]):
        return "no finite validation loss"
    where = f"epoch {row['best_epoch']:g} ({row['best_seconds']:.1f} s of training)"
    return f"val loss {row['val_loss']:.4g} at {where}, test loss {row['test_loss']:.4g} there"


def _describe_ensemble(out: Path, point: SweepPoint) -> str:
    """The test loss (and accuracy) of ``point``'s fold models averaged (:func:`fold_ensemble_test`)."""
    try:
        loss, accuracy = fold_ensemble_test([out / folder for folder, _ in point.runs])
    except FileNotFoundError:
        return f"{point.folder}: no fold models to average (the folds kept none: set train.keep_best = true)"
    quality = f", test accuracy {accuracy:.4g}" if math.isfinite(accuracy) else ""
    return (
        f"{point.folder}: its {len(point.runs)} fold models averaged: test loss {loss:.4g}{quality} "
        f"(their predictions: gramnewton predict {out})"
    )


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """A plain-text table of the summary rows, the chosen one marked ``*``."""
    quality = "test_accuracy" if "test_accuracy" in rows[0] else "test_rmse"
    columns = [*keys, "best_epoch", "best_seconds", "val_loss", "train_loss", "test_loss", quality, "last_test_loss"]

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [["", *columns]] + [["*" if row["chosen"] else "", *(cell(row[c]) for c in columns)] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in table)


def _toml(value: Any) -> str:
    """A value as ``--set`` reads it back (inline TOML)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return repr(value)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
