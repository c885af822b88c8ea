"""The Gated DeltaNet token mixer (three in four layers).

HF's fused ``in_proj_qkv`` and ``conv1d`` are kept split into q/k/v parts here, so that heads can later be split
across devices without a re-layout; the loader slices them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.delta_rule import chunked_delta_rule, delta_rule_step
from qwen_jax.norms import gated_rms_norm
from qwen_jax.ops import F32, dense, sigmoid, silu, torch_softplus

QKV = ("q", "k", "v")


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


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        h, kernel = cfg.hidden_size, cfg.linear_conv_kernel_dim
        widths = {"q": cfg.linear_key_dim, "k": cfg.linear_key_dim, "v": cfg.linear_value_dim}
        self.cfg = cfg
        self.in_proj_q = nnx.Param(init(rngs.params(), (h, widths["q"]), dtype))
        self.in_proj_k = nnx.Param(init(rngs.params(), (h, widths["k"]), dtype))
        self.in_proj_v = nnx.Param(init(rngs.params(), (h, widths["v"]), dtype))
        self.conv_q = nnx.Param(init(rngs.params(), (kernel, widths["q"]), dtype))
        self.conv_k = nnx.Param(init(rngs.params(), (kernel, widths["k"]), dtype))
        self.conv_v = nnx.Param(init(rngs.params(), (kernel, widths["v"]), dtype))
        self.in_proj_z = nnx.Param(init(rngs.params(), (h, cfg.linear_value_dim), dtype))
        self.in_proj_b = nnx.Param(init(rngs.params(), (h, cfg.linear_num_value_heads), dtype))
        self.in_proj_a = nnx.Param(init(rngs.params(), (h, cfg.linear_num_value_heads), dtype))
        self.dt_bias = nnx.Param(jnp.ones((cfg.linear_num_value_heads,), dtype))
        a = jax.random.uniform(rngs.params(), (cfg.linear_num_value_heads,), F32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(a).astype(dtype))
        self.norm = nnx.Param(jnp.ones((cfg.linear_value_head_dim,), dtype))
        self.out_proj = nnx.Param(init(rngs.params(), (cfg.linear_value_dim, h), dtype))

    def __call__(
        self,
        x: jax.Array,
        pad_mask: jax.Array | None = None,
        conv_history: dict[str, jax.Array] | None = None,
        state: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """x: [B, L, hidden]; pad_mask: [B, L] (1 real, 0 padding); conv_history: {q,k,v: [B, K-1, C]};
        state: [B, Hv, dk, dv] fp32. Returns (out [B, L, hidden], new conv history, new state).

        As in HF, one token with a state runs the one-token step (q scaled by division by sqrt(dk)); anything else
        runs the chunked form (q multiplied by dk**-0.5).
        """
        cfg = self.cfg
        b, length, _ = x.shape
        if pad_mask is not None:  # padded tokens are zeroed so they cannot touch the conv or the state
            x = (x * pad_mask[:, :, None].astype(x.dtype)).astype(x.dtype)
        if conv_history is None:
            conv_history = {
                n: jnp.zeros(
                    (b, cfg.linear_conv_kernel_dim - 1, getattr(self, f"conv_{n}").shape[1]), x.dtype
                )
                for n in QKV
            }
        mixed, new_history = {}, {}
        for n in QKV:
            projected = dense(x, getattr(self, f"in_proj_{n}")[...])
            mixed[n], new_history[n] = causal_conv(
                projected, getattr(self, f"conv_{n}")[...], conv_history[n]
            )

        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        q = mixed["q"].reshape(b, length, hk, dk)
        k = mixed["k"].reshape(b, length, hk, dk)
        v = mixed["v"].reshape(b, length, hv, dv)
        beta = sigmoid(dense(x, self.in_proj_b[...]))
        a = dense(x, self.in_proj_a[...]).astype(F32)
        g = -jnp.exp(self.A_log[...].astype(F32)) * torch_softplus(a + self.dt_bias[...].astype(F32))

        # V head j reads QK head j // (hv // hk): grouped (repeat_interleave), not tiled.
        step = state is not None and length == 1
        q = l2_normalise(q.astype(F32))
        q = q / math.sqrt(dk) if step else q * dk**-0.5
        q = jnp.repeat(q, hv // hk, axis=2)
        k = jnp.repeat(l2_normalise(k.astype(F32)), hv // hk, axis=2)
        delta_rule = delta_rule_step if step else chunked_delta_rule
        out, state = delta_rule(q, k, v.astype(F32), g, beta.astype(F32), state)

        z = dense(x, self.in_proj_z[...]).reshape(b, length, hv, dv)
        normed = gated_rms_norm(out.astype(x.dtype), z, self.norm[...], cfg.rms_norm_eps)
        return dense(normed.reshape(b, length, hv * dv), self.out_proj[...]), new_history, state
