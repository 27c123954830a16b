"""Real file formats a user brings, each with a defect that used to load silently wrong or fail
unclearly: IDX files of the wrong type or with an overflowing header, labels out of range, JPEGs
with an EXIF orientation, AFAD folders that only look like ages, cache entries of replaced files or
an unwritable cache folder, CSV headers with a column twice, bad seeds and misspelt names."""

from __future__ import annotations

import csv
import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gramnewton.lab.data import IDXError, get_dataset, read_idx
from gramnewton.lab.data import cache as cache_module
from gramnewton.lab.data import images as images_module

IDX_DTYPES = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    """A gzip'ed IDX file (as (Fashion-)MNIST is distributed) of ``array`` stored with type ``code``."""
    array = np.asarray(array)
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(IDX_DTYPES[code]).tobytes()))
    return path


def fashion_tree(folder: Path, labels=None, label_code: int = 0x08, images=None, image_code: int = 0x08) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 6), ("t10k", 3)):
        pixels = rng.integers(0, 256, (n, 28, 28)) if images is None else images[:n]
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", pixels, image_code)
        write_idx(
            folder / f"{prefix}-labels-idx1-ubyte.gz",
            rng.integers(0, 10, n) if labels is None else labels[:n],
            label_code,
        )
    return folder


# ---------------------------------------------------------------- IDX


def test_float_labels_are_refused_not_truncated(tmp_path: Path) -> None:
    """IDX labels stored as float32 (type 0x0d) 2.7 were cast to class 2 without a word."""
    root = fashion_tree(tmp_path, labels=np.full(6, 2.7), label_code=0x0D)
    with pytest.raises(IDXError, match=r"train-labels-idx1-ubyte.gz: IDX type 0x0d \(float32\), expected 0x08"):
        get_dataset("fashion-mnist", root=str(root))


def test_float_images_are_refused_not_scaled(tmp_path: Path) -> None:
    """Images stored as float32 in [0, 1] were divided by 255 again (all pixels near 0)."""
    root = fashion_tree(tmp_path, images=np.full((6, 28, 28), 0.5), image_code=0x0D)
    for name in ("fashion-mnist", "rotated-fashion-mnist"):
        with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz: IDX type 0x0d \(float32\), expected 0x08"):
            get_dataset(name, root=str(root))


def test_a_header_whose_size_overflows_is_named(tmp_path: Path) -> None:
    """2**31 x 2**31 x 2**31 items wrapped to 0 bytes in int64, matched an empty body, and failed
    in numpy's reshape without the file's name."""
    path = tmp_path / "t.idx"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2**31, 2**31, 2**31))
    with pytest.raises(IDXError, match=r"t.idx: header \(2147483648, 2147483648, 2147483648\) needs"):
        read_idx(path, ndim=3)


def test_labels_out_of_range_name_the_file(tmp_path: Path) -> None:
    """A label 10 (or 255, a padding byte) was refused as 'labels outside [0, 10)', no file named."""
    root = fashion_tree(tmp_path, labels=np.array([1, 2, 10, 3, 255, 4]))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: label 10 at item 2 is outside 0-9"):
        get_dataset("fashion-mnist", root=str(root))


# ---------------------------------------------------------------- image folders (AFAD-Lite)


