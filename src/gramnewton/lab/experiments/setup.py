"""Build what a config names: data sets (subset, resized, a validation split held out of the
training set) and the model (maybe warm-started).

The optimizer comes from :func:`gramnewton.lab.experiments.optimizers.build_optimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import get_dataset
from ..data.base import TensorRegressionDataset, permuted_parts
from ..data.classification import TensorClassificationDataset, is_classification
from ..models import get_model
from .config import validation_folds

CHECKPOINT = "checkpoint.pt"


SPLITS = ("train", "validation", "test")


def load_data(config: Mapping[str, Any], split: str) -> TensorRegressionDataset:
    """Split ``split`` (``"train"``, ``"validation"`` or ``"test"``) of ``config["data"]``,
    subset and resized as the config says.

    With ``data.validation_fraction = f > 0`` the (subset) training set is split by a
    ``seed``-ed permutation (:func:`~gramnewton.lab.data.base.permuted_parts`): its last
    ``n - round((1 - f) n)`` items are ``"validation"``, the others ``"train"``; the test set is
    never touched. With ``f = 0`` ``"train"`` is the whole training set (as before the option
    existed) and ``"validation"`` is refused.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data = config["data"]
    source = "test" if split == "test" else "train"
    dataset = _cached_dataset(data["name"], data["root"] or None, source, tuple(sorted(data["kwargs"].items())))
    if len(dataset) == 0:
        raise ValueError(f"data set {data['name']} has no {source} sample: use a larger data set or another split")
    dataset = shrink(dataset, data[f"{source}_subset"], data["image_size"], config["seed"])
    fraction = data["validation_fraction"]
    if split == "test" or (split == "train" and fraction == 0):
        return dataset
    if fraction == 0:
        raise ValueError("no validation split: set data.validation_fraction > 0")
    train_index, validation_index = validation_split(len(dataset), fraction, config["seed"], data["validation_fold"])
    return subset(dataset, validation_index if split == "validation" else train_index)


def validation_split(n: int, fraction: float, seed: int, fold: int = 0) -> tuple[Tensor, Tensor]:
    """Sorted indices ``(train, validation)`` of ``range(n)``, from a ``seed``-ed permutation.

    Fold 0: the permutation's first ``n_train = round((1 - fraction) n)`` items and the rest. Fold
    ``i >= 1`` of :func:`~gramnewton.lab.experiments.config.validation_folds` ``K``: the ``i``-th of
    ``K - 1`` near-equal consecutive parts of those first ``n_train`` items is held out instead, so
    the ``K`` folds' validation parts are disjoint and cover ``range(n)`` (K-fold cross-validation).
    Raises ``ValueError`` (one line) when either part would be empty or ``fold`` is out of range."""
    kept, held = permuted_parts(n, seed, train_fraction=1.0 - fraction)
    parts = [held, kept]  # fold 0 held out first, then the parts the other folds hold out
    if fold:
        folds = validation_folds(fraction)
        if not 0 < fold < folds:
            raise ValueError(f"validation fold {fold} out of range: a fraction of {fraction:g} gives {folds} folds")
        parts = [held, *torch.tensor_split(kept, folds - 1)]
    validation = parts[fold].sort().values
    train = torch.cat(parts[:fold] + parts[fold + 1 :]).sort().values
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(
            f"data.validation_fraction = {fraction:g} of {n} training samples leaves {len(validation)} "
            f"for validation and {len(train)} for training: both need at least one"
        )
    return train, validation


@lru_cache(maxsize=4)
def _cached_dataset(
    name: str, root: str | None, split: str, kwargs: tuple[tuple[str, Any], ...]
) -> TensorRegressionDataset:
    # Consecutive runs of ``reproduce`` share their data sets; rotating 60,000 images takes ~10 s.
    return get_dataset(name, root=root, split=split, **dict(kwargs))


