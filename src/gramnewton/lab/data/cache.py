"""On-disk cache of decoded image tensors, keyed by the source files and the decoding parameters.

An entry is valid for exactly one file list (paths, sizes, modification and change times,
inodes) and one set of decoding parameters; any change to a file gives a new key, so the entry
is rebuilt. Older entries of the same data set, parameters and source folder are removed when a
new one is written (two copies of a data set used in turn keep one entry each, instead of each
load deleting the other's). An entry that cannot be written (a read-only folder, a full disk) is
used all the same, with a warning.

Every entry stores a SHA-256 checksum of its decoded contents (tensor bytes, dtypes, shapes and the
other values); an entry whose checksum does not match (a flipped byte on disk), that cannot be read
or that lacks a required key is rebuilt, with a warning, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomically

CACHE_ENV = "GRAMNEWTON_CACHE"
CHECKSUM_KEY = "checksum"

Entry = dict[str, Any]


def default_cache_dir() -> Path:
    """``$GRAMNEWTON_CACHE`` if set, else ``~/.cache/gramnewton``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gramnewton")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def files_fingerprint(files: Sequence[Path]) -> str:
    """Hash of the file list with each file's size, modification time, inode and change time (ns).

    The change time is set by the system whenever a file is written or replaced and cannot be
    set back: a corrected image copied over with ``cp -p`` / ``rsync -a`` keeps its size and
    modification time, and would otherwise be served from the cache as the old pixels.
    """
    rows = []
    for path in files:
        st = path.stat()
        rows.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return _digest(rows)


def entry_checksum(entry: Entry) -> str:
    """SHA-256 of an entry's contents (all keys but the checksum): tensors by dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key in sorted(k for k in entry if k != CHECKSUM_KEY):
        value = entry[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().contiguous().numpy()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(array.reshape(-1).view("uint8"))
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cached(
    name: str,
    files: Sequence[Path],
    params: dict[str, Any],
    build: Callable[[], Entry],
    cache_dir: str | Path | None,
    keys: Sequence[str] = (),
) -> Entry:
    """The entry for ``(files, params)`` from ``cache_dir``, or ``build()`` it and store it.

    Args:
        name: data set (and part) name; names the entry file.
        files: source files the entry is derived from.
        params: JSON-serialisable decoding parameters (size, mode, ...).
        build: makes the entry, a dict of tensors, strings and lists, when the cache misses.
        cache_dir: folder of the cache (created when missing); ``None`` for the default.
        keys: keys a stored entry must have to be used (else it is rebuilt).

    Raises:
        ValueError: ``cache_dir`` is not a folder that can be created or written.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:  # before decoding anything: a bad folder fails at once
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"cannot use the image cache folder {folder} ({error.strerror}): set ${CACHE_ENV} or the data "
            "set's cache_dir to a writable folder, or pass cache=False"
        ) from None
    # the stale entries a new one replaces: same data set, parameters and source folder
    source = os.path.commonpath([str(path.resolve().parent) for path in files]) if files else ""
    prefix = f"{name}-{_digest([params, source])}"
    path = folder / f"{prefix}-{files_fingerprint(files)}.pt"
    entry = _read(path, keys)
    if entry is not None:
        return entry
    entry = build()
    # Write then rename: an interrupted write never leaves a truncated entry under the real name.
    try:
        write_atomically(path, lambda tmp: torch.save({**entry, CHECKSUM_KEY: entry_checksum(entry)}, tmp))
    # A read-only folder (OSError) or a full disk (torch's writer raises RuntimeError): the
    # decoded images are used all the same, never thrown away for want of a cache.
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or f"{type(error).__name__}: {error}"
        warnings.warn(
            f"cannot write the cache entry {path} ({reason}); using the decoded images without caching "
            f"them: set ${CACHE_ENV} or the data set's cache_dir to a writable folder, or pass cache=False",
            stacklevel=3,
        )
        return entry
    for stale in folder.glob(f"{prefix}-*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return entry


def _read(path: Path, keys: Sequence[str]) -> Entry | None:
    """The verified entry at ``path``; None (with a warning if a file is there) when it cannot be used."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001  an unreadable entry is rebuilt, never trusted
        problem = f"unreadable ({type(error).__name__})"
    else:
        missing = [k for k in (*keys, CHECKSUM_KEY) if not isinstance(entry, dict) or k not in entry]
        if missing:
            problem = f"missing {', '.join(missing)}"
        elif entry.pop(CHECKSUM_KEY) != entry_checksum(entry):
            problem = "checksum mismatch (corrupt on disk)"
        else:
            return entry
    warnings.warn(f"cache entry {path}: {problem}; rebuilding it", stacklevel=3)
    return None
