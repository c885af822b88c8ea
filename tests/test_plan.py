"""``python -m conversion plan``: parameter counts and bytes per device of the full-size model, from shapes only."""

from __future__ import annotations

import json
from pathlib import Path

from conversion.__main__ import main
from conversion.plan import GIB, memory_plan

CONFIG = Path(__file__).parents[1] / "qwen_jax" / "data" / "qwen3_6_35b_a3b_config.json"
OFFICIAL_TOTAL = 34_660_610_688


def expected_bytes(plan: dict, ep: int, batch: int, context: int) -> tuple[int, int]:
    """Weights and decode state per device, from the config's sizes (a second derivation of the same numbers)."""
    E, h, inter = 256, 2048, 512
    experts = 40 * E * 3 * h * inter
    weights = 2 * (OFFICIAL_TOTAL - experts) + 2 * experts // ep
    n_attn, n_linear = 10, 30
    kv = 2 * n_attn * batch * context * 2 * 256 * 2  # keys + values, Hkv 2, head_dim 256, bf16
    conv = n_linear * batch * 3 * (2048 + 2048 + 4096) * 2  # K-1 = 3 rows of q, k, v in bf16
    recurrent = n_linear * batch * 32 * 128 * 128 * 4  # fp32
    masks = batch * context * 4 + 4 + batch * 4
    return weights, kv + conv + recurrent + masks


def test_cli_json_reports_the_official_total_and_bytes_per_device(capsys):
    assert main(["plan", "--config", str(CONFIG), "--mesh", "ep=8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_params"] == OFFICIAL_TOTAL
    assert sum(plan["params_by_group"].values()) == OFFICIAL_TOTAL
    assert plan["params_by_group"]["routed_experts"] == 40 * 256 * 3 * 2048 * 512
    assert plan["params_by_group"]["embeddings"] == plan["params_by_group"]["lm_head"] == 248320 * 2048
    weights, state = expected_bytes(plan, ep=8, batch=1, context=32768)
    assert plan["weight_bytes_per_device"] == weights
    assert sum(plan["state_bytes_per_device"].values()) == state
    assert plan["total_bytes_per_device"] == weights + state
    assert plan["fits"]["8xA100-80GB"]["fits"] and plan["fits"]["1xH200-141GB"]["fits"]
    assert plan["fits"]["1xH200-141GB"]["bytes_per_device"] == sum(expected_bytes(plan, 1, 1, 32768))


def test_batch_context_and_dp_scale_the_state():
    plan = memory_plan(CONFIG, "dp=2,ep=4", batch=16, context=262144)  # eval_shape cached from the CLI test
    weights, state = expected_bytes(plan, ep=4, batch=8, context=262144)  # dp=2 halves the batch per device
    assert plan["weight_bytes_per_device"] == weights
    assert sum(plan["state_bytes_per_device"].values()) == state
    assert plan["state_bytes_per_device"]["kv_cache"] == 40 * GIB
    # 8 x A100 runs this very mesh (8 devices); one H200 holds everything, the whole batch of 16 x 256k tokens
    assert plan["fits"]["8xA100-80GB"]["mesh"] == "dp=2,ep=4"
    assert plan["fits"]["8xA100-80GB"]["bytes_per_device"] == weights + state
    assert plan["fits"]["8xA100-80GB"]["fits"]
    assert not plan["fits"]["1xH200-141GB"]["fits"]  # 64.6 GiB of weights + an 80 GiB KV cache
    assert plan["fits"]["1xH200-141GB"]["bytes_per_device"] == sum(expected_bytes(plan, 1, 16, 262144))
