"""Loading a Hugging Face safetensors checkpoint into the JAX model, with strict bookkeeping.

Every JAX leaf is set exactly once, every tensor is consumed or deliberately skipped (``mtp.*``, ``model.visual.*``),
and shapes and dtypes are checked. Problems are collected and raised together as one :class:`CheckpointError`
whose lines each name the tensor and the file. Pickle-based checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from qwen_jax.config import ModelConfig
from qwen_jax.hf_layout import (
    SKIPPED_PREFIXES,
    WHOLE,
    LeafPath,
    canonical_name,
    pieces_complete,
    side_by_side_parts,
    targets_for,
)
from qwen_jax.model import Qwen35MoeForCausalLM, resolve_dtype

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.bin")
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
MAX_LISTED_ERRORS = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names each offending tensor and file."""


@dataclasses.dataclass
class LoadReport:
    files: list[str]
    loaded: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)  # by prefix ("mtp.", "model.visual.")

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {p}*" for p, n in sorted(self.skipped.items())) or "none"
        return f"loaded {self.loaded} tensors from {len(self.files)} file(s); skipped {self.skipped_total} ({skipped})"


def tensor_targets(cfg: ModelConfig, name: str, dtype: str, where: str, errors: list[str], skipped: Counter):
    """The leaf pieces a checkpoint tensor sets, or None: counted in ``skipped`` (``mtp.*``, ``model.visual.*``)
    or, when it has no parameter in this model or is not a float, a problem appended to ``errors``."""
    canonical = canonical_name(name)
    if canonical is None:
        skipped[next(p for p in SKIPPED_PREFIXES if name.startswith(p))] += 1
        return None
    targets = targets_for(cfg, canonical)
    if targets is None:
        errors.append(f"unexpected {where}: no such parameter in this model (config.json)")
        return None
    if dtype not in FLOAT_DTYPES:
        errors.append(f"{where} has dtype {dtype}; expected a float dtype (BF16/F16/F32)")
        return None
    return targets


def claim_pieces(targets: list, shape: tuple, where: str, pieces: dict, errors: list[str]) -> list | None:
    """Checks the tensor's shape and marks its pieces as set in ``pieces``: the targets it newly sets, or None
    on a wrong shape. A piece set a second time is a problem appended to ``errors``."""
    if shape != targets[0].hf_shape:
        errors.append(f"{where} has shape {shape} but config.json implies {targets[0].hf_shape}")
        return None
    claimed = []
    for target in targets:
        have = pieces[target.leaf]
        if target.piece in have or (have and WHOLE in (target.piece, *have)):
            errors.append(f"{where} sets {'.'.join(map(str, target.leaf))} a second time")
            continue
        have.add(target.piece)
        claimed.append(target)
    return claimed


def incomplete_leaves(cfg: ModelConfig, pieces: dict, path: Path) -> list[str]:
    """One message per JAX leaf that the checkpoint's tensors leave unset or only partly set."""
    problems = []
    for leaf, got in pieces.items():
        if pieces_complete(cfg, leaf, got):
            continue
        lacking = sorted(side_by_side_parts(cfg, leaf) - got)
        if not got:
            state = "is missing"
        elif lacking:
            state = f"is only partly set (no {', '.join(lacking)} part)"
        else:
            state = f"is only partly set ({len(got)} pieces)"
        problems.append(f"parameter {'.'.join(map(str, leaf))} {state} in checkpoint {path}")
    return problems


def raise_problems(errors: list[str], what: str) -> None:
    """One :class:`CheckpointError` listing ``errors`` (the first ``MAX_LISTED_ERRORS``), if there are any."""
    if errors:
        shown = "\n  ".join(errors[:MAX_LISTED_ERRORS])
        more = (
            f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        )
        raise CheckpointError(f"{what} ({len(errors)} problem(s)):\n  {shown}{more}")


