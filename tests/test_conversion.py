"""HF safetensors -> per-leaf Orbax conversion, bitwise verification, restartability and sharded restore.

The source is a tiny random checkpoint saved by transformers in 15 shards with an index (fused 3-D experts), plus
one ``mtp.*`` tensor in its own shard (skipped on purpose) and a chat template (copied next to the weights).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen_jax
from conversion.__main__ import main
from conversion.convert import KILL_AFTER_ENV, partial_dir

hf_reference = pytest.importorskip("hf_reference")
NAME = "hv2hk_top2of8"
TAMPERED = "model.layers.1.mlp.experts.down_proj"


def params_of(model) -> dict:
    from flax import nnx

    _, state = nnx.split(model)
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conversion", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **(env or {})),
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = hf_reference.save_checkpoint(
        hf_reference.build_hf_model(NAME), tmp_path_factory.mktemp("sharded") / "hf", max_shard_size="100KB"
    )
    save_file({"mtp.fc.weight": np.ones((4, 4), np.float32)}, str(path / "mtp.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["mtp.fc.weight"] = "mtp.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    assert len(set(index["weight_map"].values())) >= 3
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "orbax"
    assert main(["convert", "--hf", str(hf_dir), "--out", str(out), "--no-progress"]) == 0
    return out


def test_round_trip_equals_load_hf_bitwise(hf_dir, converted):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert manifest["skipped_tensors"] == {"mtp.": 1}
    assert {"config.json", "generation_config.json", "chat_template.jinja"} <= set(manifest["copied_files"])
    assert (converted / "chat_template.jinja").is_file()
    assert not partial_dir(converted).exists()

    reference = qwen_jax.load_hf(hf_dir, "bfloat16")
    restored = qwen_jax.load(converted)
    ref, got = params_of(reference), params_of(restored)
    assert ref.keys() == got.keys()
    for path in ref:
        assert got[path].dtype == ref[path].dtype and got[path].shape == ref[path].shape, path
        assert np.array_equal(bits(got[path]), bits(ref[path])), path
    assert len(manifest["leaves"]) == len(ref)

    ids = np.random.RandomState(0).randint(0, 256, (2, 24))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    a = np.asarray(qwen_jax.forward(restored, ids, mask))
    b = np.asarray(qwen_jax.forward(reference, ids, mask))
    assert np.array_equal(bits(a), bits(b))


def per_expert_copy(src, dst):
    """The checkpoint with per-expert tensors (``mlp.experts.E.{gate,up,down}_proj.weight``) in 4 files."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {}
    for file in sorted(src.glob("model-*.safetensors")):
        tensors |= load_file(str(file))
    out = {}
    for name, t in tensors.items():
        base, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = np.ascontiguousarray(t[e, :inter])
                out[f"{base}.{e}.up_proj.weight"] = np.ascontiguousarray(t[e, inter:])
        elif kind == "down_proj" and t.ndim == 3:
            for e in range(t.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = np.ascontiguousarray(t[e])
        else:
            out[name] = t
    names = sorted(out)
    weight_map = {}
    for i in range(4):  # experts of one leaf end up spread over several files
        file = f"part-{i}.safetensors"
        save_file({n: out[n] for n in names[i::4]}, str(dst / file))
        weight_map |= dict.fromkeys(names[i::4], file)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_per_expert_layout_in_float32(hf_dir, tmp_path):
    src = per_expert_copy(hf_dir, tmp_path / "per_expert")
    out = tmp_path / "orbax"
    assert main(["convert", "--hf", str(src), "--out", str(out), "--dtype", "float32", "--no-progress"]) == 0
    ref, got = params_of(qwen_jax.load_hf(src, "float32")), params_of(qwen_jax.load(out))
    for path in ref:
        assert got[path].dtype == np.float32 and np.array_equal(bits(got[path]), bits(ref[path])), path
    assert main(["verify", "--hf", str(src), "--ckpt", str(out), "--no-progress"]) == 0


def test_verify_passes_and_names_a_tampered_tensor(hf_dir, converted, tmp_path, capsys):
    assert main(["verify", "--hf", str(hf_dir), "--ckpt", str(converted), "--no-progress"]) == 0

    tampered = tmp_path / "hf"
    shutil.copytree(hf_dir, tampered)
    file = json.loads((tampered / "model.safetensors.index.json").read_text())["weight_map"][TAMPERED]
    tensors = load_file(str(tampered / file))
    tensors[TAMPERED][3, 7, 11] += 1.0
    save_file(tensors, str(tampered / file))
    capsys.readouterr()
    assert main(["verify", "--hf", str(tampered), "--ckpt", str(converted), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "leaf layers.1.mlp.down differs" in err and repr(TAMPERED) in err
    assert err.count("MISMATCH") == 1


def test_verify_catches_a_tampered_orbax_leaf(hf_dir, converted, tmp_path, capsys):
    import orbax.checkpoint as ocp

    copy = tmp_path / "orbax"
    shutil.copytree(converted, copy)
    leaf = copy / "params" / "layers.2.linear_attn.in_proj"
    value = qwen_jax.checkpoint.restore_leaf(leaf).copy()
    value[0, 0] = -value[0, 0] if value[0, 0] else 1
    shutil.rmtree(leaf)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(leaf, args=ocp.args.StandardSave({"value": value}))
    capsys.readouterr()
    assert main(["verify", "--hf", str(hf_dir), "--ckpt", str(copy), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "leaf layers.2.linear_attn.in_proj differs" in err
    assert "'model.layers.2.linear_attn.in_proj_qkv.weight'" in err


def test_bad_input_is_one_line_and_exit_2(hf_dir, converted, tmp_path, capsys):
    not_ours = tmp_path / "not_ours"
    not_ours.mkdir()
    (not_ours / "keep.txt").write_text("x")
    old_version = tmp_path / "old_version"  # a conversion made before the side-by-side projections
    old_version.mkdir()
    manifest = json.loads((converted / qwen_jax.checkpoint.MANIFEST).read_text()) | {"version": 1}
    (old_version / qwen_jax.checkpoint.MANIFEST).write_text(json.dumps(manifest))
    cases = [
        (["convert", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "missing"),
        (["convert", "--hf", str(tmp_path), "--out", str(tmp_path / "o")], "no model.safetensors"),
        (["convert", "--hf", str(hf_dir), "--out", str(not_ours)], "not a converted checkpoint"),
        (["verify", "--hf", str(hf_dir), "--ckpt", str(not_ours)], "not a converted checkpoint"),
        (
            ["verify", "--hf", str(hf_dir), "--ckpt", str(old_version)],
            "convert the Hugging Face checkpoint again",
        ),
        (["plan", "--mesh", "ep=3"], "ep=3 does not divide num_experts=256"),
        (["plan", "--mesh", "tp=8"], "expected axis=size pairs"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (argv, err)
    assert (not_ours / "keep.txt").read_text() == "x"
    # An existing complete conversion of the same sources is left as is.
    assert main(["convert", "--hf", str(hf_dir), "--out", str(converted), "--no-progress"]) == 0
    # Through the real CLI: no traceback either.
    result = run_cli("convert", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_kill_9_mid_conversion_then_rerun_gives_the_same_checkpoint(hf_dir, converted, tmp_path):
    out = tmp_path / "orbax"
    killed = run_cli("convert", "--hf", str(hf_dir), "--out", str(out), env={KILL_AFTER_ENV: "30"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()  # never a complete-looking OUT
    work = partial_dir(out)
    records = sorted((work / "done").glob("*.json"))
    assert len(records) == 30
    # A record that no longer matches its leaf is redone, not trusted.
    record = json.loads(records[0].read_text())
    records[0].write_text(json.dumps(record | {"sha256": "0" * 64}))
    # What a kill inside an Orbax save leaves behind: its temp dir, and a leaf dir without a record.
    (work / "params" / "layers.3.mlp.down.orbax-checkpoint-tmp-1234").mkdir()
    shutil.copytree(work / "params" / records[1].stem, work / "params" / "norm.weight")

    rerun = run_cli("convert", "--hf", str(hf_dir), "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stderr and "does not verify" in rerun.stderr
    assert not work.exists()
    assert sorted(p.name for p in (out / "params").iterdir()) == sorted(
        p.name for p in (converted / "params").iterdir()
    )
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (converted / "manifest.json").read_text()
    )
    assert not (out / "done").exists() and not (out / "conversion_state.json").exists()
    verified = run_cli("verify", "--hf", str(hf_dir), "--ckpt", str(out))
    assert verified.returncode == 0, verified.stderr[-2000:]


MESH_SCRIPT = r"""
import sys
from pathlib import Path
import jax, numpy as np
jax.config.update("jax_cpu_enable_async_dispatch", False)
import qwen_jax
from jax.sharding import PartitionSpec as P
from qwen_jax.sharding import make_mesh

assert len(jax.devices()) == 2
ckpt = sys.argv[1]
mesh = make_mesh(2)
model = qwen_jax.load(ckpt, mesh=mesh, dtype="float32")
n_experts = model.cfg.num_experts
for layer in model.layers:
    for leaf in (layer.mlp.gate_up[...], layer.mlp.down[...]):
        assert leaf.dtype == np.float32
        assert leaf.sharding.spec == P("ep", None, None), leaf.sharding
        shards = leaf.addressable_shards
        assert len(shards) == 2 and {s.device for s in shards} == set(jax.devices())
        assert all(s.data.shape == (n_experts // 2, *leaf.shape[1:]) for s in shards)
    assert layer.input_layernorm.weight[...].sharding.is_fully_replicated
single = qwen_jax.load(ckpt, dtype="float32")
assert single.layers[0].mlp.gate_up[...].sharding.device_set == {jax.devices()[0]}
ids = np.random.RandomState(0).randint(0, 256, (2, 24))
ref = np.asarray(qwen_jax.forward(single, ids))
with jax.set_mesh(mesh):
    logits = np.asarray(qwen_jax.forward(model, ids))
    tokens = qwen_jax.generate(model, ids, max_new_tokens=4, stop_token_ids=()).tokens
np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)
assert tokens.shape == (2, 4) and (tokens[:, 0] == ref[:, -1].argmax(-1)).all()
print("sharded restore ok")
"""


def test_sharded_restore_on_a_2_device_mesh(converted):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(converted)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, XLA_FLAGS=flags.strip()),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded restore ok" in result.stdout


@pytest.mark.slow
def test_conversion_memory_stays_bounded():
    """bench/conversion_memory.py: a 2.3 GiB checkpoint converts and verifies within fixed overhead + 3 x its
    largest tensor (about a minute and 5 GB of scratch disk)."""
    bench = Path(__file__).parents[1] / "bench" / "conversion_memory.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--no-record"], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
