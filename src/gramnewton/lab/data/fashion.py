"""``rotated-fashion-mnist``: the AFAD-scale stand-in, rotated Fashion-MNIST from its IDX files.

60,000 train / 10,000 test 28x28 images (about the size of AFAD-LITE's 59,344), each rotated by
a seeded angle in [-45, 45] degrees; the target is ``angle / 45`` (see :mod:`.rotated`). The
IDX files come from Debian's ``dataset-fashion-mnist`` package (``make data`` installs it);
``root=`` takes any folder holding the four files. Only the image files are read: the class
labels play no part in the regression task.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import TensorRegressionDataset
from .idx import UNSIGNED_BYTE, read_idx
from .registry import register_dataset
from .rotated import random_angles, rotated_dataset

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGE_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def image_file(root: str | Path | None, split: str) -> Path:
    """Path of the gzip IDX image file of ``split``, or a ``FileNotFoundError`` saying how to get it."""
    return fashion_file(root, IMAGE_FILES[split], "rotated-fashion-mnist")


def fashion_file(root: str | Path | None, filename: str, dataset: str) -> Path:
    """Path of Fashion-MNIST's file ``filename`` (one of ``FILES``) under ``root`` (default
    ``DEFAULT_ROOT``), or a ``FileNotFoundError`` naming ``dataset`` and saying how to get it."""
    folder = Path(root) if root is not None else DEFAULT_ROOT
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset}: {path} not found. Install the Fashion-MNIST IDX files with "
            f"`make data` (Debian package dataset-fashion-mnist, into {DEFAULT_ROOT}), or pass "
            f"root= a folder holding {', '.join(FILES)}."
        )
    return path


@register_dataset("rotated-fashion-mnist")
def rotated_fashion_mnist(root: str | None = None, split: str = "train", seed: int = 0) -> TensorRegressionDataset:
    """Rotated Fashion-MNIST, inputs ``(1, 28, 28)`` in [0, 1], targets ``angle / 45`` ``(n,)``.

    ``split`` picks the IDX file (train 60,000, test 10,000); ``seed`` seeds the angles, with
    a different stream per split so the two never share their angle sequence.
    """
    pixels = read_idx(image_file(root, split), ndim=3, type_code=UNSIGNED_BYTE)
    images = torch.from_numpy(pixels).unsqueeze(1).float() / 255.0
    generator = torch.Generator().manual_seed(2 * seed + (split == "test"))
    return rotated_dataset(images, random_angles(images.shape[0], generator), "rotated-fashion-mnist")
