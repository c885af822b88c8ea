"""``verify``: every leaf of a converted checkpoint against the HF checkpoint it came from, bitwise.

The leaf restored from Orbax is compared with each of its HF tensors after the same transform and dtype cast as
``convert`` (shape, dtype, every byte, in blocks of rows), and with the manifest's sha256; every HF source file is
checked against the size and sha256 the conversion recorded. One leaf at a time, so
memory stays at about one leaf plus one tensor. On a mismatch the message names the leaf and the HF tensor(s) that
differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from conversion.convert import release_freed_memory
from conversion.layout import LeafPlan, build_plan, piece_value
from conversion.safetensors_io import file_sha256
from qwen_jax.checkpoint import (
    MANIFEST,
    PARAMS_DIR,
    leaf_bytes_sha256,
    leaf_name,
    read_manifest,
    restore_leaf,
)
from qwen_jax.loading import CheckpointError

log = logging.getLogger(__name__)
BLOCK_BYTES = 16 * 1024 * 1024


@dataclass
class VerifyReport:
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _equal(region: np.ndarray, expected_view: np.ndarray, dtype: np.dtype) -> bool:
    """Bitwise equality of a leaf region and a source tensor's transformed view cast to ``dtype``, compared in
    blocks of rows so that no leaf-sized temporary is made."""
    if region.shape != expected_view.shape:
        return False
    if region.ndim == 0:
        return np.array_equal(_bits(np.asarray(expected_view, dtype)), _bits(region))
    rows = max(1, BLOCK_BYTES // max(1, region[:1].nbytes))
    for a in range(0, region.shape[0], rows):
        block = np.asarray(expected_view[a : a + rows], dtype=dtype, order="C")
        if not np.array_equal(_bits(block), _bits(region[a : a + rows])):
            return False
    return True


def _differing_tensors(hf: Path, leaf: LeafPlan, actual: np.ndarray) -> list[str]:
    """The HF tensors whose part of the leaf differs, each read once (holds the leaf and one tensor)."""
    names = []
    for source in leaf.sources:
        region = actual[source.target.index] if source.target.index else actual
        if not _equal(region, piece_value(hf, source), leaf.dtype):
            names.append(f"{source.tensor.name!r} in {hf / source.tensor.file}")
        release_freed_memory()
    return names


def source_file_mismatches(
    hf: Path, files: list[str], recorded: dict, manifest: Path
) -> list[tuple[str, str]]:
    """(file, problem) for each HF file whose size or sha256 differs from what the conversion recorded in its
    manifest (a change the dtype cast could hide, such as a flipped low bit of an F32 tensor converted to bf16),
    and each file added or gone."""
    problems = []
    for file in sorted(set(files) | set(recorded)):
        entry = recorded.get(file)
        if entry is None:
            problems.append((file, f"source file {hf / file} is not among the files recorded in {manifest}"))
        elif file not in files:
            problems.append((file, f"source file {file} recorded in {manifest} is no longer part of {hf}"))
        elif (hf / file).stat().st_size != entry.get("size") or file_sha256(hf / file) != entry.get("sha256"):
            problems.append(
                (file, f"source file {hf / file}: sha256 differs from the one recorded in {manifest}")
            )
    return problems


def verify(hf: str | Path, ckpt: str | Path, progress: bool = True) -> VerifyReport:
    hf, ckpt = Path(hf), Path(ckpt)
    manifest = read_manifest(ckpt)
    plan = build_plan(hf, manifest["dtype"])
    entries = {e["name"]: e for e in manifest["leaves"]}
    report = VerifyReport()
    changed_sources = source_file_mismatches(hf, plan.files, manifest.get("sources", {}), ckpt / MANIFEST)
    extra = sorted(set(entries) - {leaf_name(leaf.path) for leaf in plan.leaves})
    report.mismatches += [f"leaf {name} is in the checkpoint but not in the HF model" for name in extra]
    total = sum(leaf.nbytes for leaf in plan.leaves)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for leaf in plan.leaves:
            name = leaf_name(leaf.path)
            bar.set_postfix_str(name, refresh=False)
            entry = entries.get(name)
            tensors = ", ".join(leaf.tensor_names[:3])
            if entry is None:
                report.mismatches.append(f"leaf {name} (from {tensors}) is missing")
                continue
            try:
                actual = restore_leaf(ckpt / PARAMS_DIR / name)
            except CheckpointError as e:
                report.mismatches.append(f"leaf {name}: {e}")
                continue
            if actual.shape != leaf.shape or actual.dtype != leaf.dtype:
                report.mismatches.append(
                    f"leaf {name}: {actual.dtype}{list(actual.shape)} in the checkpoint, "
                    f"{leaf.dtype}{list(leaf.shape)} from tensor(s) {tensors}"
                )
            elif differing := _differing_tensors(hf, leaf, actual):
                report.mismatches.append(f"leaf {name} differs from HF tensor(s) {', '.join(differing)}")
            elif leaf_bytes_sha256(actual) != entry.get("sha256"):
                report.mismatches.append(f"leaf {name}: sha256 differs from {ckpt / 'manifest.json'}")
            del actual
            release_freed_memory()
            report.checked += 1
            bar.update(leaf.nbytes)
    # a changed file whose tensors already differ is named by them; one whose leaves all match is named here
    named = " ".join(report.mismatches)
    report.mismatches += [problem for file, problem in changed_sources if str(hf / file) not in named]
    return report
