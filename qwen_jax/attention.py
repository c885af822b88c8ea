"""Gated grouped-query attention (the full-attention layers, one in four).

One projection ``qkv_proj`` = HF's ``q_proj | k_proj | v_proj`` side by side. Its q part produces, per head,
``[q_h | gate_h]`` interleaved; q and k get a zero-centred RMSNorm over head_dim
and partial RoPE; the attention output is multiplied by ``sigmoid(gate)`` before ``o_proj``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax import kernels
from qwen_jax.cache import KVCache, TokenContext
from qwen_jax.config import ModelConfig
from qwen_jax.invariance import batch_invariant, isolated, opaque_map, zero_padded
from qwen_jax.norms import rms_norm
from qwen_jax.ops import F32, dense, sigmoid, split_columns, tie_to
from qwen_jax.rope import apply_rope

MASKED = jnp.finfo(F32).min
#: Keys per block of :func:`blockwise_attend`. Fixed, so a query's result never depends on how many keys follow.
KEY_BLOCK = 256


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """fp32 [B, Hkv, G, L, T] scores as HF's eager path rounds them: q@k rounded to the activation dtype, scaled
    (torch scales with an fp32 scalar) and rounded again. q: [B, L, Hkv, G, D]; k: [B, T, Hkv, D]."""
    scores = jnp.einsum("blkgd,btkd->bkglt", q, k, preferred_element_type=F32).astype(q.dtype)
    return (scores.astype(F32) * q.shape[-1] ** -0.5).astype(q.dtype).astype(F32)


def _probs_times_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """fp32 [B, Hkv, G, L, D]: probabilities (rounded to the value dtype) times values, accumulated in fp32. (In the
    layout of the batched product over (batch, head): XLA does not copy the probabilities into it.)"""
    return jnp.einsum("bkglt,btkd->bkgld", probs.astype(v.dtype), v, preferred_element_type=F32)


def _group_queries(q: jax.Array, n_kv: int) -> jax.Array:
    b, length, n_q, d = q.shape
    return q.reshape(b, length, n_kv, n_q // n_kv, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped KV heads, mirroring HF's eager path (the decode step's form).

    q: [B, L, Hq, D]; k, v: [B, T, Hkv, D]; mask: bool [B, L, T], True where query l may see key t.
    Query head h uses KV head h // (Hq // Hkv). Scores are rounded to the activation dtype, softmax runs in fp32,
    and the probabilities are rounded back before the value matmul. Returns [B, L, Hq, D].
    """
    scores = jnp.where(mask[:, None, None], _scores(_group_queries(q, k.shape[2]), k), MASKED)
    out = _probs_times_values(jax.nn.softmax(scores, axis=-1), v).astype(v.dtype)
    return jnp.moveaxis(out, 3, 1).reshape(q.shape)


def attention_probs(q: jax.Array, k: jax.Array, key_mask: jax.Array) -> jax.Array:
    """The causal attention probabilities of L queries over their own L keys, materialised: [B, Hq, L, L] in the
    activation dtype, as HF's eager ``attn_weights`` (scores rounded as :func:`_scores`, softmax in fp32, rounded to
    the activation dtype). Exact 0 where a key is not visible; a query that sees no key (left padding) gets all 0.

    For reading, not for the forward: :func:`blockwise_attend` never holds the [L, L] matrix. q: [B, L, Hq, D];
    k: [B, L, Hkv, D]; key_mask: [B, L], 1 for real tokens.
    """
    b, length, n_q, _ = q.shape
    causal = jnp.tril(jnp.ones((length, length), bool))
    visible = (causal[None] & (key_mask > 0)[:, None, :])[:, None, None]  # [B, 1, 1, L, T]
    scores = jnp.where(visible, _scores(_group_queries(q, k.shape[2]), k), MASKED)
    probs = jnp.where(visible, jax.nn.softmax(scores, axis=-1), 0.0)
    return probs.astype(q.dtype).reshape(b, n_q, length, length)


class SoftmaxStats(NamedTuple):
    """Running softmax statistics per (batch, kv head, group, query), fp32 [B, Hkv, G, L]."""

    max: jax.Array  # the largest visible score so far (MASKED before the first)
    sum: jax.Array  # sum of exp(score - max) over the visible scores so far


