"""The full-size Qwen3.6-35B-A3B model, checked by shape only (jax.eval_shape: nothing is materialised)."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.hf_layout import expected_hf_tensors, targets_for
from qwen_jax.model import Qwen35MoeForCausalLM

OFFICIAL_TOTAL = 34_660_610_688


def abstract_leaves(cfg: ModelConfig) -> dict:
    _, state = nnx.split(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, "bfloat16")))
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def test_parameter_count_is_official_total():
    leaves = abstract_leaves(ModelConfig.qwen3_6_35b_a3b())
    assert sum(math.prod(s.shape) for s in leaves.values()) == OFFICIAL_TOTAL


def test_every_shape_equals_the_checkpoint_layout():
    """Each official tensor (spec §3 layout) maps onto JAX leaves whose shapes match its transform, and the
    layout itself has the official total."""
    cfg = ModelConfig.qwen3_6_35b_a3b()
    leaves = abstract_leaves(cfg)
    layout = expected_hf_tensors(cfg)
    assert sum(math.prod(s) for s in layout.values()) == OFFICIAL_TOTAL
    assert len(layout) == 693  # the language-model tensors of the official checkpoint, lm_head included
    spot = {
        "model.language_model.embed_tokens.weight": (248320, 2048),
        "model.language_model.layers.0.linear_attn.in_proj_qkv.weight": (8192, 2048),
        "model.language_model.layers.0.linear_attn.conv1d.weight": (8192, 1, 4),
        "model.language_model.layers.0.linear_attn.out_proj.weight": (2048, 4096),
        "model.language_model.layers.3.self_attn.q_proj.weight": (8192, 2048),
        "model.language_model.layers.3.self_attn.k_proj.weight": (512, 2048),
        "model.language_model.layers.3.self_attn.o_proj.weight": (2048, 4096),
        "model.language_model.layers.39.mlp.experts.gate_up_proj": (256, 1024, 2048),
        "model.language_model.layers.39.mlp.experts.down_proj": (256, 2048, 512),
        "model.language_model.layers.5.mlp.shared_expert_gate.weight": (1, 2048),
        "lm_head.weight": (248320, 2048),
    }
    for name, shape in spot.items():
        assert layout[name] == shape, name
    columns_set = {}  # how often each column of a side-by-side leaf is set
    for name, shape in layout.items():
        canonical = name.removeprefix("model.language_model.")
        for target in targets_for(cfg, canonical):
            assert target.hf_shape == shape
            out = target.transform(np.broadcast_to(np.int8(0), shape))  # a zero-stride stand-in of that shape
            leaf = np.broadcast_to(np.int8(0), leaves[target.leaf].shape)
            assert out.shape == leaf[target.index].shape, (name, target.leaf)
            count = columns_set.setdefault(target.leaf, np.zeros(leaf.shape[-1], int))
            count[np.arange(leaf.shape[-1])[target.index[-1] if target.index else slice(None)]] += 1
    assert set(columns_set) == set(leaves)
    for leaf, count in columns_set.items():
        assert (count == 1).all(), leaf  # the parts of a side-by-side leaf tile it exactly once