def afad_tree(root: Path, ages=(20, 30), per_folder: int = 2) -> Path:
    for age in ages:
        for sex in ("111", "112"):
            folder = root / "AFAD-Lite" / str(age) / sex
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_folder):
                Image.new("RGB", (16, 16), (age * 4 + i,) * 3).save(folder / f"{i}.jpg")
    return root


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored landscape with EXIF Orientation=6 (rotate 90 degrees clockwise to view)
    was decoded as stored: every viewer shows it upright, the model saw it on its side."""
    from gramnewton.lab.data.images import decode_image

    photo = Image.new("RGB", (40, 20))
    photo.paste((255, 255, 255), (0, 0, 20, 20))  # white left half as stored: the top half upright
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    photo.save(path, exif=exif, quality=95)
    gray = decode_image(path, 8, "L")[0].astype(float)
    assert gray[:3].mean() > 200 and gray[5:].mean() < 50, gray


def test_an_age_folder_of_non_ascii_digits_is_reported(tmp_path: Path) -> None:
    """'²'.isdigit() is true: the folder passed the check and int('²') failed with a bare
    'invalid literal for int()' naming no folder."""
    root = afad_tree(tmp_path)
    (root / "AFAD-Lite" / "²" / "111").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "AFAD-Lite" / "²" / "111" / "a.jpg")
    with pytest.raises(ValueError, match=r"AFAD-Lite/²: folder name is not an age in years"):
        get_dataset("afad-lite", root=str(root), cache=False)


# ---------------------------------------------------------------- the decoded-image cache


def test_a_file_replaced_with_the_same_size_and_mtime_rebuilds_the_cache(tmp_path: Path) -> None:
    """``cp -p`` / ``rsync -a`` of a corrected image keeps its modification time; with the same
    size the stale cached pixels were used."""
    root = afad_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    before = get_dataset("afad-lite", root=str(root), cache_dir=str(cache), size=8).inputs.clone()
    path = root / "AFAD-Lite" / "20" / "111" / "0.jpg"
    stat = path.stat()
    size = stat.st_size
    for value in range(256):  # a different image of exactly the same number of bytes
        candidate = tmp_path / "candidate.jpg"
        Image.new("RGB", (16, 16), (value,) * 3).save(candidate)
        if candidate.stat().st_size == size and candidate.read_bytes() != path.read_bytes() and abs(value - 80) > 20:
            break
    else:
        pytest.skip("no same-size JPEG found")
    path.write_bytes(candidate.read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = get_dataset("afad-lite", root=str(root), cache_dir=str(cache), size=8).inputs
    fresh = get_dataset("afad-lite", root=str(root), cache=False, size=8).inputs
    assert torch.equal(after, fresh) and not torch.equal(after, before)


def test_a_cache_that_cannot_be_written_loses_no_decoded_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only cache folder (or a full disk): the entry's write failed after every image was
    decoded, and the load died with ``PermissionError`` naming a ``.tmp`` file. Now the images
    are used, with one warning saying the cache was not written; no temporary file is left."""
    root = afad_tree(tmp_path / "data")
    cache = tmp_path / "cache"

    def read_only(obj, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_module.torch, "save", read_only)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = get_dataset("afad-lite", root=str(root), cache_dir=str(cache), size=8)
    fresh = get_dataset("afad-lite", root=str(root), cache=False, size=8)
    assert torch.equal(data.inputs, fresh.inputs)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "cannot write the cache entry" in messages[0] and str(cache) in messages[0], messages
    assert list(cache.iterdir()) == []


def test_two_copies_of_a_data_set_used_in_turn_keep_their_cache_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two roots of one data set (a local copy and a scratch copy) shared the stale-entry prefix:
    each load deleted the other's entry, so every switch decoded all images again."""
    roots = [afad_tree(tmp_path / "a"), afad_tree(tmp_path / "b")]
    cache = tmp_path / "cache"
    for root in roots:
        get_dataset("afad-lite", root=str(root), cache_dir=str(cache), size=8)
    builds = []
    real = cache_module.cached

    def counting(name, files, params, build, cache_dir, keys=()):
        return real(name, files, params, lambda: builds.append(name) or build(), cache_dir, keys)

    monkeypatch.setattr(images_module, "cached", counting)
    for root in roots:
        get_dataset("afad-lite", root=str(root), cache_dir=str(cache), size=8)
    assert builds == [] and len(list(cache.glob("*.pt"))) == 2


# ---------------------------------------------------------------- CSV (RSNA Bone Age)


