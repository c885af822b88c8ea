"""The Qwen3.5/3.6 MoE text decoder: embedding, the layer stack, final norm and an untied lm_head.

Read top-down: :func:`run_decoder` embeds the tokens, runs each :class:`DecoderLayer` (token mixer, then the sparse
MoE, each behind an RMSNorm and a residual add) and applies the final norm and lm_head. A layer's token mixer is a
full-attention block (:mod:`qwen_jax.attention`) or a Gated DeltaNet block (:mod:`qwen_jax.deltanet`); each owns its
decode state (:mod:`qwen_jax.cache`) and computes ``(x, context, state) -> (out, new state)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.attention import GatedAttention
from qwen_jax.cache import DecodeState, LayerState, TokenContext
from qwen_jax.config import ModelConfig
from qwen_jax.deltanet import GatedDeltaNet
from qwen_jax.invariance import (
    batch_invariant,
    batch_invariant_mode,
    check_right_padded,
    decode_step_mode,
    fence,
    row_tiles,
    untiled_rows,
)
from qwen_jax.moe import Routing, SparseMoe, router_logits
from qwen_jax.norms import RMSNorm
from qwen_jax.ops import dense, tie_to
from qwen_jax.rope import rope_cos_sin

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


#: The intermediates ``forward(..., capture=...)`` can return per layer; README "Intermediates" gives their shapes.
CAPTURABLE = (
    "attention_probs",
    "deltanet_state",
    "expert_outputs",
    "hidden_states",
    "router_logits",
    "routing",
)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if layer_type == "linear_attention":  # attribute names as in the checkpoint
            self.linear_attn = GatedDeltaNet(cfg, dtype, rngs)
        else:
            self.self_attn = GatedAttention(cfg, dtype, rngs)
        self.mlp = SparseMoe(cfg, dtype, rngs)

    @property
    def token_mixer(self) -> GatedDeltaNet | GatedAttention:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def __call__(
        self,
        h: jax.Array,
        context: TokenContext,
        state: LayerState | None,
        moe_backend: str = "auto",
        capture: tuple[str, ...] = (),
    ) -> tuple[jax.Array, LayerState | None, Routing, dict[str, Any]]:
        """h [B, L, hidden] -> (h, the layer's new decode state or None without one, routing, the intermediates
        named in ``capture``: {} when none is)."""
        with jax.named_scope(self.layer_type):
            (mixer_in,) = fence(self.input_layernorm(h))
            x, state = fence(*self.token_mixer(mixer_in, context, state))
        h = (h + x).astype(h.dtype)
        with jax.named_scope("moe"):
            (moe_in,) = fence(self.post_attention_layernorm(h))
            x, routing = fence(*moe_in_chunks(self.mlp, moe_in, moe_backend))
        (h,) = fence((h + x).astype(h.dtype))
        captured = {}
        if capture:
            with jax.named_scope("capture"):
                captured = self.intermediates(capture, mixer_in, moe_in, h, routing, context, moe_backend)
        return h, state, routing, captured

    def intermediates(self, names, mixer_in, moe_in, out, routing, context, moe_backend) -> dict[str, Any]:
        """The intermediates in ``names`` (see :data:`CAPTURABLE`), from the token mixer's and the MoE's (normed)
        inputs, the layer's output and its routing. Those the layer does not hold (its own values, not the
        forward's) are recomputed from these inputs by the same functions, so the forward's program is untouched;
        one of the other layer type's (attention probabilities of a DeltaNet layer) is None."""
        flat = moe_in.reshape(-1, moe_in.shape[-1])
        attention = self.layer_type == "full_attention"
        make = {
            "hidden_states": lambda: out,
            "routing": lambda: routing,
            "router_logits": lambda: router_logits(flat, self.mlp.router[...]),
            "expert_outputs": lambda: self.mlp.expert_outputs(flat, routing.experts, moe_backend),
            "attention_probs": lambda: self.self_attn.probabilities(mixer_in, context) if attention else None,
            "deltanet_state": lambda: None if attention else self.linear_attn.final_state(mixer_in, context),
        }
        return {name: make[name]() for name in names}


#: Tokens per MoE call. The MoE's activations grow with the tokens (a 32k-token prefill sorts 262k (token, slot) rows
#: of the hidden width, which XLA:CPU scatters in fp32: GiBs per layer); in chunks of this many they stay bounded.
MOE_CHUNK = 4096


