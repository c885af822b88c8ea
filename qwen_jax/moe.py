"""The sparse MoE block: fp32 softmax router with renormalised top-k, SwiGLU experts, and a gated shared expert.

Expert weights are stored fused as in the checkpoint, in [expert, in, out] layout: ``gate_up`` [E, hidden, 2I]
(columns :I gate, I: up) and ``down`` [E, I, hidden]. The shared expert's gate and up projections are one
``shared_gate_up`` [hidden, 2S] in the same column order.

The experts are computed by ``expert_ffn(x_sorted, group_sizes, gate_up, down)`` on rows sorted by expert, with
interchangeable backends: ``dense`` (a one-hot reference that runs every expert on every row), ``ragged``
(``jax.lax.ragged_dot``), ``gather`` (each row's own expert weights), ``blocked`` (block-padded groups) and
``auto`` (the fastest of those for the shape and platform). Both return one output per (token, slot); :func:`combine_slots`
then adds the slots in ascending expert order with a rounding after each add, which is what HF's ``index_add_``
loop over experts does in bf16. Every backend is differentiable in reverse mode (``blocked`` through its written-out
VJP), on one device and under expert parallelism.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen_jax import kernels
from qwen_jax.config import ModelConfig
from qwen_jax.invariance import ROW_TILE, batch_invariant, in_decode_step, map_row_tiles
from qwen_jax.ops import F32, as_bits, dense, from_bits, permute_rows, sigmoid, swiglu, tie_to
from qwen_jax.sharding import DP, EP, disjoint_psum, expert_parallel_size


class Routing(NamedTuple):
    weights: jax.Array  # [N, k] in the activation dtype, renormalised
    experts: jax.Array  # [N, k] int32
    probs: jax.Array  # [N, E] fp32 softmax over all experts


def router_logits(x: jax.Array, router: jax.Array) -> jax.Array:
    """The router's pre-softmax logits [N, E] in the activation dtype (HF's ``router_logits``)."""
    return dense(x, router)


def route(x: jax.Array, router: jax.Array, top_k: int) -> Routing:
    """Router logits in the activation dtype, softmax in fp32, top-k, renormalise, round to the activation dtype.
    (On fixed row tiles in the batch-invariant mode; in a CPU decode step there, the logits come from the native
    kernel for all rows at once, :func:`kernel_products_whole`, and only the softmax and top-k run on tiles.)"""
    if batch_invariant() and not kernel_products_whole():
        return map_row_tiles(lambda rows: route(rows, router, top_k), x)
    return routing_of(router_logits(x, router), top_k)


def routing_of(logits: jax.Array, top_k: int) -> Routing:
    """The routing of router ``logits`` [N, E] (activation dtype): fp32 softmax, top-k, renormalised weights
    rounded to the logits' dtype. (On fixed row tiles in the batch-invariant mode: a softmax sums over a row.)"""
    if batch_invariant():
        return map_row_tiles(lambda rows: routing_of(rows, top_k), logits)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    top_probs, experts = jax.lax.top_k(probs, top_k)
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return Routing(weights.astype(logits.dtype), experts.astype(jnp.int32), probs)


def kernel_products_whole() -> bool:
    """Whether the per-token products being traced (``ops.dense``: the router, the shared expert) run in the native
    kernel on all rows at once, in the batch-invariant mode: a CPU decode step (``kernels.for_decode_step``). Then
    they need no row tiles of their own; per-row reductions (softmax, the slot sum) still do. Measured on the
    bench config, batch 16, fp32 (2026-12-02): XLA's 16-row tiles of the router and shared expert took 12.9 ms of
    a 48 ms invariant decode step (XNNPACK packs the weights again at every call)."""
    return batch_invariant() and kernels.for_decode_step()


def _split_gate_up(h: jax.Array) -> jax.Array:
    inter = h.shape[-1] // 2
    return swiglu(h[..., :inter], h[..., inter:])


def ragged_expert_ffn(x_sorted, group_sizes, gate_up, down):
    """Experts on rows sorted by expert id: ``jax.lax.ragged_dot`` with fp32 accumulation."""
    h = jax.lax.ragged_dot(x_sorted, gate_up, group_sizes, preferred_element_type=F32).astype(x_sorted.dtype)
    out = jax.lax.ragged_dot(_split_gate_up(h), down, group_sizes, preferred_element_type=F32)
    return out.astype(x_sorted.dtype)


