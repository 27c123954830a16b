"""``rsna-bone-age``: bone-age regression on a local copy of the RSNA Pediatric Bone Age data.

Real layout (the common download nests the image folder twice; both forms are accepted)::

    <root>/boneage-training-dataset.csv                 id,boneage,male
    <root>/boneage-training-dataset/[boneage-training-dataset/]<id>.png
    <root>/<validation csv>                             Image ID,male,Bone Age (months)   (optional)
    <root>/<folder named *validation*>/**/<Image ID>.png                                   (optional)

With a validation CSV the test split is the validation set and the training split is the whole
training CSV; without one, a seeded 80/20 split of the training rows. Radiographs are decoded
once to grayscale ``64 x 64`` and cached. ``channels=3`` repeats the gray channel so a model
trained on RGB AFAD faces can be warm-started.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import NamedTuple, TextIO

import torch

from .bad import BadItems
from .base import TargetScale, TensorRegressionDataset, fit_scale, split_indices
from .images import load_images
from .registry import register_dataset

TRAIN_CSV = "boneage-training-dataset.csv"
TRAIN_IMAGES = "boneage-training-dataset"
TRAIN_COLUMNS = ("id", "boneage", "male")
VALIDATION_COLUMNS = ("Image ID", "Bone Age (months)", "male")
BOOLEANS = {"true": True, "false": False, "1": True, "0": False}
# Text is read with ``surrogateescape``: a byte that is not UTF-8 becomes one of these code
# points instead of failing the whole read, so the row holding it can be named (and skipped).
ESCAPED = range(0xDC80, 0xDD00)
# Characters of a malformed row quoted in its report (a row may be a whole line of junk).
SHOWN = 80
# Enough of a file's first line to hold any header the validation CSV may have.
HEADER_CHARS = 1 << 16


class Record(NamedTuple):
    """One usable CSV row: the image file, its bone age in months, and where the row is."""

    image: Path
    months: float
    row: str


def training_image_dir(root: Path) -> Path:
    """``boneage-training-dataset/``, or its doubled nesting when the download has one."""
    folder = root / TRAIN_IMAGES
    return folder / TRAIN_IMAGES if (folder / TRAIN_IMAGES).is_dir() else folder


def open_text(path: Path) -> TextIO:
    """``path`` opened for :mod:`csv` as UTF-8 (BOM allowed), undecodable bytes escaped (see :data:`ESCAPED`)."""
    return path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")


def undecodable(cells: list[str]) -> str | None:
    """The first byte of ``cells`` that was not UTF-8, as ``"0xff"``, or ``None`` when all was."""
    for cell in cells:
        for char in cell:
            if ord(char) in ESCAPED:
                return f"0x{ord(char) - 0xDC00:02x}"
    return None


def find_validation_csv(root: Path) -> Path | None:
    """The CSV in ``root`` other than the training CSV whose header has the validation columns, if any.

    Only the first line of each candidate is read, and bytes that are not UTF-8 are tolerated
    there: an unrelated file (notes in Latin-1, a spreadsheet export) is simply not the
    validation CSV, and must not stop the load. The one found is then read strictly.
    """
    for path in sorted(p for p in root.glob("*.csv") if p.name != TRAIN_CSV and p.is_file()):
        with open_text(path) as f:
            header = next(csv.reader([f.readline(HEADER_CHARS)]), [])
        if set(VALIDATION_COLUMNS) <= {h.strip() for h in header}:
            return path
    return None


def read_labels(
    path: Path, columns: tuple[str, str, str], images: dict[str, list[Path]], bad: BadItems
) -> list[Record | None]:
    """One entry per data row of CSV ``path``: its :class:`Record`, or ``None`` for a bad row.

    Args:
        columns: names of the id, bone age (months) and sex columns.
        images: image files of each id (the file stem): one, else the row is reported.
        bad: where malformed rows (a field missing or too many, a value that does not parse, bytes
            that are not UTF-8), duplicate ids and ids without an image are reported, as
            ``"<path>, row <line>"``.

    Raises:
        ValueError: the header is not UTF-8, lacks one of ``columns`` or has one twice (no row can
            be read then).
    """
    records: list[Record | None] = []
    seen: dict[str, int] = {}
    with open_text(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        byte = undecodable(header)
        if byte is not None:
            raise ValueError(f"rsna-bone-age: {path}, row 1: header is not UTF-8 text (byte {byte}); save it as UTF-8")
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"rsna-bone-age: {path} has no column(s) {missing}; header is {header}")
        twice = next((c for c in columns if header.count(c) > 1), None)
        if twice is not None:  # which one holds the labels? Guessing could read the wrong one
            raise ValueError(
                f"rsna-bone-age: {path}: column {twice!r} appears twice in the header {header}; "
                "rename or delete one of them"
            )
        where = [header.index(c) for c in columns]
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line, e.g. at the end of the file
            at = f"{path}, row {reader.line_num}"
            record = _parse_row(row, len(header), where, columns, images, seen, at, bad)
            records.append(record)
            if record is not None:
                seen[record.image.stem] = reader.line_num
    return records


def _parse_row(
    row: list[str],
    width: int,
    where: list[int],
    columns: tuple[str, ...],
    images: dict[str, list[Path]],
    seen: dict[str, int],
    at: str,
    bad: BadItems,
) -> Record | None:
    """The :class:`Record` of ``row`` (``width`` fields, as many as the header), or ``None`` once reported."""
    byte = undecodable(row)
    if byte is not None:
        bad.report(at, f"not UTF-8 text (byte {byte}); save the file as UTF-8")
        return None
    fields = [row[i].strip() if i < len(row) else "" for i in where]
    for name, value in zip(columns, fields):
        if not value:
            bad.report(at, f"missing field {name!r}")
            return None
    if len(row) != width:
        # A stray comma (a decimal comma, a note) shifts every later field: no value of the row
        # can be trusted, even where it happens to parse.
        text = ",".join(row)
        shown = text if len(text) <= SHOWN else text[:SHOWN] + "..."
        bad.report(at, f"{len(row)} fields but the header has {width} (a stray comma?): {shown!r}")
        return None
    image_id, months_text, male = fields
    try:
        months = float(months_text)
    except ValueError:
        months = math.nan
    if not math.isfinite(months) or months < 0:
        bad.report(at, f"{columns[1]!r} is not a non-negative number: {months_text!r}")
        return None
    if male.lower() not in BOOLEANS:
        bad.report(at, f"{columns[2]!r} is not a boolean: {male!r}")
        return None
    if image_id in seen:
        bad.report(at, f"duplicate id {image_id!r} (first at row {seen[image_id]})")
        return None
    if image_id not in images:
        bad.report(at, f"no image {image_id}.png for id {image_id!r}")
        return None
    if len(images[image_id]) > 1:  # which one is this row's radiograph? Guessing could mislabel
        found = ", ".join(map(str, images[image_id]))
        bad.report(at, f"{len(images[image_id])} images for id {image_id!r}: {found}; delete all but one")
        return None
    return Record(images[image_id][0], months, at)


def png_index(folders: list[Path]) -> dict[str, list[Path]]:
    """``{stem: paths}`` of the PNG files under ``folders`` (recursively; ``.png`` in any case, as
    Windows exports write ``.PNG``). More than one path for a stem is reported when its id is read."""
    index: dict[str, list[Path]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() == ".png" and path.is_file():
                index.setdefault(path.stem, []).append(path)
    return index


def _fit_months(train: list[Record | None], train_csv: Path) -> TargetScale:
    """Normalisation of the months of the training split ``train`` (``None`` for a bad row).

    Raises:
        ValueError: the split has no usable row, naming the file.
    """
    months = [r.months for r in train if r is not None]
    if not months:
        what = "no data rows (only a header)" if not train else f"{len(train)} row(s), none usable"
        raise ValueError(f"rsna-bone-age: the training split of {train_csv} has {what}: nothing to train on")
    return fit_scale(torch.tensor(months), "months", "rsna-bone-age")


@register_dataset("rsna-bone-age")
def rsna_bone_age(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    channels: int = 1,
    skip_bad: bool = False,
    cache: bool = True,
    cache_dir: str | None = None,
) -> TensorRegressionDataset:
    """RSNA Bone Age radiographs, inputs ``(channels, size, size)`` in [0, 1], targets ``(n,)``.

    Targets are ``(months - mean) / std`` with the mean and std of the training rows' labels;
    ``dataset.scale`` maps them back to months.

    Args:
        seed: seeds the 80/20 split (used only without a validation CSV).
        channels: 1 (grayscale) or 3 (gray repeated, for models built for RGB input).
        skip_bad: skip bad rows and unreadable or missing images (one warning) instead of raising.
        cache, cache_dir: keep decoded images on disk (default ``$GRAMNEWTON_CACHE`` or
            ``~/.cache/gramnewton``).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if root is None:
        raise FileNotFoundError(f"rsna-bone-age is not downloadable here: pass root= the folder holding {TRAIN_CSV}")
    folder = Path(root)
    train_csv = folder / TRAIN_CSV
    if not train_csv.is_file():
        raise FileNotFoundError(f"rsna-bone-age: {train_csv} not found; root must hold {TRAIN_CSV} and {TRAIN_IMAGES}/")
    bad = BadItems("rsna-bone-age", skip_bad)
    train_rows = read_labels(train_csv, TRAIN_COLUMNS, png_index([training_image_dir(folder)]), bad)
    validation_csv = find_validation_csv(folder)
    if validation_csv is not None:
        validation_dirs = [p for p in folder.iterdir() if p.is_dir() and "validation" in p.name.lower()]
        parts = {
            "train": train_rows,
            "test": read_labels(validation_csv, VALIDATION_COLUMNS, png_index(validation_dirs), bad),
        }
    else:
        # Split over all rows, bad ones included, so a skipped row never moves another across.
        parts = {p: [train_rows[i] for i in split_indices(len(train_rows), p, seed)] for p in ("train", "test")}
    try:
        scale = _fit_months(parts["train"], train_csv)
    except ValueError:
        bad.warn()  # which rows were skipped, so the refusal says why
        raise
    records = [r for r in parts[split] if r is not None]
    images, keep = load_images(
        f"rsna-bone-age-{split}", [r.image for r in records], size, "L", bad, cache, cache_dir, [r.row for r in records]
    )
    bad.warn()
    months = torch.tensor([r.months for r in records], dtype=torch.float64)[keep]
    targets = ((months - scale.mean) / scale.std).float()
    return TensorRegressionDataset(images.expand(-1, channels, -1, -1), targets, scale, "rsna-bone-age")
