"""Metrics logs as CSV files: one row per evaluation, one file per run."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomically

REWRITE = "fix or delete that line, or rerun the run with gramnewton train"


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV, creating parent folders; atomically
    (:func:`~gramnewton.lab.files.write_atomically`): a run rewrites its metrics.csv after every
    epoch, and ``gramnewton plot`` may read it meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def read_rows(path: str | Path, numeric: Collection[str] = ()) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_rows`; numeric fields become floats, and the fields of
    the ``numeric`` columns must be numbers (``nan`` included: how a run logs "not measured").

    Raises:
        ValueError: naming the file (and the line): not UTF-8, empty (no header), a line with
            another number of fields than the header, or a ``numeric`` field that is no number;
            a line ``write_rows`` would not write is never read as a row with gaps or text.
    """
    path = Path(path)
    lines = csv.reader(io.StringIO(_text(path), newline=""))
    header = next(lines, None)
    if not header:
        raise ValueError(f"{path} is empty: no header and no rows (rerun the run with gramnewton train)")
    rows = []
    for fields in lines:
        if not fields:  # a blank line (a trailing newline too many)
            continue
        where = f"{path}, line {lines.line_num}"
        if len(fields) != len(header):
            count = f"{len(fields)} field{'s' * (len(fields) != 1)}"
            raise ValueError(f"{where}: {count} where the header has {len(header)}; {REWRITE}")
        row = {k: _number(v) for k, v in zip(header, fields)}
        for column in numeric:
            if isinstance(row.get(column, 0.0), str):
                shown = repr(row[column].strip()) if row[column].strip() else "empty"
                raise ValueError(f"{where}: {column} is {shown}, not a number; {REWRITE}")
        rows.append(row)
    return rows


def as_rows(records: Iterable[Any], **extra: Any) -> list[dict[str, Any]]:
    """Dataclass records to dict rows, with ``extra`` columns first."""
    return [{**extra, **dataclasses.asdict(r)} for r in records]


def _number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def _text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 are refused naming the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM (a spreadsheet's export) is harmless
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: byte 0x{data[error.start]:02x} is not UTF-8 text; {REWRITE}") from None
