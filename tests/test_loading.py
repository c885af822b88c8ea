"""Loading HF safetensors checkpoints: both expert layouts, both prefixes, sharded index, and every bad input."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen_jax.config import ConfigError
from qwen_jax.loading import CheckpointError, load_hf

hf_reference = pytest.importorskip("hf_reference")
NAME = "hv2hk_top2of8"


def params_of(model) -> dict:
    from flax import nnx

    _, state = nnx.split(model)
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def read_fp32_tensors(ckpt) -> dict[str, np.ndarray]:
    return load_file(str(ckpt / "model.safetensors"))  # the tiny checkpoints are saved in fp32


def write_checkpoint(src, dst, tensors: dict[str, np.ndarray], shards: int = 1):
    """A copy of ``src``'s config with ``tensors``, as one file or ``shards`` files plus an index."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"))
        return dst
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(dst / file))
        weight_map |= dict.fromkeys(part, file)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def to_composite_prefix(tensors):
    return {
        n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n: t
        for n, t in tensors.items()
    }


def to_per_expert(tensors):
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = np.ascontiguousarray(t[e, :inter])
                out[f"{base}{e}.up_proj.weight"] = np.ascontiguousarray(t[e, inter:])
        elif name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = np.ascontiguousarray(t[e])
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints):
    return tiny_checkpoints(NAME)


@pytest.fixture(scope="module")
def reference_params(ckpt):
    return params_of(load_hf(ckpt, "float32"))


@pytest.mark.parametrize(
    "variant",
    ["composite_prefix", "per_expert", "per_expert_composite_sharded", "sharded_3"],
)
def test_layouts_and_prefixes_load_identically(variant, ckpt, reference_params, tmp_path):
    tensors = read_fp32_tensors(ckpt)
    if "per_expert" in variant:
        tensors = to_per_expert(tensors)
    if "composite" in variant:
        tensors = to_composite_prefix(tensors)
    path = write_checkpoint(ckpt, tmp_path / variant, tensors, shards=3 if "sharded" in variant else 1)
    params = params_of(load_hf(path, "float32"))
    assert params.keys() == reference_params.keys()
    for leaf, value in reference_params.items():
        np.testing.assert_array_equal(params[leaf], value, err_msg=str(leaf))


def test_skips_mtp_and_vision_and_reports_them(ckpt, reference_params, tmp_path):
    tensors = to_composite_prefix(read_fp32_tensors(ckpt))
    tensors |= {
        "mtp.fc.weight": np.zeros((4, 8), np.float32),
        "mtp.norm.weight": np.zeros(4, np.float32),
        "model.visual.pos_embed.weight": np.zeros((3, 2), np.float32),
    }
    model, report = load_hf(write_checkpoint(ckpt, tmp_path / "c", tensors), "float32", return_report=True)
    assert report.skipped == {"mtp.": 2, "model.visual.": 1}
    assert "skipped 3" in report.summary()
    np.testing.assert_array_equal(params_of(model)[("lm_head",)], reference_params[("lm_head",)])


def test_bf16_policy_rounds_every_leaf(ckpt, reference_params):
    params = params_of(load_hf(ckpt, "bfloat16"))
    for leaf, value in reference_params.items():
        assert params[leaf].dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(params[leaf], value.astype(jax.numpy.bfloat16), err_msg=str(leaf))


def expect_error(ckpt, tmp_path, tensors, *patterns, shards=1):
    path = write_checkpoint(ckpt, tmp_path / "bad", tensors, shards=shards)
    with pytest.raises(CheckpointError) as info:
        load_hf(path, "float32")
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    return str(info.value)


def test_missing_tensor(ckpt, tmp_path):
    tensors = read_fp32_tensors(ckpt)
    del tensors["model.layers.2.linear_attn.A_log"]
    expect_error(ckpt, tmp_path, tensors, "layers.2.linear_attn.A_log is missing")


