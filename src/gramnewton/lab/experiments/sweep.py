"""A grid of runs of one config, chosen on the validation split (``gramnewton sweep``).

A sweep trains one config at every point of a grid of overrides, the Cartesian product of its
axes (``key=[v1, v2, ...]``, :func:`parse_axes`), each point into its own run folder
``<out>/<NN>-<leaf>=<value>,...`` (:func:`sweep_points`; the runner's checkpoints and resume).
It then picks the point whose lowest validation loss is least: ``val_loss`` over every
evaluation of the run, the model ``train.keep_best`` keeps. The test set never takes part in the
choice; the summary reports it beside the validation loss (:func:`summarise`).

Every point is trained on the same split: the config must hold part of its training set out
(``data.validation_fraction > 0``), and no axis may change the data or the seed that draws the
split (``seed``, ``data.*``): validation losses of two splits do not rank two settings. With
``folds`` (``--folds K``) every point runs on the same K validation folds
(``data.validation_fold``: K-fold cross-validation) and is ranked by their mean. Every
point's config is resolved and validated before any training, so a typo in the last value fails
before the first run. With ``refit`` (``--refit``) the chosen point is then trained once more on
the whole training set, held-out rows included, for the epochs at which its validation loss was
lowest (:func:`refit_config`), into ``<out>/refit``: the model a user deploys, its test loss
read only after the choice. With folds the chosen point's K kept models also make one model
(:func:`fold_ensemble`: a regression's predictions averaged, a classifier's probabilities): each
saw a different part of the rows.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import parse_override, set_dotted, validate, validation_folds
from .figures import plt, save_figure
from .metrics import read_rows, write_rows
from .optimizers import build_optimizer, takes_weight_decay
from .predictions import FoldEnsemble, load_ensemble
from .runner import METRICS_FILE
from .training import evaluate, task_loss

SUMMARY_FILE, FIGURE_FILE, REFIT_FOLDER = "sweep.csv", "sweep.png", "refit"
# Keys that change the training/validation split: points differing in them are not comparable.
SPLIT_KEYS = ("seed", "data")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")
_FOLDER_CHARS = 80


@dataclass(frozen=True)
class Axis:
    """One grid axis: the dotted config ``key`` and its ``values`` (TOML values, in order)."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: its ``folder`` name under the sweep folder, its ``overrides`` (key, value)
    in axis order, the resolved, validated ``config`` it trains, and its ``runs``: (run folder
    under the sweep folder, config) per validation fold, ``((folder, config),)`` without folds."""

    folder: str
    overrides: tuple[tuple[str, Any], ...]
    config: dict[str, Any]
    runs: tuple[tuple[str, dict[str, Any]], ...]


def parse_axes(items: Iterable[str]) -> list[Axis]:
    """``["optimizer.lr=[1e-3, 3e-3]"]`` -> ``[Axis("optimizer.lr", (0.001, 0.003))]``.

    Each item is ``key=<TOML array>``, read like a ``--set`` value (so tables are inline TOML
    tables: ``optimizer.adaptive_damping=[{name = "gain_ratio", min_alpha = 10}, "auto"]``).

    Raises:
        ValueError: an item without ``=``, a value that is not a non-empty array, a key given
            twice, or a key that changes the split (``seed``, ``data.*``).
    """
    axes: list[Axis] = []
    for item in items:
        key, values = parse_override(item)
        if not isinstance(values, list) or not values:
            raise ValueError(f"--grid {item!r}: the values must be a non-empty TOML array, e.g. {key}=[0.1, 1.0]")
        if key.split(".")[0] in SPLIT_KEYS:
            raise ValueError(
                f"--grid {key}: a sweep compares its points on one validation split, which seed and data.* "
                "choose; run one sweep per seed or data set"
            )
        if any(axis.key == key for axis in axes):
            raise ValueError(f"--grid {key} is given twice: put all its values in one array")
        axes.append(Axis(key, tuple(values)))
    if not axes:
        raise ValueError("a sweep needs at least one --grid key=[values]")
    return axes


def sweep_points(config: Mapping[str, Any], axes: Sequence[Axis], folds: int = 1) -> list[SweepPoint]:
    """Every point of the grid of ``axes`` over the resolved ``config`` (the last axis varying
    fastest), each resolved and validated; with ``folds > 1`` each point runs on the first
    ``folds`` validation folds (``data.validation_fold`` 0, 1, ...; run folders ``<point>/fold-<i>``).

    Raises:
        ValueError: ``config`` holds no validation split, more ``folds`` than its
            ``validation_fraction`` gives, or a point's config is not valid (naming the point).
    """
    fraction = config["data"]["validation_fraction"]
    if not fraction:
        raise ValueError(
            "a sweep chooses on held-out data: set data.validation_fraction, e.g. --set data.validation_fraction=0.2"
        )
    if folds > 1 and (folds > validation_folds(fraction) or config["data"]["validation_fold"]):
        raise ValueError(
            f"--folds {folds}: data.validation_fraction = {fraction:g} gives {validation_folds(fraction)} folds"
            + (
                ", and data.validation_fold must be left at 0 (the folds are the sweep's)"
                if config["data"]["validation_fold"]
                else ""
            )
        )
    points = []
    for index, values in enumerate(itertools.product(*(axis.values for axis in axes))):
        overrides = tuple((axis.key, value) for axis, value in zip(axes, values))
        label = ",".join(_setting(key, value) for key, value in overrides)
        point = copy.deepcopy(dict(config))
        try:
            for key, value in overrides:
                set_dotted(point, key, copy.deepcopy(value))
            validate(point)
            _check_optimizer_values(point)
        except ValueError as error:
            raise ValueError(f"grid point {label}: {error}") from None
        folder = f"{index:02d}-{_UNSAFE.sub('_', label)[:_FOLDER_CHARS]}"
        runs = [(folder, point)]
        if folds > 1:
            runs = [(f"{folder}/fold-{i}", copy.deepcopy(point)) for i in range(folds)]
            for i, (_, fold) in enumerate(runs):
                fold["data"]["validation_fold"] = i
        points.append(SweepPoint(folder, overrides, point, tuple(runs)))
    return points


def _check_optimizer_values(config: Mapping[str, Any]) -> None:
    """Build the point's optimizer for a stand-in model: its constructor checks the values' ranges
    (``alpha >= 0``, ...), which :func:`~gramnewton.lab.experiments.config.validate` leaves to it."""
    decay = {"weight_decay": config["train"]["weight_decay"]} if takes_weight_decay(config["optimizer"]["name"]) else {}
    build_optimizer({**config["optimizer"], **decay}, nn.Linear(2, 1))


def refit_config(point: SweepPoint, row: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen ``point``'s config trained on its whole training set: no validation split
    (``data.validation_fraction = 0``, so no best-model keeping or early stopping), for
    ``train.epochs = round(row["best_epoch"])`` (at least 1; with folds the folds' mean), the epoch
    of the lowest validation loss in ``row`` (:func:`summarise`), and no ``train.seconds`` limit.

    The chosen setting retrained on every row, as scikit-learn's ``refit`` does, with the
    training length a setting of its own: the epoch count carries over, not the step count, so
    the refit takes ``1 / (1 - validation_fraction)`` times the steps of an epoch on the split.

    Raises:
        ValueError: ``row`` has no finite ``best_epoch`` (the point never reached a finite
            validation loss).
    """
    if not math.isfinite(row["best_epoch"]):
        raise ValueError(f"{point.folder} has no epoch of finite validation loss to refit for")
    config = copy.deepcopy(point.config)
    config["data"].update(validation_fraction=0.0, validation_fold=0)
    config["train"].update(
        epochs=max(1, round(row["best_epoch"])), seconds=0.0, keep_best=False, early_stopping_patience=0
    )
    validate(config)
    return config


