"""What one side of the audit records per prompt, and the reference bundle that stores the PyTorch side on disk.

A bundle (``python -m audit record``) is a directory holding ``manifest.json`` (library versions, device, dtype,
seed, sha256 of the checkpoint files, tokenizer and template, the sketch's parameters), ``prompts.json``,
``calibration.json`` and ``arrays.npz``. Per prompt and teacher-forced position (:func:`bundle_bytes_per_token`):
the token, the reference's logits view (:class:`audit.metrics.LogitView`: the top 64 logits, or the whole
vocabulary up to 4096, and the log-sum-exp; so the top-k logprobs, and the greedy token ``logit_ids[t, 0]``), the
top k+1 router choices and probabilities of every MoE layer, and per hidden state its L2 norm and its sketch
(:func:`audit.metrics.summarise_hidden`). The full hidden states [n_states, T, H] are kept only for the first
``hidden_states`` prompts (``record --hidden-states N``, default :data:`DEFAULT_HIDDEN_STATES`). The greedy
continuation is ``tokens[prompt_len:]`` and the reference's top-k experts ``router_ids[..., :k]``.
``compare --reference BUNDLE`` reads it without torch. Bundles are written to a temporary sibling and renamed.

Size per position at full size (Qwen3.6-35B-A3B: 41 hidden states of 2048, 40 MoE layers of 256 experts, top 8):
5,112 bytes (``python -c "from audit.records import *; print(full_size_bytes_per_token())"``), against 335,872
bytes of full hidden states (format 1 kept them for every position). Format 1 bundles are refused (re-record them).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from audit.atomic import atomic_directory
from audit.errors import AuditInputError
from audit.metrics import (
    FULL_VOCAB_LIMIT,
    SKETCH_DIM,
    TOP_K,
    HiddenStates,
    LogitView,
    sketch_spec,
    summarise_hidden,
)

#: 2: per-position summaries instead of every hidden state (format 1), derived arrays not stored.
BUNDLE_FORMAT = 2
#: Prompts (the first ones) whose full hidden states a bundle keeps by default.
DEFAULT_HIDDEN_STATES = 2
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
    ``hidden`` [n_states, T, H] float32, or None where not kept; ``norms`` [n_states, T] and ``sketch``
    [n_states, T, SKETCH_DIM] its summaries (:func:`audit.metrics.summarise_hidden`; computed from ``hidden`` when
    None); ``experts`` [n_layers, T, k] this side's top-k experts; ``router_ids``/``router_probs`` [n_layers, T, k+1]
    the top k+1 router probabilities (reference only)."""

    prompt_len: int
    tokens: np.ndarray
    generated: np.ndarray
    hidden: np.ndarray | None
    experts: np.ndarray
    logits: LogitView | None = None
    router_ids: np.ndarray | None = None
    router_probs: np.ndarray | None = None
    norms: np.ndarray | None = None
    sketch: np.ndarray | None = None

    def hidden_states(self) -> HiddenStates:
        """The hidden states as the metrics take them (full where kept, the summaries always)."""
        return HiddenStates(self.hidden, self.norms, self.sketch)

    def summarised(self, keep_hidden: bool = True) -> SequenceRecord:
        """This record with its summaries computed (and its full hidden states dropped unless ``keep_hidden``)."""
        norms, sketch = self.hidden_states().summaries()
        return dataclasses.replace(
            self, hidden=self.hidden if keep_hidden else None, norms=norms, sketch=sketch
        )


def with_recomputed_hidden(
    sequences: Sequence[SequenceRecord],
    indices: Sequence[int],
    hidden_of: Callable[[int], np.ndarray],
    side: str,
) -> tuple[tuple[SequenceRecord, ...], list[str]]:
    """``sequences`` with the full hidden states of prompts ``indices`` set to ``hidden_of(i)`` (recomputed), and a
    warning for each prompt whose recomputed states do not give its recorded summaries bitwise (``side``'s forward
    is not reproducible there)."""
    out, warnings = list(sequences), []
    for i in indices:
        hidden = hidden_of(i)
        norms, sketch = summarise_hidden(hidden)
        if not (
            np.array_equal(norms, out[i].norms, equal_nan=True)
            and np.array_equal(sketch, out[i].sketch, equal_nan=True)
        ):
            warnings.append(
                f"prompt {i}: the {side}'s recomputed hidden states differ from those it summarised first"
            )
        out[i] = dataclasses.replace(out[i], hidden=hidden)
    return tuple(out), warnings


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """The reference side of an audit: live from transformers or loaded from a bundle."""

    prompts: tuple[Prompt, ...]
    sequences: tuple[SequenceRecord, ...]
    manifest: dict[str, Any]
    calibration: dict[str, Any] | None
    determinism: tuple[dict[str, Any], ...]
    # greedy tokens of the determinism check's batch (its prompts: manifest["determinism_check"])
    batch_outputs: tuple[tuple[int, ...], ...] | None = None


