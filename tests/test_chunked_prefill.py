"""A long prompt's prefill in segments (qwen_jax.generate.prefill_in_segments): each segment continues the decode
state of those before it, and the result is the one-shot prefill's up to rounding, and HF's.

The segments here are 128 or 256 tokens (``segment`` / ``prefill_segment``; the default is 4096) so that tiny
prompts span several; the batch is left-padded so that a short row's padding fills whole segments. Not bit for bit:
XLA:CPU compiles a segment's program differently from the whole prompt's (the pieces, a projection, the conv, the
delta rule, are each bitwise equal across lengths when compiled alone; fused into one layer they move in the last
bits). Expert-parallel layouts stay bitwise equal to each other (slow test).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.attention import KEY_BLOCK, attend, blockwise_attend
from qwen_jax.cache import KVCache
from qwen_jax.generate import _prefill, _prefill_continued, generate, left_pad, prefill
from qwen_jax.model import default_positions

hf_reference = pytest.importorskip("hf_reference")
torch = pytest.importorskip("torch")
from test_generate import hf_greedy, models  # noqa: E402  (after the skips: it imports torch)

NAME = "hv2hk_top2of8"
FP32_ATOL = 1e-4  # as tests/test_model_parity.py
NEW_TOKENS = 16


def hf_last_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.asarray(default_positions(mask))
    return hf_reference.hf_forward(hf, ids, attention_mask=mask, position_ids=positions)[0][:, -1]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints):
    return str(tiny_checkpoints(NAME))


def long_prompts(lengths, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A left-padded batch padded to a multiple of 64, as ``generate`` pads it."""
    rs = np.random.RandomState(seed)
    return left_pad([[int(t) for t in rs.randint(0, 256, n)] for n in lengths], 64)


def test_blockwise_attention_over_the_cache_in_segments_is_one_call():
    """Queries in three calls over a cache their keys are written to (each call's keys after the earlier ones') give
    the one call's result, the forward's over its own keys and the causal softmax of the materialised scores, to
    fp32 rounding (the same sums in the same order; XLA:CPU compiles each length's program its own way)."""
    rs = np.random.RandomState(0)
    b, length, hq, hkv, d = 2, 3 * KEY_BLOCK + 64, 4, 2, 16
    q, k, v = (jnp.asarray(rs.randn(b, length, h, d), jnp.float32) for h in (hq, hkv, hkv))
    key_mask = jnp.asarray(
        np.arange(length)[None, :] >= np.array([[0], [300]]), jnp.int32
    )  # row 1 left-padded
    cache = KVCache(*(jnp.zeros((b, length + 128, hkv, d)) for _ in range(2)))
    cache = KVCache(*(c.at[:, :length].set(x) for c, x in zip(cache, (k, v), strict=True)))
    cache_mask = jnp.pad(key_mask, ((0, 0), (0, 128)))
    attend_at = jax.jit(blockwise_attend)
    whole = attend_at(q, *cache, cache_mask, 0)
    cuts = (0, KEY_BLOCK, 2 * KEY_BLOCK + 64, length)
    parts = [attend_at(q[:, s:e], *cache, cache_mask, s) for s, e in itertools.pairwise(cuts)]
    real = np.asarray(key_mask) > 0
    close = functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6)
    close(np.concatenate(parts, axis=1)[real], np.asarray(whole)[real])
    close(np.asarray(whole)[real], np.asarray(jax.jit(blockwise_attend)(q, k, v, key_mask))[real])
    causal = np.tril(np.ones((length, length), bool))[None] & (np.asarray(key_mask)[:, None, :] > 0)
    close(np.asarray(whole)[real], np.asarray(attend(q, k, v, jnp.asarray(causal)))[real])


