"""bench/roofline.py: the bytes a batch-1 decode step reads (what bounds its speed by the memory's bandwidth)."""

import dataclasses
import sys
from pathlib import Path

from flax import nnx

import qwen_jax
from qwen_jax.model import Qwen35MoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import roofline


def test_a_step_reads_one_embedding_row_at_most_and_top_k_of_the_routed_experts():
    sizes = {
        "embed_tokens": 1000,
        "lm_head": 1000,
        "layers/0/mlp/gate_up": 800,
        "layers/0/mlp/down": 400,
        "layers/0/mlp/shared_gate_up": 30,
        "layers/0/self_attn/qkv_proj": 50,
    }
    assert roofline.decode_step_bytes(sizes, top_k=2, n_experts=8) == 1000 + 200 + 100 + 30 + 50


def test_the_real_width_two_layer_model_reads_its_lm_head_and_nine_experts_a_layer():
    cfg = dataclasses.replace(
        qwen_jax.ModelConfig.qwen3_6_35b_a3b(),
        num_hidden_layers=2,
        layer_types=("linear_attention", "full_attention"),
    )
    model = nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, "bfloat16"))
    step = roofline.model_decode_step_bytes(model)
    h, e = cfg.hidden_size, cfg.moe_intermediate_size
    lm_head = 2 * h * cfg.vocab_size
    experts = 2 * 2 * cfg.num_experts_per_tok * 3 * h * e  # 2 layers x top-8 x (gate, up, down), bf16
    assert lm_head + experts < step < lm_head + experts + 150e6  # + projections, router, shared expert, norms
    bound = roofline.bound(step, bandwidth=30e9, reference_tok_s=12.0)
    assert (
        bound["max_tokens_per_s"] == 30e9 / step and bound["max_ratio_over_reference"] == 30e9 / step / 12.0
    )


def test_the_real_width_summary_gives_the_decode_ceiling_as_a_multiple_of_hf():
    import real_width

    def side(decode_s, **extra):
        return {"prefill_s": [1.0], "decode_s": [decode_s], "tokens": [1, 2], "weight_bytes": 10, **extra}

    run = {"peak_rss_bytes": 11, "load_s": 1.0}
    rounds = [{"hf": side(5.0, **run), "jax": side(4.0, decode_step_bytes=2 * 10**9, **run)}]
    summary = real_width.summarise("bfloat16", rounds, bandwidth=10e9)
    hf_tok_s = real_width.NEW / 5.0
    assert summary["decode_roofline"]["max_tokens_per_s"] == 5.0
    assert summary["decode_roofline"]["max_ratio_over_reference"] == 5.0 / hf_tok_s