def router_id_dtype(num_experts: int) -> np.dtype:
    """The smallest unsigned integer type that holds every expert id (uint8 for 256 experts)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{num_experts} experts")


def bundle_bytes_per_token(cfg) -> dict[str, int]:
    """Bytes per teacher-forced position of each array a bundle keeps for every prompt, for a model of config
    ``cfg`` (:class:`qwen_jax.config.ModelConfig`); plain counting of the shapes and dtypes that
    :func:`save_bundle` writes. Prompts with full hidden states add :func:`full_hidden_bytes_per_token`."""
    n_states = cfg.num_hidden_layers + 1
    view = cfg.vocab_size if cfg.vocab_size <= FULL_VOCAB_LIMIT else TOP_K
    routed = cfg.num_hidden_layers * (cfg.num_experts_per_tok + 1)
    return {
        "tokens": 4,  # int32
        "logit_ids": view * 4,  # int32
        "logit_values": view * 4,  # float32
        "logit_lse": 8,  # float64
        "router_ids": routed * router_id_dtype(cfg.num_experts).itemsize,
        "router_probs": routed * 4,  # float32
        "hidden_norms": n_states * 4,  # float32
        "hidden_sketch": n_states * SKETCH_DIM * 4,  # float32
    }


def full_hidden_bytes_per_token(cfg) -> int:
    """Bytes per position of the full hidden states (float32), kept only for the ``--hidden-states`` prompts."""
    return (cfg.num_hidden_layers + 1) * cfg.hidden_size * 4


def full_size_bytes_per_token() -> dict[str, int]:
    """:func:`bundle_bytes_per_token` of Qwen3.6-35B-A3B (the project's copy of its config), with the total and,
    for comparison, the full hidden states' bytes."""
    from qwen_jax.config import ModelConfig

    cfg = ModelConfig.qwen3_6_35b_a3b()
    per_token = bundle_bytes_per_token(cfg)
    return per_token | {
        "total": sum(per_token.values()),
        "full_hidden_states": full_hidden_bytes_per_token(cfg),
    }


def record_arrays(seq: SequenceRecord, keep_hidden: bool) -> dict[str, np.ndarray]:
    """The arrays a bundle (and the run journal) keeps of one reference record: the token, the logits view, the top
    k+1 router choices (ids in the smallest unsigned type) and probabilities, the hidden-state summaries, and the
    full hidden states when ``keep_hidden`` and held. :func:`record_from_arrays` reads them back."""
    norms, sketch = seq.hidden_states().summaries()
    n_experts_bound = int(seq.router_ids.max(initial=0)) + 1
    arrays = {
        "tokens": np.asarray(seq.tokens, np.int32),
        "prompt_len": np.asarray(seq.prompt_len),
        "logit_ids": np.asarray(seq.logits.ids, np.int32),
        "logit_values": np.asarray(seq.logits.values, np.float32),
        "logit_lse": np.asarray(seq.logits.lse, np.float64),
        "router_ids": np.asarray(seq.router_ids, router_id_dtype(n_experts_bound)),
        "router_probs": np.asarray(seq.router_probs, np.float32),
        "hidden_norms": np.asarray(norms, np.float32),
        "hidden_sketch": np.asarray(sketch, np.float32),
    }
    if keep_hidden and seq.hidden is not None:
        arrays["hidden"] = np.asarray(seq.hidden, np.float32)
    return arrays


def record_from_arrays(arrays: dict[str, np.ndarray], prefix: str = "") -> SequenceRecord:
    """The reference record of :func:`record_arrays`'s arrays, each named ``prefix`` + its name (a missing one:
    ``KeyError`` naming it)."""
    prompt_len = int(arrays[prefix + "prompt_len"])
    tokens = arrays[prefix + "tokens"]
    router_ids = arrays[prefix + "router_ids"].astype(np.int32)
    return SequenceRecord(
        prompt_len=prompt_len,
        tokens=tokens,
        generated=tokens[prompt_len:],
        hidden=arrays.get(prefix + "hidden"),
        experts=router_ids[..., :-1],
        logits=LogitView(
            arrays[prefix + "logit_ids"], arrays[prefix + "logit_values"], arrays[prefix + "logit_lse"]
        ),
        router_ids=router_ids,
        router_probs=arrays[prefix + "router_probs"],
        norms=arrays[prefix + "hidden_norms"],
        sketch=arrays[prefix + "hidden_sketch"],
    )


def save_bundle(run: ReferenceRun, directory: str | Path, hidden_states: int = DEFAULT_HIDDEN_STATES) -> Path:
    """Writes ``run`` as a bundle at ``directory`` (replacing an older bundle there), atomically; the full hidden
    states of the first ``hidden_states`` prompts are kept (where the run holds them)."""
    directory = Path(directory)
    if directory.exists() and not (directory / MANIFEST).is_file():
        raise AuditInputError(f"{directory}: exists and is not a reference bundle; refusing to overwrite it")
    with atomic_directory(directory) as tmp:
        arrays: dict[str, np.ndarray] = {}
        for i, seq in enumerate(run.sequences):
            kept = record_arrays(seq, keep_hidden=i < hidden_states)
            arrays.update({f"{i}/{name}": array for name, array in kept.items()})
        np.savez(tmp / ARRAYS, **arrays)
        prompts = [dataclasses.asdict(p) | {"ids": list(p.ids)} for p in run.prompts]
        _write_json(tmp / PROMPTS, {"prompts": prompts, "batch_outputs": run.batch_outputs})
        _write_json(tmp / CALIBRATION, {"calibration": run.calibration, "determinism": list(run.determinism)})
        kept = [i for i, seq in enumerate(run.sequences) if i < hidden_states and seq.hidden is not None]
        manifest = {
            "bundle_format": BUNDLE_FORMAT,
            **run.manifest,
            "hidden_states": hidden_states,
            "full_hidden_states": kept,
        }
        _write_json(tmp / MANIFEST, manifest)
    return directory


def array_sizes(directory: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of a bundle's ``arrays.npz``, from the ``.npy`` headers (no data read)."""
    path = Path(directory) / ARRAYS
    out = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as stream:
                major, _ = np.lib.format.read_magic(stream)
                read_header = (
                    np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(stream)
            out[member.removesuffix(".npy")] = (shape, dtype)
    return out


def bundle_size(directory: str | Path) -> dict[str, Any]:
    """What a bundle takes: ``bytes`` on disk (all its files), ``positions`` (teacher-forced positions of all
    prompts), ``per_position`` (bytes per position of each array kept for every prompt, over all prompts: to
    compare with :func:`bundle_bytes_per_token`), their sum ``per_token_bytes_per_position``, and the prompts whose
    ``full_hidden_states`` it keeps with their ``hidden_bytes``."""
    directory = Path(directory)
    sizes = array_sizes(directory)
    positions, per_array, full, hidden_bytes = 0, {}, [], 0
    for key, (shape, dtype) in sizes.items():
        prompt, name = key.split("/", 1)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if name == "tokens":
            positions += shape[0]
        if name == "hidden":
            full.append(int(prompt))
            hidden_bytes += nbytes
        elif name != "prompt_len":
            per_array[name] = per_array.get(name, 0) + nbytes
    per_position = {name: total / max(positions, 1) for name, total in per_array.items()}
    return {
        "bytes": sum(f.stat().st_size for f in directory.iterdir() if f.is_file()),
        "positions": positions,
        "per_position": per_position,
        "per_token_bytes_per_position": sum(per_position.values()),
        "full_hidden_states": sorted(full),
        "hidden_bytes": hidden_bytes,
    }


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


def _check_format(directory: Path, manifest: dict) -> None:
    found = manifest.get("bundle_format")
    if found == BUNDLE_FORMAT:
        return
    why = (
        " (every hidden state of every position; re-record it with `python -m audit record`)"
        if found == 1
        else ""
    )
    raise AuditInputError(
        f"{directory / MANIFEST}: bundle format {found!r}{why}; this version reads format {BUNDLE_FORMAT}"
    )


def _check_sketch(directory: Path, manifest: dict) -> None:
    """The bundle's sketches must come from the projection this version computes (same seed, pool and width)."""
    recorded = manifest.get("hidden_summary")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("hidden_size"), int):
        raise AuditInputError(f"{directory / MANIFEST}: no valid hidden_summary (the sketch's parameters)")
    if recorded != sketch_spec(recorded["hidden_size"]):
        raise AuditInputError(
            f"{directory / MANIFEST}: its hidden-state sketches were made with another projection "
            f"({recorded} vs {sketch_spec(recorded['hidden_size'])}); re-record the bundle"
        )


def load_bundle(directory: str | Path) -> ReferenceRun:
    """Reads a bundle written by :func:`save_bundle`; needs numpy only. A bundle of another format is refused."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AuditInputError(f"{directory}: reference bundle directory not found")
    manifest = _read_json(directory / MANIFEST)
    _check_format(directory, manifest)
    _check_sketch(directory, manifest)
    prompts_json = _read_json(directory / PROMPTS)
    calibration = _read_json(directory / CALIBRATION)
    try:
        with np.load(directory / ARRAYS) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # truncated or corrupt
        raise AuditInputError(f"{directory / ARRAYS}: unreadable, truncated or corrupt ({exc})") from None
    prompts = tuple(Prompt(p["name"], p["text"], tuple(p["ids"])) for p in prompts_json["prompts"])
    try:
        sequences = tuple(record_from_arrays(arrays, f"{i}/") for i in range(len(prompts)))
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
