"""Tiny random Qwen3.5/3.6 MoE checkpoints built with transformers, and the HF reference forward.

Needs torch and transformers (the ``reference`` extra). Used by the audit demo and by the tests.

Checkpoints are seeded and saved as safetensors in the official layout. Norm weights, ``dt_bias`` and ``A_log`` are
perturbed away from HF's init (zero-centred norms initialise to 0, which would hide a wrong 1 + w convention).

The weights are scaled to behave like a trained model rather than a chaotic random one: the residual stream
dominates each layer's update, routers are decisive, and lm_head gives most positions a clear top-1. With HF's
default init, bf16 comparisons are dominated by MoE routing flips at near-ties and top-1 flips at near-ties
(measured: HF-bf16 agreed with HF-fp32 on the top-1 token at only 66-89% of positions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

PATTERN = ["linear_attention"] * 3 + ["full_attention"]
ROUTER_STD = 1.0  # decisive routers, as trained ones are: fewer top-k near-ties
OUT_STD = 0.02
LM_HEAD_STD = 0.3
CONFIDENCE = 0.2
OUTPUT_PROJECTIONS = (
    "out_proj.weight",
    "o_proj.weight",
    "experts.down_proj",
    "shared_expert.down_proj.weight",
)

#: Three configs with the real 3:1 layer pattern that differ in Hv vs Hk, experts/top-k, head dims and dk vs dv.
TINY_CONFIGS: dict[str, dict] = {
    # Hv = 2 Hk, top-2 of 8, dk == dv
    "hv2hk_top2of8": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_hidden_layers=4,
    ),
    # Hv = Hk, top-4 of 16, other head dims
    "hveqhk_top4of16": dict(
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
        linear_num_key_heads=3,
        linear_num_value_heads=3,
        linear_key_head_dim=24,
        linear_value_head_dim=24,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=8,
    ),
    # dk != dv, Hv = 2 Hk, 8 query heads on 1 KV head
    "dk_ne_dv": dict(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=24,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=16,
        num_hidden_layers=4,
    ),
}


def hf_config(name: str | dict, vocab_size: int = 256) -> Qwen3_5MoeTextConfig:
    """The HF text config of a tiny config: a name in :data:`TINY_CONFIGS` or a dict of the same fields."""
    fields = dict(TINY_CONFIGS[name] if isinstance(name, str) else name)
    n_layers = fields.pop("num_hidden_layers")
    rotary_half = int(fields["head_dim"] * 0.25) // 2
    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size,
        num_hidden_layers=n_layers,
        layer_types=PATTERN * (n_layers // 4),
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.25,
            "mrope_section": [rotary_half - 2 * (rotary_half // 3), rotary_half // 3, rotary_half // 3],
            "mrope_interleaved": True,
        },
        **fields,
    )


def build_hf_model(name: str | dict, seed: int = 1234, vocab_size: int = 256):
    """A seeded tiny fp32 HF model with perturbed norms, dt_bias and A_log, on the torch fallback path."""
    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM._from_config(hf_config(name, vocab_size), attn_implementation="eager")
    model = model.float().eval()
    model.set_experts_implementation("eager")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight", "layernorm.weight")) and "linear_attn" not in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))  # zero-centred: 1 + w
            elif pname.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=generator))
            elif pname.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif pname.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-1.0, 1.5, generator=generator))
            elif pname.endswith("mlp.gate.weight"):
                p.copy_(ROUTER_STD * torch.randn(p.shape, generator=generator))
            elif pname.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=generator))
            elif pname.endswith(OUTPUT_PROJECTIONS):  # layer updates are small next to the residual stream
                p.copy_(OUT_STD * torch.randn(p.shape, generator=generator))
            elif pname.endswith("lm_head.weight"):
                p.copy_(LM_HEAD_STD * torch.randn(p.shape, generator=generator))
            elif p.ndim >= 2:
                p.copy_(0.15 * torch.randn(p.shape, generator=generator))
        # A confident next-token map, like a trained LM's: the residual stream is dominated by the current token's
        # embedding, so aligning lm_head row perm(u) with embedding u gives most positions a clear top-1 margin.
        embed = model.model.embed_tokens.weight
        perm = torch.randperm(embed.shape[0], generator=generator)
        model.lm_head.weight.add_(CONFIDENCE * embed[perm])
    return model


def save_checkpoint(model, path: Path, max_shard_size: str | None = None) -> Path:
    """Saves in the official hub layout (fused 3-D experts); transformers' default would write per-expert keys."""
    path = Path(path)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, save_original_format=False, **kwargs)
    return path


def hf_forward(model, input_ids, attention_mask=None, position_ids=None, router_logits=False):
    """HF logits and per-layer hidden states, as float64 numpy arrays (and the router logits per layer)."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kwargs = {"output_hidden_states": True, "use_cache": False, "output_router_logits": router_logits}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        out = model(ids, **kwargs)
    as_np = lambda t: t.float().numpy().astype(np.float64)  # noqa: E731
    if router_logits:
        return (
            as_np(out.logits),
            [as_np(h) for h in out.hidden_states],
            [r.float() for r in out.router_logits],
        )
    return as_np(out.logits), [as_np(h) for h in out.hidden_states]


def load_hf_reference(path: Path, dtype: str = "float32"):
    """The HF model from a saved checkpoint, as a reference run loads it (``from_pretrained`` with ``dtype``)."""
    model = Qwen3_5MoeForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()
