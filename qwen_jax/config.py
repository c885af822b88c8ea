"""The model configuration: a frozen dataclass built from a Hugging Face ``config.json``.

Accepts the composite ``qwen3_5_moe`` form (with ``text_config``) and the text-only ``qwen3_5_moe_text``
form. Every inconsistency raises :class:`ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")
#: Required positive integer fields of the text config.
INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


class ConfigError(ValueError):
    """A config.json that this implementation cannot run, with the field that is wrong."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the Qwen3.5/3.6 MoE text decoder (names follow the HF config)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # Gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # Sparse MoE
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()  # config.json's (248044 for Qwen3.6: not the chat EOS)
    generation_eos_token_ids: tuple[int, ...] = ()  # generation_config.json's, when present (248046, 248044)

    def __post_init__(self) -> None:
        _validate(self)

    # Derived sizes -------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_widths(self) -> dict[str, int]:
        """The channel blocks of the DeltaNet's causal conv (HF's ``conv1d``), in order: q, k, v."""
        return {"q": self.linear_key_dim, "k": self.linear_key_dim, "v": self.linear_value_dim}

    @property
    def linear_conv_dim(self) -> int:
        return sum(self.linear_conv_widths.values())

    @property
    def linear_in_proj_widths(self) -> dict[str, int]:
        """The column blocks of the DeltaNet's ``in_proj``, in order: HF's ``in_proj_{qkv,z,b,a}``."""
        hv = self.linear_num_value_heads
        return {"qkv": self.linear_conv_dim, "z": self.linear_value_dim, "b": hv, "a": hv}

    @property
    def attention_qkv_widths(self) -> dict[str, int]:
        """The column blocks of the attention's ``qkv_proj``, in order: HF's ``{q,k,v}_proj`` (q with its gate)."""
        kv = self.num_key_value_heads * self.head_dim
        return {"q": self.num_attention_heads * 2 * self.head_dim, "k": kv, "v": kv}

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    # Constructors ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Builds the config from a parsed HF ``config.json`` (composite or text-only)."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        text = raw
        if model_type == "qwen3_5_moe":
            if not isinstance(raw.get("text_config"), dict):
                raise ConfigError(f"{source}: model_type 'qwen3_5_moe' needs a 'text_config' object")
            text = raw["text_config"]
            if text.get("model_type", "qwen3_5_moe_text") != "qwen3_5_moe_text":
                raise ConfigError(
                    f"{source}: text_config.model_type {text.get('model_type')!r} is not 'qwen3_5_moe_text'"
                )
        return cls(**_text_fields(text, raw, source))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        cfg = cls.from_hf_dict(raw, source=str(path))
        generation = path.with_name("generation_config.json")
        if generation.is_file():
            try:
                eos = _eos_ids(json.loads(generation.read_text()), {})
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise ConfigError(f"{generation}: cannot read eos_token_id ({e})") from None
            cfg = dataclasses.replace(cfg, generation_eos_token_ids=eos)
        return cfg

    @classmethod
    def qwen3_6_35b_a3b(cls) -> ModelConfig:
        """The full-size Qwen3.6-35B-A3B config shipped with this package."""
        text = resources.files("qwen_jax").joinpath("data/qwen3_6_35b_a3b_config.json").read_text()
        return cls.from_hf_dict(json.loads(text), source="qwen3_6_35b_a3b_config.json")


def _require(text: dict[str, Any], name: str, source: str, kind: type | tuple[type, ...] = int) -> Any:
    if name not in text:
        raise ConfigError(f"{source}: required field {name!r} is missing")
    value = text[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ConfigError(f"{source}: field {name!r} has value {value!r} of the wrong type")
    return value


def _rope_fields(text: dict[str, Any], source: str) -> tuple[float, float]:
    rope = text.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{source}: rope_parameters.rope_type {rope_type!r} is not supported (only 'default')"
        )
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if not isinstance(theta, int | float) or theta <= 0:
        raise ConfigError(
            f"{source}: field 'rope_parameters.rope_theta' must be a positive number, got {theta!r}"
        )
    factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
    if not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise ConfigError(f"{source}: field 'partial_rotary_factor' must be in (0, 1], got {factor!r}")
    return float(theta), float(factor)


def _eos_ids(text: dict[str, Any], top: dict[str, Any]) -> tuple[int, ...]:
    eos = text.get("eos_token_id", top.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def _text_fields(text: dict[str, Any], top: dict[str, Any], source: str) -> dict[str, Any]:
    n_layers = _require(text, "num_hidden_layers", source)
    layer_types = text.get("layer_types")
    if layer_types is None:  # HF builds it from full_attention_interval (default 4)
        interval = text.get("full_attention_interval", 4)
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)
        ]
    theta, factor = _rope_fields(text, source)
    head_dim = text.get("head_dim") or _require(text, "hidden_size", source) // _require(
        text, "num_attention_heads", source
    )
    ints = {name: _require(text, name, source) for name in INT_FIELDS if name != "num_hidden_layers"}
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: field 'hidden_act' is {text['hidden_act']!r}; only 'silu' is supported")
    if text.get("attention_bias", False):
        raise ConfigError(f"{source}: field 'attention_bias' is true; this model has no attention biases")
    return dict(
        **ints,
        num_hidden_layers=n_layers,
        layer_types=tuple(layer_types),
        head_dim=int(head_dim),
        rope_theta=theta,
        partial_rotary_factor=factor,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", top.get("tie_word_embeddings", False))),
        eos_token_ids=_eos_ids(text, top),
    )


def _validate(c: ModelConfig) -> None:
    def fail(field: str, why: str) -> None:
        raise ConfigError(f"config field {field!r}: {why}")

    for name in (*INT_FIELDS, "head_dim"):
        if getattr(c, name) <= 0:
            fail(name, f"must be positive, got {getattr(c, name)}")
    if len(c.layer_types) != c.num_hidden_layers:
        fail(
            "layer_types", f"has {len(c.layer_types)} entries but num_hidden_layers is {c.num_hidden_layers}"
        )
    unknown = sorted(set(c.layer_types) - set(LAYER_TYPES))
    if unknown:
        fail("layer_types", f"unknown layer type(s) {unknown}; expected {LAYER_TYPES}")
    if c.num_attention_heads % c.num_key_value_heads:
        fail(
            "num_key_value_heads",
            f"{c.num_key_value_heads} does not divide num_attention_heads {c.num_attention_heads}",
        )
    if c.linear_num_value_heads % c.linear_num_key_heads:
        fail(
            "linear_num_key_heads",
            f"{c.linear_num_key_heads} does not divide linear_num_value_heads {c.linear_num_value_heads}",
        )
    if c.rotary_dim % 2 or c.rotary_dim == 0:
        fail(
            "partial_rotary_factor",
            f"rotary dim int(head_dim {c.head_dim} * {c.partial_rotary_factor}) = {c.rotary_dim} must be even "
            "and positive",
        )
    if c.num_experts_per_tok > c.num_experts:
        fail("num_experts_per_tok", f"top-k {c.num_experts_per_tok} exceeds num_experts {c.num_experts}")
    if c.tie_word_embeddings:
        fail("tie_word_embeddings", "must be false: this model has an untied lm_head")
