"""Full-size Qwen3.6-35B-A3B speed on one GPU, from random bf16 weights built on the device (issue 6).

    python bench/gpu_full_size.py --out $OUT/gpu_full_size.json          # on the H200
    python bench/gpu_full_size.py --reduced --out /tmp/reduced.json      # the same script on a CPU, small config

Speed does not depend on the weight values, so the weights are random (initializer_range 0.02 scale, which spreads
tokens over the experts). They are created by a jitted initialiser directly on the device, never on the host.
Reports compile time, peak device memory, per-step time (median and spread) for a 2,048-token prefill at batch 1
and 256 greedy decode steps at batch 1 and 8, against the HBM roofline (bytes of active weights per decode step)
and bf16 peak FLOP/s for the prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import qwen_jax  # noqa: F401  (XLA flags before the backend starts)
from qwen_jax.config import ModelConfig
from qwen_jax.generate import _greedy_step, _prefill
from qwen_jax.model import Qwen35MoeForCausalLM
from qwen_jax.ops import greedy_tokens

H200 = {
    "hbm_bytes_per_s": 4.8e12,
    "bf16_flops_per_s": 989e12,
}  # dense bf16 peak (the issue quotes ~790 sustained)


def reduced_config() -> ModelConfig:
    return dataclasses.replace(
        ModelConfig.qwen3_6_35b_a3b(), num_hidden_layers=4, layer_types=("linear_attention",) * 3 + ("full_attention",),
        vocab_size=4096, num_experts=32, hidden_size=256, num_attention_heads=4, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        moe_intermediate_size=64, shared_expert_intermediate_size=64,
    )  # fmt: skip


def active_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters one decode step reads, excluding the embedding table; routed-expert FLOP parameters/token)."""
    _, state = nnx.split(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, "bfloat16")))
    total = expert = 0
    for path, var in nnx.to_flat_state(state):
        n = var.get_value().size
        if path[-1] in ("gate_up", "down"):
            expert += n
        elif path != ("embed_tokens",):
            total += n
    routed = expert * cfg.num_experts_per_tok // cfg.num_experts
    return total + routed + cfg.hidden_size, total + routed


def timed(fn, *args, repeats: int):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return out, times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def run(
    cfg: ModelConfig, prefill_len: int, decode_steps: int, batches: tuple[int, ...], backend: str
) -> dict:
    t = time.perf_counter()
    model = nnx.jit(lambda: Qwen35MoeForCausalLM(cfg, "bfloat16", rngs=nnx.Rngs(1234)))()
    jax.block_until_ready(nnx.state(model))
    graphdef, params = nnx.split(model)
    results = {"init_s": time.perf_counter() - t, "moe_backend": backend, "device": str(jax.devices()[0])}
    read_params, flop_params = active_params(cfg)

    ids = jax.random.randint(jax.random.key(0), (1, prefill_len), 0, cfg.vocab_size)
    mask = jnp.ones_like(ids)
    max_length = prefill_len + decode_steps
    t = time.perf_counter()
    jax.block_until_ready(_prefill(graphdef, params, ids, mask, max_length, backend))
    results["prefill_compile_s"] = time.perf_counter() - t
    _, times = timed(lambda: _prefill(graphdef, params, ids, mask, max_length, backend), repeats=5)
    prefill = summary(times)
    prefill["tokens_per_s"] = prefill_len / prefill["median_s"]
    prefill["flops_per_s"] = 2 * flop_params * prefill_len / prefill["median_s"]
    results["prefill_batch1"] = prefill

    for batch in batches:
        ids = jax.random.randint(jax.random.key(batch), (batch, prefill_len), 0, cfg.vocab_size)
        logits, cache = _prefill(graphdef, params, ids, jnp.ones_like(ids), max_length, backend)
        token = greedy_tokens(logits)  # the first token as generate chooses it
        t = time.perf_counter()
        token, cache = jax.block_until_ready(_greedy_step(graphdef, params, token, cache, backend))
        compile_s = time.perf_counter() - t
        steps = []
        for _ in range(decode_steps - 1):
            t = time.perf_counter()
            token, cache = jax.block_until_ready(_greedy_step(graphdef, params, token, cache, backend))
            steps.append(time.perf_counter() - t)
        decode = summary(steps)
        decode |= {"compile_s": compile_s, "tokens_per_s": batch / decode["median_s"]}
        decode["bytes_per_step"] = 2 * read_params  # bf16 weights; batch 1 reads the top-k experts only
        decode["hbm_fraction"] = decode["bytes_per_step"] / decode["median_s"] / H200["hbm_bytes_per_s"]
        results[f"decode_batch{batch}"] = decode

    stats = jax.devices()[0].memory_stats() or {}
    results["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    results["active_params_per_token"] = read_params
    results["prefill_fraction_of_bf16_peak"] = prefill["flops_per_s"] / H200["bf16_flops_per_s"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reduced", action="store_true", help="a small config, to check the script on a CPU")
    parser.add_argument("--moe-backend", default="auto", help="auto | ragged | blocked | gather | dense")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()
    cfg = reduced_config() if args.reduced else ModelConfig.qwen3_6_35b_a3b()
    prefill_len, decode_steps = (128, 16) if args.reduced else (2048, 256)
    results = run(cfg, prefill_len, decode_steps, (1, 8), args.moe_backend)
    results |= {"jax": jax.__version__, "reduced": args.reduced, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
