"""Small numeric helpers shared by the blocks.

They mirror where PyTorch rounds: a bf16 matmul accumulates in fp32 and rounds its output once; a bf16 elementwise
op computes in fp32 and rounds its output once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import kernels
from qwen_jax.invariance import batch_invariant, map_row_tiles

F32 = jnp.float32


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a kernel in [in, out] layout, accumulated in fp32 and rounded to ``x.dtype``.

    XLA:CPU has no bf16 kernel for a one-row product (a batch-1 decode step): it converts both operands to fp32, and
    inside a decode loop that conversion of the (loop-invariant) weights is hoisted out of the loop, an fp32 copy of
    every weight. So on the CPU a single bf16 row is computed as two (the second a copy, dropped): the same
    fp32-accumulated product of the same operands, with the weights read in bf16. In a decode step, where the native
    CPU kernel is available (:mod:`qwen_jax.kernels`), that one row goes through it instead: XLA:CPU's bf16 product
    of one or two rows reads the weights at a few GB/s (the batch-1 lm_head of the real vocabulary, 1 GB in bf16,
    took 3-8x the kernel's time, measured 2026-12-02); the same product, summed in another order.

    In the batch-invariant mode the product runs on fixed tiles of rows (:func:`qwen_jax.invariance.map_row_tiles`),
    except in a decode step where the native kernel is available: the kernel computes each row alike whatever the
    number of rows, so all rows go through it at once (no tiles; at 16 rows it read the bench config's lm_head
    faster than XLA's tiles, measured 2026-12-02).
    """
    if batch_invariant():
        if kernels.for_decode_step():
            return kernel_dense(x, w)
        return map_row_tiles(lambda rows: dense(rows, w), x)
    rows = math.prod(x.shape[:-1])
    if rows == 1 and x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        if kernels.for_decode_step():
            return kernel_dense(x, w)
        two = jnp.broadcast_to(x.reshape(1, -1), (2, x.shape[-1]))
        return jnp.matmul(two, w, preferred_element_type=F32)[:1].astype(x.dtype).reshape(*x.shape[:-1], -1)
    return jnp.matmul(x, w, preferred_element_type=F32).astype(x.dtype)


def kernel_dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` through the native kernel (:func:`qwen_jax.kernels.grouped_matmul`, every row one group of a single
    expert), accumulated in fp32 and rounded to ``x.dtype``; each row's result independent of the other rows."""
    rows = x.reshape(-1, x.shape[-1])
    out = kernels.grouped_matmul(rows, jnp.full((1,), rows.shape[0], jnp.int32), w[None])
    return out.astype(x.dtype).reshape(*x.shape[:-1], -1)


def tie_to(anchor: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays``, tied by an optimization barrier to ``anchor``: XLA computes nothing from them before ``anchor``.

    Two uses, both about where XLA:CPU places work:
    - the weights a gather or dynamic slice reads at a loop-varying index (the anchor). XLA:CPU computes a bf16 gather
      or dynamic slice in fp32: it converts the whole operand, and when the operand is loop-invariant (an expert
      loop's weights, a decode loop's embedding table) that conversion is hoisted out of the loop, an fp32 copy of
      the whole tensor. Tied to the index, the conversion stays in the loop and fuses into the slice, which then
      converts only what it reads;
    - a loop's initial buffer (zeros), tied to the loop's input: otherwise XLA:CPU makes each layer's copy of it at
      the start of the program, and all of them stay live at once.
    Values are unchanged.
    """
    tied = jax.lax.optimization_barrier((anchor, *arrays))
    return tied[1:]


#: The unsigned integer type of each float width: a float array's bits, moved by data movement alone.
_BITS = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def as_bits(x: jax.Array) -> jax.Array:
    """``x``'s bits as unsigned integers of its width (a bitcast: no value changes).

    XLA:CPU computes data movement on bf16 (dynamic-update-slice, gather, select) in fp32: it converts the whole
    operand, and a dynamic-update-slice in a loop is then no longer done in place but converts and copies the
    whole buffer every iteration. On the bits the same movement is done as written. :func:`from_bits` undoes it.
    """
    return jax.lax.bitcast_convert_type(x, _BITS[jnp.dtype(x.dtype).itemsize])


def from_bits(bits: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The values of ``dtype`` whose bits :func:`as_bits` gave."""
    return jax.lax.bitcast_convert_type(bits, dtype)


@jax.custom_jvp
def permute_rows(rows: jax.Array, index: jax.Array, into: jax.Array) -> jax.Array:
    """``into.at[index].set(rows)`` where ``index`` is a permutation of ``into``'s rows (each row overwritten, so
    ``into``'s values do not matter: it lends its buffer), computed on the bits (:func:`as_bits`).

    XLA:CPU fuses a gather into its consumers and then computes it element by element (a bf16 one in fp32); a
    scatter is never fused, and on the bits it moves rows as they are: measured on [2048, 512] bf16 rows, 1.1-1.6
    ms against 9 ms for the gather ``rows[inverse]`` fused with the MoE's slot sum. Differentiable as the scatter
    (``into``'s tangent is dropped, as its values are)."""
    return from_bits(as_bits(into).at[index].set(as_bits(rows), unique_indices=True), rows.dtype)


@permute_rows.defjvp
def _permute_rows_jvp(primals, tangents):
    rows, index, into = primals
    return permute_rows(rows, index, into), jnp.zeros_like(tangents[0]).at[index].set(
        tangents[0], unique_indices=True
    )


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
