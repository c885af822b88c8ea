"""bf16 stays bf16: XLA's own buffer assignment for the real widths (2 layers, abstract weights: nothing allocated)
holds no fp32 copy of the weights, and a prefill's temp does not grow with the layers. The buffers that keep it
small change no value: the lm_head in row chunks, the expert-parallel psum on the bits. The full-size figures are
``bench/full_size_memory.py``'s."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import model
from qwen_jax.cache import init_decode_state
from qwen_jax.config import ModelConfig
from qwen_jax.model import Qwen35MoeForCausalLM, _forward_jit
from qwen_jax.ops import dense
from qwen_jax.sharding import disjoint_psum

generate = importlib.import_module("qwen_jax.generate")


def two_real_width_layers(layer_types=("linear_attention", "full_attention")):
    full = ModelConfig.qwen3_6_35b_a3b()
    cfg = dataclasses.replace(full, num_hidden_layers=len(layer_types), layer_types=layer_types)
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


@pytest.mark.slow
def test_prefill_temp_does_not_grow_with_the_layers():
    """Each layer's loop buffers (the delta rule's chunk outputs, attention's accumulator) are made when the layer
    runs: a constant initial buffer was copied at the start of the program, every layer's at once (64 MiB per layer
    for 4096 tokens at full size). At 512 tokens, 4 (DeltaNet, attention) pairs against 1: +64 MiB of temp before,
    +17 MiB now (what still grows is each layer's decode state: a DeltaNet's 2 MiB fp32 state and its copy, the
    keys and values)."""
    temps = []
    for pairs in (1, 4):
        _, (graphdef, params) = two_real_width_layers(("linear_attention", "full_attention") * pairs)
        ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
        compiled = generate._prefill.lower(graphdef, params, ids, ids, 768, "auto").compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temps[1] - temps[0] < 32 * 2**20, temps


def test_lm_head_in_row_chunks_equals_one_product():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 37, 64)), jnp.bfloat16)  # 74 rows: 9 chunks of 8, the last padded
    w = jnp.asarray(0.1 * rng.standard_normal((64, 1000)), jnp.bfloat16)
    whole = jax.jit(dense)(h, w)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "LOGITS_CHUNK", 8)
        chunked = jax.jit(model.lm_head_logits)(h, w)
        program = jax.jit(model.lm_head_logits).lower(h, w).as_text()
    assert "while" in program  # the rows were chunked
    assert chunked.dtype == jnp.bfloat16 and chunked.shape == (2, 37, 1000)
    np.testing.assert_array_equal(np.asarray(chunked, np.float32), np.asarray(whole, np.float32))
    one_product = jax.jit(model.lm_head_logits).lower(h.astype(jnp.float32), w.astype(jnp.float32)).as_text()
    assert "while" not in one_product  # fp32 logits are the product itself: no chunks


def _bits(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(6, 10), (6, 5, 2), (60,), (12, 5)])  # (12, 5): bf16 values unpaired
def test_disjoint_psum_is_the_one_devices_value_bit_for_bit(dtype, shape):
    """Each position non-zero on one device at most (as an expert-parallel slot output): the sum is that value
    exactly, -0.0, infinities and NaN included (vmap's named axis stands for 4 devices)."""
    rng = np.random.default_rng(0)
    values = np.array(jnp.asarray(rng.standard_normal(60) * 1e3, dtype), np.float32)
    values[:4] = [-0.0, np.inf, -np.inf, np.nan]
    owner = rng.integers(0, 4, size=60)
    per_device = np.where(owner == np.arange(4)[:, None], values, 0.0).reshape(4, *shape)
    summed = jax.vmap(lambda x: disjoint_psum(x, "ep"), axis_name="ep")(jnp.asarray(per_device, dtype))
    assert summed.dtype == dtype and summed.shape == (4, *shape)
    expected = _bits(jnp.asarray(values.reshape(shape), dtype))
    for device in range(4):
        np.testing.assert_array_equal(_bits(summed[device]), expected)


def test_disjoint_psum_differentiates_as_psum():
    rng = np.random.default_rng(0)
    owner = rng.integers(0, 4, size=(3, 6))
    parts = jnp.asarray(
        np.where(owner == np.arange(4)[:, None, None], rng.standard_normal((3, 6)), 0.0), jnp.float32
    )

    def loss(psum):
        return lambda x: jnp.sum(jax.vmap(lambda part: psum(part, "ep"), axis_name="ep")(x) ** 3)

    np.testing.assert_array_equal(jax.grad(loss(disjoint_psum))(parts), jax.grad(loss(jax.lax.psum))(parts))
