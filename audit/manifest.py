"""The contract of a run: library versions, device, dtype, seed, and sha256 of the checkpoint, tokenizer and chat
template, so that two runs can be checked to be of the same thing (spec: pin the contract, warn when it differs)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
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


def sha256_file(path: Path) -> str:
    """sha256 of a file (:func:`conversion.safetensors_io.file_sha256`, imported on use: it loads JAX)."""
    from conversion.safetensors_io import file_sha256

    return file_sha256(path)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: The files that define a checkpoint's weights: its safetensors and config.json (an index or generation config
#: changes no weight, and a conversion to Orbax does not keep the index).
CONFIG_FILE = "config.json"
ORBAX_MANIFEST = "manifest.json"


def checkpoint_digest(directory: Path, progress: bool = False) -> dict[str, str]:
    """See :func:`_checkpoint_digest`; computed once per directory and process (a live compare hashes the same
    checkpoint for the reference's contract and the JAX side's: tens of GB at full size)."""
    return dict(_checkpoint_digest(Path(directory).resolve(), progress))


@functools.cache
def _checkpoint_digest(directory: Path, progress: bool) -> dict[str, str]:
    """sha256 of the safetensors files and config.json of an HF checkpoint dir, by file name. For an Orbax dir
    from ``python -m conversion convert``, the source safetensors' sha256 recorded at conversion time (and its copy
    of config.json), so that a faithful conversion has the same digest as the checkpoint it came from."""
    directory = Path(directory)
    digests = {}
    manifest = directory / ORBAX_MANIFEST
    if manifest.is_file() and not any(directory.glob("*.safetensors")):
        sources = json.loads(manifest.read_text(encoding="utf-8")).get("sources", {})
        digests = {name: record["sha256"] for name, record in sources.items()}
    else:
        files = sorted(directory.glob("*.safetensors"))
        for path in tqdm(files, desc="sha256", disable=not progress, leave=False):
            digests[path.name] = sha256_file(path)
    if (directory / CONFIG_FILE).is_file():
        digests[CONFIG_FILE] = sha256_file(directory / CONFIG_FILE)
    return digests


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