def shrink(dataset: TensorRegressionDataset, subset_size: int, image_size: int, seed: int) -> TensorRegressionDataset:
    """The first ``subset_size`` items of a ``seed``-ed permutation (all when 0), inputs resized to
    ``image_size x image_size`` (area interpolation; unchanged when 0 or already that size)."""
    if 0 < subset_size < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:subset_size]
        dataset = subset(dataset, index.sort().values)
    inputs = dataset.inputs
    if image_size and tuple(inputs.shape[-2:]) != (image_size, image_size):
        # The uint8 image store is converted to floats in [0, 1], as __getitem__ would.
        floats = inputs.float() / 255.0 if inputs.dtype == torch.uint8 else inputs
        return _like(dataset, F.interpolate(floats, size=(image_size, image_size), mode="area"), _targets(dataset))
    return dataset


def subset(dataset: TensorRegressionDataset, index: Tensor) -> TensorRegressionDataset:
    """The items ``index`` ``(n_subset,)`` of ``dataset``, as a data set of the same kind (the
    regression target scale and the classification labels' class count are kept)."""
    return _like(dataset, dataset.inputs[index], _targets(dataset)[index])


def _like(dataset: TensorRegressionDataset, inputs: Tensor, targets: Tensor) -> TensorRegressionDataset:
    if is_classification(dataset):
        return TensorClassificationDataset(inputs, targets, dataset.num_classes, dataset.name, dataset.blank)
    return TensorRegressionDataset(inputs, targets, dataset.scale, dataset.name)


def _targets(dataset: Dataset) -> Tensor:
    return dataset.labels if is_classification(dataset) else dataset.targets


# models that flatten their inputs: their in_channels is the flattened input size C * H * W
FLAT_INPUT_MODELS = ("mlp", "two_layer")


def build_model(config: Mapping[str, Any], dataset: TensorRegressionDataset) -> nn.Module:
    """The model for ``dataset``'s input channels (the flattened input size for
    :data:`FLAT_INPUT_MODELS`) and target width (its number of classes for a classification data
    set), initialised under ``seed``; ``model.kwargs`` override both."""
    torch.manual_seed(config["seed"])
    if is_classification(dataset):
        num_outputs = dataset.num_classes
    else:
        num_outputs = 1 if dataset.targets.dim() == 1 else dataset.targets.shape[1]
    name, shape = config["model"]["name"], dataset.input_shape
    in_channels = math.prod(shape) if name in FLAT_INPUT_MODELS else shape[0]
    kwargs = {"in_channels": in_channels, "num_outputs": num_outputs, **config["model"]["kwargs"]}
    return get_model(config["model"]["name"], **kwargs)


def warm_start(model: nn.Module, source_run: str | Path) -> list[str]:
    """Load the final weights of ``source_run`` into ``model``, adapting what differs.

    - an input convolution with a different channel count: gray from RGB sums the colour
      weights (a gray image fed as R = G = B gives the same output); RGB from gray splits the
      gray weights in three;
    - an output layer with a different number of outputs keeps its fresh initialisation.
    Other names or shapes that differ raise (a different architecture).

    Returns:
        The names of the parameters that were adapted or kept fresh.
    """
    path = Path(source_run) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"warm start: no {CHECKPOINT} in {source_run} (train that run first)")
    source = torch.load(path, weights_only=True)["model"]
    target = model.state_dict()
    if set(source) != set(target):
        raise ValueError(
            f"warm start from {source_run}: parameter names differ ({sorted(set(source) ^ set(target))[:4]} ...)"
        )
    changed = []
    for name, value in source.items():
        if value.shape == target[name].shape:
            target[name] = value
        else:
            adapted = _adapt(value, target[name])
            if adapted is None:
                raise ValueError(
                    f"warm start from {source_run}: {name} has shape {tuple(value.shape)}, "
                    f"the model needs {tuple(target[name].shape)}"
                )
            target[name] = adapted
            changed.append(name)
    model.load_state_dict(target)
    return changed


def _adapt(value: Tensor, fresh: Tensor) -> Tensor | None:
    if value.dim() == 4 and value.shape[0] == fresh.shape[0] and value.shape[2:] == fresh.shape[2:]:
        if fresh.shape[1] == 1:
            return value.sum(1, keepdim=True)
        if value.shape[1] == 1:
            return value.expand_as(fresh) / fresh.shape[1]
    if value.dim() in (1, 2) and value.shape[1:] == fresh.shape[1:]:
        return fresh  # a head with another number of outputs: keep the fresh one
    return None
