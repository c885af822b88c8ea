"""The Qwen3.5/3.6 MoE text decoder: embedding, the layer stack, final norm and an untied lm_head."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.attention import GatedAttention, attend
from qwen_jax.config import ModelConfig
from qwen_jax.deltanet import GatedDeltaNet
from qwen_jax.moe import Routing, SparseMoe
from qwen_jax.norms import RMSNorm
from qwen_jax.ops import F32
from qwen_jax.rope import rope_cos_sin

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, dtype, rngs)
        else:
            self.self_attn = GatedAttention(cfg, dtype, rngs)
        self.mlp = SparseMoe(cfg, dtype, rngs)


class Qwen35MoeForCausalLM(nnx.Module):
    """Parameters of the text decoder. Run it with :func:`forward` (or the cached paths in ``generate``)."""

    def __init__(
        self, cfg: ModelConfig, dtype: str | jnp.dtype = "bfloat16", *, rngs: nnx.Rngs | None = None
    ):
        dtype = resolve_dtype(dtype)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = nnx.List([DecoderLayer(cfg, t, dtype, rngs) for t in cfg.layer_types])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype))


class ForwardOutput(NamedTuple):
    logits: jax.Array  # [B, L, vocab] in the model dtype
    hidden_states: (
        tuple[jax.Array, ...] | None
    )  # as HF: embeddings, layers 0..n-2, final-normed output of n-1
    routing: tuple[Routing, ...] | None  # per layer, for the flattened [B*L] tokens


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions that ignore left padding: cumsum(mask) - 1, and 0 on padding (as HF ``generate`` builds them)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """bool [B, L, L]: query l sees key t when t <= l and t is a real token."""
    length = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & (attention_mask[:, None, :] > 0)


def run_decoder(
    model: Qwen35MoeForCausalLM,
    input_ids,
    attention_mask,
    positions,
    moe_backend,
    cache=None,
    last_only=False,
):
    """The decoder on ``input_ids`` [B, L]: a plain forward (``cache`` None), a prefill that fills an empty
    :class:`~qwen_jax.cache.DecodeState` (L > 1), or one decode step (L == 1) that reads and extends it.

    Returns (logits, hidden states, routing, new cache or None); with ``last_only`` the logits are those of the
    last position only, [B, 1, vocab] (a prefill needs no more).
    """
    cfg = model.cfg
    length = input_ids.shape[1]
    decoding = cache is not None and length == 1
    h = jnp.take(model.embed_tokens[...], input_ids, axis=0)
    cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, h.dtype)
    if decoding:
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, jnp.ones_like(input_ids), (0, cache.length))
        mask = key_mask[:, None, :] > 0
    else:
        mask = causal_padding_mask(attention_mask)
    keys, values, conv, recurrent = [], [], [], []
    hidden, routings = [h], []
    for layer in model.layers:
        x = layer.input_layernorm(h)
        if layer.layer_type == "linear_attention":
            i = len(conv)
            x, history, state = layer.linear_attn(
                x,
                pad_mask=None if decoding else attention_mask,
                conv_history=cache.conv[i] if decoding else None,
                state=cache.recurrent[i] if decoding else None,
            )
            conv.append(history)
            recurrent.append(state)
        else:
            i = len(keys)
            q, k, v, gate = layer.self_attn.project_qkv(x, cos, sin)
            if cache is not None:
                start = cache.length if decoding else 0
                k = jax.lax.dynamic_update_slice(cache.keys[i], k, (0, start, 0, 0))
                v = jax.lax.dynamic_update_slice(cache.values[i], v, (0, start, 0, 0))
                keys.append(k)
                values.append(v)
                if not decoding:  # prefill attends to its own keys only
                    k, v = k[:, :length], v[:, :length]
            x = layer.self_attn.output(attend(q, k, v, mask), gate)
        h = (h + x).astype(h.dtype)
        x, routing = layer.mlp(layer.post_attention_layernorm(h), backend=moe_backend)
        h = (h + x).astype(h.dtype)
        hidden.append(h)
        routings.append(routing)
    hidden[-1] = model.norm(h)  # as HF: the last hidden state is the final norm's output
    final = hidden[-1][:, -1:] if last_only else hidden[-1]
    logits = jnp.matmul(final, model.lm_head[...], preferred_element_type=F32).astype(h.dtype)
    new_cache = None
    if cache is not None:
        if not decoding:
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, attention_mask.astype(jnp.int32), (0, 0))
        new_cache = cache._replace(
            keys=tuple(keys),
            values=tuple(values),
            conv=tuple(conv),
            recurrent=tuple(recurrent),
            key_mask=key_mask,
            length=(cache.length if decoding else 0) + length,
            next_position=positions[:, -1] + 1,
        )
    return logits, tuple(hidden), tuple(routings), new_cache


@functools.partial(jax.jit, static_argnames=("graphdef", "moe_backend", "extras"))
def _forward_jit(graphdef, state, input_ids, attention_mask, positions, moe_backend, extras):
    model = nnx.merge(graphdef, state)
    logits, hidden, routing, _ = run_decoder(model, input_ids, attention_mask, positions, moe_backend)
    return ForwardOutput(logits, hidden if extras else None, routing if extras else None)


def forward(
    model: Qwen35MoeForCausalLM,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    position_ids: Any = None,
    return_hidden_states: bool = False,
    moe_backend: str = "auto",
) -> jax.Array | ForwardOutput:
    """Logits [B, L, vocab] for int ``input_ids`` [B, L].

    ``attention_mask`` [B, L] is 1 for real tokens and 0 for left padding. Positions default to
    :func:`default_positions`, so a left-padded row gives the same logits as the unpadded one.
    With ``return_hidden_states=True`` returns a :class:`ForwardOutput` with per-layer hidden states and routing.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    positions = (
        default_positions(attention_mask) if position_ids is None else jnp.asarray(position_ids, jnp.int32)
    )
    graphdef, state = nnx.split(model)
    out = _forward_jit(
        graphdef, state, input_ids, attention_mask, positions, moe_backend, return_hidden_states
    )
    return out if return_hidden_states else out.logits


__all__ = [
    "ForwardOutput",
    "Qwen35MoeForCausalLM",
    "default_positions",
    "forward",
    "resolve_dtype",
    "run_decoder",
]