def test_a_csv_header_with_a_column_twice_is_refused(tmp_path: Path) -> None:
    """``id,boneage,male,boneage`` (a merged export): the first boneage column was used and the
    second ignored without a word."""
    folder = tmp_path / "boneage-training-dataset"
    folder.mkdir()
    with (tmp_path / "boneage-training-dataset.csv").open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["id", "boneage", "male", "boneage"])
        for i in range(5):
            writer.writerow([100 + i, 10 * i, "True", 999])
            Image.new("L", (8, 8), i).save(folder / f"{100 + i}.png")
    with pytest.raises(ValueError, match=r"boneage-training-dataset.csv: column 'boneage' appears twice in the header"):
        get_dataset("rsna-bone-age", root=str(tmp_path), cache=False)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("seed", [1.5, 2**70, -1, True])
def test_a_bad_seed_is_one_clear_line(seed) -> None:
    """``seed=1.5`` failed in torch (``RuntimeError: manual_seed expected a long``), ``2**70`` with
    ``Overflow when unpacking long long``."""
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, "):
        get_dataset("digits", seed=seed)


def test_a_misspelt_data_set_name_gets_a_suggestion() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'fashion_mnist' \(did you mean fashion-mnist\?\)"):
        get_dataset("fashion_mnist")


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_a_bad_image_size_is_refused_before_any_image_is_blamed(tmp_path: Path, size) -> None:
    """``size=0`` failed as ``ZeroDivisionError`` (AFAD's JPEG draft) or blamed the first image
    (``rsna-bone-age: .../1377.png ...: cannot decode image (ValueError: height and width must be
    > 0)``; with ``skip_bad=True`` every image was skipped as corrupt)."""
    root = afad_tree(tmp_path)
    with pytest.raises(ValueError, match=r"^afad-lite: size must be an integer >= 1 \(pixels\), got"):
        get_dataset("afad-lite", root=str(root), cache=False, size=size, skip_bad=True)


def rsna_root(root: Path, ids=range(100, 105)) -> Path:
    """A small RSNA Bone Age tree (CRLF, BOM, as spreadsheet exports write it)."""
    folder = root / "boneage-training-dataset"
    folder.mkdir(parents=True)
    with (root / "boneage-training-dataset.csv").open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["id", "boneage", "male"])
        for i in ids:
            writer.writerow([i, 10 + i, "True"])
            Image.new("L", (8, 8), i).save(folder / f"{i}.png")
    return root


def test_an_upper_case_png_suffix_is_read(tmp_path: Path) -> None:
    """``1377.PNG`` (a Windows or camera export) was 'no image 1377.png for id ...' while it was there."""
    root = rsna_root(tmp_path)
    folder = root / "boneage-training-dataset"
    (folder / "101.png").rename(folder / "101.PNG")
    parts = {s: get_dataset("rsna-bone-age", root=str(root), split=s, cache=False) for s in ("train", "test")}
    months = sorted(round(float(m)) for d in parts.values() for m in d.scale.to_original(d.targets))
    assert months == [110, 111, 112, 113, 114]


def test_two_images_of_one_id_are_reported(tmp_path: Path) -> None:
    """``a/101.png`` and ``b/101.png`` under the image folder: the later one was used without a word."""
    root = rsna_root(tmp_path)
    folder = root / "boneage-training-dataset"
    (folder / "again").mkdir()
    Image.new("L", (8, 8), 250).save(folder / "again" / "101.png")
    with pytest.raises(
        ValueError, match=r"boneage-training-dataset.csv, row 3: 2 images for id '101': .*101.png, .*again/101.png"
    ):
        get_dataset("rsna-bone-age", root=str(root), cache=False)


def test_fewer_labels_than_images_names_both_files(tmp_path: Path) -> None:
    """Was '12 images but 7 labels in <root>' (``in .`` for the default root): no file named."""
    root = fashion_tree(tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(
        ValueError, match=r"t10k-labels-idx1-ubyte.gz has 2 labels but .*t10k-images-idx3-ubyte.gz has 3 images"
    ):
        get_dataset("fashion-mnist", root=str(root), split="test")
