"""sha256 of whole files (the source fingerprint of a conversion). Reading safetensors headers and tensors is
:mod:`qwen_jax.safetensors_io`, shared with :func:`qwen_jax.load_hf`."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_CHUNK = 16 * 1024 * 1024


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
