"""Reader for the IDX format of (Fashion-)MNIST (LeCun et al.), plain or gzip-compressed.

Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
``uint32`` sizes, then the data in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
UNSIGNED_BYTE = 0x08  # the type of every (Fashion-)MNIST file: pixels 0-255 and labels 0-9
GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """An IDX file that is corrupt or not what was expected; the message names the file."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IDXError(f"{path}: corrupt gzip data ({exc})") from exc


def read_idx(path: str | Path, ndim: int | None = None, type_code: int | None = None) -> np.ndarray:
    """The array stored in IDX file ``path`` (``.gz`` or not), with the shape from its header.

    Args:
        ndim: the number of dimensions required (3 for images ``(n, H, W)``, 1 for labels).
        type_code: the IDX type required (``UNSIGNED_BYTE`` for (Fashion-)MNIST): a file of
            another type (float labels, [0, 1] float pixels) would be cast without a word.

    Raises:
        IDXError: bad magic number, unknown type code or not ``type_code``, wrong
            dimensionality, or a data length that does not match the header (a truncated or
            padded file).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    stored, dims = data[2], data[3]
    if stored not in IDX_TYPES:
        raise IDXError(f"{path}: unknown IDX type code 0x{stored:02x}")
    if type_code is not None and stored != type_code:
        found, wanted = np.dtype(IDX_TYPES[stored]).name, np.dtype(IDX_TYPES[type_code]).name
        raise IDXError(f"{path}: IDX type 0x{stored:02x} ({found}), expected 0x{type_code:02x} ({wanted})")
    if ndim is not None and dims != ndim:
        raise IDXError(f"{path}: expected {ndim} dimensions, the header says {dims}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise IDXError(f"{path}: truncated header")
    shape = struct.unpack(f">{dims}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[stored])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header cannot overflow to a match
    if len(data) - header != expected:
        raise IDXError(f"{path}: header {shape} needs {expected} data bytes, the file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
