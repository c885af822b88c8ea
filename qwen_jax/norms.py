"""The two RMSNorms of Qwen3.5/3.6: zero-centred (1 + w) and the DeltaNet's gated one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.invariance import batch_invariant, map_row_tiles
from qwen_jax.ops import F32


def _normalise(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Zero-centred RMSNorm: ``normalise(x) * (1 + w)``, all in fp32, rounded once at the end. (On fixed row
    tiles in the batch-invariant mode, as every norm here.)"""
    if batch_invariant():
        return map_row_tiles(lambda rows: rms_norm(rows, weight, eps), x)
    return (_normalise(x, eps) * (1.0 + weight.astype(F32))).astype(x.dtype)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """The DeltaNet output norm: ``w * round(normalise(x)) * silu(gate)``, over the last axis.

    ``w`` is a plain multiplier (not 1 + w). The normalised value is rounded to ``x.dtype`` before the weight
    multiply; the gate's SiLU runs in fp32; the result is rounded once more.
    """
    if batch_invariant():
        return map_row_tiles(lambda rows, gates: gated_rms_norm(rows, gates, weight, eps), x, gate)
    n = weight * _normalise(x, eps).astype(x.dtype)
    return (n.astype(F32) * jax.nn.silu(gate.astype(F32))).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
