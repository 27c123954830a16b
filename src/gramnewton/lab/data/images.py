"""Decoding image files into one resized ``uint8`` tensor, cached, with bad files reported."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

from .bad import BadItems
from .cache import Entry, cached

CHANNELS = {"L": 1, "RGB": 3}
ORIENTATION = 0x0112  # the EXIF tag saying how a camera's stored pixels are turned to view them
# Errors Pillow raises for unreadable, truncated or hostile files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _to_8bit(image: Image.Image) -> Image.Image:
    """8-bit version of a 16/32-bit integer image, scaled by its own maximum.

    Pillow's ``convert("L")`` clips such images at 255 (radiographs stored with 12 or 16 bits
    would turn white); scaling by the maximum keeps their contrast whatever the bit depth.
    """
    pixels = np.asarray(image, dtype=np.float64)
    peak = pixels.max() if pixels.size else 0.0
    return Image.fromarray(np.round(pixels * (255.0 / peak if peak > 0 else 0.0)).astype(np.uint8))


def decode_image(path: Path, size: int, mode: str) -> np.ndarray:
    """Read ``path`` as ``mode`` (``"L"`` or ``"RGB"``) resized to ``(size, size)``: ``(C, size, size)`` uint8.

    An EXIF orientation is applied (the image as viewers show it). Raises one of
    ``DECODE_ERRORS`` when the file cannot be decoded.
    """
    with Image.open(path) as image:
        # JPEG can decode at a reduced scale directly, which is much faster for large photos.
        image.draft(mode, (size, size))
        # Phones store photos as the sensor saw them and say in EXIF how to turn them upright, as
        # every viewer does; without this such a face would be learnt lying on its side.
        if image.getexif().get(ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            image = _to_8bit(image)
        pixels = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR))
    return pixels.reshape(size, size, CHANNELS[mode]).transpose(2, 0, 1)


def load_images(
    name: str,
    paths: Sequence[Path],
    size: int,
    mode: str,
    bad: BadItems,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    sources: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode ``paths`` (or read them from the cache) and report the unreadable ones to ``bad``.

    ``sources`` optionally says where each path came from (``"labels.csv, row 7"``), so a
    report names the row as well as the file.

    Returns:
        ``images`` ``(n_ok, C, size, size)`` uint8 and ``keep`` ``(len(paths),)`` bool, true for
        the files that decoded (their images are in ``images``, in order).
    """
    if mode not in CHANNELS:
        raise ValueError(f"unknown image mode {mode!r}; expected one of {sorted(CHANNELS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        # else Pillow's error for the first file would blame that image (every one, with skip_bad)
        raise ValueError(f"{name}: size must be an integer >= 1 (pixels), got {size!r}")

    def build() -> Entry:
        images = np.zeros((len(paths), CHANNELS[mode], size, size), dtype=np.uint8)
        keep = np.ones(len(paths), dtype=bool)
        failed: list[tuple[int, str]] = []
        for i, path in enumerate(tqdm(paths, desc=f"decoding {name}", unit="img", leave=False, disable=None)):
            try:
                images[i] = decode_image(path, size, mode)
            except DECODE_ERRORS as exc:
                reason = f"cannot decode image ({type(exc).__name__}: {exc})"
                if not bad.skip_bad:
                    bad.report(describe(i), reason)  # raises at once: no point decoding the rest
                keep[i] = False
                failed.append((i, reason))
        kept = images if keep.all() else images[keep]  # no 0.7 GB copy in the common case
        return {"images": torch.from_numpy(kept), "keep": torch.from_numpy(keep), "failed": failed}

    def describe(i: int) -> str:
        return f"{paths[i]} ({sources[i]})" if sources is not None else str(paths[i])

    params = {"size": size, "mode": mode, "version": 2}  # 2: EXIF orientation applied
    entry = cached(name, paths, params, build, cache_dir, keys=("images", "keep", "failed")) if cache else build()
    # Failures are reported here, also for a cache hit, so skip_bad=False still refuses a
    # cached entry that was built with skip_bad=True.
    for i, reason in entry["failed"]:
        bad.report(describe(int(i)), reason)
    return entry["images"], entry["keep"]
