"""``convert``: an HF safetensors checkpoint -> one small Orbax checkpoint per leaf + manifest (see
:mod:`qwen_jax.checkpoint` for the layout).

- Streaming: leaves are written one at a time in the model's order; each is assembled from its HF tensor(s), hashed,
  saved and released before the next is read, so the peak memory is about twice the largest leaf (the tensor as
  read plus its transposed/cast copy) plus a fixed JAX/Orbax overhead, whatever the model size.
- Atomic: everything is written under a sibling ``.OUT.partial`` dir, which is renamed to OUT only after the
  manifest is written; OUT never exists half-written.
- Refusals: an OUT that is a file, under a file or under an unwritable directory is refused before anything is
  read; a ``.OUT.partial`` left by a conversion of other sources or dtype is refused, never deleted; a tensor
  holding a NaN or an infinity is refused, naming it; a full disk stops the conversion with one line, keeping the
  finished leaves for the rerun.
- Restartable: the partial dir records the source fingerprint (dtype, every source file's size and sha256) and one
  record per finished leaf (sha256 of its bytes). A rerun after an interruption (kill -9 included) keeps each
  finished leaf whose restored bytes still hash to its record, redoes the rest, and writes the same manifest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
from tqdm import tqdm

from conversion import UsageError, check_convert_paths
from conversion.layout import Plan, assemble_leaf, build_plan
from conversion.safetensors_io import file_sha256
from qwen_jax.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PARAMS_DIR,
    VALUE_KEY,
    _quiet_orbax,
    leaf_bytes_sha256,
    leaf_name,
    read_manifest,
    restore_leaf,
)
from qwen_jax.loading import CheckpointError

log = logging.getLogger(__name__)

STATE = "conversion_state.json"
DONE_DIR = "done"
#: Test hook: SIGKILL this process after writing this many leaves (simulates a crash mid-conversion).
KILL_AFTER_ENV = "QWEN_CONVERSION_KILL_AFTER_LEAVES"
#: Files copied next to the weights so that the converted dir is self-contained (weights and index excluded).
COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model")
NOT_COPIED = ("model.safetensors.index.json",)


def leaf_checkpointer():
    """A synchronous Orbax checkpointer that writes numpy leaves without its defensive deep copy (the save
    returns only once the leaf is on disk, and nothing touches the array meanwhile): one leaf-sized copy less."""
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def release_freed_memory() -> None:
    """Returns freed heap memory to the OS. TensorStore's worker threads allocate in their own glibc arenas, which
    keep freed pages (measured: RSS crept up by about one leaf per large leaf written without this)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def write_json(path: Path, data) -> None:
    """Writes JSON atomically (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def source_fingerprint(plan: Plan, dtype: str) -> dict:
    sources = {}
    for file in plan.files:
        path = plan.path / file
        sources[file] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype, "sources": sources}


def _same_source(manifest: dict, fingerprint: dict) -> bool:
    return manifest.get("dtype") == fingerprint["dtype"] and manifest.get("sources") == fingerprint["sources"]


def _copy_side_files(hf: Path, work: Path) -> list[str]:
    copied = []
    for path in sorted(hf.iterdir()):
        if path.is_file() and path.suffix in COPIED_SUFFIXES and path.name not in (*NOT_COPIED, MANIFEST):
            shutil.copy2(path, work / path.name)
            copied.append(path.name)
    return copied


def _open_work_dir(out: Path, fingerprint: dict) -> Path:
    work = partial_dir(out)
    state = work / STATE
    if work.exists():
        try:
            previous = json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            raise UsageError(
                f"{work}: exists and is not a partial conversion; remove it or choose another --out"
            ) from None
        if previous == fingerprint:
            log.info("resuming the interrupted conversion in %s", work)
            return work
        raise UsageError(
            f"{work}: holds an interrupted conversion of other sources or dtype; remove it (or rerun that "
            "conversion) before converting into this --out"
        )
    (work / PARAMS_DIR).mkdir(parents=True)
    (work / DONE_DIR).mkdir()
    write_json(state, fingerprint)
    return work


def _finished_record(work: Path, name: str, shape, dtype: np.dtype) -> dict | None:
    """The record of a leaf finished by an earlier run, if its saved bytes still hash to it."""
    record_path = work / DONE_DIR / f"{name}.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        if record["shape"] != list(shape) or record["dtype"] != dtype.name:
            return None
        value = restore_leaf(work / PARAMS_DIR / name)
        if leaf_bytes_sha256(value) == record["sha256"] and value.dtype == dtype:
            return record
    except (OSError, json.JSONDecodeError, KeyError, CheckpointError):
        pass
    log.warning("leaf %s from the interrupted run does not verify; converting it again", name)
    return None


#: What a full disk (or quota, or file-size limit) looks like from Python and from Orbax/TensorStore.
OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
OUT_OF_SPACE_TEXT = ("RESOURCE_EXHAUSTED", "No space left", "Disk quota exceeded", "File too large")


@contextlib.contextmanager
def out_of_space_is_usage_error(work: Path, leaf: str):
    """A full disk while writing ``leaf`` becomes one line (exit 2) that says the finished leaves are kept in
    ``work`` and a rerun resumes; any other error passes unchanged. Orbax's own log of the failure (a traceback
    at ERROR on the ``absl`` logger) is muted meanwhile: the exception itself carries it."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    except Exception as e:
        full = getattr(e, "errno", None) in OUT_OF_SPACE_ERRNOS or any(t in str(e) for t in OUT_OF_SPACE_TEXT)
        if not full:
            raise
        raise UsageError(
            f"{work}: out of disk space while writing leaf {leaf}; the finished leaves are kept there: free some "
            "space and rerun the same command to resume"
        ) from None
    finally:
        absl.setLevel(level)


