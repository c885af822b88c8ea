"""Orbax checkpoints written by ``python -m conversion convert``, and :func:`load`, which restores one sharded.

Layout of a converted directory (self-contained: config, generation config, tokenizer and chat template are copied
next to the weights)::

    OUT/manifest.json            format marker, dtype, config, every leaf (path, shape, dtype, sha256 of its bytes,
                                 the HF tensors it came from) and every source file (size, sha256)
    OUT/params/<leaf name>/      one small Orbax checkpoint per parameter leaf, tree {"value": array}
    OUT/config.json, generation_config.json, tokenizer*.json, chat_template.jinja, ...

One checkpoint per leaf lets the converter write and release each leaf before it reads the next (bounded memory),
and lets :func:`load` restore each leaf straight into its sharding on the mesh: Orbax reads, for each device, only
the slice of the leaf that device holds, so no full host copy of an expert-sharded leaf is ever made.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.hf_layout import LeafPath
from qwen_jax.loading import CheckpointError, abstract_model, load_hf
from qwen_jax.model import resolve_dtype

FORMAT = "qwen-jax-orbax-per-leaf"
#: 2: the projections that read the same input are one leaf each (``in_proj``, ``qkv_proj``, ``shared_gate_up``).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
VALUE_KEY = "value"


def leaf_name(path: LeafPath) -> str:
    """``("layers", 0, "mlp", "gate_up")`` -> ``"layers.0.mlp.gate_up"`` (also the leaf's directory name)."""
    return ".".join(map(str, path))


def leaf_bytes_sha256(value: np.ndarray) -> str:
    """sha256 of a leaf's C-order bytes (the dtype and shape are recorded next to it)."""
    return hashlib.sha256(np.ascontiguousarray(value).reshape(-1).view(np.uint8)).hexdigest()


def read_manifest(ckpt_dir: str | Path) -> dict:
    """The manifest of a converted checkpoint; CheckpointError if the directory is not one."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a converted checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('version')}, this qwen_jax reads version {FORMAT_VERSION}; "
            "convert the Hugging Face checkpoint again (python -m conversion convert)"
        )
    return manifest


def _quiet_orbax() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)


def restore_leaf(leaf_dir: Path, sharding=None, shape=None, dtype=None):
    """One leaf: a numpy array (``sharding`` None) or a jax.Array laid out by ``sharding``, each device reading
    only its own slice (``ArrayRestoreArgs``); ``dtype`` casts on restore."""
    import orbax.checkpoint as ocp

    _quiet_orbax()
    leaf_dir = Path(leaf_dir).absolute()  # Orbax refuses relative paths
    if sharding is None:
        args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    else:
        args = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(shape), dtype=dtype)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = checkpointer.restore(leaf_dir, args=ocp.args.PyTreeRestore(restore_args={VALUE_KEY: args}))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{leaf_dir}: cannot restore this Orbax leaf ({e})") from None
    return restored[VALUE_KEY]


def restore_verified_leaf(leaf_dir: Path, entry: dict, sharding, dtype):
    """One leaf read whole on the host in its stored dtype, its bytes checked against the manifest's sha256
    (``entry``), then cast to ``dtype`` and placed by ``sharding``; CheckpointError naming the leaf on a
    mismatch."""
    value = restore_leaf(leaf_dir)
    if list(value.shape) != list(entry.get("shape", ())) or leaf_bytes_sha256(value) != entry.get("sha256"):
        raise CheckpointError(
            f"{leaf_dir}: the leaf's bytes do not match the sha256 recorded in {MANIFEST} (corrupted or altered "
            "since the conversion)"
        )
    return jax.device_put(value.astype(dtype), sharding)


def load(
    ckpt_dir: str | Path,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str | None = None,
    *,
    verify: bool = True,
):
    """The model from a converted checkpoint, each parameter restored directly into its sharding.

    With ``mesh``, every leaf gets :func:`qwen_jax.sharding.param_sharding` (experts split on
    ``ep``, the rest replicated) and each device materialises only its shard; run the model under
    ``jax.set_mesh(mesh)``. Without a mesh, everything goes to the first device. ``dtype`` ("float32" or "bfloat16")
    casts on restore; by default the checkpoint's own dtype is kept.

    ``verify`` (default True) checks every leaf's bytes against the sha256 the manifest records: each leaf is then
    read whole on the host once (one leaf at a time) before it is placed; ``verify=False`` skips the check and
    lets each device read only its own slice. ``python -m audit`` always verifies.
    """
    from qwen_jax.sharding import check_mesh, param_sharding

    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    cfg = ModelConfig.from_json(ckpt_dir / "config.json")
    stored = resolve_dtype(manifest["dtype"])
    target = resolve_dtype(dtype) if dtype is not None else stored
    if mesh is not None:
        check_mesh(cfg, mesh)
    graphdef, flat = abstract_model(cfg, target)
    entries = {leaf_name(tuple(e["path"])): e for e in manifest["leaves"]}
    for path, var in flat:
        name = leaf_name(path)
        entry = entries.get(name)
        spec = var.get_value()
        if entry is None:
            raise CheckpointError(f"{ckpt_dir}: parameter {name} is missing from {MANIFEST}")
        if tuple(entry["shape"]) != tuple(spec.shape):
            raise CheckpointError(
                f"{ckpt_dir}: parameter {name} has shape {tuple(entry['shape'])} in {MANIFEST} "
                f"but config.json implies {tuple(spec.shape)}"
            )
        sharding = param_sharding(path, mesh)
        leaf_dir = ckpt_dir / PARAMS_DIR / name
        if verify:
            value = restore_verified_leaf(leaf_dir, entry, sharding, target)
        else:
            value = restore_leaf(leaf_dir, sharding, spec.shape, target)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def is_converted(path: str | Path) -> bool:
    """A directory written by ``python -m conversion convert`` (a manifest and no safetensors)."""
    path = Path(path)
    return (path / MANIFEST).is_file() and not any(path.glob("*.safetensors"))


def load_model_dir(path: str | Path, dtype: str, mesh: jax.sharding.Mesh | None = None):
    """The model of a converted (Orbax) directory, its leaves checked against the manifest's sha256 (:func:`load`),
    or of an HF safetensors directory, streamed (:func:`qwen_jax.load_hf`); each leaf placed in its sharding on
    ``mesh``. What the audit's JAX side and the server load."""
    if is_converted(path):
        return load(path, mesh=mesh, dtype=dtype, verify=True)
    return load_hf(path, dtype, mesh=mesh)


__all__ = [
    "FORMAT",
    "MANIFEST",
    "PARAMS_DIR",
    "is_converted",
    "leaf_bytes_sha256",
    "leaf_name",
    "load",
    "load_model_dir",
    "read_manifest",
]
