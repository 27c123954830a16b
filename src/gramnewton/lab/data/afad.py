"""``afad-lite``: age regression on a local copy of AFAD-Lite (Niu et al., 2016).

Real layout, with no label file (labels come from the folders)::

    AFAD-Lite/<age>/<111|112>/<name>.jpg      111 = male, 112 = female; ages 18-39, ~59k images

``root`` may be the ``AFAD-Lite`` folder or its parent. Images are decoded once to RGB
``64 x 64`` and cached (see :mod:`.cache`); the 80/20 train/test split is a seeded permutation of
the sorted file list, so it does not depend on which files fail to decode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .bad import BadItems
from .base import TensorRegressionDataset, fit_scale, split_indices
from .images import load_images
from .registry import register_dataset

FOLDER = "AFAD-Lite"
SEX_FOLDERS = ("111", "112")
IMAGE_SUFFIXES = (".jpg", ".jpeg")


def find_root(root: str | Path | None) -> Path:
    """The ``AFAD-Lite`` folder: ``root`` itself or its ``AFAD-Lite`` child."""
    if root is None:
        raise FileNotFoundError(
            "afad-lite is not downloadable here: pass root= a local copy of AFAD-Lite "
            "(the AFAD-Lite folder with <age>/<111|112>/*.jpg, or its parent)"
        )
    root = Path(root)
    folder = root / FOLDER if (root / FOLDER).is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"afad-lite: {root} is not a folder")
    return folder


def scan(folder: Path, bad: BadItems) -> tuple[list[Path], list[int]]:
    """Image paths under ``folder`` (sorted) and their ages in years, from the folder names.

    A folder that is not ``<age>/<111|112>`` is reported to ``bad`` rather than guessed at.
    Files other than JPEGs (a README, ``Thumbs.db``) are not images and are ignored.
    """
    paths: list[Path] = []
    ages: list[int] = []
    for age_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not (age_dir.name.isascii() and age_dir.name.isdigit()):  # '²'.isdigit() is true
            bad.report(str(age_dir), "folder name is not an age in years")
            continue
        for sex_dir in sorted(p for p in age_dir.iterdir() if p.is_dir()):
            if sex_dir.name not in SEX_FOLDERS:
                bad.report(str(sex_dir), f"expected a sex folder {' or '.join(SEX_FOLDERS)}")
                continue
            files = sorted(p for p in sex_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            ages += [int(age_dir.name)] * len(files)
    if not paths:
        raise FileNotFoundError(f"afad-lite: no <age>/<111|112>/*.jpg images under {folder}")
    return paths, ages


@register_dataset("afad-lite")
def afad_lite(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    skip_bad: bool = False,
    cache: bool = True,
    cache_dir: str | None = None,
) -> TensorRegressionDataset:
    """AFAD-Lite faces, inputs ``(3, size, size)`` in [0, 1], targets ``(n,)`` normalised ages.

    Targets are ``(age - mean) / std`` with the training split's mean and std; ``dataset.scale``
    maps them back to years.

    Args:
        seed: seeds the train/test permutation.
        skip_bad: skip unreadable images and malformed folders (one warning) instead of raising.
        cache, cache_dir: keep decoded images on disk (default ``$GRAMNEWTON_CACHE`` or
            ``~/.cache/gramnewton``).
    """
    bad = BadItems("afad-lite", skip_bad)
    paths, ages = scan(find_root(root), bad)
    images, keep = load_images("afad-lite", paths, size, "RGB", bad, cache=cache, cache_dir=cache_dir)
    bad.warn()
    ages_t = torch.tensor(ages, dtype=torch.float64)
    # Positions of each kept file within ``images``; -1 for files that failed to decode.
    position = torch.cumsum(keep.long(), 0) - 1
    parts = {}
    for part in ("train", "test"):
        index = split_indices(len(paths), part, seed)
        parts[part] = index[keep[index]]
    scale = fit_scale(ages_t[parts["train"]], "years", "afad-lite")
    index = parts[split]
    targets = (ages_t[index] - scale.mean) / scale.std
    return TensorRegressionDataset(images[position[index]], targets.float(), scale, "afad-lite")