def fold_ensemble(runs: Sequence[str | Path], average: str | None = None) -> FoldEnsemble:
    """The kept (best-validation, ``best.pt``) models of the fold runs ``runs`` (run folders,
    e.g. ``<point>/fold-<i>`` of a ``--folds`` sweep), each built from its ``config.toml``,
    averaged (:class:`~gramnewton.lab.experiments.predictions.FoldEnsemble`): a cross-validation
    committee, each member trained without a different fold. ``average`` (``None``: the task's,
    :data:`~gramnewton.lab.experiments.predictions.TASK_AVERAGES`) is what is averaged.

    Raises:
        FileNotFoundError: a run kept no model (``train.keep_best`` off).
    """
    return load_ensemble(runs, "test", "best", average)[0]


def fold_ensemble_test(runs: Sequence[str | Path], average: str | None = None) -> tuple[float, float]:
    """``(test loss, test accuracy)`` of :func:`fold_ensemble` ``(runs, average)`` on the runs'
    test split (:func:`~gramnewton.lab.experiments.training.evaluate`; accuracy NaN for regression)."""
    ensemble, test, _ = load_ensemble(runs, "test", "best", average)
    return evaluate(ensemble, test, task_loss(test))


def chosen_runs(out: str | Path) -> list[Path]:
    """The run folders of the chosen point of the sweep in ``out`` (its ``sweep.csv``): the
    point's folder, or its fold runs ``<point>/fold-<i>`` in fold order with ``--folds``.

    Raises:
        FileNotFoundError: ``out`` holds no ``sweep.csv``.
        ValueError: no point is chosen (none reached a finite validation loss).
    """
    out = Path(out)
    if not (out / SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"{out} is not a sweep folder: it has no {SUMMARY_FILE}")
    chosen = [row for row in read_rows(out / SUMMARY_FILE) if row["chosen"]]
    if not chosen:
        raise ValueError(f"the sweep in {out} chose no point (none reached a finite validation loss)")
    point = out / chosen[0]["point"]
    folds = sorted(point.glob("fold-*"), key=lambda run: int(run.name.removeprefix("fold-")))
    return folds or [point]


