"""Build what a config names: data sets (subset, resized) and the model (maybe warm-started).

The optimizer comes from :func:`gramnewton.lab.experiments.optimizers.build_optimizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import get_dataset
from ..data.base import TensorRegressionDataset
from ..data.classification import TensorClassificationDataset, is_classification
from ..models import get_model

CHECKPOINT = "checkpoint.pt"


def load_data(config: Mapping[str, Any], split: str) -> TensorRegressionDataset:
    """Split ``split`` of ``config["data"]``, subset and resized as the config says."""
    data = config["data"]
    dataset = _cached_dataset(data["name"], data["root"] or None, split, tuple(sorted(data["kwargs"].items())))
    if len(dataset) == 0:
        raise ValueError(f"data set {data['name']} has no {split} sample: use a larger data set or another split")
    return shrink(dataset, data[f"{split}_subset"], data["image_size"], config["seed"])


@lru_cache(maxsize=4)
def _cached_dataset(
    name: str, root: str | None, split: str, kwargs: tuple[tuple[str, Any], ...]
) -> TensorRegressionDataset:
    # Consecutive runs of ``reproduce`` share their data sets; rotating 60,000 images takes ~10 s.
    return get_dataset(name, root=root, split=split, **dict(kwargs))


def shrink(dataset: TensorRegressionDataset, subset: int, image_size: int, seed: int) -> TensorRegressionDataset:
    """The first ``subset`` items of a ``seed``-ed permutation (all when 0), inputs resized to
    ``image_size x image_size`` (area interpolation; unchanged when 0 or already that size)."""
    inputs, targets = dataset.inputs, _targets(dataset)
    if 0 < subset < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:subset].sort().values
        inputs, targets = inputs[index], targets[index]
    if image_size and tuple(inputs.shape[-2:]) != (image_size, image_size):
        # The uint8 image store is converted to floats in [0, 1], as __getitem__ would.
        floats = inputs.float() / 255.0 if inputs.dtype == torch.uint8 else inputs
        inputs = F.interpolate(floats, size=(image_size, image_size), mode="area")
    if inputs is dataset.inputs:
        return dataset
    if is_classification(dataset):
        return TensorClassificationDataset(inputs, targets, dataset.num_classes, dataset.name, dataset.blank)
    return TensorRegressionDataset(inputs, targets, dataset.scale, dataset.name)


def _targets(dataset: Dataset) -> Tensor:
    return dataset.labels if is_classification(dataset) else dataset.targets


def build_model(config: Mapping[str, Any], dataset: TensorRegressionDataset) -> nn.Module:
    """The model for ``dataset``'s input channels and target width (its number of classes for a
    classification data set), initialised under ``seed``."""
    torch.manual_seed(config["seed"])
    if is_classification(dataset):
        num_outputs = dataset.num_classes
    else:
        num_outputs = 1 if dataset.targets.dim() == 1 else dataset.targets.shape[1]
    kwargs = {"in_channels": dataset.input_shape[0], "num_outputs": num_outputs, **config["model"]["kwargs"]}
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
