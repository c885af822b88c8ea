"""What one side of the audit records per prompt, and the reference bundle that stores the PyTorch side on disk.

A bundle (``python -m audit record``) is a directory holding ``manifest.json`` (library versions, device, dtype,
seed, sha256 of the checkpoint files, tokenizer and template), ``prompts.json``, ``calibration.json`` and
``arrays.npz`` (per prompt: the greedy tokens, the teacher-forced logits view, every hidden state, the routing).
``compare --reference BUNDLE`` reads it without torch. Bundles are written to a temporary sibling and renamed.

Size: per prompt, hidden states take (layers + 1) x tokens x hidden x 4 bytes (41 x 2048 x 4 = 336 kB per token at
full size) and the logits view 64 x 8 bytes per token.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from audit.atomic import atomic_directory
from audit.errors import AuditInputError
from audit.metrics import LogitView

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
PROMPTS = "prompts.json"
CALIBRATION = "calibration.json"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt as both sides see it: ``ids`` is what is fed to the models."""

    name: str
    text: str
    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SequenceRecord:
    """One side's record of one prompt.

    ``tokens`` is the teacher-forced sequence (the prompt followed by the REFERENCE's greedy tokens, so that a
    divergence does not compound); ``generated`` this side's own greedy tokens (the stop token included).
    ``hidden`` [n_states, T, H] float32; ``experts`` [n_layers, T, k] this side's top-k experts;
    ``router_ids``/``router_probs`` [n_layers, T, k+1] the top k+1 router probabilities (reference only)."""

    prompt_len: int
    tokens: np.ndarray
    generated: np.ndarray
    hidden: np.ndarray
    experts: np.ndarray
    logits: LogitView | None = None
    router_ids: np.ndarray | None = None
    router_probs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """The reference side of an audit: live from transformers or loaded from a bundle."""

    prompts: tuple[Prompt, ...]
    sequences: tuple[SequenceRecord, ...]
    manifest: dict[str, Any]
    calibration: dict[str, Any] | None
    determinism: tuple[dict[str, Any], ...]
    batch_outputs: tuple[tuple[int, ...], ...] | None = None  # greedy tokens of the batched run


def save_bundle(run: ReferenceRun, directory: str | Path) -> Path:
    """Writes ``run`` as a bundle at ``directory`` (replacing an older bundle there), atomically."""
    directory = Path(directory)
    if directory.exists() and not (directory / MANIFEST).is_file():
        raise AuditInputError(f"{directory}: exists and is not a reference bundle; refusing to overwrite it")
    with atomic_directory(directory) as tmp:
        arrays: dict[str, np.ndarray] = {}
        for i, seq in enumerate(run.sequences):
            arrays.update(
                {
                    f"{i}/tokens": seq.tokens,
                    f"{i}/generated": seq.generated,
                    f"{i}/hidden": seq.hidden,
                    f"{i}/experts": seq.experts,
                    f"{i}/logit_ids": seq.logits.ids,
                    f"{i}/logit_values": seq.logits.values,
                    f"{i}/logit_lse": seq.logits.lse,
                    f"{i}/router_ids": seq.router_ids,
                    f"{i}/router_probs": seq.router_probs,
                    f"{i}/prompt_len": np.asarray(seq.prompt_len),
                }
            )
        np.savez(tmp / ARRAYS, **arrays)
        prompts = [dataclasses.asdict(p) | {"ids": list(p.ids)} for p in run.prompts]
        _write_json(tmp / PROMPTS, {"prompts": prompts, "batch_outputs": run.batch_outputs})
        _write_json(tmp / CALIBRATION, {"calibration": run.calibration, "determinism": list(run.determinism)})
        _write_json(tmp / MANIFEST, {"bundle_format": BUNDLE_FORMAT, **run.manifest})
    return directory


def _write_json(path: Path, data: Any) -> None:
    path.write_text(
        json.dumps(data, indent=1, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditInputError(f"{path.parent}: not a reference bundle (no {path.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AuditInputError(f"{path}: unreadable JSON ({exc})") from None


def load_bundle(directory: str | Path) -> ReferenceRun:
    """Reads a bundle written by :func:`save_bundle`; needs numpy only."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AuditInputError(f"{directory}: reference bundle directory not found")
    manifest = _read_json(directory / MANIFEST)
    if manifest.get("bundle_format") != BUNDLE_FORMAT:
        raise AuditInputError(
            f"{directory / MANIFEST}: bundle format {manifest.get('bundle_format')!r}, expected {BUNDLE_FORMAT}"
        )
    prompts_json = _read_json(directory / PROMPTS)
    calibration = _read_json(directory / CALIBRATION)
    try:
        with np.load(directory / ARRAYS) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # truncated or corrupt
        raise AuditInputError(f"{directory / ARRAYS}: unreadable, truncated or corrupt ({exc})") from None
    prompts = tuple(Prompt(p["name"], p["text"], tuple(p["ids"])) for p in prompts_json["prompts"])
    try:
        sequences = tuple(
            SequenceRecord(
                prompt_len=int(arrays[f"{i}/prompt_len"]),
                tokens=arrays[f"{i}/tokens"],
                generated=arrays[f"{i}/generated"],
                hidden=arrays[f"{i}/hidden"],
                experts=arrays[f"{i}/experts"],
                logits=LogitView(
                    arrays[f"{i}/logit_ids"], arrays[f"{i}/logit_values"], arrays[f"{i}/logit_lse"]
                ),
                router_ids=arrays[f"{i}/router_ids"],
                router_probs=arrays[f"{i}/router_probs"],
            )
            for i in range(len(prompts))
        )
    except KeyError as exc:
        raise AuditInputError(f"{directory / ARRAYS}: missing array {exc.args[0]}") from None
    batch = prompts_json.get("batch_outputs")
    return ReferenceRun(
        prompts=prompts,
        sequences=sequences,
        manifest={k: v for k, v in manifest.items() if k != "bundle_format"},
        calibration=calibration.get("calibration"),
        determinism=tuple(calibration.get("determinism", ())),
        batch_outputs=None if batch is None else tuple(tuple(b) for b in batch),
    )
