"""The Gated DeltaNet token mixer (three in four layers).

One input projection ``in_proj`` = HF's ``in_proj_qkv | in_proj_z | in_proj_b | in_proj_a`` side by side (one matmul
instead of four; a decode step is bound by reading weights, and one wide matmul reads them faster than four narrow
ones). The causal conv runs over the q|k|v columns, as HF's ``conv1d``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax import kernels
from qwen_jax.cache import DeltaNetState, TokenContext
from qwen_jax.config import ModelConfig
from qwen_jax.delta_rule import chunked_delta_rule, delta_rule_step
from qwen_jax.invariance import batch_invariant, map_row_tiles, map_rows, zero_padded
from qwen_jax.norms import gated_rms_norm
from qwen_jax.ops import F32, dense, sigmoid, silu, split_columns, torch_softplus


def causal_conv(x: jax.Array, weight: jax.Array, history: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise conv1d + SiLU over time.

    x: [B, L, C]; weight: [K, C]; history: [B, K-1, C], the inputs before x (zeros at the start).
    out[t] = sum_j weight[j] * x[t - K + 1 + j]. The sum runs in fp32 and is rounded to x.dtype, then SiLU.
    Returns (out [B, L, C], the new history: the last K-1 inputs).
    """
    kernel = weight.shape[0]
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    length = x.shape[1]
    acc = sum(padded[:, j : j + length].astype(F32) * weight[j].astype(F32) for j in range(kernel))
    return silu(acc.astype(x.dtype)), padded[:, padded.shape[1] - (kernel - 1) :]


def history_at_lengths(x: jax.Array, history: jax.Array, lengths: jax.Array) -> jax.Array:
    """Each row's conv history after its first ``lengths[b]`` inputs of ``x`` [B, L, C] (right padding): the last
    K-1 of ``history`` [B, K-1, C] followed by those inputs."""
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    window = history.shape[1]
    return jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, window, 0))(padded, lengths)


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    if batch_invariant():
        return map_row_tiles(lambda rows: l2_normalise(rows, eps), x)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        h, kernel = cfg.hidden_size, cfg.linear_conv_kernel_dim
        self.cfg = cfg
        in_width = sum(cfg.linear_in_proj_widths.values())
        self.in_proj = nnx.Param(init(rngs.params(), (h, in_width), dtype))
        self.conv = nnx.Param(init(rngs.params(), (kernel, cfg.linear_conv_dim), dtype))
        self.dt_bias = nnx.Param(jnp.ones((cfg.linear_num_value_heads,), dtype))
        a = jax.random.uniform(rngs.params(), (cfg.linear_num_value_heads,), F32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(a).astype(dtype))
        self.norm = nnx.Param(jnp.ones((cfg.linear_value_head_dim,), dtype))
        self.out_proj = nnx.Param(init(rngs.params(), (cfg.linear_value_dim, h), dtype))

    def __call__(
        self, x: jax.Array, context: TokenContext, state: DeltaNetState | None = None
    ) -> tuple[jax.Array, DeltaNetState | None]:
        """x [B, L, hidden] -> (out [B, L, hidden], the new state, or None without one).

        A forward starts from zeros (padded tokens zeroed); a decode step continues ``state``, and so does a prefill
        of more than one token (padded tokens zeroed): a long prompt's segment continues the state of the segments
        before it. A one-token prefill starts from zeros (its state is empty), in the chunked form as HF's.
        """
        if context.decoding:
            out, history, recurrent = self.mix(x, None, state.conv, state.recurrent)
        elif state is not None and x.shape[1] > 1:  # one token with a state would run the decode step's form
            out, history, recurrent = self.mix(x, context.attention_mask, state.conv, state.recurrent)
        else:
            out, history, recurrent = self.mix(x, context.attention_mask)
        return out, None if state is None else DeltaNetState(history, recurrent)

    def final_state(self, x: jax.Array, context: TokenContext) -> jax.Array:
        """The delta-rule state [B, Hv, dk, dv] (fp32) after a forward over ``x`` [B, L, hidden], as a prefill leaves
        it; recomputed from ``x``, so only a caller that asks for it pays for it."""
        if context.decoding:
            raise ValueError("the DeltaNet state is captured by a forward, not by a decode step")
        return self.mix(x, context.attention_mask)[2]

    def mix(
        self,
        x: jax.Array,
        pad_mask: jax.Array | None = None,
        conv_history: jax.Array | None = None,
        state: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, L, hidden]; pad_mask: [B, L] (1 real, 0 padding); conv_history: [B, K-1, q|k|v channels];
        state: [B, Hv, dk, dv] fp32. Returns (out [B, L, hidden], new conv history, new state).

        As in HF, one token with a state runs the one-token step (q scaled by division by sqrt(dk)); anything else
        runs the chunked form (q multiplied by dk**-0.5).
        """
        cfg = self.cfg
        b, length, _ = x.shape
        if pad_mask is not None:  # padded tokens are zeroed so they cannot touch the conv or the state
            x = (x * pad_mask[:, :, None].astype(x.dtype)).astype(x.dtype)
        if conv_history is None:
            conv_history = jnp.zeros((b, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), x.dtype)
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        qkv, z, beta_logits, a = split_columns(dense(x, self.in_proj[...]), cfg.linear_in_proj_widths)
        mixed, new_history = causal_conv(qkv, self.conv[...], conv_history)
        q, k, v = split_columns(mixed, cfg.linear_conv_widths)
        q, k, v = q.reshape(b, length, hk, dk), k.reshape(b, length, hk, dk), v.reshape(b, length, hv, dv)
        beta = sigmoid(beta_logits)
        a = a.astype(F32)
        g = -jnp.exp(self.A_log[...].astype(F32)) * torch_softplus(a + self.dt_bias[...].astype(F32))

        # V head j reads QK head j // (hv // hk): grouped (repeat_interleave), not tiled.
        step = state is not None and length == 1
        q = l2_normalise(q.astype(F32))
        q = q / math.sqrt(dk) if step else q * dk**-0.5
        q = jnp.repeat(q, hv // hk, axis=2)
        k = jnp.repeat(l2_normalise(k.astype(F32)), hv // hk, axis=2)
        v, beta = v.astype(F32), beta.astype(F32)
        if (
            pad_mask is not None and batch_invariant()
        ):  # right padding: padded tokens leave the state as it was
            q, k, v, g, beta = zero_padded((q, k, v, g, beta), pad_mask)
            new_history = history_at_lengths(qkv, conv_history, jnp.sum(pad_mask > 0, axis=1))
        delta_rule = delta_rule_step if step else chunked_delta_rule
        # An invariant CPU decode step: the native kernel, all rows at once (invariant by construction).
        if batch_invariant() and step and kernels.for_decode_step():
            out, state = kernels.delta_rule_step(q, k, v, g, beta, state)
        elif batch_invariant():
            out, state = map_rows(delta_rule, q, k, v, g, beta, *(() if state is None else (state,)))
        else:
            out, state = delta_rule(q, k, v, g, beta, state)

        z = z.reshape(b, length, hv, dv)
        normed = gated_rms_norm(out.astype(x.dtype), z, self.norm[...], cfg.rms_norm_eps)
        return dense(normed.reshape(b, length, hv * dv), self.out_proj[...]), new_history, state
