"""The batch-invariant mode: a row's numbers do not depend on what else is in the batch, or on its padding.

XLA chooses the kernel of a matmul or of a reduction by the shape of the whole operation, and with the kernel the
order of its floating-point sums. Measured on XLA:CPU (fp32 and bf16): ``(x[:m] @ W)[0]`` changes in its last bits
with the row count m, and so does a row's RMSNorm, softmax or l2 norm once m reaches 8-16 rows. A batched matmul
(batch dimensions on both operands) computes each batch element alike whatever their number; elementwise ops,
gathers, max, min, top-k and argsort are exact. So a program computes a row the same way in every batch when every
sum over a row's features runs on a fixed shape:

- per-token work (the dense projections, lm_head, the norms, the router) runs on tiles of :data:`ROW_TILE` rows
  (:func:`map_row_tiles`): one fixed-shape program applied tile after tile, whatever the number of rows; in a
  CPU decode step the dense products (``qwen_jax.ops.dense``: projections, lm_head, the router, the shared
  expert) run in the native kernel instead, all rows at once (invariant by construction), and only the per-row
  reductions (norms, softmax, the slot sum) on tiles;
- the routed experts run on blocks of one expert (``qwen_jax.moe.blocked_expert_ffn``) of :data:`ROW_TILE` rows
  in a forward or prefill and of ``qwen_jax.moe.DECODE_EXPERT_BLOCK`` in a decode step (:func:`decode_step_mode`),
  whatever the row count (the default mode switches to per-row gathers for a few rows); a decode step on the CPU
  runs them in the native grouped matmul instead (``qwen_jax.kernels``), invariant by construction;
- attention runs one row at a time, on blocks of queries over fixed-size key blocks, where a fully masked block
  leaves the softmax statistics bit for bit unchanged (:func:`qwen_jax.attention.invariant_attend`), so neither
  the padded length nor the cache length changes a result; a CPU decode step's one query per row runs in the
  native kernel instead (``qwen_jax.kernels.decode_attention``: each row's keys up to its own slot, by the same
  loops whatever the batch or the cache length);
- rows are right-padded, so the DeltaNet's 64-token chunks start at the same tokens in every row and in every
  bucket; padded positions are zeroed before the delta rule, so they leave its state unchanged, and each row's
  conv history is taken at its own length. The delta rule runs one row at a time (:func:`map_rows`): its small
  batched matmuls, on XLA:CPU, round differently with the batch count (measured: the chunked form's output at
  B = 2 differs from B = 1 by 6e-8), though not with the number of chunks; a CPU decode step runs its one-token
  step in the native kernel instead (``qwen_jax.kernels.delta_rule_step``), all rows at once, invariant by
  construction (measured: 0.10 ms a layer against 0.8 ms for the per-row loop at batch 16 on the bench config).

:func:`batch_invariant_mode` switches the mode on while a program is traced (``forward``, ``generate`` and
``stream_generate`` do so for ``batch_invariant=True``); the blocks ask :func:`batch_invariant`. The default mode
is untouched, and the two modes' numbers differ (they round in different places); each keeps the parity bounds
against transformers.

Status (tests/test_batch_invariance.py): forward logits and hidden states, greedy tokens and their logits are
bitwise invariant in fp32 and bf16, on one device and on ``ep`` meshes. What fp32 decoding needed: a map over a
single entry (one row, or one tile) keeps its loop body in the loop (:func:`opaque_map`'s spare entry); hoisted
out and fused with its producers, XLA:CPU summed the DeltaNet's l2 norm in another order (a reassociated vector
reduction along the key dimension instead of a sum per row). A tile's work must not end in a multiply whose add
comes after it in the same fusion: LLVM may contract the two into one fused multiply-add, or not, by how it vectorises
the loop body, which depends on the number of tiles (the MoE's shared-expert add: ``qwen_jax.moe.SparseMoe.combine``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

#: Rows per tile of the per-token work, and per block of an expert's rows.
ROW_TILE = 16

_MODE = contextvars.ContextVar("qwen_jax_batch_invariant", default=False)
_DECODE_STEP = contextvars.ContextVar("qwen_jax_decode_step", default=False)


@contextlib.contextmanager
def tracing_with(switch: contextvars.ContextVar, value: bool) -> Iterator[None]:
    """Traces the enclosed code with the mode ``switch`` (a context variable read while tracing) set to ``value``."""
    token = switch.set(value)
    try:
        yield
    finally:
        switch.reset(token)


def batch_invariant_mode(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Traces the enclosed code in the batch-invariant mode (or, with ``enabled=False``, in the default one)."""
    return tracing_with(_MODE, enabled)


def batch_invariant() -> bool:
    """Whether the code being traced is in the batch-invariant mode."""
    return _MODE.get()


def decode_step_mode(decoding: bool) -> contextlib.AbstractContextManager:
    """Traces the enclosed code as a decode step (one new token per row, read against a state) or not (a forward
    or a prefill). A program is one or the other whatever its batch, so a block may choose its tiling by it."""
    return tracing_with(_DECODE_STEP, decoding)


def in_decode_step() -> bool:
    """Whether the code being traced is a decode step (see :func:`decode_step_mode`)."""
    return _DECODE_STEP.get()


def isolated(fn: Callable, *operands: jax.Array) -> object:
    """``fn(*operands)`` behind optimization barriers on its inputs and outputs: XLA may not move work across them
    while it simplifies the program. (They are expanded away before code generation, so they do not forbid fusion
    by themselves; what fixed the measured case, a 1-token forward 1.2e-7 off the same token in a batch, was
    keeping the loop: :func:`opaque_map`.)"""
    return jax.lax.optimization_barrier(fn(*jax.lax.optimization_barrier(operands)))