def convert(hf: str | Path, out: str | Path, dtype: str = "bfloat16", progress: bool = True) -> Path:
    """Converts the HF checkpoint dir ``hf`` into ``out``; returns ``out``. See the module docstring."""
    import orbax.checkpoint as ocp

    hf, out = Path(hf), Path(out).absolute()  # Orbax wants absolute paths
    check_convert_paths(hf, out)
    plan = build_plan(hf, dtype)
    fingerprint = source_fingerprint(plan, dtype)
    if out.exists():
        manifest = read_manifest(out)
        if not _same_source(manifest, fingerprint):
            raise UsageError(
                f"{out}: exists and holds a conversion of other sources or dtype; remove it first"
            )
        log.info("%s: already converted from these sources", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = _open_work_dir(out, fingerprint)
    params = work / PARAMS_DIR
    records = {}
    for leaf in plan.leaves:
        name = leaf_name(leaf.path)
        record = _finished_record(work, name, leaf.shape, leaf.dtype)
        if record is not None:
            records[name] = record
    for entry in params.iterdir():  # leaves without a record, and Orbax's temp dirs from a killed save
        if entry.name not in records:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    _quiet_orbax()
    checkpointer = leaf_checkpointer()
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    written = 0
    total = sum(leaf.nbytes for leaf in plan.leaves)
    done_bytes = sum(leaf.nbytes for leaf in plan.leaves if leaf_name(leaf.path) in records)
    with tqdm(
        total=total, initial=done_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress
    ) as bar:
        for leaf in plan.leaves:
            name = leaf_name(leaf.path)
            if name in records:
                continue
            bar.set_postfix_str(name, refresh=False)
            value = assemble_leaf(hf, leaf)
            sha = leaf_bytes_sha256(value)
            with out_of_space_is_usage_error(work, name):
                checkpointer.save(params / name, args=ocp.args.PyTreeSave({VALUE_KEY: value}))
            del value
            release_freed_memory()
            records[name] = {"shape": list(leaf.shape), "dtype": leaf.dtype.name, "sha256": sha}
            with out_of_space_is_usage_error(work, name):
                write_json(work / DONE_DIR / f"{name}.json", records[name])
            bar.update(leaf.nbytes)
            written += 1
            if kill_after and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    copied = _copy_side_files(hf, work)
    manifest = {
        **fingerprint,
        "config": json.loads((hf / "config.json").read_text()),
        "copied_files": copied,
        "skipped_tensors": dict(sorted(plan.skipped.items())),
        "total_params": int(sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in plan.leaves)),
        "leaves": [
            {
                "path": list(leaf.path),
                "name": leaf_name(leaf.path),
                "dir": f"{PARAMS_DIR}/{leaf_name(leaf.path)}",
                **records[leaf_name(leaf.path)],
                "hf_tensors": leaf.tensor_names if len(leaf.sources) <= 3 else _summarise(leaf.tensor_names),
            }
            for leaf in plan.leaves
        ],
    }
    with out_of_space_is_usage_error(work, MANIFEST):
        write_json(work / MANIFEST, manifest)
    os.replace(work, out)  # the one step that makes OUT appear, complete
    shutil.rmtree(out / DONE_DIR, ignore_errors=True)
    (out / STATE).unlink(missing_ok=True)
    log.info(
        "converted %d tensors (%d leaves) from %d file(s) into %s; skipped %s",
        plan.loaded,
        len(plan.leaves),
        len(plan.files),
        out,
        dict(plan.skipped) or "none",
    )
    return out


def _summarise(names: list[str]) -> list[str]:
    """Per-expert leaves come from hundreds of tensors: the manifest names the first and last."""
    return [names[0], f"... {len(names) - 2} more ...", names[-1]]
