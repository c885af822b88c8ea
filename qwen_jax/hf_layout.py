"""The Hugging Face checkpoint layout and how each tensor maps onto the JAX parameter tree.

One table of regex rules: an HF tensor name -> the JAX leaf (or the part of a leaf) it fills and the numpy transform
that gets it there (a view: transforms only move data). JAX kernels are [in, out] (HF stores [out, in]); HF's fused ``in_proj_qkv``/``conv1d`` are split
into q/k/v leaves; experts are [expert, in, out]. Both expert layouts are accepted: fused 3-D
(``mlp.experts.gate_up_proj``/``down_proj``) and per-expert (``mlp.experts.E.{gate,up,down}_proj.weight``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from qwen_jax.config import ModelConfig

LeafPath = tuple[str | int, ...]
Transform = Callable[[np.ndarray], np.ndarray]

#: Prefixes of the language model in composite (``model.language_model.``) and text-only (``model.``) checkpoints.
LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "model.")
#: Tensors that are read past on purpose: the MTP head and the vision tower.
SKIPPED_PREFIXES = ("mtp.", "model.visual.")
WHOLE = "whole"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: ``leaf[index] = transform(tensor)``; ``piece`` names the part for bookkeeping."""

    leaf: LeafPath
    hf_shape: tuple[int, ...]
    transform: Transform
    index: tuple = ()
    piece: object = WHOLE


