"""Data augmentation of image batches: random translations (torch only, vectorised, seeded).

:func:`translation` makes the ``augment`` argument of
:func:`~gramnewton.lab.experiments.training.fit`, which applies it to the inputs of every
training batch with a generator seeded by ``(seed, epoch, batch)``: the same shifts for every
optimizer of a run, and a resumed run draws those an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.utils.data import Dataset

Augment = Callable[[Tensor, torch.Generator], Tensor]


def random_translate(images: Tensor, generator: torch.Generator, *, shift: int, fill: Tensor | float = 0.0) -> Tensor:
    """Each image of ``images`` ``(n, C, H, W)`` moved by its own ``(dy, dx)``, drawn uniformly from
    ``{-shift, ..., shift}^2`` with ``generator``; the pixels moved in take ``fill`` (a number, or one
    value per channel ``(C,)``: the value of a blank pixel). Returns ``(n, C, H, W)``; ``shift=0``
    returns ``images`` itself.

    Pad-and-crop: the batch is padded by ``shift`` on every side with ``fill`` and each image's
    ``H x W`` window is read at its own offset by one gather (no loop over the images). The result
    has the strides of ``images`` (its memory format: contiguous in, contiguous out).
    """
    if images.dim() != 4:
        raise ValueError(f"random translations need image batches (n, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < min(h, w):
        raise ValueError(f"shift must be an integer in [0, {min(h, w)}) for {h}x{w} images, got {shift!r}")
    if shift == 0:
        return images
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    if fill.shape[0] not in (1, c):
        raise ValueError(f"fill must be a number or one value per channel ({c},), got {fill.shape[0]} values")
    padded = fill.expand(c, h + 2 * shift, w + 2 * shift).repeat(n, 1, 1, 1)
    padded[:, :, shift : shift + h, shift : shift + w] = images
    # the top-left corner of each image's window in the padded batch: shift + (dy, dx)
    top, left = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).to(images.device)
    rows = (top[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (n, H, 1)
    cols = (left[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (n, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # advanced indices around a slice put their broadcast shape (n, H, W) first: (n, H, W, C)
    windows = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
    # written into the input's layout: the permuted view has channels-last strides, and for C = 1
    # it is contiguous too (so .contiguous() keeps it), which makes every convolution downstream
    # run channels-last, a different speed for each optimizer than the user's own batches get
    return torch.empty_like(images).copy_(windows)


def translation(dataset: Dataset, shift: int) -> Augment | None:
    """The ``fit`` augmentation translating ``dataset``'s images by up to ``shift`` pixels
    (None for ``shift=0``). The moved-in pixels are blank: ``dataset.blank`` where the data set
    defines it (a standardised image set: the standardised value of a 0 pixel), else 0.

    Raises ``ValueError`` for a data set whose inputs are not images ``(C, H, W)``.
    """
    if shift == 0:
        return None
    shape = tuple(dataset.input_shape)
    if len(shape) != 3:
        name = getattr(dataset, "name", "") or "this data set"
        raise ValueError(f"shift={shift}: random translations need image inputs (C, H, W); {name} has inputs {shape}")
    fill = getattr(dataset, "blank", 0.0)
    random_translate(torch.zeros(1, *shape), torch.Generator(), shift=shift, fill=fill)  # refuse a bad shift now
    return partial(random_translate, shift=shift, fill=fill)