def check_finite(value: np.ndarray, where: str, block: int = 1 << 24) -> None:
    """CheckpointError naming ``where`` when a tensor holds a NaN or an infinity; checked in blocks of ``block``
    elements on the data already read, so no tensor-sized temporary is made."""
    flat = value.reshape(-1)
    for start in range(0, flat.size, block):
        finite = np.isfinite(flat[start : start + block])
        if not finite.all():
            first = start + int(np.argmin(finite))
            raise CheckpointError(f"{where} holds a non-finite value ({flat[first]} at flat index {first})")


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """The safetensors files of a checkpoint dir and, for each, the tensor names it should hold (None: all)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        missing = sorted(f for f in files if not (path / f).is_file())
        if missing:
            raise CheckpointError(f"{index}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return {SINGLE_FILE: None}
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        raise CheckpointError(
            f"{path}: found pickle-based checkpoint file(s) {pickles}; only safetensors is read "
            "(pickle files are never unpickled). Convert them to safetensors first."
        )
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def iter_tensors(path: Path, files: dict[str, list[str] | None]) -> Iterator[tuple[str, str, str, object]]:
    """Yields (file, name, safetensors dtype, lazy getter) for every tensor, one file open at a time."""
    for file, expected_names in files.items():
        try:
            with safe_open(path / file, framework="flax") as f:
                names = list(f.keys())
                if expected_names is not None:
                    absent = sorted(set(expected_names) - set(names))
                    if absent:
                        raise CheckpointError(
                            f"{path / file}: tensor(s) listed in the index are not in this file: {absent[:5]}"
                        )
                for name in names:
                    dtype = f.get_slice(name).get_dtype()
                    yield file, name, dtype, (lambda f=f, name=name: np.asarray(f.get_tensor(name)))
        except SafetensorError as e:
            raise CheckpointError(
                f"{path / file}: not a valid safetensors file (truncated or corrupt: {e})"
            ) from None


def _leaf_specs(model_shape: Qwen35MoeForCausalLM) -> dict[LeafPath, jax.ShapeDtypeStruct]:
    _, state = nnx.split(model_shape)
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def read_hf_params(
    path: str | Path, cfg: ModelConfig, dtype: str | jnp.dtype
) -> tuple[dict[LeafPath, np.ndarray], LoadReport]:
    """Reads every tensor of an HF checkpoint into numpy leaves of the JAX tree (cast to ``dtype``)."""
    path = Path(path)
    dtype = resolve_dtype(dtype)
    specs = _leaf_specs(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, dtype)))
    files = checkpoint_files(path)
    report = LoadReport(files=list(files))
    buffers: dict[LeafPath, np.ndarray] = {}
    pieces: dict[LeafPath, set] = {leaf: set() for leaf in specs}
    errors: list[str] = []

    for file, name, st_dtype, get in iter_tensors(path, files):
        where = f"tensor {name!r} in {path / file}"
        targets = tensor_targets(cfg, name, st_dtype, where, errors, report.skipped)
        if targets is None:
            continue
        tensor = get()
        check_finite(tensor, where)
        claimed = claim_pieces(targets, tuple(tensor.shape), where, pieces, errors)
        if claimed is None:
            continue
        for target in claimed:
            spec = specs[target.leaf]
            value = target.transform(tensor).astype(spec.dtype)
            if target.index:
                buffer = buffers.setdefault(target.leaf, np.zeros(spec.shape, spec.dtype))
                buffer[target.index] = value
            else:
                buffers[target.leaf] = value
        report.loaded += 1

    errors += incomplete_leaves(cfg, pieces, path)
    raise_problems(errors, f"cannot load checkpoint {path}")
    log.info("%s", report.summary())
    return buffers, report


def model_from_leaves(cfg: ModelConfig, dtype: str | jnp.dtype, leaves: dict[LeafPath, object]):
    """Builds the model from a complete {leaf path: array} mapping without allocating random weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, resolve_dtype(dtype))))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(leaves[path]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf(path: str | Path, dtype: str = "float32", *, return_report: bool = False):
    """The JAX model for an HF checkpoint directory (``config.json`` + safetensors), in ``dtype``.

    ``dtype`` is "float32" or "bfloat16"; every parameter is cast to it (a bf16 model rounds the F32-stored
    ``A_log`` and gated-norm weight to bf16, exactly as HF does when loading in bf16).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg = ModelConfig.from_json(path / "config.json")
    leaves, report = read_hf_params(path, cfg, dtype)
    model = model_from_leaves(cfg, dtype, leaves)
    return (model, report) if return_report else model
