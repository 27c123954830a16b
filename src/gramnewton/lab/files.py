"""Writing a file so that it is never seen half-written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` on a temporary file beside ``path``, then ``os.replace(tmp, path)``.

    A reader (``gramnewton plot`` on a running run) or a write cut short (an interrupt, a full
    disk, a killed process) finds the old file or the new one, never a truncated one; the
    temporary file (named with the process id: two processes may write one cache entry) is
    removed when ``write`` or the rename raises, and the error re-raised. Returns ``path``.
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the first error is the one to see
            tmp.unlink(missing_ok=True)
        raise
    return path