def map_row_chunks(fn, x: jax.Array, chunk: int):
    """``fn`` over the flattened rows of ``x`` [..., width], ``chunk`` rows at a time (``lax.map``; the last chunk
    zero-padded): its outputs with their leading axis the ``x.shape[:-1]`` rows, flattened."""
    out = jax.lax.map(fn, row_tiles(x, x.ndim - 1, chunk))
    return untiled_rows(out, math.prod(x.shape[:-1]))


def moe_in_chunks(moe: SparseMoe, x: jax.Array, backend: str) -> tuple[jax.Array, Routing]:
    """``moe(x)`` over the flattened tokens of ``x`` [..., hidden], :data:`MOE_CHUNK` tokens at a time. Each token is
    routed and computed on its own, so chunking changes no result."""
    if math.prod(x.shape[:-1]) <= MOE_CHUNK:
        return moe(x, backend=backend)
    out, routing = map_row_chunks(lambda chunk: moe(chunk, backend=backend), x, MOE_CHUNK)
    return out.reshape(x.shape), routing


#: Rows per lm_head product when the logits are narrower than fp32: the product is accumulated in fp32 and rounded
#: once, and over a whole forward's rows that fp32 product is the largest buffer of the program (a [2048, 248320]
#: forward at full size: 1.9 GiB); a chunk of this many rows at a time holds 243 MiB of it.
LOGITS_CHUNK = 256


def lm_head_logits(h: jax.Array, lm_head: jax.Array) -> jax.Array:
    """``dense(h, lm_head)``: the logits [..., vocab] of the final-normed ``h`` [..., hidden]. In the model dtype
    below fp32, over more than :data:`LOGITS_CHUNK` rows, computed :data:`LOGITS_CHUNK` rows at a time (the same
    per-row products and roundings; ``tests/test_memory.py`` checks the chunked logits bit for bit). The
    batch-invariant mode's ``dense`` already runs on fixed row tiles."""
    n_rows = math.prod(h.shape[:-1])
    if n_rows <= LOGITS_CHUNK or h.dtype == jnp.float32 or batch_invariant():
        return dense(h, lm_head)
    logits = map_row_chunks(lambda rows: dense(rows, lm_head), h, LOGITS_CHUNK)
    return logits.reshape(*h.shape[:-1], -1)


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
    captured: dict[str, tuple] | None = None  # {name: one value per layer, None where the layer has none}


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions that ignore left padding: cumsum(mask) - 1, and 0 on padding (as HF ``generate`` builds them)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def last_real(h: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Each row's last real position of ``h`` [B, L, ...], as [B, 1, ...]: the last position (left padding), or in
    the batch-invariant mode (right padding) the row's own last."""
    if not batch_invariant():
        return h[:, -1:]
    last = jnp.maximum(jnp.sum(attention_mask > 0, axis=1) - 1, 0)
    return jnp.take_along_axis(h, last.reshape(-1, *(1,) * (h.ndim - 1)), axis=1)


def run_decoder(
    model: Qwen35MoeForCausalLM,
    input_ids,
    attention_mask,
    positions,
    moe_backend,
    cache: DecodeState | None = None,
    last_only=False,
    capture: tuple[str, ...] = (),
    prefill=False,
):
    """The decoder on ``input_ids`` [B, L]: a plain forward (``cache`` None), a prefill that fills an empty
    :class:`~qwen_jax.cache.DecodeState` (L > 1, or ``prefill``), or one decode step (L == 1) that reads and
    extends it. A one-token prompt's prefill (``prefill=True``) runs as a prefill, as HF's first call does.

    Returns (logits, hidden states, routing, new cache or None, {name: per-layer tuple} for the names in
    ``capture``); with ``last_only`` the logits are those of the last position only, [B, 1, vocab] (a prefill needs
    no more).
    """
    cfg = model.cfg
    length = input_ids.shape[1]
    decoding = cache is not None and length == 1 and not prefill
    if attention_mask is None:  # a decode step's token is real
        attention_mask = jnp.ones_like(input_ids)
    with jax.named_scope("embed"):
        (embed_tokens,) = tie_to(input_ids, model.embed_tokens[...])
        h = jnp.take(embed_tokens, input_ids, axis=0)
    cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, h.dtype)
    key_mask, start = None, 0
    if cache is not None and decoding and batch_invariant():  # right-padded rows: each at its own length
        start = cache.next_position
        key_mask = cache.key_mask.at[jnp.arange(input_ids.shape[0]), start].set(1)
    elif cache is not None:
        start = cache.length
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, attention_mask.astype(jnp.int32), (0, start))
    context = TokenContext(cos, sin, attention_mask, key_mask, start, decoding)
    states = cache.layers if cache is not None else (None,) * len(model.layers)
    hidden, routings, new_states, captured = [h], [], [], {name: [] for name in capture}
    for index, (layer, state) in enumerate(zip(model.layers, states, strict=True)):
        with jax.named_scope(f"layer_{index}"), decode_step_mode(decoding):
            h, state, routing, layer_captured = layer(h, context, state, moe_backend, capture)
        hidden.append(h)
        routings.append(routing)
        new_states.append(state)
        for name, value in layer_captured.items():
            captured[name].append(value)
    with jax.named_scope("head"), decode_step_mode(decoding):
        hidden[-1] = model.norm(h)  # as HF: the last hidden state is the final norm's output
        logits = lm_head_logits(
            last_real(hidden[-1], attention_mask) if last_only else hidden[-1], model.lm_head[...]
        )
    new_cache = None
    if cache is not None:
        new_cache = DecodeState(tuple(new_states), key_mask, cache.length + length, positions[:, -1] + 1)
    captured = {name: tuple(values) for name, values in captured.items()}
    return logits, tuple(hidden), tuple(routings), new_cache, captured