def _visible_exp(scores: jax.Array, max_: jax.Array, visible: jax.Array) -> jax.Array:
    """exp(score - max) where visible, exact 0 elsewhere (with no inf or NaN computed there: safe to differentiate)."""
    return jnp.where(visible, jnp.exp(jnp.where(visible, scores - max_[..., None], 0.0)), 0.0)


def update_stats(stats: SoftmaxStats, scores: jax.Array, visible: jax.Array) -> SoftmaxStats:
    """``stats`` extended by one block of ``scores`` [..., L, block] (``visible`` broadcastable to it). A query
    that sees none of the block keeps its statistics bit for bit."""
    new_max = jnp.maximum(stats.max, jnp.max(jnp.where(visible, scores, MASKED), axis=-1))
    new_sum = stats.sum * jnp.exp(stats.max - new_max) + jnp.sum(
        _visible_exp(scores, new_max, visible), axis=-1
    )
    seen = jnp.any(visible, axis=-1)
    return SoftmaxStats(jnp.where(seen, new_max, stats.max), jnp.where(seen, new_sum, stats.sum))


def block_probs(stats: SoftmaxStats, scores: jax.Array, visible: jax.Array) -> jax.Array:
    """The final softmax probabilities of one block, fp32 (0 where not visible)."""
    total = jnp.where(stats.sum > 0, stats.sum, 1.0)  # a query that sees no key at all: probabilities 0
    return _visible_exp(scores, stats.max, visible) / total[..., None]


def two_pass_attend(grouped_q: jax.Array, n_blocks, block: Callable) -> jax.Array:
    """Attention of ``grouped_q`` [B, L, Hkv, G, D] over key blocks ``block(i)`` -> (keys [B, KEY_BLOCK, Hkv, D],
    values, visibility [B, 1, 1, L, KEY_BLOCK]) for i < ``n_blocks`` (static or traced).

    Two passes keep HF's rounding points: the first finds each query's max score and its sum of exponentials
    (fp32); the second rounds ``exp(score - max) / sum`` to the value dtype and accumulates probabilities @ values
    in fp32 across blocks. A block a query does not see leaves its statistics and its accumulator bit for bit as
    they were; a query that sees no key gets zeros. Returns fp32 [B, L, Hkv, G, D].
    """

    def first_pass(i, stats):
        block_k, _, visible = block(i)
        return update_stats(stats, _scores(grouped_q, block_k), visible)

    b, length, n_kv, group, _ = grouped_q.shape
    shape = (b, n_kv, group, length)
    empty = SoftmaxStats(
        *tie_to(grouped_q, jnp.full(shape, MASKED, F32), jnp.zeros(shape, F32))
    )  # see tie_to
    stats = jax.lax.fori_loop(0, n_blocks, first_pass, empty)

    def second_pass(i, acc):
        block_k, block_v, visible = block(i)
        probs = block_probs(stats, _scores(grouped_q, block_k), visible)
        seen = jnp.any(visible, axis=-1)[..., None]  # [B, 1, 1, L, 1], as acc's [B, Hkv, G, L, D]
        return jnp.where(seen, acc + _probs_times_values(probs, block_v), acc)

    # Zeros computed from the queries (+0.0 for any finite query), not a constant: XLA:CPU copies a loop's constant
    # initial buffer at the start of the program, every layer's at once (64 MiB each for 4096 queries at full size).
    acc = jnp.moveaxis(jnp.abs(grouped_q).astype(F32) * 0, 1, 3)  # [B, Hkv, G, L, D], the product's layout
    return jnp.moveaxis(jax.lax.fori_loop(0, n_blocks, second_pass, acc), 3, 1)


def _pad_keys(k: jax.Array, v: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, ...]:
    """Keys, values and the key mask (as bool) padded with masked keys to whole :data:`KEY_BLOCK` blocks."""
    pad = -k.shape[1] % KEY_BLOCK
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
    return k, v, jnp.pad(key_mask > 0, ((0, 0), (0, pad)))


