"""Opt-in tuning of glibc's ``malloc`` for training loops (``gramnewton.tune_allocator``).

Why: a training step allocates and frees the same large buffers (activations, per-sample
gradients) every time. glibc serves blocks above its mmap threshold (128 kB, raised dynamically
up to 32 MB) with a fresh ``mmap`` and returns them with ``munmap`` on free, and it trims the top
of the heap back to the kernel: every step then pays page faults to map and zero those pages
again. On the 2-core development machine that was a third of a GGN step and a sixth of an SGD
step (docs/performance.md). Raising the thresholds keeps freed memory in the process, so the
next step reuses it; the peak resident set does not grow (freed blocks are reused, not added).

Nothing here runs at import: ``import gramnewton`` never changes process state. The
``gramnewton`` command and the benchmarks call :func:`tune_allocator` at start; it does nothing
when ``GRAMNEWTON_TUNE_ALLOCATOR=0`` is set, when the C library is not glibc, or when ``malloc``
is replaced (e.g. ``LD_PRELOAD=libjemalloc.so.2``), and says which in its return value.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

ENV_VAR = "GRAMNEWTON_TUNE_ALLOCATOR"

# mallopt parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# Defaults: blocks up to 1 GiB come from the heap, the heap is trimmed only when 2 GiB are free
# at its top (mallopt takes an int), and it grows 64 MiB beyond each request (fewer brk calls;
# address space only, pages become resident when first written).
DEFAULT_MMAP_THRESHOLD = 1 << 30
DEFAULT_TRIM_THRESHOLD = (1 << 31) - 1
DEFAULT_TOP_PAD = 64 << 20


@dataclass(frozen=True)
class AllocatorTuning:
    """What :func:`tune_allocator` did.

    Attributes:
        applied: True when every ``mallopt`` call succeeded.
        reason: why it was or was not applied, one line.
        settings: the ``mallopt`` parameters set, name -> value (empty when not applied).
    """

    applied: bool
    reason: str
    settings: dict[str, int] = field(default_factory=dict)


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or ``None`` when the C library is something else."""
    if os.name != "posix":  # Windows: ``ctypes.CDLL(None)`` raises TypeError there, not OSError
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() and hasattr(libc, "mallopt") else None


def _malloc_is_glibcs(libc: ctypes.CDLL) -> bool:
    """Whether ``malloc`` as the process resolves it is glibc's (not an ``LD_PRELOAD``-ed one)."""
    try:
        own = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    address = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    return address == ctypes.cast(own.malloc, ctypes.c_void_p).value


def tune_allocator(
    *,
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    top_pad: int = DEFAULT_TOP_PAD,
) -> AllocatorTuning:
    """Make glibc keep freed memory for reuse instead of unmapping it (process-wide, explicit).

    Calls ``mallopt(M_MMAP_THRESHOLD, mmap_threshold)``, ``mallopt(M_TRIM_THRESHOLD,
    trim_threshold)`` and ``mallopt(M_TOP_PAD, top_pad)`` (bytes; each at most ``2**31 - 1``).
    Setting them fixes them for the process (glibc's dynamic threshold is then off). Call it once
    at the start of a training script; the ``gramnewton`` command does. It is a no-op, reported
    in the result, when ``GRAMNEWTON_TUNE_ALLOCATOR=0`` is set, on a C library other than glibc,
    or when ``malloc`` is not glibc's (``LD_PRELOAD``).

    Returns:
        An :class:`AllocatorTuning`; ``applied`` is False in the no-op cases above.

    Raises:
        ValueError: a value that is not an ``int`` in ``[0, 2**31 - 1]`` (nothing is changed).
    """
    settings = {"M_MMAP_THRESHOLD": mmap_threshold, "M_TRIM_THRESHOLD": trim_threshold, "M_TOP_PAD": top_pad}
    for name, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= (1 << 31) - 1:
            raise ValueError(f"{name} must be an int in [0, 2**31 - 1] bytes (mallopt takes an int), got {value!r}")
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return AllocatorTuning(False, f"disabled by {ENV_VAR}=0")
    libc = _glibc()
    if libc is None:
        return AllocatorTuning(False, "the C library is not glibc; nothing to tune")
    if not _malloc_is_glibcs(libc):
        return AllocatorTuning(False, "malloc is not glibc's (replaced, e.g. by LD_PRELOAD); left as it is")
    numbers = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD, "M_TOP_PAD": M_TOP_PAD}
    failed = [name for name, value in settings.items() if libc.mallopt(numbers[name], ctypes.c_int(value)) != 1]
    if failed:
        return AllocatorTuning(False, f"glibc refused mallopt for {', '.join(failed)}")
    return AllocatorTuning(True, "glibc malloc keeps freed memory for reuse", settings)
