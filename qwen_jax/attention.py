"""Gated grouped-query attention (the full-attention layers, one in four).

One projection ``qkv_proj`` = HF's ``q_proj | k_proj | v_proj`` side by side. Its q part produces, per head,
``[q_h | gate_h]`` interleaved; q and k get a zero-centred RMSNorm over head_dim
and partial RoPE; the attention output is multiplied by ``sigmoid(gate)`` before ``o_proj``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.norms import rms_norm
from qwen_jax.ops import F32, dense, sigmoid, split_columns
from qwen_jax.rope import apply_rope

MASKED = jnp.finfo(F32).min


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped KV heads, mirroring HF's eager path.

    q: [B, L, Hq, D]; k, v: [B, T, Hkv, D]; mask: bool [B, L, T], True where query l may see key t.
    Query head h uses KV head h // (Hq // Hkv). Scores are rounded to the activation dtype, softmax runs in fp32,
    and the probabilities are rounded back before the value matmul. Returns [B, L, Hq, D].
    """
    b, length, n_q, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, length, n_kv, n_q // n_kv, d)
    scores = jnp.einsum("blkgd,btkd->bkglt", q, k, preferred_element_type=F32).astype(q.dtype)
    scores = (scores.astype(F32) * d**-0.5).astype(q.dtype).astype(F32)  # torch scales with an fp32 scalar
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglt,btkd->blkgd", probs, v, preferred_element_type=F32).astype(v.dtype)
    return out.reshape(b, length, n_q, d)


class GatedAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.qkv_proj = nnx.Param(init(rngs.params(), (h, sum(cfg.attention_qkv_widths.values())), dtype))
        self.o_proj = nnx.Param(init(rngs.params(), (cfg.num_attention_heads * d, h), dtype))
        self.q_norm = nnx.Param(jnp.zeros((d,), dtype))
        self.k_norm = nnx.Param(jnp.zeros((d,), dtype))

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, ...]:
        """Returns q, k (normed, rotated), v and the output gate for the tokens in ``x`` [B, L, hidden]."""
        cfg = self.cfg
        b, length, _ = x.shape
        d, eps = cfg.head_dim, cfg.rms_norm_eps
        q_and_gate, k, v = split_columns(dense(x, self.qkv_proj[...]), cfg.attention_qkv_widths)
        q_and_gate = q_and_gate.reshape(b, length, cfg.num_attention_heads, 2 * d)
        q, gate = q_and_gate[..., :d], q_and_gate[..., d:]
        q = rms_norm(q, self.q_norm[...], eps)
        k = rms_norm(k.reshape(b, length, -1, d), self.k_norm[...], eps)
        v = v.reshape(b, length, -1, d)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate.reshape(b, length, -1)

    def output(self, attn: jax.Array, gate: jax.Array) -> jax.Array:
        b, length = attn.shape[:2]
        gated = (attn.reshape(b, length, -1) * sigmoid(gate)).astype(attn.dtype)
        return dense(gated, self.o_proj[...])

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v, gate = self.project_qkv(x, cos, sin)
        return self.output(attend(q, k, v, mask), gate)
