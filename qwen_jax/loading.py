"""Loading a Hugging Face safetensors checkpoint into the JAX model, with strict bookkeeping, one leaf at a time.

Every JAX leaf is set exactly once, every tensor is consumed or deliberately skipped (``mtp.*``, ``model.visual.*``),
and shapes and dtypes are checked. Problems are collected and raised together as one :class:`CheckpointError`
whose lines each name the tensor and the file. Pickle-based checkpoints are refused, never unpickled.

The checks run on a plan built from the safetensors headers alone (:func:`plan_checkpoint`: which tensors fill
which leaf), before any tensor data is read; ``conversion convert`` and ``verify`` use the same plan. Then
:func:`load_hf` streams: it reads, casts and places one leaf at a time (on a mesh, only this process's shards).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.hf_layout import (
    SKIPPED_PREFIXES,
    WHOLE,
    LeafPath,
    Target,
    canonical_name,
    hf_view,
    keeps_leading_axis,
    pieces_complete,
    side_by_side_parts,
    targets_for,
)
from qwen_jax.model import Qwen35MoeForCausalLM, resolve_dtype
from qwen_jax.safetensors_io import CheckpointError, TensorInfo, read_header, read_tensor
from qwen_jax.sharding import check_mesh, param_sharding

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.bin")
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
MAX_LISTED_ERRORS = 20
#: How much of a tensor is read at a time while a leaf is filled (the only transient besides the leaf).
BLOCK_BYTES = 16 * 1024 * 1024
#: Rows of a matrix copied at a time into its (often transposed) place in the leaf.
TILE_ROWS = 128
#: Byte alignment of a leaf's host buffer (XLA:CPU's buffer alignment).
ALIGNMENT = 64


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


@dataclasses.dataclass(frozen=True)
class Source:
    tensor: TensorInfo
    target: Target


@dataclasses.dataclass
class LeafPlan:
    """One JAX leaf and the HF tensors (``sources``) that fill it."""

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
    files: list[str]
    leaves: list[LeafPlan]  # in the model's flat-state order
    skipped: Counter

    @property
    def loaded(self) -> int:
        return len({s.tensor.name for leaf in self.leaves for s in leaf.sources})

    def report(self) -> LoadReport:
        return LoadReport(files=list(self.files), loaded=self.loaded, skipped=Counter(self.skipped))


def abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, list]:
    """The model's graph and flat state of ``jax.ShapeDtypeStruct`` leaves, from ``nnx.eval_shape`` (nothing is
    allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, resolve_dtype(dtype))))
    return graphdef, nnx.to_flat_state(state)


def abstract_leaves(cfg: ModelConfig, dtype) -> dict[LeafPath, jax.ShapeDtypeStruct]:
    """{leaf path: ShapeDtypeStruct} of the model, in flat-state order (nothing is allocated)."""
    return {path: var.get_value() for path, var in abstract_model(cfg, dtype)[1]}


def plan_checkpoint(
    path: Path,
    cfg: ModelConfig,
    specs: dict[LeafPath, jax.ShapeDtypeStruct],
    files: dict[str, list[str] | None],
    what: str,
) -> Plan:
    """Maps every tensor of the checkpoint's ``files`` onto the leaves ``specs`` from the safetensors headers alone
    (no tensor data is read), with the strict bookkeeping; one :class:`CheckpointError` titled ``what`` lists
    every problem."""
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
    raise_problems(errors, f"{what} {path}")
    leaves = [
        LeafPlan(leaf, tuple(spec.shape), np.dtype(spec.dtype), sources[leaf]) for leaf, spec in specs.items()
    ]
    return Plan(path, cfg, list(files), leaves, skipped)


def copy_cast(dest: np.ndarray, value: np.ndarray) -> None:
    """``dest[...] = value`` cast to ``dest``'s dtype. The cast is done on the contiguous ``value``, then the bits are
    copied ``TILE_ROWS`` rows of each matrix at a time: numpy's whole-array copy into a transposed view (the
    kernels and experts are stored transposed) walks memory against the cache and is several times slower."""
    if value.dtype != dest.dtype:
        value = value.astype(dest.dtype)
    if dest.ndim == 0:
        dest[...] = value
        return
    bits = np.dtype(f"u{dest.dtype.itemsize}")
    dest, value = dest.view(bits), value.view(bits)
    if dest.ndim > 2:
        for i in range(dest.shape[0]):
            copy_cast(dest[i], value[i])
        return
    for a in range(0, dest.shape[0], TILE_ROWS):
        dest[a : a + TILE_ROWS] = value[a : a + TILE_ROWS]


