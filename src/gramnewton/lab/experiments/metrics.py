"""Metrics logs as CSV files: one row per evaluation, one file per run."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_rows`; numeric fields become floats."""
    with Path(path).open(newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def as_rows(records: Iterable[Any], **extra: Any) -> list[dict[str, Any]]:
    """Dataclass records to dict rows, with ``extra`` columns first."""
    return [{**extra, **dataclasses.asdict(r)} for r in records]


def _number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value