def blockwise_attend(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, query_start: jax.Array | int = 0
) -> jax.Array:
    """Causal attention of L queries in blocks of :data:`KEY_BLOCK` keys: memory linear in the length.

    q: [B, L, Hq, D], the queries at key slots ``query_start`` .. ``query_start + L - 1``; k, v: [B, T, Hkv, D];
    key_mask: [B, T], 1 for real keys. A forward passes the call's own keys (T == L, ``query_start`` 0); a prefill
    segment passes the decode state's keys with its own written at ``query_start`` (traced), after those of the
    segments before it. Query l sees key t when t <= query_start + l and t is real (see :func:`two_pass_attend`);
    only the key blocks up to the last query's are computed, and the blocks are at fixed key slots, so a query's
    result is the same whether its keys came in one call or in several. The output is rounded once at the end.
    Returns [B, L, Hq, D].
    """
    length, n_kv = q.shape[1], k.shape[2]
    k, v, key_mask = _pad_keys(k, v, key_mask)
    queries = query_start + jnp.arange(length)

    def block(i):
        """Block i's keys, values and visibility [B, 1, 1, L, KEY_BLOCK]."""
        block_k, block_v, block_mask = tie_to(i, k, v, key_mask)
        start = i * KEY_BLOCK
        block_k, block_v = (jax.lax.dynamic_slice_in_dim(x, start, KEY_BLOCK, 1) for x in (block_k, block_v))
        keys = start + jnp.arange(KEY_BLOCK)
        real = jax.lax.dynamic_slice_in_dim(block_mask, start, KEY_BLOCK, 1)
        visible = (keys[None, :] <= queries[:, None])[None] & real[:, None, :]
        return block_k, block_v, visible[:, None, None]

    # Up to the last query's block (traced when the start is).
    n_blocks = (query_start + length - 1) // KEY_BLOCK + 1
    acc = two_pass_attend(_group_queries(q, n_kv), n_blocks, block)
    return acc.astype(v.dtype).reshape(q.shape)


#: Queries per block of :func:`invariant_attend` in a forward or prefill (a decode step's block is its one query).
QUERY_BLOCK = 64


