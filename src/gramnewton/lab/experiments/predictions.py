"""Trained runs' models, averaged, and their predictions on a split of the runs' data set.

``gramnewton predict`` and a ``--folds`` sweep's committee
(:func:`~gramnewton.lab.experiments.sweep.fold_ensemble`) read models here. A run folder's
model is rebuilt from its ``config.toml`` and loaded from ``best.pt`` (the model of its lowest
validation loss, ``train.keep_best``) or ``checkpoint.pt`` (its last). Several runs make one
model, :class:`FoldEnsemble`; they must have been trained on the same data set, so the split
they predict is one (:func:`load_ensemble` checks it sample by sample).

A prediction table (:func:`prediction_table`) gives one row per sample of the split, in the
data set's own units: a regression's targets and predictions with the normalisation undone
(:class:`~gramnewton.lab.data.base.TargetScale`), a classifier's label, predicted class and
class probabilities.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.base import TensorRegressionDataset
from ..data.classification import is_classification
from ..files import write_atomically
from .config import load_config
from .early_stopping import BEST
from .runner import CONFIG_FILE
from .setup import CHECKPOINT, build_model, load_data
from .training import batches, evaluation_mode, task_loss

# What a fold ensemble averages (:class:`FoldEnsemble`), and its choice per task loss (a
# classifier's: see docs/design.md, "Choices").
ENSEMBLE_AVERAGES = ("outputs", "probabilities")
TASK_AVERAGES = {"mse": "outputs", "cross_entropy": "probabilities"}
# Which saved model of a run: "auto" is best.pt where the run kept one, else checkpoint.pt.
MODEL_FILES = {"best": BEST, "last": CHECKPOINT}
MODEL_CHOICES = ("auto", *MODEL_FILES)
# The splits a prediction reads: "train" is the whole training set, validation rows included
# (the runs of a --folds sweep each held out other rows, so only the whole set is common to them).
PREDICTION_SPLITS = ("test", "train")


class FoldEnsemble(nn.Module):
    """The mean of its ``models``' outputs: ``(b, ...) -> (b, k)``, each model's output ``(b, k)``.

    ``average="outputs"`` averages the outputs themselves (a regression's predictions, a
    classifier's logits). ``average="probabilities"`` averages a classifier's softmax
    probabilities and returns the mean's logarithm, ``log((1/K) sum_i softmax(z_i))``: read as
    logits (its softmax is that mean), so cross-entropy and argmax take it as any classifier's.
    """

    def __init__(self, models: Sequence[nn.Module], average: str = "outputs") -> None:
        super().__init__()
        if not models:
            raise ValueError("a fold ensemble needs at least one model")
        if average not in ENSEMBLE_AVERAGES:
            raise ValueError(f"average must be one of {', '.join(ENSEMBLE_AVERAGES)}, not {average!r}")
        self.models = nn.ModuleList(models)
        self.average = average

    def forward(self, inputs: Tensor) -> Tensor:
        outputs = torch.stack([model(inputs) for model in self.models])  # (K, b, k)
        if self.average == "outputs":
            return outputs.mean(0)
        if outputs.shape[-1] < 2:  # a softmax over one output is 1 whatever the model says
            raise ValueError(
                f"average='probabilities' needs a classifier's logits (b, k >= 2), got {tuple(outputs.shape[1:])}"
            )
        return torch.logsumexp(outputs.log_softmax(-1), 0) - math.log(len(self.models))


def load_split(run: str | Path, split: str = "test") -> TensorRegressionDataset:
    """Split ``split`` of :data:`PREDICTION_SPLITS` of the data set run ``run`` was trained on
    (its ``config.toml``): ``"test"``, or ``"train"``, the whole training set."""
    if split not in PREDICTION_SPLITS:
        raise ValueError(f"split must be one of {', '.join(PREDICTION_SPLITS)}, not {split!r}")
    config = load_config(Path(run) / CONFIG_FILE)
    config["data"].update(validation_fraction=0.0, validation_fold=0)
    return load_data(config, split)


def load_run_model(run: str | Path, dataset: TensorRegressionDataset, model: str = "auto") -> tuple[nn.Module, str]:
    """The model of run folder ``run``, built from its ``config.toml`` for ``dataset``'s shapes
    (:func:`~gramnewton.lab.experiments.setup.build_model`), and the file it was loaded from.

    ``model``: ``"best"`` (``best.pt``), ``"last"`` (``checkpoint.pt``) or ``"auto"`` (the
    first of the two the run has).

    Raises:
        FileNotFoundError: ``run`` has no ``config.toml`` or not the file asked for.
    """
    if model not in MODEL_CHOICES:
        raise ValueError(f"model must be one of {', '.join(MODEL_CHOICES)}, not {model!r}")
    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a run folder: it has no {CONFIG_FILE}")
    names = list(MODEL_FILES.values()) if model == "auto" else [MODEL_FILES[model]]
    path = next((run / name for name in names if (run / name).is_file()), None)
    if path is None:
        why = " (train.keep_best = true keeps one)" if model == "best" else ""
        raise FileNotFoundError(f"no {' or '.join(names)} in {run}: the run has no such model{why}")
    network = build_model(load_config(run / CONFIG_FILE), dataset)
    network.load_state_dict(torch.load(path, weights_only=True)["model"])
    return network, path.name


def load_ensemble(
    runs: Sequence[str | Path], split: str = "test", model: str = "auto", average: str | None = None
) -> tuple[FoldEnsemble, TensorRegressionDataset, list[str]]:
    """The models of ``runs`` (:func:`load_run_model` ``model``) averaged (:class:`FoldEnsemble`
    ``average``; ``None``: the task's, :data:`TASK_AVERAGES`), the split ``split`` they predict
    (:func:`load_split`; each other run's is loaded and checked equal to the first's) and each model's file name.

    Raises:
        ValueError: no run, or two runs trained on different data (their ``split`` differs).
    """
    if not runs:
        raise ValueError("a fold ensemble needs at least one model")
    dataset = load_split(runs[0], split)
    for run in runs[1:]:
        if not _same_samples(load_split(run, split), dataset):  # the data sets are cached: cheap
            raise ValueError(
                f"{run} and {runs[0]} were trained on different data (their {split} splits differ): "
                "average only runs of one data set, subset and seed"
            )
    models, files = [], []
    for run in runs:
        network, file = load_run_model(run, dataset, model)
        models.append(network)
        files.append(file)
    return FoldEnsemble(models, average or TASK_AVERAGES[task_loss(dataset)]), dataset, files


def _same_samples(a: TensorRegressionDataset, b: TensorRegressionDataset) -> bool:
    if len(a) != len(b) or is_classification(a) != is_classification(b):
        return False
    (xa, ya), (xb, yb) = a[torch.arange(len(a))], b[torch.arange(len(b))]
    return xa.shape == xb.shape and torch.equal(xa, xb) and ya.shape == yb.shape and torch.equal(ya, yb)


@torch.no_grad()
def predict(model: nn.Module, dataset: TensorRegressionDataset, batch_size: int = 500) -> Tensor:
    """``model``'s outputs ``(n, k)`` on every sample of ``dataset``, in order, in evaluation mode."""
    with evaluation_mode(model):
        index = list(torch.arange(len(dataset)).split(batch_size))
        return torch.cat([model(x).reshape(len(x), -1) for x, _ in batches(dataset, index)])


def prediction_table(dataset: TensorRegressionDataset, outputs: Tensor) -> tuple[list[str], Tensor]:
    """Column names and a float64 table ``(n, c)`` of ``outputs`` ``(n, k)`` on ``dataset``.

    Regression: ``index``, then ``target`` and ``prediction`` (one output) or ``target_j`` and
    ``prediction_j`` (``j < k``), in the data set's unit (``scale.to_original``). Classification:
    ``index``, ``label``, ``predicted`` (the argmax) and ``probability_j``, the softmax of
    ``outputs`` (a probability average's outputs are the log of the mean, so these are the mean).
    """
    targets = dataset[torch.arange(len(dataset))][1]
    index = torch.arange(len(dataset), dtype=torch.float64)[:, None]
    outputs = outputs.double()
    if is_classification(dataset):
        k = outputs.shape[1]
        header = ["index", "label", "predicted", *(f"probability_{j}" for j in range(k))]
        columns = [index, targets.double()[:, None], outputs.argmax(1).double()[:, None], outputs.softmax(1)]
        return header, torch.cat(columns, 1)
    k = outputs.shape[1]
    if k == 1:
        names = ["target", "prediction"]
    else:
        names = [*(f"target_{j}" for j in range(k)), *(f"prediction_{j}" for j in range(k))]
    scale = dataset.scale
    originals = [scale.to_original(targets.double().reshape(len(targets), k)), scale.to_original(outputs)]
    return ["index", *names], torch.cat([index, *originals], 1)


def write_predictions(path: str | Path, header: Sequence[str], table: Tensor) -> Path:
    """Write ``table`` ``(n, c)`` under ``header`` as CSV, atomically: the columns ``index``,
    ``label`` and ``predicted`` as integers, the others as the shortest text that reads back to
    the same float64."""
    integral = [name in _INTEGER_COLUMNS for name in header]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row in table.tolist():
                writer.writerow([int(v) if whole else repr(v) for v, whole in zip(row, integral)])

    return write_atomically(Path(path), write)


_INTEGER_COLUMNS = ("index", "label", "predicted")
