"""Read and write IDX files (the MNIST format), raw or gzipped, and hash files.

An IDX file is a 4-byte magic number (0, 0, dtype code, number of dimensions), one
big-endian uint32 per dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from kdkit.errors import DataError

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped if it is gzip (by its magic bytes, not its name)."""
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"corrupt gzip file {path}: {e}") from e
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or .gz) into a numpy array of its shape and dtype."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()!r})")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: header of {ndim} dimensions is incomplete")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path} is corrupt or truncated: shape {shape} needs {expected} bytes of data, "
            f"found {len(data) - header}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read an IDX image file: uint8 array (N, H, W)."""
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 images (N, H, W), got {arr.dtype} {arr.shape}")
    return arr


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Read an IDX label file: uint8 array (N,)."""
    arr = read_idx(path)
    if arr.ndim != 1 or arr.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 labels (N,), got {arr.dtype} {arr.shape}")
    return arr


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file; gzipped if ``compress`` (default: name ends in .gz)."""
    path = Path(path)
    codes = {v: k for k, v in IDX_DTYPES.items()}
    dtype = np.dtype(array.dtype).newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in codes:
        raise DataError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
