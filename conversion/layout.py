"""Which HF tensors fill which JAX leaf: the plan built from the safetensors headers alone (no data is read), and
the assembly of one leaf from its tensors. Shared by ``convert`` and ``verify`` so both apply the same transform
and the same dtype cast, and with :func:`qwen_jax.load_hf`, which streams the same plan onto devices.

The checks are :mod:`qwen_jax.loading`'s: every tensor is consumed or deliberately skipped (``mtp.*``,
``model.visual.*``), shapes and float dtypes are checked, every leaf is set exactly once (a fused tensor, one q/k/v
slice, or every expert's pieces), and all problems are raised together as one ``CheckpointError`` whose lines
name the tensor and the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_jax.config import ModelConfig
from qwen_jax.loading import (
    LeafPlan,
    Plan,
    Source,
    abstract_leaves,
    assemble_leaf,
    checkpoint_files,
    plan_checkpoint,
)
from qwen_jax.safetensors_io import read_tensor

__all__ = ["LeafPlan", "Plan", "Source", "abstract_leaves", "assemble_leaf", "build_plan", "piece_value"]


def build_plan(path: str | Path, dtype: str) -> Plan:
    """Reads config.json and every safetensors header of an HF checkpoint dir and maps each tensor to its leaf."""
    path = Path(path)
    files = checkpoint_files(path)  # dir, index, missing shards, pickle refusal
    cfg = ModelConfig.from_json(path / "config.json")
    return plan_checkpoint(path, cfg, abstract_leaves(cfg, dtype), files, "cannot convert checkpoint")


def piece_value(path: Path, source: Source) -> np.ndarray:
    """One source tensor, transformed as it lands in its leaf (a view of the tensor: the transforms only move
    data); the cast to the leaf dtype happens when it is copied into place."""
    return source.target.transform(read_tensor(path, source.tensor))
