"""Greedy generation: a prefill that fills the decode state, then a decode loop compiled once.

The decode loop is one ``lax.while_loop`` inside one jit. Its shapes depend only on the batch size, the cache length
(``max_length``) and the vocabulary, so it compiles once per (batch, max_length) whatever the prompts and however
many new tokens are asked for: ``max_new_tokens`` is a traced value.

A prompt longer than :data:`PREFILL_SEGMENT` tokens is prefilled in segments, each continuing the decode state, so
the prefill's activations stay those of one segment (:func:`prefill_in_segments`).

Prompt-length bucketing: prompts are left-padded to a multiple of ``pad_to_multiple`` (default 64) so that the
prefill compiles once per bucket rather than once per prompt length. Extra left padding changes nothing in exact
arithmetic (padded tokens are zeroed before the DeltaNet and masked in attention), but it shifts the chunk
boundaries of the chunked delta rule, so results can differ from an unbucketed run at fp32 rounding level. Pass
``pad_to_multiple=1`` to prefill exactly what was given (as HF does).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import kernels
from qwen_jax.cache import DecodeState, init_decode_state
from qwen_jax.delta_rule import CHUNK_SIZE
from qwen_jax.invariance import batch_invariant_mode, check_right_padded
from qwen_jax.limits import check_generation
from qwen_jax.model import Qwen35MoeForCausalLM, default_positions, run_decoder
from qwen_jax.ops import greedy_tokens

#: Qwen3.5/3.6 stop tokens (generation_config.json): <|im_end|> and <|endoftext|>.
DEFAULT_STOP_TOKEN_IDS = (248046, 248044)


class Generation(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32; after a row stops, ``pad_token_id``
    lengths: np.ndarray  # [B] number of generated tokens per row, the stop token included
    # [B, max_new_tokens, vocab] when requested: the logits each token was chosen from
    logits: np.ndarray | None


def default_stop_token_ids(model: Qwen35MoeForCausalLM) -> tuple[int, ...]:
    """The checkpoint's generation_config.json EOS ids when it has them, else :data:`DEFAULT_STOP_TOKEN_IDS`."""
    return model.cfg.generation_eos_token_ids or DEFAULT_STOP_TOKEN_IDS


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_prompts(
    prompts: Sequence[Sequence[int]], multiple: int = 1, pad_id: int = 0, *, right: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Pads token lists to a common length (rounded up to ``multiple``) on the left, or with ``right`` on the
    right: (input_ids, attention_mask)."""
    width = _round_up(max(len(p) for p in prompts), multiple)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            where = slice(0, len(prompt)) if right else slice(width - len(prompt), width)
            ids[row, where] = prompt
            mask[row, where] = 1
    return ids, mask


def left_pad(
    prompts: Sequence[Sequence[int]], multiple: int = 1, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length (rounded up to ``multiple``): (input_ids, attention_mask)."""
    return pad_prompts(prompts, multiple, pad_id)


#: Tokens per segment of a long prompt's prefill. A prefill's activations (the MoE's sorted rows, the projections'
#: outputs: [tokens, width] per layer) grow with the tokens of one call; in segments of this many they stay bounded,
#: whatever the prompt length. A multiple of the delta rule's chunk (64), so the segments cut no chunk (attention's
#: key blocks sit at fixed cache slots): the same sums in the same order as a one-shot prefill. Not bit for bit the
#: same results (XLA:CPU fuses and vectorises a program of another length differently: fp32 logits within 1e-5 on
#: the tiny checkpoints, tests/test_chunked_prefill.py). Chosen by measuring temp at full size (README "Memory at
#: full size").
PREFILL_SEGMENT = 4096


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length", "moe_backend", "batch_invariant"))
def _prefill(graphdef, params, input_ids, attention_mask, max_length, moe_backend, batch_invariant=False):
    """The last position's logits [B, vocab] and the decode state after the prompt ``input_ids`` [B, L], in one
    call (a long prompt goes through :func:`prefill`, which runs it in segments)."""
    model = nnx.merge(graphdef, params)
    cache = init_decode_state(model.cfg, input_ids.shape[0], max_length, model.dtype)
    positions = default_positions(attention_mask)
    with batch_invariant_mode(batch_invariant):
        return prefill_segment(model, input_ids, attention_mask, positions, cache, moe_backend)


def prefill(
    graphdef,
    params,
    input_ids,
    attention_mask,
    max_length: int,
    moe_backend: str,
    batch_invariant: bool = False,
    segment: int = PREFILL_SEGMENT,
):
    """The last position's logits [B, vocab] and the decode state after the prompt ``input_ids`` [B, L]: one call
    (:func:`_prefill`), or for a prompt longer than ``segment`` tokens (except in the batch-invariant mode, which
    runs it in one call) :func:`prefill_in_segments`."""
    if batch_invariant or input_ids.shape[1] <= segment:
        return _prefill(graphdef, params, input_ids, attention_mask, max_length, moe_backend, batch_invariant)
    return prefill_in_segments(graphdef, params, input_ids, attention_mask, max_length, moe_backend, segment)


def prefill_segment(model, input_ids, attention_mask, positions, cache: DecodeState, moe_backend: str):
    """One prefill call on ``input_ids`` [B, L] (all arrays [B, L]) that continues ``cache``: (the last position's
    logits [B, vocab], the extended cache). Traced in the kernels' prefill mode (a prefill is never differentiated,
    :func:`qwen_jax.kernels.prefill_mode`)."""
    with kernels.prefill_mode():
        logits, _, _, cache, _ = run_decoder(
            model, input_ids, attention_mask, positions, moe_backend, cache, last_only=True, prefill=True
        )
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "max_length"))
def _empty_state(graphdef, params, batch: int, max_length: int) -> DecodeState:
    """An empty decode state, placed on the devices of ``params`` (replicated on a mesh, as a prefill makes it)."""
    model = nnx.merge(graphdef, params)
    return init_decode_state(model.cfg, batch, max_length, model.dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "moe_backend"), donate_argnames=("cache",))
