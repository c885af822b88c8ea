"""The decode state and what each layer reads about the tokens of one call.

:class:`DecodeState` is one pytree, allocated once for a fixed maximum length. ``layers`` holds one state per decoder
layer, in layer order, of the type its token mixer keeps:

- a full-attention layer: :class:`KVCache`, keys and values [B, T, Hkv, D] in the model dtype, stored after k_norm and
  RoPE;
- a DeltaNet layer: :class:`DeltaNetState`, the last K-1 pre-conv inputs [B, K-1, q|k|v channels] in the model dtype
  and the delta-rule state [B, Hv, dk, dv] in fp32.

Shared by all layers: ``key_mask`` [B, T], 1 where a cache slot holds a real token (left padding stays 0);
``length``, how many slots are written (the same for every row: prompts are left-padded); ``next_position`` [B], the
RoPE position of each row's next token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen_jax.config import ModelConfig
from qwen_jax.ops import F32


class KVCache(NamedTuple):
    """A full-attention layer's decode state."""

    keys: jax.Array  # [B, T, Hkv, D]
    values: jax.Array  # [B, T, Hkv, D]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_length: int, dtype: jnp.dtype) -> KVCache:
        shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class DeltaNetState(NamedTuple):
    """A DeltaNet layer's decode state."""

    conv: jax.Array  # [B, K-1, q|k|v channels], the model dtype
    recurrent: jax.Array  # [B, Hv, dk, dv], fp32

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_length: int, dtype: jnp.dtype) -> DeltaNetState:
        history = (batch, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim)
        state = (batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        return cls(jnp.zeros(history, dtype), jnp.zeros(state, F32))


#: The decode state of each layer type.
LAYER_STATES = {"full_attention": KVCache, "linear_attention": DeltaNetState}

LayerState = KVCache | DeltaNetState


class DecodeState(NamedTuple):
    layers: tuple[LayerState, ...]  # per layer, in layer order
    key_mask: jax.Array
    length: jax.Array
    next_position: jax.Array

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]

    def of_type(self, state_type: type) -> tuple[LayerState, ...]:
        """The states of the layers that keep ``state_type`` (for reports: :mod:`conversion.plan` sizes them)."""
        return tuple(s for s in self.layers if isinstance(s, state_type))


def init_decode_state(cfg: ModelConfig, batch: int, max_length: int, dtype: jnp.dtype) -> DecodeState:
    """An empty state (all zeros) for ``batch`` rows of up to ``max_length`` tokens."""
    return DecodeState(
        layers=tuple(LAYER_STATES[t].empty(cfg, batch, max_length, dtype) for t in cfg.layer_types),
        key_mask=jnp.zeros((batch, max_length), jnp.int32),
        length=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )


class TokenContext(NamedTuple):
    """What every layer reads about the tokens of one call, besides the hidden states.

    A forward or a prefill (``decoding`` False) mixes the call's own tokens, ``attention_mask`` saying which are real;
    a decode step (one token per row) reads the layer's state, whose real slots ``key_mask`` gives (this token's
    included). ``cache_start`` is where the call's tokens go in the state.
    """

    cos: jax.Array  # [B, L, rotary_dim]
    sin: jax.Array
    attention_mask: jax.Array  # [B, L], 1 for real tokens
    key_mask: jax.Array | None  # [B, T] with a state, else None
    cache_start: jax.Array | int
    decoding: bool