def check_sweep_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder without ``resume`` or ``overwrite``
    (each point's folder is then checked as a run folder,
    :func:`~gramnewton.lab.experiments.runner.check_run_folder`)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pick another --out")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise ValueError(
            f"{out} is not empty (another sweep?): pass --resume to continue the sweep there, "
            "--overwrite to replace its points' runs, or pick another --out"
        )


def _setting(key: str, value: Any) -> str:
    """``leaf=value``, as a point's folder name and the figure's legend write one axis's value."""
    return f"{key.rsplit('.', 1)[-1]}={_format(value)}"


def _format(value: Any) -> str:
    """A short, readable text of a TOML value for folder names and tables."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}={_format(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_format, value)) + "]"
    return str(value)


def point_summary(out: str | Path, point: SweepPoint, error: str = "") -> dict[str, Any]:
    """The summary row of one point, from its run folders' ``metrics.csv`` (see :func:`summarise`;
    ``chosen`` is 0 here); with validation folds each number is the mean over the folds' runs."""
    runs = [_run_summary(Path(out) / folder / METRICS_FILE) for folder, _ in point.runs]
    row: dict[str, Any] = {"point": point.folder}
    for key, value in point.overrides:
        row[key] = value if isinstance(value, (int, float, str)) else _format(value)
    return row | {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]} | {"chosen": 0, "error": error}


def _run_summary(path: Path) -> dict[str, float]:
    """One run's numbers of a summary row, read from its ``metrics.csv`` (NaN where none)."""
    metrics = read_rows(path) if path.is_file() else []
    finite = [r for r in metrics if math.isfinite(r.get("val_loss", math.nan))]
    best = min(finite, key=lambda r: r["val_loss"]) if finite else {}
    last = metrics[-1] if metrics else {}
    quality = "test_accuracy" if "test_accuracy" in (best or last) else "test_rmse"
    return {
        "epochs": last.get("epoch", 0),
        "seconds": last.get("seconds", 0.0),
        "best_epoch": best.get("epoch", math.nan),
        "best_seconds": best.get("seconds", math.nan),
        "val_loss": best.get("val_loss", math.nan),
        "train_loss": best.get("train_loss", math.nan),
        "test_loss": best.get("test_loss", math.nan),
        quality: best.get(quality, math.nan),
        "last_test_loss": last.get("test_loss", math.nan),
    }


def summarise(
    out: str | Path, points: Sequence[SweepPoint], failures: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """One summary row per point (:func:`point_summary`), the point of least validation loss chosen.

    Row keys: ``point`` (the folder), one column per axis (its dotted key; tables and lists as
    text), ``epochs`` and ``seconds`` (trained), ``best_epoch`` and ``best_seconds`` (the epoch and
    training seconds of the lowest ``val_loss``),
    ``val_loss`` (that lowest), ``train_loss`` and ``test_loss`` at the same evaluation, then
    ``test_rmse`` or ``test_accuracy`` there (regression or classification), ``last_test_loss``,
    ``chosen`` (1 for the point of least ``val_loss``, 0 else) and ``error`` (why a point failed,
    from ``failures``: folder -> message; "" else). A point without a finite validation loss
    (diverged, failed, or not yet evaluated) has NaN there and is never chosen; when no point has
    one, none is chosen.
    """
    failures = dict(failures or {})
    rows = [point_summary(out, point, failures.get(point.folder, "")) for point in points]
    candidates = [i for i, row in enumerate(rows) if math.isfinite(row["val_loss"])]
    if candidates:
        rows[min(candidates, key=lambda i: rows[i]["val_loss"])]["chosen"] = 1
    return rows


def write_summary(out: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` (:func:`summarise`) to ``<out>/sweep.csv``; return the path."""
    path = Path(out) / SUMMARY_FILE
    write_rows(path, rows)
    return path


def plot_summary(out: str | Path, rows: Sequence[dict[str, Any]], axes: Sequence[Axis], *, title: str = "") -> Path:
    """``<out>/sweep.png``: each point's lowest validation loss and the test loss at the same
    evaluation, the chosen point ringed. A numeric last axis is the x axis (logarithmic when its
    values are positive and span a decade or more), one pair of lines (validation solid, test
    dashed) per combination of the other axes' values; other grids are drawn point by point."""
    path = Path(out) / FIGURE_FILE
    *others, last = axes
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in last.values)
    xs = [row[last.key] for row in rows] if numeric else list(range(len(rows)))
    groups: dict[str, list[int]] = {}  # the other axes' values (as the folder names write them) -> rows
    for i, row in enumerate(rows):
        groups.setdefault(", ".join(_setting(a.key, row[a.key]) for a in others) if numeric else "", []).append(i)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, (group, indices) in enumerate(groups.items()):
        prefix, x = f"{group}: " if group else "", [xs[i] for i in indices]
        ax.plot(x, [rows[i]["val_loss"] for i in indices], f"C{n}o-", label=f"{prefix}validation loss (lowest)")
        ax.plot(x, [rows[i]["test_loss"] for i in indices], f"C{n}s--", label=f"{prefix}test loss (same evaluation)")
    chosen = [i for i, row in enumerate(rows) if row["chosen"]]
    ax.plot([xs[i] for i in chosen], [rows[i]["val_loss"] for i in chosen], "ko", ms=14, mfc="none", label="chosen")
    if numeric:
        ax.set_xlabel(last.key)
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
    else:
        ax.set_xticks(xs, [row["point"] for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7 if len(groups) > 1 else 8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
