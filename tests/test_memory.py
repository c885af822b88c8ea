"""bf16 stays bf16: XLA's own buffer assignment for the real widths (2 layers, abstract weights: nothing allocated)
holds no fp32 copy of the weights. The full-size figures are ``bench/full_size_memory.py``'s."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qwen_jax.cache import init_decode_state
from qwen_jax.config import ModelConfig
from qwen_jax.model import Qwen35MoeForCausalLM, _forward_jit

generate = importlib.import_module("qwen_jax.generate")


def two_real_width_layers():
    full = ModelConfig.qwen3_6_35b_a3b()
    cfg = dataclasses.replace(full, num_hidden_layers=2, layer_types=("linear_attention", "full_attention"))
    return cfg, nnx.split(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, "bfloat16")))


@pytest.mark.slow
def test_bf16_programs_hold_no_fp32_copy_of_the_weights():
    cfg, (graphdef, params) = two_real_width_layers()
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    state = jax.eval_shape(lambda: init_decode_state(cfg, 1, 768, jnp.bfloat16))
    logits = jax.ShapeDtypeStruct((1, cfg.vocab_size), jnp.bfloat16)
    stop = jax.ShapeDtypeStruct((2,), jnp.int32)
    programs = {
        "decode": generate._decode_loop.lower(graphdef, params, logits, state, i32, stop, i32, "auto", False),
        "prefill": generate._prefill.lower(graphdef, params, ids, ids, 768, "auto"),
        "forward": _forward_jit.lower(graphdef, params, ids, ids, ids, "auto", False),
    }
    for name, lowered in programs.items():
        memory = lowered.compile().memory_analysis()
        # an fp32 copy of the experts alone would be 2x the arguments; the forward's own fp32 logits
        # [512, 248320] are 0.5 GB of the 6.7 GB of weights
        limit = 0.1 * memory.argument_size_in_bytes
        assert memory.temp_size_in_bytes < limit, (name, memory.temp_size_in_bytes, limit)
