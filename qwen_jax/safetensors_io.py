"""Reading safetensors files without mmap: the header, then tensors (or leading-axis row ranges of them) one at a time.

Each read is one ``readinto`` into a fresh numpy array, so the process holds exactly the data it is working on (a
mmap'd file would count every page it has touched in the process's RSS until it is unmapped). :func:`read_tensor`
is the one place where tensor data enters the process, for :func:`qwen_jax.load_hf`, ``conversion convert`` and
``conversion verify`` alike, and it refuses a NaN or an infinity (:func:`check_finite`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

NUMPY_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(bool),
}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names each offending tensor and file."""


def check_finite(value: np.ndarray, where: str, block: int = 1 << 24) -> None:
    """CheckpointError naming ``where`` when a tensor holds a NaN or an infinity; checked in blocks of ``block``
    elements on the data already read, so no tensor-sized temporary is made. Integer tensors pass."""
    if not np.issubdtype(value.dtype, np.floating) and value.dtype != NUMPY_DTYPES["BF16"]:
        return
    flat = value.reshape(-1)
    for start in range(0, flat.size, block):
        finite = np.isfinite(flat[start : start + block])
        if not finite.all():
            first = start + int(np.argmin(finite))
            raise CheckpointError(f"{where} holds a non-finite value ({flat[first]} at flat index {first})")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str  # relative to the checkpoint dir
    name: str
    dtype: str  # safetensors dtype name ("BF16", ...)
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int

    @property
    def rows(self) -> int:
        """The length of the leading axis (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * NUMPY_DTYPES[self.dtype].itemsize


def read_header(path: Path, relative: str) -> list[TensorInfo]:
    """The tensors of one safetensors file, in file order, with every offset checked against the file size."""
    file = path / relative
    where = str(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{where}: not a valid safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{where}: not a valid safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: not a valid safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a valid safetensors file (header is not an object)")
    base = 8 + n
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"tensor {name!r} in {where}: malformed header entry") from None
        itemsize = NUMPY_DTYPES[dtype].itemsize if dtype in NUMPY_DTYPES else None
        if itemsize is not None and b - a != math.prod(shape) * itemsize:
            raise CheckpointError(f"tensor {name!r} in {where}: {b - a} bytes for shape {shape} {dtype}")
        if not 0 <= a <= b or base + b > size:
            raise CheckpointError(
                f"{where}: not a valid safetensors file (truncated or corrupt: the data of tensor {name!r} runs "
                "past the end of the file)"
            )
        infos.append(TensorInfo(relative, name, dtype, shape, base + a, base + b))
    infos.sort(key=lambda t: t.start)
    return infos


def read_tensor(path: Path, info: TensorInfo, rows: slice | None = None) -> np.ndarray:
    """One tensor, or the rows ``rows`` of its leading axis (a contiguous byte range), read into a fresh array."""
    start, stop = (0, info.rows) if rows is None else (rows.start, rows.stop)
    shape = (stop - start, *info.shape[1:]) if info.shape else ()
    out = np.empty(shape, NUMPY_DTYPES[info.dtype])
    buffer = out.reshape(-1).view(np.uint8)
    try:
        with open(path / info.file, "rb") as f:
            f.seek(info.start + start * info.row_bytes)
            got = f.readinto(buffer)
    except OSError as e:
        raise CheckpointError(
            f"tensor {info.name!r} in {path / info.file}: cannot read ({e.strerror})"
        ) from None
    if got != buffer.nbytes:
        raise CheckpointError(f"tensor {info.name!r} in {path / info.file}: truncated ({got} bytes read)")
    check_finite(out, f"tensor {info.name!r} in {path / info.file}")
    return out