def _prefill_continued(graphdef, params, input_ids, attention_mask, positions, cache, moe_backend):
    """:func:`prefill_segment` as its own program: the decode state is donated (extended in place)."""
    model = nnx.merge(graphdef, params)
    return prefill_segment(model, input_ids, attention_mask, positions, cache, moe_backend)


def prefill_in_segments(graphdef, params, input_ids, attention_mask, max_length, moe_backend, segment):
    """The prefill of a long prompt in segments of ``segment`` tokens, each continuing the decode state of those
    before it (the attention keys and values, the DeltaNet's conv history and recurrent state): one call on the
    first ``L % segment`` tokens if any, then one per whole segment, all of these the same compiled program
    (:func:`_prefill_continued`, the state donated). Segments run from Python, not in a ``lax.fori_loop``: a loop
    whose body is the whole model carries every weight through it, and at full size on an 8-device mesh that
    program compiled in 30 s, one segment's program in 19 s (README "Memory at full size"). Returns (the last
    segment's last-position logits [B, vocab], the decode state)."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    positions = np.asarray(default_positions(attention_mask))
    # committed where it lies, as the segments' outputs are (else the second segment would compile again)
    empty = _empty_state(graphdef, params, input_ids.shape[0], max_length)
    cache = jax.tree.map(lambda a: jax.device_put(a, a.sharding), empty)
    length = input_ids.shape[1]
    starts = ([0] if length % segment else []) + list(range(length % segment, length, segment))
    for start, stop in zip(starts, [*starts[1:], length], strict=True):
        window = tuple(x[:, start:stop] for x in (input_ids, attention_mask, positions))
        logits, cache = _prefill_continued(graphdef, params, *window, cache, moe_backend)
    return logits, cache


def decode_step(
    model: Qwen35MoeForCausalLM, tokens: jax.Array, cache: DecodeState, moe_backend: str = "auto"
):
    """One token per row [B] -> (logits [B, vocab], the extended cache)."""
    positions = cache.next_position[:, None]
    logits, _, _, cache, _ = run_decoder(model, tokens[:, None], None, positions, moe_backend, cache)
    return logits[:, 0], cache


class DecodeCarry(NamedTuple):
    """The decode loop's carry."""

    step: jax.Array  # how many tokens are chosen
    token: jax.Array  # [B] the last chosen token
    done: jax.Array  # [B] the row has chosen a stop token
    cache: DecodeState
    tokens: jax.Array  # [B, max_length] the chosen tokens
    logits: jax.Array  # [B, max_length or 0, vocab] the logits they were chosen from


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "moe_backend", "keep_logits", "batch_invariant"),
    donate_argnames=("cache",),
)
def _decode_loop(
    graphdef,
    params,
    first_logits,
    cache,
    max_new_tokens,
    stop_ids,
    pad_id,
    moe_backend,
    keep_logits,
    batch_invariant=False,
):
    with batch_invariant_mode(batch_invariant):
        return _decode_loop_body(
            graphdef, params, first_logits, cache, max_new_tokens, stop_ids, pad_id, moe_backend, keep_logits
        )


