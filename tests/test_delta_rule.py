"""The three forms of the gated delta rule agree: chunked vs token-by-token oracle, and chained one-token steps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.delta_rule import chunked_delta_rule, delta_rule_step, recurrent_delta_rule
from qwen_jax.deltanet import l2_normalise


def random_inputs(length: int, seed: int, batch=2, heads=3, dk=16, dv=24):
    rs = np.random.RandomState(seed)
    q = l2_normalise(jnp.asarray(rs.randn(batch, length, heads, dk), jnp.float32)) * dk**-0.5
    k = l2_normalise(jnp.asarray(rs.randn(batch, length, heads, dk), jnp.float32))
    v = jnp.asarray(rs.randn(batch, length, heads, dv), jnp.float32)
    g = jnp.asarray(-np.abs(rs.randn(batch, length, heads)) * 0.5, jnp.float32)
    beta = jnp.asarray(1 / (1 + np.exp(-rs.randn(batch, length, heads))), jnp.float32)
    state = jnp.asarray(rs.randn(batch, heads, dk, dv) * 0.5, jnp.float32)
    return (q, k, v, g, beta), state


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 127, 128, 129, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_oracle(length, with_state):
    inputs, state = random_inputs(length, seed=length)
    state = state if with_state else None
    out_c, state_c = chunked_delta_rule(*inputs, state)
    out_r, state_r = recurrent_delta_rule(*inputs, state)
    np.testing.assert_allclose(out_c, out_r, rtol=0, atol=1e-5)
    np.testing.assert_allclose(state_c, state_r, rtol=0, atol=1e-5)


def test_chained_steps_equal_oracle():
    inputs, state = random_inputs(70, seed=3)
    out_r, state_r = recurrent_delta_rule(*inputs, state)
    outs = []
    s = state
    for t in range(70):
        out, s = delta_rule_step(*(x[:, t : t + 1] for x in inputs), s)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), out_r, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s, state_r, rtol=0, atol=1e-6)


def test_chunked_prefix_then_rest_equals_whole():
    """The state carries across calls: prefill 100 tokens, then the other 60, equals 160 at once."""
    inputs, _ = random_inputs(160, seed=11)
    whole, state_whole = chunked_delta_rule(*inputs)
    first, s = chunked_delta_rule(*(x[:, :100] for x in inputs))
    rest, s = chunked_delta_rule(*(x[:, 100:] for x in inputs), s)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(s, state_whole, rtol=0, atol=1e-5)


def test_oracle_matches_hf_recurrent():
    """The oracle is the HF token loop (on normalised inputs), not just self-consistent."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import torch_recurrent_gated_delta_rule

    (q, k, v, g, beta), state = random_inputs(40, seed=5)
    to_t = lambda x: torch.from_numpy(np.asarray(x))  # noqa: E731
    ref, ref_state = torch_recurrent_gated_delta_rule(
        to_t(q) * 16**0.5,
        to_t(k),
        to_t(v),
        to_t(g),
        to_t(beta),
        initial_state=to_t(state),
        output_final_state=True,
    )
    out, s = recurrent_delta_rule(q, k, v, g, beta, state)
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(s, ref_state.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [64, 24])  # blocked, and the unblocked fallback (24 is not a multiple of 16)
def test_solve_unit_lower_matches_a_float64_solve(n):
    from qwen_jax.delta_rule import solve_unit_lower

    rng = np.random.RandomState(n)
    keys = rng.randn(3, n, 16)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    a = 0.9 * keys @ keys.swapaxes(-1, -2)  # a delta-rule-like system: |a| < 1, unit diagonal implied
    b = rng.randn(3, n, 5)
    exact = np.linalg.solve(np.eye(n) + np.tril(a, -1), b)
    ours = np.asarray(solve_unit_lower(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    np.testing.assert_allclose(ours, exact, rtol=0, atol=2e-5)


def test_invariant_decode_mixer_does_not_depend_on_the_batch(tiny_checkpoints):
    """The DeltaNet's decode step in the batch-invariant mode (causal conv, q/k l2 norms on 16-row tiles, the delta
    rule row by row), fp32: a row's output, conv history and state are bitwise the same at batch 1, 2, 8 (its q/k
    rows, 8 x 2 heads, are exactly one tile). Without :func:`~qwen_jax.invariance.opaque_map`'s spare entry
    batch 8's l2 norm and batch 1's delta rule were hoisted out of their one-trip loops and rounded differently."""
    import jax

    import qwen_jax
    from qwen_jax.invariance import ROW_TILE, batch_invariant_mode

    model = qwen_jax.load_hf(tiny_checkpoints("hv2hk_top2of8"), "float32")
    cfg, mixer = model.cfg, model.layers[0].linear_attn
    assert cfg.linear_num_key_heads * 8 == ROW_TILE  # batch 8 fills one tile exactly

    @jax.jit
    def step(x, history, state):
        with batch_invariant_mode():
            return mixer.mix(x, None, history, state)

    rs = np.random.RandomState(0)
    n = 8
    state_shape = (n, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    for draw in range(3):  # before: 16 of 20 draws differed at batch 8
        x = jnp.asarray(rs.randn(n, 1, cfg.hidden_size), jnp.float32)
        history = jnp.asarray(rs.randn(n, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), jnp.float32)
        state = jnp.asarray(rs.randn(*state_shape) * 0.3, jnp.float32)
        alone = step(x[:1], history[:1], state[:1])
        for batch in (2, 8):
            together = step(x[:batch], history[:batch], state[:batch])
            for a, b in zip(alone, together, strict=True):
                assert np.array_equal(a[0], b[0]), (draw, batch, float(np.abs(a[0] - b[0]).max()))