def canonical_name(name: str) -> str | None:
    """Strips the language-model prefix; None for tensors that are skipped on purpose (MTP, vision)."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if name == "lm_head.weight":
        return name
    for prefix in LANGUAGE_MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _rows(start: int, stop: int, then: Transform = _t) -> Transform:
    return lambda x: then(x[start:stop])


def _conv_rows(start: int, stop: int) -> Transform:
    return lambda x: x[start:stop, 0, :].T  # [C, 1, K] -> [K, c]


def _swap_last(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _layer_rules(cfg: ModelConfig, i: int) -> dict[str, list[Target]]:
    h, e = cfg.hidden_size, cfg.num_experts
    inter, shared = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    layer: LeafPath = ("layers", i)
    rules: dict[str, list[Target]] = {
        "input_layernorm.weight": [Target((*layer, "input_layernorm", "weight"), (h,), _identity)],
        "post_attention_layernorm.weight": [
            Target((*layer, "post_attention_layernorm", "weight"), (h,), _identity)
        ],
        "mlp.gate.weight": [Target((*layer, "mlp", "router"), (e, h), _t)],
        "mlp.experts.gate_up_proj": [Target((*layer, "mlp", "gate_up"), (e, 2 * inter, h), _swap_last)],
        "mlp.experts.down_proj": [Target((*layer, "mlp", "down"), (e, h, inter), _swap_last)],
        "mlp.shared_expert.gate_proj.weight": [Target((*layer, "mlp", "shared_gate_proj"), (shared, h), _t)],
        "mlp.shared_expert.up_proj.weight": [Target((*layer, "mlp", "shared_up_proj"), (shared, h), _t)],
        "mlp.shared_expert.down_proj.weight": [Target((*layer, "mlp", "shared_down_proj"), (h, shared), _t)],
        "mlp.shared_expert_gate.weight": [Target((*layer, "mlp", "shared_expert_gate"), (1, h), _t)],
    }
    if cfg.layer_types[i] == "linear_attention":
        mixer = (*layer, "linear_attn")
        kd, vd, hv = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_num_value_heads
        conv, kernel = cfg.linear_conv_dim, cfg.linear_conv_kernel_dim
        bounds = {"q": (0, kd), "k": (kd, 2 * kd), "v": (2 * kd, conv)}
        rules |= {
            "linear_attn.in_proj_qkv.weight": [
                Target((*mixer, f"in_proj_{n}"), (conv, h), _rows(a, b), piece=n)
                for n, (a, b) in bounds.items()
            ],
            "linear_attn.conv1d.weight": [
                Target((*mixer, f"conv_{n}"), (conv, 1, kernel), _conv_rows(a, b), piece=n)
                for n, (a, b) in bounds.items()
            ],
            "linear_attn.in_proj_z.weight": [Target((*mixer, "in_proj_z"), (vd, h), _t)],
            "linear_attn.in_proj_b.weight": [Target((*mixer, "in_proj_b"), (hv, h), _t)],
            "linear_attn.in_proj_a.weight": [Target((*mixer, "in_proj_a"), (hv, h), _t)],
            "linear_attn.dt_bias": [Target((*mixer, "dt_bias"), (hv,), _identity)],
            "linear_attn.A_log": [Target((*mixer, "A_log"), (hv,), _identity)],
            "linear_attn.norm.weight": [Target((*mixer, "norm"), (cfg.linear_value_head_dim,), _identity)],
            "linear_attn.out_proj.weight": [Target((*mixer, "out_proj"), (h, vd), _t)],
        }
    else:
        mixer = (*layer, "self_attn")
        nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rules |= {
            "self_attn.q_proj.weight": [Target((*mixer, "q_proj"), (nq * 2 * d, h), _t)],
            "self_attn.k_proj.weight": [Target((*mixer, "k_proj"), (nkv * d, h), _t)],
            "self_attn.v_proj.weight": [Target((*mixer, "v_proj"), (nkv * d, h), _t)],
            "self_attn.o_proj.weight": [Target((*mixer, "o_proj"), (h, nq * d), _t)],
            "self_attn.q_norm.weight": [Target((*mixer, "q_norm"), (d,), _identity)],
            "self_attn.k_norm.weight": [Target((*mixer, "k_norm"), (d,), _identity)],
        }
    return rules


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_PER_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _per_expert_target(cfg: ModelConfig, i: int, expert: int, which: str) -> Target | None:
    if expert >= cfg.num_experts:
        return None
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    mlp: LeafPath = ("layers", i, "mlp")
    if which == "down_proj":
        return Target((*mlp, "down"), (h, inter), _t, index=(expert,), piece=(expert, which))
    columns = slice(0, inter) if which == "gate_proj" else slice(inter, 2 * inter)
    return Target(
        (*mlp, "gate_up"), (inter, h), _t, index=(expert, slice(None), columns), piece=(expert, which)
    )


def targets_for(cfg: ModelConfig, name: str) -> list[Target] | None:
    """The targets of a canonical HF tensor name, or None if this model has no such tensor."""
    if name == "embed_tokens.weight":
        return [Target(("embed_tokens",), (cfg.vocab_size, cfg.hidden_size), _identity)]
    if name == "lm_head.weight":
        return [Target(("lm_head",), (cfg.vocab_size, cfg.hidden_size), _t)]
    if name == "norm.weight":
        return [Target(("norm", "weight"), (cfg.hidden_size,), _identity)]
    match = _LAYER.match(name)
    if not match or int(match.group(1)) >= cfg.num_hidden_layers:
        return None
    i, rest = int(match.group(1)), match.group(2)
    expert = _PER_EXPERT.match(rest)
    if expert:
        target = _per_expert_target(cfg, i, int(expert.group(1)), expert.group(2))
        return None if target is None else [target]
    return _layer_rules(cfg, i).get(rest)


def pieces_complete(cfg: ModelConfig, leaf: LeafPath, pieces: set) -> bool:
    """Whether the pieces set for a leaf fill it exactly once: one whole tensor (or one q/k/v slice of a fused
    one), or every expert's parts with nothing else."""
    per_expert = {p for p in pieces if isinstance(p, tuple)}
    if not per_expert:
        return len(pieces) == 1
    parts = ("down_proj",) if leaf[-1] == "down" else ("gate_proj", "up_proj")
    return pieces == {(e, w) for e in range(cfg.num_experts) for w in parts}


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The official (fused-expert) checkpoint layout of the language model, by ``model.language_model.`` name."""
    shapes = {
        "model.language_model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.language_model.norm.weight": (cfg.hidden_size,),
        "lm_head.weight": (cfg.vocab_size, cfg.hidden_size),
    }
    for i in range(cfg.num_hidden_layers):
        for rest, targets in _layer_rules(cfg, i).items():
            shapes[f"model.language_model.layers.{i}.{rest}"] = targets[0].hf_shape
    return shapes