def dense_expert_ffn(x_sorted, group_sizes, gate_up, down):
    """Reference backend: runs every expert on every row, then keeps each row's own expert (one-hot)."""
    n_experts = gate_up.shape[0]
    one_hot = jax.nn.one_hot(_row_experts(group_sizes, x_sorted.shape[0]), n_experts, dtype=x_sorted.dtype)
    h = jnp.einsum("rh,ehf->ref", x_sorted, gate_up, preferred_element_type=F32).astype(x_sorted.dtype)
    out = jnp.einsum("ref,efh->reh", _split_gate_up(h), down, preferred_element_type=F32).astype(
        x_sorted.dtype
    )
    return jnp.einsum("reh,re->rh", out, one_hot)


def _row_experts(group_sizes: jax.Array, n_rows: int) -> jax.Array:
    return jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes, total_repeat_length=n_rows)


def gather_expert_ffn(x_sorted, group_sizes, gate_up, down):
    """Gathers each row's own expert weights: reads exactly the routed experts. Best for a few rows (decode)."""
    experts = _row_experts(group_sizes, x_sorted.shape[0])
    gate_up, down = tie_to(experts, gate_up, down)
    h = jnp.einsum("rh,rhf->rf", x_sorted, gate_up[experts], preferred_element_type=F32).astype(
        x_sorted.dtype
    )
    out = jnp.einsum("rf,rfh->rh", _split_gate_up(h), down[experts], preferred_element_type=F32)
    return out.astype(x_sorted.dtype)


def _expert_block(rows, expert_gate_up, expert_down):
    """One expert's SwiGLU FFN on a block of rows: fp32 accumulation, each product rounded to the rows' dtype."""
    h = jnp.matmul(rows, expert_gate_up, preferred_element_type=F32).astype(rows.dtype)
    return jnp.matmul(_split_gate_up(h), expert_down, preferred_element_type=F32).astype(rows.dtype)


def _pad_rows(x: jax.Array, block: int) -> jax.Array:
    """``x`` with ``block`` zero rows appended, so that a block starting at any row can be sliced."""
    return jnp.concatenate([x, jnp.zeros((block, x.shape[1]), x.dtype)])


def _block_mask(i, size, block: int) -> jax.Array:
    """[block, 1]: which rows of an expert's ``i``-th block are its own (its last block may run past them)."""
    return (i * block + jnp.arange(block) < size)[:, None]


#: Rows per expert block of the CPU's grouped matmul in a forward or prefill (default mode).
EXPERT_BLOCK = 32


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_expert_ffn(x_sorted, group_sizes, gate_up, down, block: int = EXPERT_BLOCK):
    """A grouped matmul as two loops: over the experts, and within each over ``block``-row blocks of its rows.

    Each expert's weights are sliced once (XLA:CPU copies a dynamic slice, so slicing them per block would copy
    them again for every block), and each block is one [block, hidden] matmul. A block that runs past its
    expert's rows computes them too but keeps only its own; one that would run past the last row is moved back to
    end there. The cost is the routed FLOPs plus under one block per expert, where XLA:CPU's ``ragged_dot`` runs
    every expert on every row.

    JAX cannot differentiate a loop with a dynamic trip count in reverse mode, so the VJP is written out
    (:func:`_blocked_expert_ffn_bwd`): the exact derivative, computed block by block over each expert's rows.
    """
    n_rows, n_experts = x_sorted.shape[0], gate_up.shape[0]
    if n_rows < block:  # fewer rows than one block: pad them to one (``.fun``: this runs inside the primal)
        padded = jnp.pad(x_sorted, ((0, block - n_rows), (0, 0)))
        return blocked_expert_ffn.fun(padded, group_sizes, gate_up, down, block)[:n_rows]
    starts = jnp.cumsum(group_sizes) - group_sizes
    dtype = x_sorted.dtype

    def one_expert(expert, out):
        size, start = group_sizes[expert], starts[expert]

        def its_blocks(out):
            expert_gate_up, expert_down = tie_to(expert, gate_up, down)
            expert_gate_up, expert_down = expert_gate_up[expert], expert_down[expert]

            def one_block(i, out):
                first = jnp.minimum(start + i * block, n_rows - block)
                (rows,) = tie_to(first, x_sorted)
                rows = jax.lax.dynamic_slice_in_dim(rows, first, block)
                y = as_bits(_expert_block(rows, expert_gate_up, expert_down))
                row = first + jnp.arange(block)
                mine = ((row >= start + i * block) & (row < start + size))[:, None]
                y = jnp.where(mine, y, jax.lax.dynamic_slice_in_dim(out, first, block))
                return jax.lax.dynamic_update_slice_in_dim(out, y, first, 0)

            return jax.lax.fori_loop(0, -(-size // block), one_block, out)

        # An expert without rows is skipped, its weights not even sliced (a copy on XLA:CPU): a decode step's few
        # rows touch a few experts.
        return jax.lax.cond(size > 0, its_blocks, lambda out: out, out)

    # The output starts as a copy of the rows, not of zeros: XLA:CPU makes a loop's copy of a constant at the start
    # of the program, every layer's at once. Every row in a group is overwritten; the others are not outputs.
    # The blocks are written into the output's bits (same values): XLA:CPU computes a bf16 dynamic-update-slice in
    # fp32, converting and copying the whole output for every block.
    out = jax.lax.fori_loop(0, n_experts, one_expert, as_bits(_varying_like(x_sorted, down)))
    return from_bits(out, dtype)


def _blocked_expert_ffn_fwd(x_sorted, group_sizes, gate_up, down, block):
    out = blocked_expert_ffn.fun(x_sorted, group_sizes, gate_up, down, block)
    return out, (x_sorted, group_sizes, gate_up, down)


def _blocked_expert_ffn_bwd(block, residuals, d_out):
    """The VJP of :func:`blocked_expert_ffn` by the chain rule, block by block: with h = x Wgu and a = swiglu(h),
    da = dy Wd^T, dh = swiglu'(h)^T da, dx = dh Wgu^T; dWd += a^T dy and dWgu += x^T dh, summed over the expert's
    blocks in fp32 and rounded once. Rows past the expert's own get a zero dy, so they add nothing."""
    x_sorted, group_sizes, gate_up, down = residuals
    n_rows, dtype = x_sorted.shape[0], x_sorted.dtype
    starts = jnp.cumsum(group_sizes) - group_sizes
    rows_padded, d_out_padded = _pad_rows(x_sorted, block), _pad_rows(d_out.astype(dtype), block)

    def matmul(a, b):
        return jnp.matmul(a, b, preferred_element_type=F32)

    def one_expert(expert, grads):
        d_x, d_gate_up, d_down = grads
        expert_gate_up, expert_down = gate_up[expert], down[expert]
        size, start = group_sizes[expert], starts[expert]

        def one_block(i, carry):
            d_x, d_expert_gate_up, d_expert_down = carry
            first = start + i * block
            mine = _block_mask(i, size, block)
            rows = jax.lax.dynamic_slice_in_dim(rows_padded, first, block)
            d_y = jnp.where(mine, jax.lax.dynamic_slice_in_dim(d_out_padded, first, block), 0)
            h = matmul(rows, expert_gate_up).astype(dtype)
            act, swiglu_vjp = jax.vjp(_split_gate_up, h)
            (d_h,) = swiglu_vjp(matmul(d_y, expert_down.T).astype(dtype))
            d_rows = matmul(d_h, expert_gate_up.T).astype(dtype)
            d_rows = jnp.where(mine, d_rows, jax.lax.dynamic_slice_in_dim(d_x, first, block))
            return (
                jax.lax.dynamic_update_slice_in_dim(d_x, d_rows, first, 0),
                d_expert_gate_up + matmul(rows.T, d_h),
                d_expert_down + matmul(act.T, d_y),
            )

        zeros = (_varying_like(jnp.zeros(w.shape[1:], F32), down) for w in (gate_up, down))
        d_x, d_expert_gate_up, d_expert_down = jax.lax.fori_loop(
            0, -(-size // block), one_block, (d_x, *zeros)
        )
        return (
            d_x,
            d_gate_up.at[expert].set(d_expert_gate_up.astype(gate_up.dtype)),
            d_down.at[expert].set(d_expert_down.astype(down.dtype)),
        )

    zeros = (_varying_like(jnp.zeros(x.shape, x.dtype), down) for x in (rows_padded, gate_up, down))
    d_x, d_gate_up, d_down = jax.lax.fori_loop(0, gate_up.shape[0], one_expert, tuple(zeros))
    return d_x[:n_rows], None, d_gate_up, d_down


blocked_expert_ffn.defvjp(_blocked_expert_ffn_fwd, _blocked_expert_ffn_bwd)


def _varying_like(x: jax.Array, reference: jax.Array) -> jax.Array:
    """``x`` marked as varying over the mesh axes ``reference`` varies over (inside ``shard_map``, a loop carry
    must have the same type as the body's result, which depends on the device's own experts). Axes ``x`` already
    varies over are left as they are."""

    def varying(a: jax.Array) -> set:
        manual = getattr(jax.typeof(a), "manual_axis_type", None)
        return set(manual.varying) if manual is not None else set()

    axes = tuple(sorted(varying(reference) - varying(x)))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


#: Up to this many (token, slot) rows, ``auto`` gathers per-row expert weights (a batch-1 decode step); above,
#: grouped matmuls. A gather copies one expert's weights per row, so more rows than this copy more than the blocks.
GATHER_MAX_ROWS = 8

#: Rows per expert block of a decode step's grouped matmul (both modes): a step has a few rows per expert.
DECODE_EXPERT_BLOCK = 4


def kernel_expert_ffn(x_sorted, group_sizes, gate_up, down):
    """The CPU's native grouped matmul (:mod:`qwen_jax.kernels`), reading the stacked weights in place, with
    :func:`_expert_block`'s roundings; batch-invariant by construction. Not differentiable: decode steps and
    prefills only (:func:`uses_kernel`)."""
    h = kernels.grouped_matmul(x_sorted, group_sizes, gate_up).astype(x_sorted.dtype)
    return kernels.grouped_matmul(_split_gate_up(h), group_sizes, down).astype(x_sorted.dtype)


#: Weight dtypes whose prefill runs the routed experts in the native kernel. Measured at real width (4096 rows over
#: 256 experts, one layer's experts, under load): fp32 0.66 s against XLA's 32-row blocks' 1.9 s; bf16 0.63 s
#: against 0.46 s (XLA's bf16 matmuls are faster there, so a bf16 prefill keeps them).
PREFILL_KERNEL_DTYPES = (jnp.dtype(jnp.float32),)


def uses_kernel(gate_up: jax.Array) -> bool:
    """Whether the native kernel computes the routed experts being traced: a CPU decode step, or a CPU prefill
    (``qwen_jax.generate``'s, never differentiated) with weights in :data:`PREFILL_KERNEL_DTYPES`."""
    if kernels.for_decode_step():
        return True
    return gate_up.dtype in PREFILL_KERNEL_DTYPES and kernels.for_prefill()


def auto_expert_ffn(x_sorted, group_sizes, gate_up, down):
    """The native kernel in a CPU decode step or fp32 prefill (:func:`uses_kernel`); otherwise per-row gathers for
    a few rows (batch-1 decode), else ``ragged_dot`` on accelerators and blocks on the CPU (small blocks in a decode
    step)."""
    if uses_kernel(gate_up):
        return kernel_expert_ffn(x_sorted, group_sizes, gate_up, down)
    if x_sorted.shape[0] <= GATHER_MAX_ROWS:
        return gather_expert_ffn(x_sorted, group_sizes, gate_up, down)
    if jax.default_backend() == "cpu":
        block = DECODE_EXPERT_BLOCK if in_decode_step() else EXPERT_BLOCK
        return blocked_expert_ffn(x_sorted, group_sizes, gate_up, down, block)
    return ragged_expert_ffn(x_sorted, group_sizes, gate_up, down)


#: Rows per expert block in the batch-invariant mode (a decode step's: :data:`DECODE_EXPERT_BLOCK`).
INVARIANT_EXPERT_BLOCK = ROW_TILE


def invariant_expert_ffn(x_sorted, group_sizes, gate_up, down):
    """The batch-invariant mode's experts: always blocks of :data:`INVARIANT_EXPERT_BLOCK` rows (of
    :data:`DECODE_EXPERT_BLOCK` in a decode step), so a row is computed by the same fixed-shape matmuls whatever the
    number of rows; where :func:`uses_kernel` (a CPU decode step or fp32 prefill), the native kernel, invariant by
    construction."""
    if uses_kernel(gate_up):
        return kernel_expert_ffn(x_sorted, group_sizes, gate_up, down)
    block = DECODE_EXPERT_BLOCK if in_decode_step() else INVARIANT_EXPERT_BLOCK
    return blocked_expert_ffn(x_sorted, group_sizes, gate_up, down, block)


def expert_backend(name: str) -> Callable:
    """The expert backend called ``name``; in the batch-invariant mode only ``auto`` is allowed, and it is
    :func:`invariant_expert_ffn`."""
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"unknown moe_backend {name!r}: use one of {sorted(EXPERT_BACKENDS)}")
    if batch_invariant():
        if name != "auto":
            raise ValueError(
                f"moe_backend={name!r} is not batch-invariant: use 'auto' with batch_invariant=True"
            )
        return invariant_expert_ffn
    return EXPERT_BACKENDS[name]


EXPERT_BACKENDS: dict[str, Callable] = {
    "auto": auto_expert_ffn,
    "ragged": ragged_expert_ffn,
    "dense": dense_expert_ffn,
    "gather": gather_expert_ffn,
    "blocked": blocked_expert_ffn,
}


def sort_by_expert(experts: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
    """Orders the flattened (token, slot) assignments by expert: returns (order, group_sizes).

    Ids outside [0, n_experts) (experts that live on another device) sort last and are in no group.
    """
    flat = experts.reshape(-1)
    flat = jnp.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    # argsort drops the varying type of its operand (jax 0.10.2): inside shard_map each device's order differs,
    # and typed as invariant its gathers would transpose to wrong gradients (the cotangent of x summed over
    # devices, then scattered with this device's order). Typed as varying, as its values are.
    order = _varying_like(jnp.argsort(flat, stable=True), experts)
    return order, jnp.bincount(flat, length=n_experts + 1)[:n_experts].astype(jnp.int32)


def slot_outputs(x, experts, gate_up, down, expert_ffn: Callable) -> jax.Array:
    """Each (token, slot)'s expert output, unweighted: [N, k, hidden]. Slots whose expert id is outside
    [0, len(gate_up)) get exact zeros (under expert parallelism: the expert lives on another device)."""
    n, k = experts.shape
    n_experts = gate_up.shape[0]
    order, group_sizes = sort_by_expert(experts, n_experts)
    x_sorted = x[order // k]
    y_sorted = expert_ffn(x_sorted, group_sizes, gate_up, down)
    # Unsorted by a scatter of the bits into the sorted rows' buffer: a bf16 scatter would be computed in fp32, into
    # a copy of zeros that XLA:CPU schedules at the start of the program, one per layer (GiBs for a long forward).
    y = permute_rows(y_sorted, order, x_sorted).reshape(n, k, -1)
    here = (experts >= 0) & (experts < n_experts)
    return jnp.where(here[..., None], y, jnp.zeros((), y.dtype))


def expert_parallel_slot_outputs(x, experts, gate_up, down, expert_ffn: Callable) -> jax.Array:
    """:func:`slot_outputs` with the experts split over the mesh's ``ep`` axis: each device computes the slots of
    its own experts (exact zeros elsewhere) and one exact psum combines them (:func:`qwen_jax.sharding.disjoint_psum`).
    See :mod:`qwen_jax.sharding`."""
    mesh = jax.sharding.get_abstract_mesh()
    tokens = P(DP) if DP in mesh.axis_names else P()

    def local(x, experts, gate_up, down):
        first = jax.lax.axis_index(EP) * gate_up.shape[0]
        return disjoint_psum(slot_outputs(x, experts - first, gate_up, down, expert_ffn), EP)

    return jax.shard_map(local, in_specs=(tokens, tokens, P(EP), P(EP)), out_specs=tokens)(
        x, experts, gate_up, down
    )


def _select_slots(slots: jax.Array, order: jax.Array) -> jax.Array:
    """[N, k, ...] -> [N, k, ...] with ``out[:, r] = slots[:, order[:, r]]``, by k - 1 selects of whole rows (each
    slot's row broadcast over the k ranks: few ops to compile, the same selects per element)."""
    which = order.reshape(*order.shape, *[1] * (slots.ndim - 2))
    picked = jnp.broadcast_to(slots[:, :1], slots.shape)
    for other in range(1, slots.shape[1]):
        picked = jnp.where(which == other, slots[:, other : other + 1], picked)
    return picked


@jax.custom_jvp
def slots_in_order(slots: jax.Array, order: jax.Array) -> jax.Array:
    """``jnp.take_along_axis(slots, order[..., None], axis=1)``, moved as bits by selects (:func:`_select_slots`).

    XLA:CPU computes a gather element by element (a bf16 one in fp32), fused with whatever uses it, where selects
    of whole rows vectorise; and on the bits, XLA cannot fuse a product before them with an add after them into one
    multiply-add, which would skip the product's fp32 rounding. Differentiable as the selects are."""
    return from_bits(_select_slots(as_bits(slots), order), slots.dtype)


@slots_in_order.defjvp
def _slots_in_order_jvp(primals, tangents):
    slots, order = primals
    return slots_in_order(slots, order), _select_slots(tangents[0], order)


def combine_slots(outputs: jax.Array, routing: Routing) -> jax.Array:
    """Weights each slot and sums the slots in ascending expert order, rounding after each add (as HF does)."""
    dtype = outputs.dtype
    weighted = (outputs * routing.weights[..., None]).astype(dtype)
    weighted = slots_in_order(weighted, jnp.argsort(routing.experts, axis=-1, stable=True))
    total = weighted[:, 0]
    for slot in range(1, weighted.shape[1]):
        total = (total + weighted[:, slot]).astype(dtype)
    return total


class SparseMoe(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        h, e = cfg.hidden_size, cfg.num_experts
        inter, shared = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.router = nnx.Param(init(rngs.params(), (h, e), dtype))
        self.gate_up = nnx.Param(init(rngs.params(), (e, h, 2 * inter), dtype))
        self.down = nnx.Param(init(rngs.params(), (e, inter, h), dtype))
        self.shared_gate_up = nnx.Param(init(rngs.params(), (h, 2 * shared), dtype))  # gate | up
        self.shared_down_proj = nnx.Param(init(rngs.params(), (shared, h), dtype))
        self.shared_expert_gate = nnx.Param(init(rngs.params(), (h, 1), dtype))

    def shared_expert(self, x: jax.Array) -> jax.Array:
        hidden = _split_gate_up(dense(x, self.shared_gate_up[...]))
        out = dense(hidden, self.shared_down_proj[...])
        return (sigmoid(dense(x, self.shared_expert_gate[...])) * out).astype(x.dtype)

    def __call__(self, x: jax.Array, backend: str = "auto") -> tuple[jax.Array, Routing]:
        """x: [..., hidden] -> (out [..., hidden], routing of the flattened tokens)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = route(x, self.router[...], self.top_k)
        outputs = self.expert_outputs(x, routing.experts, backend)
        return self.combine(x, outputs, routing).reshape(shape), routing

    def combine(self, x: jax.Array, outputs: jax.Array, routing: Routing) -> jax.Array:
        """The weighted slot outputs plus the shared expert's, per token. In the batch-invariant mode on row tiles:
        otherwise XLA fuses the slot sum with whatever produced the outputs (an expert-parallel psum, or not), and
        rounds it differently (measured: 3e-8 per layer). The shared expert's products run in the tiles too, except
        where :func:`kernel_products_whole` (then before them, on all rows, and added in the tiles).

        In the tiles the shared expert's output (a gate times a product) is added after the map, on all rows: XLA:CPU
        lets LLVM contract a multiply and the add that follows into one fused multiply-add, and whether it does
        depends on how the fusion is vectorised, which changed with the number of tiles the loop writes into (a
        16-row tile's combine, the same inputs: 1-2 tiles vectorised, 3 or more scalar, 1.5e-8 apart; a 1-token
        prompt's fp32 logits 2.4e-6 off the same prompt in a batch, dk_ne_dv). After the map the add reads two
        rounded values: nothing to contract."""
        if batch_invariant() and kernel_products_whole():
            return map_row_tiles(
                lambda rows, out, weights, experts, shared: self.combine_with(
                    rows, out, Routing(weights, experts, None), shared
                ),
                x,
                outputs,
                routing.weights,
                routing.experts,
                self.shared_expert(x),
            )
        if batch_invariant():
            routed, shared = map_row_tiles(
                lambda rows, out, weights, experts: (
                    combine_slots(out, Routing(weights, experts, None)),
                    self.shared_expert(rows),
                ),
                x,
                outputs,
                routing.weights,
                routing.experts,
            )
            return (routed + shared).astype(x.dtype)
        return self.combine_with(x, outputs, routing, self.shared_expert(x))

    def combine_with(
        self, x: jax.Array, outputs: jax.Array, routing: Routing, shared: jax.Array
    ) -> jax.Array:
        """:meth:`combine` on one set of rows, given the shared expert's output ``shared``."""
        return (combine_slots(outputs, routing) + shared).astype(x.dtype)

    def expert_outputs(self, x: jax.Array, experts: jax.Array, backend: str = "auto") -> jax.Array:
        """Each (token, slot)'s routed expert output before the weighted combine: x [N, hidden], experts [N, k] ->
        [N, k, hidden], on one device or split over the mesh's ``ep`` axis."""
        compute = expert_parallel_slot_outputs if expert_parallel_size() > 1 else slot_outputs
        return compute(x, experts, self.gate_up[...], self.down[...], expert_backend(backend))
