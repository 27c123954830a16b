"""The benchmarks' result files: a JSON list per file, one record appended per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to the JSON list in ``path`` (created, with its folder, if missing)."""
    records = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*records, record], indent=1))
