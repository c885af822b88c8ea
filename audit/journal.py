"""The run journal: each side's per-prompt results appended to ``REPORT_DIR/journal.jsonl`` as each prompt finishes,
so that an interrupted ``compare`` (kill -9 included) resumes where it stopped.

The first line is a header: the journal format and what makes two runs the same run (the contract: dtype, seed,
budget, sha256 of the checkpoint files, tokenizer, template and prompts; and the settings). Every further line is
``{"side": "reference"|"jax", "prompt": i, "data": ...}`` with numpy arrays stored as base64 ``.npy`` bytes (exact:
dtype and shape kept); the header is written with the first entry, so a run that stops before any prompt finishes
leaves no journal. Each line is written whole, flushed and fsynced. On reopening, a header that differs is
refused (:class:`audit.errors.AuditInputError`, exit 2), a torn last line (the process died mid-write) is dropped
and cut off the file, and a malformed line before it is refused. A prompt's entry is reused, never recomputed, and
entries are keyed by side and prompt, so none is counted twice.

What a prompt's entry holds (format 2): the reference's bundle arrays (:func:`audit.records.record_arrays`) and the
JAX side's :func:`audit.jax_side.prompt_result`: per position, summaries of the hidden states (norms and sketches),
and the full hidden states only for the ``--hidden-states`` prompts; :func:`journal_bytes_per_token` counts it.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from audit.errors import AuditInputError
from audit.metrics import LOGIT_METRICS, SKETCH_DIM
from audit.records import bundle_bytes_per_token, full_hidden_bytes_per_token, router_id_dtype

JOURNAL = "journal.jsonl"
#: 2: per-position summaries of the hidden states (format 1 kept the JAX side's full states for every prompt).
JOURNAL_FORMAT = 2
_ARRAY = "__npy__"


def encode(value: Any) -> Any:
    """``value`` as JSON: arrays as ``{"__npy__": base64}``, numpy scalars as Python ones, the rest recursively."""
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return {_ARRAY: base64.b64encode(buffer.getvalue()).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """The inverse of :func:`encode` (tuples come back as lists)."""
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return np.load(io.BytesIO(base64.b64decode(value[_ARRAY])), allow_pickle=False)
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def jax_bytes_per_token(cfg) -> dict[str, int]:
    """Bytes per teacher-forced position of each array the JAX side journals for every prompt
    (:func:`audit.jax_side.prompt_result`), for a model of config ``cfg``: plain counting, as
    :func:`audit.records.bundle_bytes_per_token` counts the reference's (which its journal lines hold)."""
    n_states = cfg.num_hidden_layers + 1
    routed = cfg.num_hidden_layers * cfg.num_experts_per_tok
    return {
        "generated": 4,  # int32, at most one per position
        "experts": routed * router_id_dtype(cfg.num_experts).itemsize,
        "norms": n_states * 4,  # float32
        "sketch": n_states * SKETCH_DIM * 4,  # float32
        "metrics": 8 * (len(LOGIT_METRICS) - 1) + 1,  # float64 each, top1_agree a bool
    }


def journal_bytes_per_token(cfg) -> dict[str, float]:
    """Bytes per teacher-forced position of the journal, per side and in all, for a model of config ``cfg``: the
    arrays' bytes (:func:`jax_bytes_per_token`, :func:`audit.records.bundle_bytes_per_token`) in base64 (4/3).
    Not counted: a line's fixed part (JSON keys, npy headers: about 2 kB a line), and ``full_hidden`` more per
    position of each side for a prompt with full hidden states (the ``--hidden-states`` prompts)."""
    jax = sum(jax_bytes_per_token(cfg).values()) * 4 / 3
    reference = sum(bundle_bytes_per_token(cfg).values()) * 4 / 3
    return {
        "jax": jax,
        "reference": reference,
        "total": jax + reference,
        "full_hidden": full_hidden_bytes_per_token(cfg) * 4 / 3,
    }


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"


class Journal:
    """An open journal: the entries already there (:meth:`done`) and :meth:`append` for new ones."""

    def __init__(self, path: Path, entries: dict[tuple[str, int], Any], header: dict | None = None):
        self.path = path
        self._entries = entries
        self._pending_header = header  # written with the first entry: a run that fails before leaves nothing

    @classmethod
    def open(cls, directory: Path, header: dict) -> Journal:
        """The journal of ``directory`` for a run with ``header`` (JSON-able): created with that header, or
        reopened when its header is the same; another run's journal is refused."""
        path = Path(directory) / JOURNAL
        header = json.loads(json.dumps({"journal": JOURNAL_FORMAT, **header}))
        if not path.is_file():
            return cls(path, {}, header)
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        if lines[-1]:  # no newline at the end: a torn last write
            raw = raw[: len(raw) - len(lines[-1])]
            with open(path, "r+b") as f:
                f.truncate(len(raw))
                os.fsync(f.fileno())
        lines = [line for line in raw.split(b"\n") if line]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise AuditInputError(
                    f"{path}: line {number} is not JSON; remove the journal to start over"
                ) from None
        if not records:
            return cls(path, {}, header)
        difference = _first_difference(records[0], header)
        if difference is not None:
            raise AuditInputError(
                f"{path}: the journal of another run ({difference}); remove it or choose another --report"
            )
        entries = {}
        for number, record in enumerate(records[1:], 2):
            if not isinstance(record, dict) or not {"side", "prompt", "data"} <= set(record):
                raise AuditInputError(f"{path}: line {number} is not a journal entry")
            entries[(record["side"], int(record["prompt"]))] = record["data"]
        return cls(path, entries)

    def done(self, side: str) -> dict[int, Any]:
        """The decoded entries of ``side`` already journaled, by prompt index."""
        return {i: decode(data) for (s, i), data in self._entries.items() if s == side}

    def append(self, side: str, prompt: int, data: Any) -> None:
        encoded = encode(data)
        if self._pending_header is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _append_line(self.path, self._pending_header)
            self._pending_header = None
        _append_line(self.path, {"side": side, "prompt": prompt, "data": encoded})
        self._entries[(side, prompt)] = encoded


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
