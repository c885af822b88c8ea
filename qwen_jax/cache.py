"""The decode state: one pytree, allocated once for a fixed maximum length.

- ``keys``/``values``: per full-attention layer, [B, T, Hkv, D] in the model dtype, stored after k_norm and RoPE;
- ``conv``: per DeltaNet layer, the last K-1 pre-conv inputs [B, K-1, q|k|v channels] in the model dtype;
- ``recurrent``: per DeltaNet layer, the delta-rule state [B, Hv, dk, dv] in fp32;
- ``key_mask``: [B, T], 1 where a cache slot holds a real token (left padding stays 0);
- ``length``: how many slots are written (the same for every row: prompts are left-padded);
- ``next_position``: [B], the RoPE position of each row's next token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen_jax.config import ModelConfig
from qwen_jax.ops import F32


class DecodeState(NamedTuple):
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    conv: tuple[jax.Array, ...]
    recurrent: tuple[jax.Array, ...]
    key_mask: jax.Array
    length: jax.Array
    next_position: jax.Array

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]


def init_decode_state(cfg: ModelConfig, batch: int, max_length: int, dtype: jnp.dtype) -> DecodeState:
    """An empty state (all zeros) for ``batch`` rows of up to ``max_length`` tokens."""
    n_attn = len(cfg.full_attention_layers)
    n_linear = cfg.num_hidden_layers - n_attn
    kv_shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
    history_shape = (batch, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim)
    state_shape = (batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    return DecodeState(
        keys=tuple(jnp.zeros(kv_shape, dtype) for _ in range(n_attn)),
        values=tuple(jnp.zeros(kv_shape, dtype) for _ in range(n_attn)),
        conv=tuple(jnp.zeros(history_shape, dtype) for _ in range(n_linear)),
        recurrent=tuple(jnp.zeros(state_shape, F32) for _ in range(n_linear)),
        key_mask=jnp.zeros((batch, max_length), jnp.int32),
        length=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )
