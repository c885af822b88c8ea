"""Where every tensor lives on the device mesh: the one place that says it.

The default mesh is ``("ep",)`` over all devices. Routed experts are split on ``ep`` (at full size, 32 of the 256
experts per device on 8 devices); every other parameter, the activations and the decode state are replicated.
An optional ``("dp", "ep")`` mesh adds data parallelism over the batch. Any ``ep`` size that divides
``num_experts`` works.

Expert parallelism needs no all-to-all: tokens are replicated, each device runs only the (token, slot) assignments
of its own experts (:func:`qwen_jax.moe.slot_outputs` gives exact zeros for the others), and one ``psum`` over
``ep`` combines them (:func:`disjoint_psum`: on the values' bits, so it is exact and not computed in fp32). The
slots are then added in the same fixed order as on one device: the result does not depend on the device count.

Use it as::

    mesh = make_mesh()                       # ("ep",) over jax.devices()
    model = shard_model(model, mesh)
    with jax.set_mesh(mesh):
        logits = qwen_jax.forward(model, ids)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from qwen_jax.config import ModelConfig
from qwen_jax.ops import as_bits, from_bits

EP = "ep"
DP = "dp"
#: Parameter leaves split on the expert axis (their leading dimension is the expert).
EXPERT_LEAVES = ("gate_up", "down")


def make_mesh(ep: int | None = None, dp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``("ep",)`` mesh (or ``("dp", "ep")`` when ``dp > 1``) over ``devices`` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    ep = ep or len(devices) // dp
    if ep * dp != len(devices):
        raise ValueError(f"mesh dp={dp} x ep={ep} does not use the {len(devices)} devices given")
    shape, names = ((dp, ep), (DP, EP)) if dp > 1 else ((ep,), (EP,))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def check_mesh(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> None:
    ep = mesh.shape.get(EP, 1)
    if cfg.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={cfg.num_experts}")


def param_spec(path: tuple) -> P:
    """The partition spec of a parameter leaf, by its path in the model."""
    return P(EP, None, None) if path[-1] in EXPERT_LEAVES else P()


def param_sharding(path: tuple, mesh: jax.sharding.Mesh | None = None) -> jax.sharding.Sharding:
    """Where a parameter leaf is placed when a model is loaded: ``NamedSharding(mesh, param_spec(path))``, or the
    first device without a mesh."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, param_spec(path))


def activation_spec(mesh: jax.sharding.Mesh) -> P:
    """Activations and the decode state: batch over ``dp`` when the mesh has it, else replicated."""
    return P(DP) if DP in mesh.axis_names else P()


def param_shardings(model, mesh: jax.sharding.Mesh) -> dict[tuple, NamedSharding]:
    """{leaf path: NamedSharding} for every parameter of ``model``."""
    _, state = nnx.split(model)
    return {path: NamedSharding(mesh, param_spec(path)) for path, _ in nnx.to_flat_state(state)}


def shard_model(model, mesh: jax.sharding.Mesh):
    """The model with every parameter placed on ``mesh`` by :func:`param_spec` (experts split on ``ep``)."""
    check_mesh(model.cfg, mesh)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, param_spec(path))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def expert_parallel_size() -> int:
    """The ``ep`` size of the mesh set with ``jax.set_mesh`` (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape.get(EP, 1) if mesh is not None and not mesh.empty else 1


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def disjoint_psum(x: jax.Array, axis: str) -> jax.Array:
    """``psum(x, axis)`` of a float ``x`` that is +0.0 on every device but at most one at each position, summed on its
    bits as unsigned integers: adding zero bit patterns is exact, so the result is that one device's value, bit for
    bit (-0.0 included). XLA:CPU computes a bf16 all-reduce in fp32: its operand, result and consumer are fp32
    copies, [tokens, slots, hidden] each in the MoE (256 MiB for 4096 tokens at full size); on the bits the
    all-reduce is one buffer of ``x``'s size. Two bf16 values are summed as one uint32 (the other devices' bits are
    zero, so no carry crosses from one half to the other). Its derivative is ``psum``'s."""
    if x.dtype.itemsize not in (2, 4):
        return jax.lax.psum(x, axis)
    if x.dtype.itemsize == 2 and x.ndim and x.shape[-1] % 2 == 0:  # two bf16 values per uint32
        bits = jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 2), jnp.uint32)
        return jax.lax.bitcast_convert_type(jax.lax.psum(bits, axis), x.dtype).reshape(x.shape)
    return from_bits(jax.lax.psum(as_bits(x), axis), x.dtype)


@disjoint_psum.defjvp
def _disjoint_psum_jvp(axis, primals, tangents):
    return disjoint_psum(primals[0], axis), jax.lax.psum(tangents[0], axis)