@pytest.mark.slow  # 12-18 s each on the shared machine; the default run has the greedy test below
@pytest.mark.parametrize("segment", [128, 256])
def test_fp32_segmented_prefill_matches_one_shot_and_hf(ckpt, segment):
    """Last-position logits within the fp32 parity bound of HF's and of the one-shot prefill's, and every leaf of
    the decode state within it of the one-shot prefill's (the key mask, length and positions exactly)."""
    hf, model = models(ckpt, "float32")
    ids, mask = long_prompts([700, 150])  # 704 tokens: one 64- or 192-token segment, then whole ones
    graphdef, params = nnx.split(model)
    max_length = ids.shape[1] + 256
    one_shot = prefill(graphdef, params, ids, mask, max_length, "auto", False, 1024)
    segmented = prefill(graphdef, params, ids, mask, max_length, "auto", False, segment)
    ref = hf_last_logits(hf, ids, mask)
    np.testing.assert_allclose(np.asarray(segmented[0]), ref, rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(np.asarray(segmented[0]), np.asarray(one_shot[0]), rtol=0, atol=FP32_ATOL)
    one_state, state = one_shot[1], segmented[1]
    for name in ("key_mask", "length", "next_position"):
        np.testing.assert_array_equal(getattr(state, name), getattr(one_state, name), err_msg=name)
    for layer, (ours, theirs) in enumerate(zip(state.layers, one_state.layers, strict=True)):
        for field, a, b in zip(ours._fields, ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=FP32_ATOL, err_msg=f"layer {layer} {field}")


def test_fp32_greedy_after_a_segmented_prefill_is_token_identical_to_hf(ckpt):
    """Through ``generate``: a 384-token batch in three 128-token segments (the short row's padding fills the
    first two; one program for all three), the first token's logits within the fp32 parity bound of HF's, and every greedy token HF's."""
    hf, model = models(ckpt, "float32")
    ids, mask = long_prompts([380, 100], seed=1)
    before = (_prefill._cache_size(), _prefill_continued._cache_size())
    ours = generate(
        model,
        ids,
        mask,
        max_new_tokens=NEW_TOKENS,
        stop_token_ids=(),
        return_logits=True,
        prefill_segment=128,
    )
    # the three segments run one compiled program, from Python (not a loop inside one program)
    assert _prefill._cache_size() == before[0] and _prefill_continued._cache_size() <= before[1] + 1
    tokens, first_logits = hf_greedy(hf, ids, mask, NEW_TOKENS, first_logits=True)
    np.testing.assert_allclose(ours.logits[:, 0], first_logits, rtol=0, atol=FP32_ATOL)
    np.testing.assert_array_equal(ours.tokens, tokens)


@pytest.mark.slow  # ~24 s on the shared machine: a second dtype's compiles; fp32 parity above is in the default run
def test_bf16_segmented_prefill_no_further_from_hf_bf16_than_hf_bf16_from_fp32(ckpt):
    """bf16, as tests/test_model_parity.py's criterion: with e = max |HF-bf16 - HF-fp32| over the last logits, the
    segmented prefill's last logits are within 2e of HF-bf16's and of the one-shot prefill's, same top-1."""
    hf32, _ = models(ckpt, "float32")
    hf16, model = models(ckpt, "bfloat16")
    ids, mask = long_prompts([700, 150])
    graphdef, params = nnx.split(model)
    max_length = ids.shape[1] + 256
    one_shot = np.asarray(
        prefill(graphdef, params, ids, mask, max_length, "auto", False, 1024)[0], np.float64
    )
    ours = np.asarray(prefill(graphdef, params, ids, mask, max_length, "auto", False, 128)[0], np.float64)
    ref16 = hf_last_logits(hf16, ids, mask)
    budget = np.abs(ref16 - hf_last_logits(hf32, ids, mask)).max()
    assert np.abs(ours - ref16).max() <= 2 * budget
    assert np.abs(ours - one_shot).max() <= 2 * budget
    np.testing.assert_array_equal(ours.argmax(-1), ref16.argmax(-1))


def test_prefill_segment_must_be_whole_delta_rule_chunks(ckpt):
    _, model = models(ckpt, "float32")
    with pytest.raises(ValueError, match="prefill_segment must be a positive multiple of 64"):
        generate(model, [[1, 2, 3]], max_new_tokens=2, prefill_segment=100)


EXPERT_PARALLEL = r"""
import sys
import jax, numpy as np
jax.config.update("jax_cpu_enable_async_dispatch", False)
import qwen_jax
from qwen_jax.generate import generate, left_pad
from qwen_jax.sharding import make_mesh, shard_model

model = qwen_jax.load_hf(sys.argv[1], "float32")
rs = np.random.RandomState(3)
ids, mask = left_pad([list(rs.randint(0, 256, n)) for n in (450, 100)], 64)
run = lambda m: generate(m, ids, mask, max_new_tokens=8, stop_token_ids=(), return_logits=True, prefill_segment=128)
alone = run(model)
layouts = {}
for ep in (2, 4, 8):
    with jax.set_mesh(mesh := make_mesh(ep, devices=jax.devices()[:ep])):
        layouts[ep] = run(shard_model(model, mesh))
    np.testing.assert_array_equal(layouts[ep].tokens, alone.tokens, err_msg=f"ep={ep}")
    np.testing.assert_array_equal(layouts[ep].logits, layouts[2].logits, err_msg=f"ep={ep} differs from ep=2")
print("segmented prefill: ep layouts bitwise identical")
"""


@pytest.mark.slow  # 8 fake devices in a subprocess: minutes on 2 cores
def test_segmented_prefill_is_bitwise_equal_across_expert_parallel_layouts(ckpt):
    from test_sharding import run_on_8_devices

    result = run_on_8_devices(EXPERT_PARALLEL, ckpt, 900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "segmented prefill: ep layouts bitwise identical" in result.stdout