def invariant_attend(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, query_slots: jax.Array, query_block: int
) -> jax.Array:
    """Causal attention computed the same way for a row whatever the batch, its padding or the cache length.

    q: [B, L, Hq, D] at key slots ``query_slots`` [B, L] (right padding: a token's slot is its position);
    k, v: [B, T, Hkv, D]; key_mask: [B, T], 1 for real keys. A query sees the real keys at slots <= its own. One row
    at a time, ``query_block`` queries at a time (L is padded to whole blocks), over the key blocks up to the
    block's last query (:func:`two_pass_attend`): every sum runs on a fixed shape, and the key blocks past a query,
    the padded ones and the unwritten cache, are not computed. Returns [B, L, Hq, D].
    """
    b, length, n_q, d = q.shape
    n_kv = k.shape[2]
    k, v, key_mask = _pad_keys(k, v, key_mask)
    pad = -length % query_block
    grouped = jnp.pad(_group_queries(q, n_kv), ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    slots = jnp.pad(query_slots, ((0, 0), (0, pad)), constant_values=-1)  # padded queries see nothing

    def one_row(row):
        row_q, row_slots, row_k, row_v, row_mask = row
        q_blocks = row_q.reshape(-1, query_block, *row_q.shape[1:])
        slot_blocks = row_slots.reshape(-1, query_block)

        def one_query_block(operands):
            block_q, block_slots = operands

            def block(i):
                start = i * KEY_BLOCK
                keys, values, real = (
                    jax.lax.dynamic_slice_in_dim(x, start, KEY_BLOCK, 0) for x in (row_k, row_v, row_mask)
                )
                visible = (start + jnp.arange(KEY_BLOCK) <= block_slots[:, None]) & real[None, :]
                # A barrier: when the keys are one block, XLA drops the (whole-array) slice and fuses the scores
                # with their producers, which rounds differently (measured); materialised, they are the same.
                return jax.lax.optimization_barrier((keys[None], values[None], visible[None, None, None]))

            n_blocks = jnp.max(block_slots) // KEY_BLOCK + 1
            return two_pass_attend(block_q[None], n_blocks, block)[0]

        return opaque_map(one_query_block, (q_blocks, slot_blocks))

    out = opaque_map(
        lambda row: isolated(one_row, row), (grouped, slots, k, v, key_mask)
    )  # [B, n, QB, Hkv, G, D]
    out = out.reshape(b, -1, n_q, d)[:, :length]
    return out.astype(v.dtype)


class GatedAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.qkv_proj = nnx.Param(init(rngs.params(), (h, sum(cfg.attention_qkv_widths.values())), dtype))
        self.o_proj = nnx.Param(init(rngs.params(), (cfg.num_attention_heads * d, h), dtype))
        self.q_norm = nnx.Param(jnp.zeros((d,), dtype))
        self.k_norm = nnx.Param(jnp.zeros((d,), dtype))

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, ...]:
        """Returns q, k (normed, rotated), v and the output gate for the tokens in ``x`` [B, L, hidden]."""
        cfg = self.cfg
        b, length, _ = x.shape
        d, eps = cfg.head_dim, cfg.rms_norm_eps
        q_and_gate, k, v = split_columns(dense(x, self.qkv_proj[...]), cfg.attention_qkv_widths)
        q_and_gate = q_and_gate.reshape(b, length, cfg.num_attention_heads, 2 * d)
        q, gate = q_and_gate[..., :d], q_and_gate[..., d:]
        q = rms_norm(q, self.q_norm[...], eps)
        k = rms_norm(k.reshape(b, length, -1, d), self.k_norm[...], eps)
        v = v.reshape(b, length, -1, d)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate.reshape(b, length, -1)

    def output(self, attn: jax.Array, gate: jax.Array) -> jax.Array:
        b, length = attn.shape[:2]
        gated = (attn.reshape(b, length, -1) * sigmoid(gate)).astype(attn.dtype)
        return dense(gated, self.o_proj[...])

    def probabilities(self, x: jax.Array, context: TokenContext) -> jax.Array:
        """The attention probabilities [B, Hq, L, L] of a forward over ``x`` [B, L, hidden] (see
        :func:`attention_probs`); recomputed from ``x``, so only a caller that asks for them pays for them."""
        if context.decoding:
            raise ValueError("attention probabilities are captured by a forward, not by a decode step")
        q, k, _, _ = self.project_qkv(x, context.cos, context.sin)
        return attention_probs(q, k, context.attention_mask)

    def __call__(
        self, x: jax.Array, context: TokenContext, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """x [B, L, hidden] -> (out [B, L, hidden], the cache with this call's keys and values written, or None).

        A forward attends blockwise to the call's own keys, a prefill (or one segment of a long one) blockwise to the
        cache's keys up to its own; a decode step attends to the whole cache.
        In the batch-invariant mode both go through :func:`invariant_attend`, and padded keys are zeroed; a CPU decode
        step there goes through the native kernel (``kernels.decode_attention``: every row by the same loops, one
        query over its row's keys, where :func:`invariant_attend` maps rows and key blocks in XLA).
        """
        q, k, v, gate = self.project_qkv(x, context.cos, context.sin)
        invariant = batch_invariant()
        if invariant and not context.decoding:
            k, v = zero_padded((k, v), context.attention_mask)
        if cache is not None:
            cache = write_cache(cache, k, v, context.cache_start)
        if invariant and context.decoding and kernels.for_decode_step():
            attn = kernels.decode_attention(q, *cache, context.key_mask, context.cache_start)
        elif invariant and context.decoding:
            attn = invariant_attend(q, *cache, context.key_mask, context.cache_start[:, None], 1)
        elif invariant:
            length = x.shape[1]
            slots = jnp.where(context.attention_mask > 0, jnp.arange(length), -1)  # padded queries: none
            attn = invariant_attend(q, k, v, context.attention_mask, slots, QUERY_BLOCK)
        elif context.decoding:
            attn = attend(q, cache.keys, cache.values, context.key_mask[:, None, :] > 0)
        elif cache is not None:  # a prefill, or one segment of it: the state's keys, this call's included
            attn = blockwise_attend(q, *cache, context.key_mask, context.cache_start)
        else:
            attn = blockwise_attend(q, k, v, context.attention_mask)
        return self.output(attn, gate), cache


def write_cache(cache: KVCache, k: jax.Array, v: jax.Array, start: jax.Array | int) -> KVCache:
    """``cache`` with k, v [B, L, Hkv, D] written at slot ``start``: one slot for all rows, or, for a decode step
    (L == 1), ``start`` [B] per row (the batch-invariant mode: right-padded rows are at their own lengths)."""
    if jnp.ndim(start) == 1:
        rows = jnp.arange(k.shape[0])
        return KVCache(*(c.at[rows, start].set(n[:, 0]) for c, n in zip(cache, (k, v), strict=True)))
    at = (0, start, 0, 0)
    return KVCache(*(jax.lax.dynamic_update_slice(c, n, at) for c, n in zip(cache, (k, v), strict=True)))
