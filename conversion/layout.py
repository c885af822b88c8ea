"""Which HF tensors fill which JAX leaf: a plan built from the safetensors headers alone (no data is read), and
the assembly of one leaf from its tensors. Shared by ``convert`` and ``verify`` so both apply the same transform
and the same dtype cast.

The checks are :mod:`qwen_jax.loading`'s: every tensor is consumed or deliberately skipped (``mtp.*``,
``model.visual.*``), shapes and float dtypes are checked, every leaf is set exactly once (a fused tensor, one q/k/v
slice, or every expert's pieces), and all problems are raised together as one ``CheckpointError`` whose lines
name the tensor and the file.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from conversion.safetensors_io import TensorInfo, read_header, read_tensor
from qwen_jax.config import ModelConfig
from qwen_jax.hf_layout import (
    LeafPath,
    Target,
)
from qwen_jax.loading import (
    CheckpointError,
    checkpoint_files,
    claim_pieces,
    incomplete_leaves,
    raise_problems,
    tensor_targets,
)
from qwen_jax.model import Qwen35MoeForCausalLM, resolve_dtype


@dataclasses.dataclass(frozen=True)
class Source:
    tensor: TensorInfo
    target: Target


@dataclasses.dataclass
class LeafPlan:
    path: LeafPath
    shape: tuple[int, ...]
    dtype: np.dtype
    sources: list[Source]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def tensor_names(self) -> list[str]:
        return sorted({s.tensor.name for s in self.sources})


@dataclasses.dataclass
class Plan:
    path: Path
    cfg: ModelConfig
    dtype: np.dtype
    files: list[str]
    leaves: list[LeafPlan]  # in the model's flat-state order
    skipped: Counter

    @property
    def loaded(self) -> int:
        return len({s.tensor.name for leaf in self.leaves for s in leaf.sources})


def abstract_leaves(cfg: ModelConfig, dtype) -> dict[LeafPath, jax.ShapeDtypeStruct]:
    """{leaf path: ShapeDtypeStruct} of the model, from ``nnx.eval_shape`` (nothing is allocated)."""
    _, state = nnx.split(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, resolve_dtype(dtype))))
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def build_plan(path: str | Path, dtype: str) -> Plan:
    """Reads config.json and every safetensors header of an HF checkpoint dir and maps each tensor to its leaf."""
    path = Path(path)
    files = checkpoint_files(path)  # dir, index, missing shards, pickle refusal
    cfg = ModelConfig.from_json(path / "config.json")
    specs = abstract_leaves(cfg, dtype)
    sources: dict[LeafPath, list[Source]] = {leaf: [] for leaf in specs}
    pieces: dict[LeafPath, set] = {leaf: set() for leaf in specs}
    skipped: Counter = Counter()
    errors: list[str] = []
    for file, expected in files.items():
        infos = read_header(path, file)
        if expected is not None:
            absent = sorted(set(expected) - {t.name for t in infos})
            if absent:
                raise CheckpointError(
                    f"{path / file}: tensor(s) listed in the index are not in this file: {absent[:5]}"
                )
        for info in infos:
            where = f"tensor {info.name!r} in {path / file}"
            targets = tensor_targets(cfg, info.name, info.dtype, where, errors, skipped)
            if targets is None:
                continue
            for target in claim_pieces(targets, info.shape, where, pieces, errors) or ():
                sources[target.leaf].append(Source(info, target))
    errors += incomplete_leaves(cfg, pieces, path)
    raise_problems(errors, f"cannot convert checkpoint {path}")
    leaves = [
        LeafPlan(leaf, tuple(spec.shape), np.dtype(spec.dtype), sources[leaf]) for leaf, spec in specs.items()
    ]
    return Plan(path, cfg, np.dtype(resolve_dtype(dtype)), list(files), leaves, skipped)


def piece_value(path: Path, source: Source) -> np.ndarray:
    """One source tensor, transformed as it lands in its leaf (a view of the tensor: the transforms only move
    data); the cast to the leaf dtype happens when it is copied into place."""
    return source.target.transform(read_tensor(path, source.tensor))


def assemble_leaf(path: Path, leaf: LeafPlan) -> np.ndarray:
    """The leaf's value, C-contiguous in the target dtype; holds at most the leaf and one source tensor."""
    if len(leaf.sources) == 1 and not leaf.sources[0].target.index:
        value = np.asarray(piece_value(path, leaf.sources[0]), dtype=leaf.dtype, order="C")  # <= one copy
    else:
        value = np.empty(leaf.shape, leaf.dtype)
        for source in leaf.sources:  # pieces_complete guarantees they tile the leaf exactly once
            value[source.target.index] = piece_value(path, source)  # numpy casts as it assigns
    if value.shape != leaf.shape:  # the hf_layout transforms are checked by shape in tests; keep a guard
        raise CheckpointError(f"parameter {'.'.join(map(str, leaf.path))}: assembled shape {value.shape}")
    return value
