"""ModelConfig: both HF config forms, and an error naming the field for each inconsistency."""

from __future__ import annotations

import copy
import json

import pytest

from qwen_jax.config import ConfigError, ModelConfig

FULL = ModelConfig.qwen3_6_35b_a3b()


def composite() -> dict:
    from importlib import resources

    return json.loads(resources.files("qwen_jax").joinpath("data/qwen3_6_35b_a3b_config.json").read_text())


def test_full_size_values():
    assert (FULL.hidden_size, FULL.num_hidden_layers, FULL.vocab_size) == (2048, 40, 248320)
    assert FULL.rotary_dim == 64 and FULL.rope_theta == 1e7
    assert FULL.full_attention_layers == tuple(range(3, 40, 4))
    assert (FULL.num_experts, FULL.num_experts_per_tok, FULL.moe_intermediate_size) == (256, 8, 512)
    assert FULL.linear_conv_dim == 8192 and FULL.eos_token_ids == (248044,)


def test_text_only_form_equals_composite():
    text = composite()["text_config"]
    assert ModelConfig.from_hf_dict(text) == FULL


def test_layer_types_default_from_interval():
    text = composite()["text_config"]
    del text["layer_types"]
    assert ModelConfig.from_hf_dict(text).layer_types == FULL.layer_types


def test_is_frozen():
    with pytest.raises(AttributeError):
        FULL.hidden_size = 1  # type: ignore[misc]


def broken(path: tuple, value) -> dict:
    raw = copy.deepcopy(composite())
    target = raw
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("model_type",), "llama", "model_type"),
        (("text_config", "model_type"), "qwen3_next", "text_config.model_type"),
        (("text_config", "rope_parameters", "partial_rotary_factor"), 0.2, "partial_rotary_factor"),
        (("text_config", "layer_types"), ["linear_attention"] * 39, "layer_types"),
        (("text_config", "layer_types"), ["linear_attention"] * 39 + ["sliding_attention"], "layer_types"),
        (("text_config", "num_experts_per_tok"), 300, "num_experts_per_tok"),
        (("text_config", "num_key_value_heads"), 3, "num_key_value_heads"),
        (("text_config", "linear_num_key_heads"), 5, "linear_num_key_heads"),
        (("text_config", "hidden_size"), KeyError, "hidden_size"),
        (("text_config", "num_experts"), "many", "num_experts"),
        (("text_config", "hidden_act"), "gelu", "hidden_act"),
        (("text_config", "rope_parameters", "rope_type"), "yarn", "rope_type"),
        (("text_config", "tie_word_embeddings"), True, "tie_word_embeddings"),
    ],
)
def test_inconsistent_config_names_the_field(path, value, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(broken(path, value))


def test_from_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_generation_config_supplies_the_stop_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(composite()))
    assert ModelConfig.from_json(tmp_path).generation_eos_token_ids == ()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [248046, 248044]}))
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.generation_eos_token_ids == (248046, 248044) and cfg.eos_token_ids == (248044,)
