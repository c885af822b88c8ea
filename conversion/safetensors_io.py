"""Reading safetensors files one tensor at a time, without mmap.

Each tensor is read with one ``readinto`` into a fresh numpy array, so the process holds exactly the tensors it is
working on (a mmap'd file would count every page it has touched in the process's RSS until it is closed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen_jax.loading import CheckpointError, check_finite

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
HASH_CHUNK = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str  # relative to the checkpoint dir
    name: str
    dtype: str  # safetensors dtype name ("BF16", ...)
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


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
                f"tensor {name!r} in {where}: data runs past the end of the file (truncated or corrupt)"
            )
        infos.append(TensorInfo(relative, name, dtype, shape, base + a, base + b))
    infos.sort(key=lambda t: t.start)
    return infos


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor, read into a fresh array; CheckpointError if it holds a NaN or an infinity."""
    out = np.empty(info.shape, NUMPY_DTYPES[info.dtype])
    buffer = out.reshape(-1).view(np.uint8)
    try:
        with open(path / info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buffer)
    except OSError as e:
        raise CheckpointError(
            f"tensor {info.name!r} in {path / info.file}: cannot read ({e.strerror})"
        ) from None
    if got != info.stop - info.start:
        raise CheckpointError(f"tensor {info.name!r} in {path / info.file}: truncated ({got} bytes read)")
    check_finite(out, f"tensor {info.name!r} in {path / info.file}")
    return out


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
