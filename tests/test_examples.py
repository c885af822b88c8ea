"""The worked examples in examples/, run as a user runs them (a subprocess on the demo checkpoint, built into a
temporary cache), and the content of what they write."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
pytest.importorskip("torch")  # the demo checkpoint is built with transformers


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


def run_example(name: str, cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, QWEN_JAX_AUDIT_CACHE=str(cache)),
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_layer_statistics_by_hand():
    from expert_usage import layer_statistics

    experts = np.array([[0, 1], [0, 2]])
    weights = np.array([[0.6, 0.4], [0.5, 0.5]])
    stats = layer_statistics(experts, weights, np.full((2, 4), 0.25))
    assert stats["counts"] == [2, 1, 1, 0]
    assert stats["load"] == [0.5, 0.25, 0.25, 0.0]
    np.testing.assert_allclose(stats["mean_weight"], [0.55, 0.4, 0.5, 0.0])
    assert stats["unused"] == 1
    assert stats["max_over_mean"] == 2.0
    np.testing.assert_allclose(stats["load_entropy"], 1.5 / 2)  # 1.5 bits of log2(4) = 2
    np.testing.assert_allclose(stats["load_balancing_loss"], 2.0)  # k, as for uniform router probabilities


def test_expert_usage_example(demo_cache, tmp_path):
    from audit import demo

    out = tmp_path / "usage"
    result = run_example("expert_usage.py", demo_cache, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["expert_usage.json", "expert_usage.png"]
    assert min(png_size(out / "expert_usage.png")) > 300
    results = json.loads((out / "expert_usage.json").read_text("utf-8"))
    fields = demo.DEMO_FIELDS
    assert [p["name"] for p in results["prompts"]] == [p["name"] for p in demo.DEMO_PROMPTS]
    assert results["tokens"] == sum(p["tokens"] for p in results["prompts"])  # no padding counted
    assert len(results["layers"]) == fields["num_hidden_layers"]
    k, n_experts = fields["num_experts_per_tok"], fields["num_experts"]
    for layer in results["layers"]:
        assert sum(layer["counts"]) == k * results["tokens"]
        assert len(layer["load"]) == n_experts and abs(sum(layer["load"]) - 1) < 1e-12
        assert abs(sum(layer["mean_probability"]) - 1) < 1e-5
        assert 0 < layer["load_entropy"] <= 1 and layer["max_over_mean"] >= 1
        assert layer["unused"] == layer["counts"].count(0)


@pytest.mark.slow  # (test budget: ~18 s; the expert-usage example stays in the default run)
def test_attribution_example(demo_cache, tmp_path):
    """At position 20 of the greeting: the reported log-probability is the model's own (an ordinary forward
    agrees), every position after 20 gets exactly zero, and integrated gradients nearly add up to
    f(prompt) - f(baseline) (measured gap 0.4% with 64 steps)."""
    import jax

    import qwen_jax

    out = tmp_path / "attribution"
    position = 20
    args = ("--out", str(out), "--position", str(position), "--steps", "64")
    result = run_example("attribution.py", demo_cache, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["attribution.json", "attribution.png"]
    assert min(png_size(out / "attribution.png")) > 300
    results = json.loads((out / "attribution.json").read_text("utf-8"))
    ids = [t["id"] for t in results["tokens"]]
    assert results["prompt"] == "greeting" and results["target"]["position"] == position

    logits = qwen_jax.forward(qwen_jax.load_hf(results["checkpoint"], "float32"), [ids[: position + 1]])
    log_p = np.asarray(jax.nn.log_softmax(logits[0, -1].astype("float32")))
    assert results["target"]["id"] == int(log_p.argmax())
    assert abs(results["target"]["logprob"] - float(log_p.max())) < 1e-5

    for name, values in results["attributions"].items():
        assert len(values) == len(ids), name
        assert all(v == 0 for v in values[position + 1 :]), f"{name}: non-zero after the target position"
        assert any(v != 0 for v in values[: position + 1]), name
    check = results["completeness"]
    total = check["logprob_at_prompt_minus_at_baseline"]
    assert abs(check["sum_of_integrated_gradients"] - total) <= 0.02 * abs(total)


@pytest.mark.parametrize("name", ["expert_usage.py", "attribution.py"])
def test_examples_bad_checkpoint_is_one_error_line(name, demo_cache, tmp_path):
    result = run_example(
        name, demo_cache, "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: checkpoint directory not found"
    ]
    assert not (tmp_path / "o").exists()
