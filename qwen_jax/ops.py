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


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis as int32, with torch's and ``jnp.argmax``'s semantics (the first maximum; the
    first NaN if there is one), computed as a max and then a min over the matching indices.

    Two plain reductions vectorise, where XLA:CPU runs ``jnp.argmax``'s (value, index) reduction one element at a
    time: over a 32k vocabulary that is 0.14 ms against 0.02 ms, about 2% of a small model's decode step.
    """
    nan = jnp.isnan(logits)
    best = jnp.max(logits, axis=-1, keepdims=True)  # (XLA:CPU's vectorised max may skip NaNs)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == best)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)