def _decode_loop_body(
    graphdef, params, first_logits, cache, max_new_tokens, stop_ids, pad_id, moe_backend, keep_logits
):
    model = nnx.merge(graphdef, params)
    batch, vocab = first_logits.shape
    capacity = cache.max_length - cache.length  # traced: tokens that still fit
    limit = jnp.minimum(max_new_tokens, capacity + 1)
    buffer_len = cache.max_length  # static bound for the output buffers

    def choose(carry: DecodeCarry, logits: jax.Array) -> DecodeCarry:
        token = jnp.where(carry.done, pad_id, greedy_tokens(logits))
        tokens = carry.tokens.at[:, carry.step].set(token)
        kept = carry.logits.at[:, carry.step].set(logits) if keep_logits else carry.logits
        done = carry.done | jnp.isin(token, stop_ids)
        return carry._replace(step=carry.step + 1, token=token, done=done, tokens=tokens, logits=kept)

    start = DecodeCarry(
        step=jnp.int32(0),
        token=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        cache=cache,
        tokens=jnp.full((batch, buffer_len), pad_id, jnp.int32),
        logits=jnp.zeros((batch, buffer_len if keep_logits else 0, vocab), first_logits.dtype),
    )

    def cond(carry: DecodeCarry) -> jax.Array:
        return (carry.step < limit) & ~jnp.all(carry.done)

    def body(carry: DecodeCarry) -> DecodeCarry:
        logits, cache = decode_step(model, carry.token, carry.cache, moe_backend)
        return choose(carry._replace(cache=cache), logits)

    end = jax.lax.while_loop(cond, body, choose(start, first_logits))
    return end.tokens, end.logits, end.step, end.cache  # the cache: donated in, so updated in place