def test_missing_part_of_a_side_by_side_leaf(ckpt, tmp_path):
    tensors = read_fp32_tensors(ckpt)
    del tensors["model.layers.2.linear_attn.in_proj_z.weight"]
    expect_error(ckpt, tmp_path, tensors, "layers.2.linear_attn.in_proj is only partly set (no z part)")


def test_wrong_shape(ckpt, tmp_path):
    tensors = read_fp32_tensors(ckpt)
    tensors["model.layers.3.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    expect_error(
        ckpt,
        tmp_path,
        tensors,
        "'model.layers.3.self_attn.k_proj.weight'",
        "model.safetensors",
        "shape (3, 64)",
        "(64, 64)",
    )


def test_unexpected_key(ckpt, tmp_path):
    tensors = read_fp32_tensors(ckpt) | {"model.layers.0.mlp.bias": np.zeros(3, np.float32)}
    expect_error(ckpt, tmp_path, tensors, "unexpected tensor 'model.layers.0.mlp.bias'", "model.safetensors")


def test_duplicate_expert_sources(ckpt, tmp_path):
    """Fused and per-expert tensors for the same layer set the same leaf twice; the later one is named."""
    tensors = read_fp32_tensors(ckpt)
    gate = to_per_expert(tensors)["model.layers.1.mlp.experts.0.gate_proj.weight"]
    tensors["model.layers.1.mlp.experts.0.gate_proj.weight"] = gate
    expect_error(
        ckpt,
        tmp_path,
        tensors,
        "'model.layers.1.mlp.experts.gate_up_proj'",
        "sets layers.1.mlp.gate_up a second time",
    )


def test_non_float_dtype(ckpt, tmp_path):
    tensors = read_fp32_tensors(ckpt)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    expect_error(ckpt, tmp_path, tensors, "'model.norm.weight'", "dtype I32")


def test_truncated_file(ckpt, tmp_path):
    path = write_checkpoint(ckpt, tmp_path / "t", read_fp32_tensors(ckpt))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: not a valid safetensors file \(truncated"
    ):
        load_hf(path, "float32")


def test_corrupt_header(ckpt, tmp_path):
    path = write_checkpoint(ckpt, tmp_path / "c", read_fp32_tensors(ckpt))
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_hf(path, "float32")


def test_missing_index_shard(ckpt, tmp_path):
    path = write_checkpoint(ckpt, tmp_path / "s", read_fp32_tensors(ckpt), shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"index.json: shard\(s\) listed in the index are missing: "
        r"model-00002-of-00003",
    ):
        load_hf(path, "float32")


def test_index_names_a_tensor_its_shard_lacks(ckpt, tmp_path):
    path = write_checkpoint(ckpt, tmp_path / "s", read_fp32_tensors(ckpt), shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00003.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"model-00001-of-00003.safetensors: tensor\(s\) listed in the index "
        r"are not in this file: \['model.layers.0.ghost.weight'\]",
    ):
        load_hf(path, "float32")


def test_config_that_does_not_match_the_tensors(ckpt, tmp_path):
    path = write_checkpoint(ckpt, tmp_path / "m", read_fp32_tensors(ckpt))
    config = json.loads((path / "config.json").read_text())
    config["moe_intermediate_size"] *= 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"mlp\.experts\.gate_up_proj' in .* has shape \(8, 64, 64\) but "
        r"config\.json implies \(8, 128, 64\)",
    ):
        load_hf(path, "float32")


def test_pickle_checkpoint_is_refused_without_unpickling(ckpt, tmp_path):
    path = tmp_path / "p"
    path.mkdir()
    shutil.copy(ckpt / "config.json", path / "config.json")
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 this would run code if unpickled")
    with pytest.raises(CheckpointError, match="only safetensors is read"):
        load_hf(path, "float32")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_hf(tmp_path / "nope", "float32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        load_hf(tmp_path / "empty", "float32")
