"""Partial rotary position embedding (NeoX rotate-half pairing on the first ``rotary_dim`` dims).

For text-only input the interleaved MRoPE of Qwen3.5/3.6 reduces exactly to 1-D RoPE, which is what this computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.ops import F32


def inverse_frequencies(rotary_dim: int, theta: float) -> jax.Array:
    exponents = jnp.arange(0, rotary_dim, 2, dtype=F32) / rotary_dim
    return 1.0 / (jnp.asarray(theta, F32) ** exponents)


def rope_cos_sin(
    positions: jax.Array, rotary_dim: int, theta: float, dtype: jnp.dtype
) -> tuple[jax.Array, ...]:
    """cos and sin of shape [B, L, rotary_dim], computed in fp32 and rounded to the activation dtype."""
    freqs = positions[..., None].astype(F32) * inverse_frequencies(rotary_dim, theta)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first ``cos.shape[-1]`` dims of ``x`` [B, L, heads, head_dim]; the rest pass through."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = ((x_rot * cos).astype(x.dtype) + (rotate_half(x_rot) * sin).astype(x.dtype)).astype(x.dtype)
    return jnp.concatenate([rotated, x_pass], axis=-1)