def fence(*values):
    """``values`` (pytrees of arrays) behind an optimization barrier in the batch-invariant mode, unchanged
    otherwise: a layer's blocks are not merged with their neighbours while XLA simplifies (a precaution, as
    :func:`isolated`; not sufficient alone, see the module's status)."""
    return jax.lax.optimization_barrier(values) if batch_invariant() else values


def opaque_map(fn: Callable, xs) -> object:
    """``jax.lax.map(fn, xs)`` as a loop XLA cannot drop: its trip count is hidden behind an optimization barrier.
    XLA inlines a loop that runs once, and the inlined body compiles differently (measured: a 1-token forward's
    last layer came out 1.2e-7 off the same token in a batch); a loop kept as a loop compiles its body alone.

    With one entry (``n == 1``) the operands get a spare zero entry, never computed: XLA drops the index of a
    dynamic slice that spans its whole axis, the body then no longer depends on the loop and is hoisted out of it
    and fused with its producers, which rounds differently (measured in fp32 decoding: the DeltaNet's l2 norm on a
    single full 16-row tile summed in another order, batch 1's delta rule fused with the conv, batch 16's decode
    step: logits up to 2e-6 off)."""
    n = jax.tree.leaves(xs)[0].shape[0]
    out_shape = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], xs))
    if n == 1:
        xs = jax.tree.map(lambda x: jnp.pad(x, [(0, 1)] + [(0, 0)] * (x.ndim - 1)), xs)
    (count,) = jax.lax.optimization_barrier((jnp.int32(n),))

    def body(i, out):
        y = fn(jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), xs))
        return jax.tree.map(lambda o, v: jax.lax.dynamic_update_index_in_dim(o, v, i, 0), out, y)

    (first,) = jax.tree.leaves(xs)[:1]
    empty = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), out_shape)
    empty = jax.lax.optimization_barrier((first, empty))[
        1
    ]  # made inside the program, not at its start (see ops.tie_to)
    return jax.lax.fori_loop(0, count, body, empty)


def row_tiles(a: jax.Array, lead_dims: int, size: int) -> jax.Array:
    """``a`` with its first ``lead_dims`` dimensions flattened into rows and zero-padded to whole tiles of ``size``
    rows: [tiles, size, ...] (undone by :func:`untiled_rows`)."""
    rows = math.prod(a.shape[:lead_dims])
    flat = a.reshape(rows, *a.shape[lead_dims:])
    flat = jnp.pad(flat, [(0, -rows % size)] + [(0, 0)] * (flat.ndim - 1))
    return flat.reshape(-1, size, *flat.shape[1:])


def untiled_rows(out, rows: int):
    """A pytree of per-tile outputs [tiles, size, ...] back to its first ``rows`` rows [rows, ...] (the padding
    :func:`row_tiles` added dropped)."""
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:rows], out)


def map_row_tiles(fn: Callable, *arrays: jax.Array) -> object:
    """``fn(*arrays)`` for a per-row ``fn``, computed on fixed tiles of :data:`ROW_TILE` rows.

    A row is one index of the leading dimensions the arrays share (all but the last dimension of the first array):
    the rows are flattened, zero-padded to whole tiles, and ``fn`` is mapped over the tiles, so it always sees
    [ROW_TILE, features] operands. ``fn`` returns arrays (or a pytree of them) with one leading row dimension; the
    result has the arrays' leading dimensions back. Inside a tile the mode is off: the tile is already fixed-shape.
    """
    lead = arrays[0].shape[:-1]

    def one_tile(operands):
        with batch_invariant_mode(False):
            return isolated(fn, *operands)

    out = opaque_map(one_tile, tuple(row_tiles(a, len(lead), ROW_TILE) for a in arrays))
    return jax.tree.map(lambda o: o.reshape(*lead, *o.shape[1:]), untiled_rows(out, math.prod(lead)))


def map_rows(fn: Callable, *arrays: jax.Array) -> object:
    """``fn(*arrays)`` for arrays [B, ...] computed one batch row at a time (``fn`` sees [1, ...] operands and returns
    arrays, or a pytree of them, [1, ...]): for the sequence mixers' batched matmuls, whose small-matrix kernels on
    XLA:CPU change with the batch count."""
    out = opaque_map(lambda row: isolated(fn, *(a[None] for a in row)), arrays)
    return jax.tree.map(lambda o: o[:, 0], out)


def zero_padded(arrays: tuple[jax.Array, ...], pad_mask: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` [B, L, ...] with exact zeros at the padded positions of ``pad_mask`` [B, L]. The DeltaNet's
    delta-rule inputs: q = k = v = beta = 0 and a log decay g = 0 leave the state bit for bit as it was, as the
    chunked form's own padding does; attention's keys and values: no padded value can reach a sum."""
    real = pad_mask > 0
    return tuple(
        jnp.where(real.reshape(*real.shape, *(1,) * (a.ndim - 2)), a, 0).astype(a.dtype) for a in arrays
    )


def right_padded(attention_mask: np.ndarray) -> bool:
    """Whether every row of a [B, L] mask is its real tokens first, then padding (1s, then 0s)."""
    mask = np.asarray(attention_mask) > 0
    return bool(np.all(mask[:, :-1] >= mask[:, 1:])) if mask.shape[1] > 1 else True


def check_right_padded(attention_mask: np.ndarray) -> None:
    if not right_padded(attention_mask):
        raise ValueError(
            "batch_invariant=True needs right-padded rows (attention_mask 1 for the real tokens, then 0): "
            "left padding would shift the DeltaNet's chunk boundaries by the padding"
        )