def generate(
    model: Qwen35MoeForCausalLM,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 256,
    stop_token_ids: Sequence[int] | None = None,
    max_length: int | None = None,
    pad_to_multiple: int = 64,
    pad_token_id: int = 0,
    return_logits: bool = False,
    moe_backend: str = "auto",
    batch_invariant: bool = False,
    prefill_segment: int = PREFILL_SEGMENT,
) -> Generation:
    """Greedy decoding of a left-padded batch (right-padded with ``batch_invariant``).

    ``input_ids`` [B, L] int, or a list of token lists (left-padded here); ``attention_mask`` 1 for real tokens.
    Each row stops at any of ``stop_token_ids`` (default: :func:`default_stop_token_ids`; pass ``()`` to never
    stop early). ``max_length`` is the cache length (prompt plus
    new tokens); by default the padded prompt plus ``max_new_tokens``, rounded up to 256. The decode loop compiles
    once per (batch, max_length).

    With ``batch_invariant=True`` prompts are right-padded (an array must be already) and every row's tokens and
    logits (fp32 and bf16) are bit for bit those it gets alone, whatever the batch and the bucket
    (:mod:`qwen_jax.invariance`).

    A (padded) prompt longer than ``prefill_segment`` tokens is prefilled in segments of that many (a multiple of
    the delta rule's 64-token chunk; not in the batch-invariant mode), so the prefill's memory does not grow with
    the prompt beyond the decode state; results agree with a one-shot prefill to rounding (:data:`PREFILL_SEGMENT`).
    """
    if prefill_segment <= 0 or prefill_segment % CHUNK_SIZE:
        raise ValueError(
            f"prefill_segment must be a positive multiple of {CHUNK_SIZE}, got {prefill_segment}"
        )
    if isinstance(input_ids, list | tuple) and input_ids and not np.isscalar(input_ids[0]):
        input_ids, attention_mask = pad_prompts(
            input_ids, pad_to_multiple, pad_token_id, right=batch_invariant
        )
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    attention_mask = (
        np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    )
    if batch_invariant:
        check_right_padded(attention_mask)
    extra = _round_up(input_ids.shape[1], pad_to_multiple) - input_ids.shape[1]
    if extra:
        where = (0, extra) if batch_invariant else (extra, 0)
        input_ids = np.pad(input_ids, ((0, 0), where), constant_values=pad_token_id)
        attention_mask = np.pad(attention_mask, ((0, 0), where))
    prompt_len = input_ids.shape[1]
    if max_length is None:
        max_length = _round_up(prompt_len + max_new_tokens, 256)
    check_generation(model.cfg, attention_mask, max_new_tokens, max_length, model.dtype, return_logits)
    if prompt_len + max_new_tokens - 1 > max_length:
        raise ValueError(
            f"max_length {max_length} is too small for a {prompt_len}-token (padded) prompt plus {max_new_tokens} "
            "new tokens"
        )
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(model)
    stop_ids = jnp.asarray(list(stop_token_ids) or [-1], jnp.int32)

    graphdef, params = nnx.split(model)
    first_logits, cache = prefill(
        graphdef, params, input_ids, attention_mask, max_length, moe_backend, batch_invariant, prefill_segment
    )
    tokens, logits, steps, _ = _decode_loop(
        graphdef,
        params,
        first_logits,
        cache,
        max_new_tokens,
        stop_ids,
        pad_token_id,
        moe_backend,
        return_logits,
        batch_invariant,
    )
    steps = int(steps)
    tokens = np.array(tokens)[:, :max_new_tokens]
    stopped = np.isin(tokens, np.asarray(stop_token_ids)) if stop_token_ids else np.zeros_like(tokens, bool)
    first_stop = np.where(stopped.any(1), stopped.argmax(1) + 1, min(steps, max_new_tokens))
    tokens[np.arange(tokens.shape[1])[None, :] >= first_stop[:, None]] = pad_token_id
    kept = np.asarray(logits)[:, :max_new_tokens] if return_logits else None
    return Generation(tokens=tokens, lengths=first_stop.astype(np.int32), logits=kept)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "moe_backend", "batch_invariant"), donate_argnames=("cache",)
)
def _greedy_step(graphdef, params, token, cache, moe_backend, batch_invariant=False):
    with batch_invariant_mode(batch_invariant):
        logits, cache = decode_step(nnx.merge(graphdef, params), token, cache, moe_backend)
    return greedy_tokens(logits), cache


def stream_generate(
    model: Qwen35MoeForCausalLM,
    prompt: Sequence[int],
    *,
    max_new_tokens: int = 256,
    stop_token_ids: Sequence[int] | None = None,
    max_length: int | None = None,
    moe_backend: str = "auto",
    batch_invariant: bool = False,
) -> Iterator[int]:
    """Greedy decoding of one prompt, yielding each token as soon as it is chosen (for terminals and progress
    bars). Same numerics as :func:`generate` (with the same ``batch_invariant``); the per-token step compiles once
    per ``max_length``."""
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(model)
    ids, mask = pad_prompts([list(prompt)], 64, right=batch_invariant)
    max_length = max_length or _round_up(ids.shape[1] + max_new_tokens, 256)
    check_generation(model.cfg, mask, max_new_tokens, max_length, model.dtype)
    graphdef, params = nnx.split(model)
    logits, cache = prefill(graphdef, params, ids, mask, max_length, moe_backend, batch_invariant)
    token = greedy_tokens(logits)
    for step in range(min(max_new_tokens, max_length - ids.shape[1] + 1)):
        value = int(token[0])
        yield value
        if value in stop_token_ids or step + 1 == max_new_tokens:
            return
        token, cache = _greedy_step(graphdef, params, token, cache, moe_backend, batch_invariant)