def read_rows_into(path: Path, tensor: TensorInfo, dest: np.ndarray, first_row: int = 0) -> None:
    """``dest[...] =`` rows ``first_row : first_row + len(dest)`` of ``tensor``, cast to ``dest``'s dtype, read
    ``BLOCK_BYTES`` at a time, so that no tensor-sized temporary is made."""
    if not tensor.shape:
        copy_cast(dest, read_tensor(path, tensor))
        return
    step = max(1, BLOCK_BYTES // max(1, tensor.row_bytes))
    for a in range(0, dest.shape[0], step):
        b = min(dest.shape[0], a + step)
        copy_cast(dest[a:b], read_tensor(path, tensor, slice(first_row + a, first_row + b)))


def assemble_leaf(path: Path, leaf: LeafPlan, rows: slice = slice(None)) -> np.ndarray:
    """The leaf's value, or the rows ``rows`` of its leading axis (one device's experts), C-contiguous in the leaf
    dtype. The buffer is filled from the tensors in blocks: besides it, at most one block is held, and a row
    range reads only its own rows (a fused expert tensor's experts, or only the per-expert tensors in range)."""
    if not leaf.shape:
        out = aligned_empty((), leaf.dtype)
        read_rows_into(path, leaf.sources[0].tensor, out)
        return out
    start, stop, _ = rows.indices(leaf.shape[0])
    out = aligned_empty((stop - start, *leaf.shape[1:]), leaf.dtype)
    whole = (start, stop) == (0, leaf.shape[0])
    for source in leaf.sources:  # pieces_complete guarantees they tile the leaf exactly once
        target, index = source.target, source.target.index
        if whole:
            read_rows_into(path, source.tensor, hf_view(target, out[index] if index else out))
        elif index and isinstance(index[0], int):  # one expert's tensor (per-expert layout)
            if start <= index[0] < stop:
                read_rows_into(path, source.tensor, hf_view(target, out[(index[0] - start, *index[1:])]))
        elif keeps_leading_axis(target):  # a fused expert tensor: its rows are the leaf's rows
            read_rows_into(path, source.tensor, hf_view(target, out), first_row=start)
        else:
            raise CheckpointError(
                f"parameter {'.'.join(map(str, leaf.path))}: rows {start}:{stop} of it cannot be read from "
                f"tensor {source.tensor.name!r} alone"
            )
    return out


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` whose data starts on an ``ALIGNMENT``-byte boundary, so that ``jax.device_put`` on the CPU can
    use the buffer as the device array without copying it (measured: a whole-leaf copy otherwise)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def shard_rows(leaf: LeafPlan, index: tuple) -> tuple[int, int] | None:
    """The leading-axis rows [start, stop) that a device's ``index`` into the leaf covers (None for a scalar);
    only the leading axis (the experts, on ``ep``) may be split."""
    if any(s != slice(None) for s in index[1:]):
        raise ValueError(f"{'.'.join(map(str, leaf.path))}: only the leading axis can be sharded on load")
    return index[0].indices(leaf.shape[0])[:2] if index else None


def place_leaf(path: Path, leaf: LeafPlan, sharding: jax.sharding.Sharding) -> jax.Array:
    """The leaf as a jax.Array laid out by ``sharding``: each distinct shard of this process's devices is assembled
    from the files once, put on its device(s) and released before the next is read."""
    devices_of: dict[tuple | None, list] = {}
    for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
        devices_of.setdefault(shard_rows(leaf, index), []).append(device)
    shards = []
    for rows, devices in devices_of.items():
        value = assemble_leaf(path, leaf, slice(*rows) if rows else slice(None))
        shards += [jax.device_put(value, device) for device in devices]
        del value  # on the CPU the device array is this buffer (no copy); elsewhere it has been copied
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)


def load_hf(
    path: str | Path,
    dtype: str = "float32",
    *,
    mesh: jax.sharding.Mesh | None = None,
    return_report: bool = False,
):
    """The JAX model for an HF checkpoint directory (``config.json`` + safetensors), in ``dtype``.

    ``dtype`` is "float32" or "bfloat16"; every parameter is cast to it (a bf16 model rounds the F32-stored
    ``A_log`` and gated-norm weight to bf16, exactly as HF does when loading in bf16).

    Streaming: the model is built abstractly, every tensor is mapped to its leaf from the safetensors headers (all
    problems are reported before any data is read), then each leaf is read, cast and placed in turn and its host
    buffer released (on CPU the placed array uses that buffer without a copy). Peak host memory is the model plus
    about one block of reading (``BLOCK_BYTES``).

    With ``mesh``, every leaf gets :func:`qwen_jax.sharding.param_sharding` (experts split on ``ep``, the rest
    replicated) and each process reads only the rows its own devices hold: a fused expert tensor's byte range of
    those experts, or only those experts' tensors. Run the model under ``jax.set_mesh(mesh)``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg = ModelConfig.from_json(path / "config.json")
    if mesh is not None:
        check_mesh(cfg, mesh)
    graphdef, flat = abstract_model(cfg, dtype)
    specs = {leaf: var.get_value() for leaf, var in flat}
    plan = plan_checkpoint(path, cfg, specs, checkpoint_files(path), "cannot load checkpoint")
    for (leaf_path, var), leaf in zip(flat, plan.leaves, strict=True):
        var.set_value(place_leaf(path, leaf, param_sharding(leaf_path, mesh)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    report = plan.report()
    log.info("%s", report.summary())
    return (model, report) if return_report else model
