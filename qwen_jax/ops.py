"""Small numeric helpers shared by the blocks.

They mirror where PyTorch rounds: a bf16 matmul accumulates in fp32 and rounds its output once; a bf16 elementwise
op computes in fp32 and rounds its output once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a kernel in [in, out] layout, accumulated in fp32 and rounded to ``x.dtype``."""
    return jnp.matmul(x, w, preferred_element_type=F32).astype(x.dtype)


def split_columns(x: jax.Array, widths: dict[str, int]) -> list[jax.Array]:
    """``x``'s last axis cut into consecutive blocks of the given widths (in ``widths`` order)."""
    return jnp.split(x, np.cumsum(list(widths.values()))[:-1], axis=-1)


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in fp32, rounded to the input dtype (as torch does for bf16)."""
    return jax.nn.silu(x.astype(F32)).astype(x.dtype)


def sigmoid(x: jax.Array) -> jax.Array:
    """Sigmoid computed in fp32, rounded to the input dtype."""
    return jax.nn.sigmoid(x.astype(F32)).astype(x.dtype)


def torch_softplus(x: jax.Array, threshold: float = 20.0) -> jax.Array:
    """``torch.nn.functional.softplus`` with its defaults (beta=1, linear above ``threshold``)."""
    return jnp.where(x > threshold, x, jnp.log1p(jnp.exp(jnp.minimum(x, threshold))))


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` with a rounding after each op, as in HF's MLP and experts."""
    return (silu(gate) * up).astype(gate.dtype)
