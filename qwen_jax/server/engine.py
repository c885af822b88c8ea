"""The model side of the server: loading, prompt rendering, one batch of greedy decoding, and turning generated
ids into a reply.

Everything here is synchronous and framework-free (no HTTP): the app renders a request into :class:`Row` s, the
batcher hands lists of rows to :meth:`Engine.decode`, and :func:`finish` makes the reply text of one row.

What a reply depends on (README, "Serving"): the request's prompt ids and ``max_tokens``, the server's dtype,
mesh and ``--pad-to-multiple``, and, without ``--batch-invariant``, the other rows decoded in the same batch
(their number, their padded prompt length and the largest ``max_tokens``): every batch is recorded in the request
log, so any reply can be re-made with ``qwen_jax.generate`` from the log alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen_jax.chat import apply_chat_template, load_default_chat_template
from qwen_jax.generate import default_stop_token_ids, generate
from qwen_jax.replies import apply_until
from qwen_jax.tokenizer import QwenTokenizer, load_tokenizer

__all__ = [
    "Decoded",
    "Engine",
    "Finished",
    "Row",
    "batching",
    "finish",
]


def batching(max_batch_size: int, batch_invariant: bool) -> tuple[int, dict[str, Any]]:
    """(the largest batch the batcher may form, extra keywords for ``generate``): batches form alike with or without
    ``--batch-invariant``, which decodes them with ``generate(..., batch_invariant=True)`` (a row's reply is then
    the one it gets alone, whatever else is in its batch)."""
    return max_batch_size, {"batch_invariant": True} if batch_invariant else {}


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt to decode: a chat request is one row, a completions request one row per prompt."""

    prompt_ids: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A row's greedy tokens (through its first stop token, at most ``max_tokens``) and the batch it was decoded
    in: ``generate(model, prompts, **generate_kwargs)`` on the batch's prompts in row order re-makes them."""

    generated_ids: tuple[int, ...]
    batch_id: int
    row: int
    batch_size: int
    generate_kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Finished:
    """What the server answers for one row."""

    text: str  # decoded without special tokens, cut at the first stop token and at the stop strings
    finish_reason: str  # "stop" (a stop token or a stop string) or "length"
    completion_tokens: int  # tokens generated up to the stop (the stop token included), as vLLM counts them


def _first(ids: Sequence[int], wanted: frozenset[int]) -> int | None:
    return next((k for k, t in enumerate(ids) if t in wanted), None)


def _stop_string_tokens(tokenizer: QwenTokenizer, ids: Sequence[int], stop: Sequence[str]) -> int:
    """The fewest leading tokens whose text already contains a stop string (where a streaming server stops)."""
    low, high = 1, len(ids)
    while low < high:
        mid = (low + high) // 2
        text = tokenizer.decode(list(ids[:mid]), skip_special_tokens=True)
        if apply_until(text, stop) != text:
            high = mid
        else:
            low = mid + 1
    return low


def finish(
    tokenizer: QwenTokenizer, generated: Sequence[int], stop_token_ids: frozenset[int], stop: Sequence[str]
) -> Finished:
    """The reply of a row, as a vLLM server makes it: ids cut at the first stop token, decoded with
    ``skip_special_tokens=True``, then cut at the stop strings by ``qwen_jax.replies.apply_until`` (the whole
    output, reasoning included; the audit's replay applies the same rule)."""
    stop_at = _first(generated, stop_token_ids)
    kept = list(generated[:stop_at]) if stop_at is not None else list(generated)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    cut = apply_until(text, stop)
    if cut != text:
        return Finished(cut, "stop", _stop_string_tokens(tokenizer, kept, stop))
    if stop_at is not None:
        return Finished(text, "stop", stop_at + 1)
    return Finished(text, "length", len(kept))


class Engine:
    """The model, its tokenizer and chat template, and the generation settings of the server."""

    def __init__(
        self,
        model,
        tokenizer: QwenTokenizer,
        *,
        max_model_len: int | None = None,
        pad_to_multiple: int = 64,
        mesh=None,
        generate_options: dict[str, Any] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template or load_default_chat_template()
        self.max_model_len = max_model_len or model.cfg.max_position_embeddings
        self.pad_to_multiple = pad_to_multiple
        self.mesh = mesh
        self.generate_options = dict(generate_options or {})
        self.stop_token_ids = tuple(default_stop_token_ids(model))
        self._batch_ids = itertools.count()

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, dtype: str, mesh=None, **kwargs) -> Engine:
        tokenizer = load_tokenizer(checkpoint)
        from qwen_jax.checkpoint import load_model_dir

        return cls(load_model_dir(checkpoint, dtype, mesh), tokenizer, mesh=mesh, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Prompts.

    def render_chat(self, messages: list[dict], chat_template_kwargs: dict[str, Any]) -> str:
        """The prompt text, as transformers renders it (and the audit, ``audit/prompts.py``): the checkpoint's
        template, ``add_generation_prompt=True``, the tokenizer's named special tokens, then the request's
        ``chat_template_kwargs`` (``enable_thinking`` ...)."""
        kwargs = {**self.tokenizer.special_tokens_map, **chat_template_kwargs}
        return apply_chat_template(self.chat_template, messages, add_generation_prompt=True, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """``max_tokens``, or what is left of the context when absent (vLLM's default); raises
        ``ValueError`` with OpenAI's wording when the prompt and the completion do not fit the context."""
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_tokens
        if prompt_tokens + max(max_tokens, 1) > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        return max_tokens

    # ------------------------------------------------------------------------------------------------
    # Decoding.

    def generate_kwargs(self, rows: Sequence[Row]) -> dict[str, Any]:
        """The keywords of the ``generate`` call that decodes ``rows`` together (recorded in the log)."""
        return {
            "max_new_tokens": max(r.max_tokens for r in rows),
            "stop_token_ids": list(self.stop_token_ids),
            "pad_to_multiple": self.pad_to_multiple,
            "pad_token_id": self.stop_token_ids[0],
            **self.generate_options,
        }

    def decode_batch(self, rows: Sequence[Row]) -> list[Decoded]:
        """Greedy decoding of ``rows`` as one padded batch; each row cut at its own ``max_tokens``."""
        kwargs = self.generate_kwargs(rows)
        mesh = contextlib.nullcontext() if self.mesh is None else _set_mesh(self.mesh)
        with mesh:
            out = generate(self.model, [list(r.prompt_ids) for r in rows], **kwargs)
        batch_id = next(self._batch_ids)
        decoded = []
        for k, row in enumerate(rows):
            n = min(int(out.lengths[k]), row.max_tokens)
            ids = tuple(int(t) for t in np.asarray(out.tokens[k, :n]))
            decoded.append(Decoded(ids, batch_id, k, len(rows), kwargs))
        return decoded


def _set_mesh(mesh):
    import jax

    return jax.set_mesh(mesh)
