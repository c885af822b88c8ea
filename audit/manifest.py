"""The contract of a run: library versions, device, dtype, seed, and sha256 of the checkpoint, tokenizer and chat
template, so that two runs can be checked to be of the same thing (spec: pin the contract, warn when it differs)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from tqdm import tqdm

#: Keys whose difference between the reference bundle and the current run is warned about loudly.
CONTRACT_KEYS = (
    "dtype",
    "seed",
    "max_new_tokens",
    "checkpoint_sha256",
    "tokenizer_sha256",
    "chat_template_sha256",
    "prompts_sha256",
)
CHUNK = 1 << 24


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checkpoint_digest(directory: Path, progress: bool = False) -> dict[str, str]:
    """sha256 of every weight and config file of an HF checkpoint directory, by file name."""
    files = sorted(
        p
        for p in Path(directory).iterdir()
        if p.is_file() and (p.suffix in {".safetensors", ".json"}) and not p.name.startswith("tokenizer")
    )
    return {p.name: sha256_file(p) for p in tqdm(files, desc="sha256", disable=not progress, leave=False)}


def combined_sha256(digests: dict[str, str]) -> str:
    return sha256_text("".join(f"{name}:{digest}\n" for name, digest in sorted(digests.items())))


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict[str, str]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def contract_differences(reference: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    """The contract keys whose values differ between two manifests."""
    return [
        {"key": key, "reference": reference.get(key), "jax": current.get(key)}
        for key in CONTRACT_KEYS
        if reference.get(key) != current.get(key)
    ]
