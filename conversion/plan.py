"""``plan``: parameter counts by group and bytes per device for a config on a mesh, from shapes only.

Everything is derived, nothing typed in: the parameter shapes come from ``nnx.eval_shape`` of the real model, each
leaf's per-device shard from :func:`qwen_jax.sharding.param_spec` (experts split on ``ep``, the rest replicated), and
the decode state from ``jax.eval_shape`` of :func:`qwen_jax.cache.init_decode_state` (KV cache and DeltaNet conv
history in the weight dtype, DeltaNet recurrent state in fp32; replicated, or split on ``dp`` by batch as
:func:`qwen_jax.sharding.activation_spec` says).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from conversion import UsageError
from conversion.layout import abstract_leaves
from qwen_jax.cache import DeltaNetState, KVCache, init_decode_state
from qwen_jax.config import ModelConfig
from qwen_jax.model import resolve_dtype
from qwen_jax.sharding import DP, EP, param_spec

_abstract_leaves = functools.cache(abstract_leaves)  # eval_shape of the full model takes seconds
GROUPS = (
    "embeddings",
    "lm_head",
    "attention",
    "deltanet",
    "routed_experts",
    "shared_experts",
    "routers",
    "norms",
)
GIB = 1024**3
#: Memory per device of the two target machines, in bytes, and the fraction of it a plan may use.
DEVICES = {
    "8xA100-80GB": {"count": 8, "bytes": 80 * GIB},  # 81920 MiB per A100 80GB
    "1xH200-141GB": {"count": 1, "bytes": 141 * 10**9},  # the nominal 141 GB (nvidia-smi shows a little more)
}
USABLE_FRACTION = 0.9
HEADROOM = (
    "fits = weights + decode state <= 90% of device memory; the other 10% is left for XLA's workspace, one "
    "step's activations (prefill chunks are not counted here), compiled programs and allocator fragmentation"
)


def leaf_group(path: tuple) -> str:
    last = path[-1] if path[-1] != "weight" else path[-2]
    if path == ("embed_tokens",):
        return "embeddings"
    if path == ("lm_head",):
        return "lm_head"
    if last in ("norm", "q_norm", "k_norm", "input_layernorm", "post_attention_layernorm"):
        return "norms"
    if "self_attn" in path:
        return "attention"
    if "linear_attn" in path:
        return "deltanet"
    if last in ("gate_up", "down"):
        return "routed_experts"
    if str(last).startswith("shared_"):
        return "shared_experts"
    if last == "router":
        return "routers"
    raise ValueError(f"parameter {'.'.join(map(str, path))} belongs to no group")


def parse_mesh(text: str, cfg: ModelConfig) -> dict[str, int]:
    """``"ep=8"`` or ``"dp=2,ep=4"`` -> {"dp": 2, "ep": 4}; UsageError if malformed or ep does not divide E."""
    mesh = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in (EP, DP) or not value.isdigit() or int(value) < 1 or name in mesh:
            raise UsageError(
                f"--mesh {text!r}: expected axis=size pairs over ep and dp, e.g. ep=8 or dp=2,ep=4"
            )
        mesh[name] = int(value)
    mesh.setdefault(DP, 1)
    mesh.setdefault(EP, 1)
    if cfg.num_experts % mesh[EP]:
        raise UsageError(f"--mesh {text!r}: ep={mesh[EP]} does not divide num_experts={cfg.num_experts}")
    return mesh


def shard_shape(shape: tuple[int, ...], spec: P, mesh: dict[str, int]) -> tuple[int, ...]:
    out = list(shape)
    for i, axis in enumerate(spec):
        if axis is not None:
            out[i] = math.ceil(out[i] / mesh[axis])
    return tuple(out)


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def state_bytes(cfg: ModelConfig, batch: int, context: int, dtype, mesh: dict[str, int]) -> dict[str, int]:
    """Per-device bytes of the decode state by part (the batch axis is split on dp, the rest replicated)."""
    state = jax.eval_shape(lambda: init_decode_state(cfg, batch, context, resolve_dtype(dtype)))

    def per_device(arrays) -> int:
        total = 0
        for a in jax.tree.leaves(arrays):
            shape = shard_shape(a.shape, P(DP) if a.ndim else P(), mesh)
            total += nbytes(shape, a.dtype)
        return total

    return {
        "kv_cache": per_device(state.of_type(KVCache)),
        "deltanet_conv": per_device([s.conv for s in state.of_type(DeltaNetState)]),
        "deltanet_recurrent_fp32": per_device([s.recurrent for s in state.of_type(DeltaNetState)]),
        "masks_and_positions": per_device((state.key_mask, state.length, state.next_position)),
    }


def memory_plan(
    config: str | Path | None = None,
    mesh: str = "ep=8",
    batch: int = 1,
    context: int = 32768,
    dtype: str = "bfloat16",
) -> dict:
    if config is None:
        cfg = ModelConfig.qwen3_6_35b_a3b()
        config_name = "qwen_jax/data/qwen3_6_35b_a3b_config.json (packaged)"
    else:
        if not Path(config).exists():
            raise UsageError(f"{config}: config file not found")
        cfg = ModelConfig.from_json(config)
        config_name = str(config)
    if batch < 1 or context < 1:
        raise UsageError(f"--batch {batch} / --context {context}: both must be positive")
    axes = parse_mesh(mesh, cfg)
    if batch % axes[DP]:
        raise UsageError(f"--mesh {mesh!r}: dp={axes[DP]} does not divide --batch {batch}")
    leaves = _abstract_leaves(cfg, dtype)
    params: dict[str, int] = defaultdict(int)
    weight_bytes: dict[str, int] = defaultdict(int)
    for path, spec in leaves.items():
        group = leaf_group(path)
        params[group] += math.prod(spec.shape)
        weight_bytes[group] += nbytes(shard_shape(spec.shape, param_spec(path), axes), spec.dtype)
    weights = sum(weight_bytes.values())
    state = state_bytes(cfg, batch, context, dtype, axes)
    total = weights + sum(state.values())

    def per_device_total(machine_mesh: dict[str, int]) -> int:
        w = sum(nbytes(shard_shape(s.shape, param_spec(p), machine_mesh), s.dtype) for p, s in leaves.items())
        return w + sum(state_bytes(cfg, batch, context, dtype, machine_mesh).values())

    fits = {}
    for machine, spec in DEVICES.items():
        # the --mesh when it uses exactly this machine's devices, else all of them on ep
        machine_mesh = axes if axes[DP] * axes[EP] == spec["count"] else {DP: 1, EP: spec["count"]}
        if batch % machine_mesh[DP]:
            machine_mesh = {DP: 1, EP: spec["count"]}
        need = per_device_total(machine_mesh)
        usable = int(spec["bytes"] * USABLE_FRACTION)
        fits[machine] = {
            "mesh": ",".join(f"{k}={v}" for k, v in sorted(machine_mesh.items())),
            "bytes_per_device": need,
            "device_bytes": spec["bytes"],
            "usable_bytes": usable,
            "fits": need <= usable,
        }
    return {
        "config": config_name,
        "dtype": dtype,
        "mesh": axes,
        "batch": batch,
        "context": context,
        "params_by_group": {g: params[g] for g in GROUPS},
        "total_params": sum(params.values()),
        "weight_bytes_per_device_by_group": {g: weight_bytes[g] for g in GROUPS},
        "weight_bytes_per_device": weights,
        "state_bytes_per_device": state,
        "total_bytes_per_device": total,
        "fits": fits,
        "headroom": HEADROOM,
    }


def format_plan(plan: dict) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in sorted(plan["mesh"].items()))

    def gib(b: int) -> str:
        return f"{b / GIB:,.2f} GiB" if b >= GIB else f"{b / 2**20:,.2f} MiB"

    lines = [
        f"config {plan['config']}, {plan['dtype']} weights, mesh {mesh}, batch {plan['batch']}, "
        f"context {plan['context']}",
        "",
        f"| group | parameters | per device ({mesh}) |",
        "| --- | ---: | ---: |",
    ]
    for g in GROUPS:
        lines.append(
            f"| {g} | {plan['params_by_group'][g]:,} | {gib(plan['weight_bytes_per_device_by_group'][g])} |"
        )
    lines.append(f"| **total** | **{plan['total_params']:,}** | **{gib(plan['weight_bytes_per_device'])}** |")
    for part, b in plan["state_bytes_per_device"].items():
        lines.append(f"| state: {part} | | {gib(b)} |")
    lines.append(f"| **weights + state** | | **{gib(plan['total_bytes_per_device'])}** |")
    lines.append("")
    for machine, f in plan["fits"].items():
        verdict = "fits" if f["fits"] else "does NOT fit"
        lines.append(
            f"{machine} ({f['mesh']}): {gib(f['bytes_per_device'])} per device of {gib(f['usable_bytes'])} usable "
            f"({gib(f['device_bytes'])} total): {verdict}"
        )
    lines.append(f"assumption: {plan['headroom']}")
    return "\n".join(lines)
