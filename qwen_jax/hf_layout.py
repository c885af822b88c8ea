"""The Hugging Face checkpoint layout and how each tensor maps onto the JAX parameter tree.

One table of regex rules: an HF tensor name -> the JAX leaf (or the part of a leaf) it fills and the numpy transform
that gets it there (a view: transforms only move data). JAX kernels are [in, out] (HF stores [out, in]); experts are
[expert, in, out]. Projections that read the same input are one leaf, so that a decode step reads them in one
matmul: the DeltaNet's ``in_proj`` is HF's ``in_proj_qkv | in_proj_z | in_proj_b | in_proj_a`` side by side, the
attention's ``qkv_proj`` is ``q_proj | k_proj | v_proj``, the shared expert's ``shared_gate_up`` is
``gate_proj | up_proj``. Both expert layouts are accepted: fused 3-D (``mlp.experts.gate_up_proj``/``down_proj``)
and per-expert (``mlp.experts.E.{gate,up,down}_proj.weight``).
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


def _conv(x: np.ndarray) -> np.ndarray:
    return x[:, 0, :].T  # [C, 1, K] -> [K, C]


def _swap_last(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _unconv(x: np.ndarray) -> np.ndarray:
    return x.T[:, None, :]  # [K, C] -> [C, 1, K]


#: Each transform's inverse (also a view): a region of a leaf seen in the HF tensor's layout, to be written into.
_INVERSE: dict[Transform, Transform] = {_identity: _identity, _t: _t, _swap_last: _swap_last, _conv: _unconv}
#: Transforms that keep the leading axis where it is (row r of the tensor lands in row r of the leaf).
_KEEP_LEADING_AXIS = (_identity, _swap_last)


def hf_view(target: Target, region: np.ndarray) -> np.ndarray:
    """``region`` (the part of the leaf that ``target`` sets, ``leaf[target.index]``) in the HF tensor's layout: a
    writable view, so that ``hf_view(target, region)[...] = tensor`` sets ``region = target.transform(tensor)``."""
    return _INVERSE[target.transform](region)


def keeps_leading_axis(target: Target) -> bool:
    """Whether rows a:b of the leaf are rows a:b of the tensor (a whole-leaf target whose transform keeps axis 0),
    so that a slice of the leaf's leading axis can be read as a byte range of the tensor."""
    return not target.index and target.transform in _KEEP_LEADING_AXIS


def _side_by_side(leaf: LeafPath, widths: dict[str, int], hidden: int) -> dict[str, Target]:
    """Targets that put HF [width, hidden] matrices side by side as column blocks of one [hidden, sum(widths)]
    leaf, in ``widths`` order (part name -> width)."""
    targets, start = {}, 0
    for name, width in widths.items():
        columns = slice(start, start + width)
        targets[name] = Target(leaf, (width, hidden), _t, index=(slice(None), columns), piece=name)
        start += width
    return targets


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
        **{
            f"mlp.shared_expert.{name}.weight": [target]
            for name, target in _side_by_side(
                (*layer, "mlp", "shared_gate_up"), {"gate_proj": shared, "up_proj": shared}, h
            ).items()
        },
        "mlp.shared_expert.down_proj.weight": [Target((*layer, "mlp", "shared_down_proj"), (h, shared), _t)],
        "mlp.shared_expert_gate.weight": [Target((*layer, "mlp", "shared_expert_gate"), (1, h), _t)],
    }
    if cfg.layer_types[i] == "linear_attention":
        mixer = (*layer, "linear_attn")
        vd, hv = cfg.linear_value_dim, cfg.linear_num_value_heads
        conv, kernel = cfg.linear_conv_dim, cfg.linear_conv_kernel_dim
        in_proj = _side_by_side((*mixer, "in_proj"), cfg.linear_in_proj_widths, h)
        rules |= {f"linear_attn.in_proj_{name}.weight": [target] for name, target in in_proj.items()}
        rules |= {
            "linear_attn.conv1d.weight": [Target((*mixer, "conv"), (conv, 1, kernel), _conv)],
            "linear_attn.dt_bias": [Target((*mixer, "dt_bias"), (hv,), _identity)],
            "linear_attn.A_log": [Target((*mixer, "A_log"), (hv,), _identity)],
            "linear_attn.norm.weight": [Target((*mixer, "norm"), (cfg.linear_value_head_dim,), _identity)],
            "linear_attn.out_proj.weight": [Target((*mixer, "out_proj"), (h, vd), _t)],
        }
    else:
        mixer = (*layer, "self_attn")
        nq, d = cfg.num_attention_heads, cfg.head_dim
        qkv_proj = _side_by_side((*mixer, "qkv_proj"), cfg.attention_qkv_widths, h)
        rules |= {f"self_attn.{name}_proj.weight": [target] for name, target in qkv_proj.items()}
        rules |= {
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


def side_by_side_parts(cfg: ModelConfig, leaf: LeafPath) -> set[str]:
    """The part names of a side-by-side leaf (e.g. ``{"qkv", "z", "b", "a"}`` for ``in_proj``); empty for others."""
    if leaf[0] != "layers":
        return set()
    parts = {t.piece for targets in _layer_rules(cfg, leaf[1]).values() for t in targets if t.leaf == leaf}
    return parts - {WHOLE}


def pieces_complete(cfg: ModelConfig, leaf: LeafPath, pieces: set) -> bool:
    """Whether the pieces set for a leaf fill it exactly once: one whole tensor, every part of a side-by-side
    leaf, or every expert's parts with nothing else."""
    per_expert = {p for p in pieces if isinstance(p, tuple)}
    if not per_expert:
        return pieces == (side_by_side_parts(cfg, leaf) or {WHOLE})
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
