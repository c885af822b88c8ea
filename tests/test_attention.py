"""Blockwise attention (prefill and forward) against the one-block softmax attention the decode step uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import attention
from qwen_jax.attention import KEY_BLOCK, MASKED, SoftmaxStats, block_probs, update_stats

blockwise_attend = jax.jit(attention.blockwise_attend)
attend = jax.jit(attention.attend)

HEADS_Q, HEADS_KV, HEAD_DIM = 4, 2, 16


def qkv(length: int, batch: int = 2, seed: int = 0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, HEADS_Q, HEAD_DIM), dtype) * 2
    k = jax.random.normal(keys[1], (batch, length, HEADS_KV, HEAD_DIM), dtype) * 2
    v = jax.random.normal(keys[2], (batch, length, HEADS_KV, HEAD_DIM), dtype)
    return q, k, v


def left_padded_mask(length: int, real: tuple[int, ...]) -> jnp.ndarray:
    return jnp.asarray([[0] * (length - n) + [1] * n for n in real], jnp.int32)


def full_mask(key_mask: jnp.ndarray) -> jnp.ndarray:
    length = key_mask.shape[1]
    return jnp.tril(jnp.ones((length, length), bool))[None] & (key_mask[:, None, :] > 0)


@pytest.mark.parametrize("length", [1, KEY_BLOCK + 37])
def test_blockwise_equals_one_block_attention_fp32(length):
    q, k, v = qkv(length)
    key_mask = left_padded_mask(length, (length, max(1, length // 3)))
    ours = blockwise_attend(q, k, v, key_mask)
    ref = attend(q, k, v, full_mask(key_mask))
    real = np.asarray(key_mask, bool)  # padded queries: zeros here, an average of values in the reference
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], rtol=0, atol=2e-6)
    assert not np.asarray(ours)[~real].any()


def test_blockwise_keeps_the_bf16_rounding_points():
    """In bf16 the probabilities are rounded where HF rounds them: the result is the one-block attention's up to
    fp32 summation order (of the softmax denominator and the value products), which flips a rare bf16 rounding."""
    length = 2 * KEY_BLOCK + 11
    q, k, v = qkv(length, dtype=jnp.bfloat16)
    key_mask = left_padded_mask(length, (length, 300))
    real = np.asarray(key_mask, bool)
    ours = np.asarray(blockwise_attend(q, k, v, key_mask).astype(jnp.float32))[real]
    ref = np.asarray(attend(q, k, v, full_mask(key_mask)).astype(jnp.float32))[real]
    assert (ours == ref).mean() > 0.99
    ulp = np.abs(ref) * 2.0**-7 + 1e-30
    assert (np.abs(ours - ref) <= ulp).all()


def test_a_query_does_not_depend_on_later_keys():
    """Fixed key blocks: a query's result is bitwise the same whatever the keys after it hold, padded or real."""
    length = KEY_BLOCK + 50
    q, k, v = qkv(length)
    key_mask = left_padded_mask(length, (length, 200))
    base = np.asarray(blockwise_attend(q, k, v, key_mask))
    cut = 70  # queries < cut only see keys < cut
    noise = jax.random.normal(jax.random.PRNGKey(9), k.shape) * 5
    later = jnp.arange(length)[None, :, None, None] >= cut
    k2, v2 = jnp.where(later, noise, k), jnp.where(later, -noise, v)
    mask2 = key_mask.at[:, cut:].set(0)
    for keys, values, mask in ((k2, v2, key_mask), (k, v, mask2), (k2, v2, mask2)):
        out = np.asarray(blockwise_attend(q, keys, values, mask))
        np.testing.assert_array_equal(out[:, :cut], base[:, :cut])


def test_a_fully_masked_block_changes_nothing():
    shape = (2, 3, 4)  # (batch, heads, queries)
    rng = np.random.RandomState(0)
    stats = SoftmaxStats(
        jnp.asarray(rng.randn(*shape), jnp.float32), jnp.asarray(rng.rand(*shape) + 0.5, jnp.float32)
    )
    stats = stats._replace(max=stats.max.at[0, 0, 0].set(MASKED), sum=stats.sum.at[0, 0, 0].set(0.0))
    scores = jnp.asarray(rng.randn(*shape, 8) * 30, jnp.float32)
    hidden = jnp.zeros((*shape, 8), bool)
    after = update_stats(stats, scores, hidden)
    np.testing.assert_array_equal(np.asarray(after.max), np.asarray(stats.max))
    np.testing.assert_array_equal(np.asarray(after.sum), np.asarray(stats.sum))
    probs = np.asarray(block_probs(stats, scores, hidden))
    assert not probs.any() and np.isfinite(probs).all()


def test_blockwise_gradients_are_finite_with_padding():
    length = 40
    q, k, v = qkv(length)
    key_mask = left_padded_mask(length, (length, 9))
    loss = jax.jit(jax.grad(lambda q, k, v: attention.blockwise_attend(q, k, v, key_mask).sum(), (0, 1, 2)))
    grads = loss(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