@functools.partial(
    jax.jit, static_argnames=("graphdef", "moe_backend", "extras", "capture", "batch_invariant")
)
def _forward_jit(
    graphdef,
    state,
    input_ids,
    attention_mask,
    positions,
    moe_backend,
    extras,
    capture=(),
    batch_invariant=False,
):
    model = nnx.merge(graphdef, state)
    with batch_invariant_mode(batch_invariant):
        logits, hidden, routing, _, captured = run_decoder(
            model, input_ids, attention_mask, positions, moe_backend, capture=capture
        )
    return ForwardOutput(
        logits, hidden if extras else None, routing if extras else None, captured if capture else None
    )


def capture_names(capture: str | Iterable[str]) -> tuple[str, ...]:
    """``capture`` as the sorted tuple of distinct names (a static argument); an unknown name is an error."""
    names = (capture,) if isinstance(capture, str) else tuple(capture)
    unknown = sorted(set(names) - set(CAPTURABLE))
    if unknown:
        raise ValueError(f"cannot capture {unknown}: the capturable intermediates are {list(CAPTURABLE)}")
    return tuple(sorted(set(names)))


def forward(
    model: Qwen35MoeForCausalLM,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    position_ids: Any = None,
    return_hidden_states: bool = False,
    moe_backend: str = "auto",
    capture: str | Iterable[str] = (),
    batch_invariant: bool = False,
) -> jax.Array | ForwardOutput:
    """Logits [B, L, vocab] for int ``input_ids`` [B, L].

    ``attention_mask`` [B, L] is 1 for real tokens and 0 for left padding. Positions default to
    :func:`default_positions`, so a left-padded row gives the same logits as the unpadded one.
    With ``return_hidden_states=True`` returns a :class:`ForwardOutput` with per-layer hidden states and routing.
    With ``capture`` (names from :data:`CAPTURABLE`) returns a :class:`ForwardOutput` whose ``captured[name]`` holds
    one value per layer (None for a layer of the other type); the logits are the same, bit for bit, and with no
    names the program is the one compiled without ``capture``.

    With ``batch_invariant=True`` (rows right-padded: ``attention_mask`` 1s, then 0s) each row's logits and hidden
    states at its real positions are bit for bit the same whatever the batch, the other rows and the padded
    length (:mod:`qwen_jax.invariance`); they differ from the default mode's in the last bits.
    """
    capture = capture_names(capture)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if batch_invariant:
        check_right_padded(attention_mask)
    positions = (
        default_positions(attention_mask) if position_ids is None else jnp.asarray(position_ids, jnp.int32)
    )
    graphdef, state = nnx.split(model)
    out = _forward_jit(
        graphdef,
        state,
        input_ids,
        attention_mask,
        positions,
        moe_backend,
        return_hidden_states,
        capture,
        batch_invariant,
    )
    return out if return_hidden_states or capture else out.logits


__all__ = [
    "CAPTURABLE",
    "ForwardOutput",
    "Qwen35MoeForCausalLM",
    "default_positions",
    "forward",
    "resolve_dtype",
    "run_decoder",
]
