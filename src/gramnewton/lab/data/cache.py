"""On-disk cache of decoded image tensors, keyed by the source files and the decoding parameters.

An entry is valid for exactly one file list (paths, sizes, modification times) and one set of
decoding parameters; any change to a file gives a new key, so the entry is rebuilt. Older
entries of the same data set and parameters are removed when a new one is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "GRAMNEWTON_CACHE"

Entry = dict[str, Any]


def default_cache_dir() -> Path:
    """``$GRAMNEWTON_CACHE`` if set, else ``~/.cache/gramnewton``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gramnewton")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def files_fingerprint(files: Sequence[Path]) -> str:
    """Hash of the file list with each file's size and modification time (ns)."""
    rows = []
    for path in files:
        st = path.stat()
        rows.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return _digest(rows)


def cached(
    name: str, files: Sequence[Path], params: dict[str, Any], build: Callable[[], Entry], cache_dir: str | Path | None
) -> Entry:
    """The entry for ``(files, params)`` from ``cache_dir``, or ``build()`` it and store it.

    Args:
        name: data set (and part) name; names the entry file.
        files: source files the entry is derived from.
        params: JSON-serialisable decoding parameters (size, mode, ...).
        build: makes the entry, a dict of tensors, strings and lists, when the cache misses.
        cache_dir: folder of the cache (created when missing); ``None`` for the default.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prefix = f"{name}-{_digest(params)}"
    path = folder / f"{prefix}-{files_fingerprint(files)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001  an unreadable entry is rebuilt, never trusted
            pass
    entry = build()
    folder.mkdir(parents=True, exist_ok=True)
    # Write then rename: an interrupted write never leaves a truncated entry under the real name.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(entry, tmp)
    os.replace(tmp, path)
    for stale in folder.glob(f"{prefix}-*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return entry
