"""Greedy decode and prefill speed of the JAX model against HF transformers, on this CPU, same weights.

    python bench/decode_vs_hf.py [--prompt 512] [--new 128] [--dtype both] [--repeats 5] [--json OUT]

Config (issue 3): hidden 512, 8 layers (3:1 DeltaNet:attention), 32 experts top-4, vocab 32k. Each side runs in
its own subprocess, so that peak RSS is per side. Also prints decode throughput as a fraction of this machine's
memory-bandwidth roofline: the bytes of weights one decode step must read (embedding row, lm_head, every non-expert
weight, the top-k routed experts and the shared expert of each layer), over a read bandwidth measured in this run.

Equal work on both sides. The prefill is what ``generate`` runs before decoding, on both sides: the whole prompt
through the model, filling the decode state (HF: ``use_cache=True``), and the logits of the last position only
(HF: ``logits_to_keep=1``; JAX: ``qwen_jax.generate._prefill``). The decode is ``--new`` greedy tokens: the first
chosen from the prefill's logits, then ``--new`` - 1 model steps on both sides (HF: ``generate`` minus its prefill,
measured as above; JAX: the compiled decode loop); decode tokens/s counts those ``--new`` - 1 steps on both sides.
``--dtype both`` (the default) runs float32, then bfloat16.

Each side runs ``--repeats`` times (speeds: the best run of each phase). On a shared machine the bandwidth varies
from minute to minute, so the JAX side measures it right before each of its runs, and the fraction of the roofline
is the median over its runs of (that run's decode speed) / (the bandwidth measured just before it). When those
bandwidths differ by more than 20% (max/min), the load from other processes changed during the invocation, and a
warning says that the fraction is unreliable.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_CONFIG = dict(
    vocab_size=32000, hidden_size=512, num_hidden_layers=8,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
    linear_conv_kernel_dim=4, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
    shared_expert_intermediate_size=256, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "mrope_section": [4, 2, 2], "mrope_interleaved": True},
)  # fmt: skip


#: Above this max/min ratio of the bandwidths measured before the JAX runs, the machine was busy: a warning says so.
BUSY_SPREAD = 1.2


def build_checkpoint(path: Path) -> None:
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(1234)
    model = Qwen3_5MoeForCausalLM._from_config(Qwen3_5MoeTextConfig(**BENCH_CONFIG)).float()
    model.save_pretrained(path, safe_serialization=True, save_original_format=False)


def prompt_ids(n: int):
    import numpy as np

    return np.random.RandomState(0).randint(0, BENCH_CONFIG["vocab_size"], (1, n))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_hf(path: str, n_prompt: int, n_new: int, dtype: str, repeats: int, out) -> None:
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    model = Qwen3_5MoeForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager", experts_implementation="eager"
    ).eval()
    ids = torch.as_tensor(prompt_ids(n_prompt))
    kwargs = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
    with torch.no_grad():
        model(ids[:, :64])  # warm-up
        prefill, decode = float("inf"), float("inf")
        for _ in range(repeats):  # best of each phase, as on the JAX side
            t = time.perf_counter()
            model(
                ids, use_cache=True, logits_to_keep=1
            )  # what generate's prefill computes, as on the JAX side
            this_prefill = time.perf_counter() - t
            t = time.perf_counter()
            tokens = model.generate(ids, **kwargs)[0, n_prompt:].tolist()
            decode = min(decode, time.perf_counter() - t - this_prefill)  # generate = a prefill, then decode
            prefill = min(prefill, this_prefill)
    out.put(dict(prefill_s=prefill, decode_s=decode, tokens=tokens, peak_rss_mb=peak_rss_mb()))


def run_jax(path: str, n_prompt: int, n_new: int, dtype: str, repeats: int, out) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import qwen_jax  # noqa: F401  (sets XLA flags before the backend starts)
    from qwen_jax.generate import _decode_loop, _prefill
    from qwen_jax.loading import load_hf

    model = load_hf(path, dtype)
    graphdef, params = nnx.split(model)
    ids = prompt_ids(n_prompt).astype("int32")
    mask = ids * 0 + 1
    max_length = n_prompt + n_new
    stop = jnp.asarray([-1], jnp.int32)

    def once():
        t = time.perf_counter()
        logits, cache = _prefill(graphdef, params, ids, mask, max_length, "auto")
        jax.block_until_ready(cache)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        tokens, _, _, _ = _decode_loop(graphdef, params, logits, cache, n_new, stop, 0, "auto", False)
        tokens = jax.block_until_ready(tokens)
        return t_prefill, time.perf_counter() - t, tokens

    t = time.perf_counter()
    once()
    compile_s = time.perf_counter() - t
    peak_rss = peak_rss_mb()  # the model's own peak, before the bandwidth probe allocates its array
    read_bandwidth = bandwidth_probe()
    runs = []
    for _ in range(repeats):
        bandwidth = read_bandwidth()
        runs.append((*once(), bandwidth))
    prefill = min(r[0] for r in runs)  # best run of each phase
    decode, tokens = min(r[1] for r in runs), runs[0][2]
    out.put(dict(prefill_s=prefill, decode_s=decode, tokens=tokens[0, :n_new].tolist(), compile_s=compile_s,
                 peak_rss_mb=peak_rss, decode_runs_s=[r[1] for r in runs],
                 bandwidth_runs_gbs=[r[3] for r in runs]))  # fmt: skip


def bandwidth_probe(n_bytes: int = 1 << 28):
    """A function that measures the read bandwidth in GB/s: a jitted sum over an fp32 array 8x this machine's L3
    (a read-only stream), best of 5 passes."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()

    def measure() -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            total(x).block_until_ready()
            best = min(best, time.perf_counter() - t)
        return n_bytes / best / 1e9

    return measure


def decode_step_bytes(bytes_per_param: int) -> int:
    c = BENCH_CONFIG
    h, layers = c["hidden_size"], c["layer_types"]
    kd = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    vd = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    hv, kernel = c["linear_num_value_heads"], c["linear_conv_kernel_dim"]
    deltanet = (
        h * (2 * kd + vd) + (2 * kd + vd) * kernel + h * vd + 2 * h * hv + 2 * hv + c["linear_value_head_dim"]
    )
    deltanet += vd * h
    nq, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    attention = h * nq * d * 2 + 2 * h * nkv * d + nq * d * h + 2 * d
    expert = 3 * h * c["moe_intermediate_size"]
    moe = (
        h * c["num_experts"]
        + c["num_experts_per_tok"] * expert
        + 3 * h * c["shared_expert_intermediate_size"]
        + h
    )
    per_layer = [moe + 2 * h + (deltanet if t == "linear_attention" else attention) for t in layers]
    params = h + sum(per_layer) + h + c["vocab_size"] * h  # embedding row, layers, final norm, lm_head
    return params * bytes_per_param


def in_subprocess(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def compare(path: str, dtype: str, n_prompt: int, n_new: int, repeats: int) -> dict:
    """One dtype: both sides in their own subprocesses, then the ratios and the roofline, printed and returned."""
    hf = in_subprocess(run_hf, path, n_prompt, n_new, dtype, repeats)
    jx = in_subprocess(run_jax, path, n_prompt, n_new, dtype, repeats)
    steps = n_new - 1  # model steps of the decode on both sides (the first token comes from the prefill)
    decode_tps = {"hf": steps / hf["decode_s"], "jax": steps / jx["decode_s"]}
    prefill_tps = {"hf": n_prompt / hf["prefill_s"], "jax": n_prompt / jx["prefill_s"]}
    step_bytes = decode_step_bytes(4 if dtype == "float32" else 2)
    bandwidths = jx["bandwidth_runs_gbs"]
    bandwidth = statistics.median(bandwidths)
    roofline_tps = bandwidth * 1e9 / step_bytes
    fractions = [  # each JAX run against the bandwidth measured just before it
        steps / decode_s / (run_bandwidth * 1e9 / step_bytes)
        for decode_s, run_bandwidth in zip(jx["decode_runs_s"], bandwidths, strict=True)
    ]
    bandwidth_spread = max(bandwidths) / min(bandwidths)
    same = sum(a == b for a, b in zip(hf["tokens"], jx["tokens"], strict=False))
    results = dict(
        config=BENCH_CONFIG, dtype=dtype, prompt=n_prompt, new_tokens=n_new,
        work="equal: prefill = prompt -> filled decode state + last-position logits; decode = new - 1 model steps",
        decode_tokens_per_s=decode_tps, prefill_tokens_per_s=prefill_tps,
        decode_ratio=decode_tps["jax"] / decode_tps["hf"], prefill_ratio=prefill_tps["jax"] / prefill_tps["hf"],
        peak_rss_mb={"hf": hf["peak_rss_mb"], "jax": jx["peak_rss_mb"]}, jax_compile_s=jx["compile_s"],
        decode_step_bytes=step_bytes, read_bandwidth_gbs=bandwidth,
        read_bandwidth_runs_gbs=bandwidths, read_bandwidth_spread=bandwidth_spread, roofline_tokens_per_s=roofline_tps,
        jax_decode_fraction_of_roofline=statistics.median(fractions), jax_decode_fraction_of_roofline_runs=fractions,
        hf_decode_fraction_of_roofline=decode_tps["hf"] / roofline_tps, repeats=repeats,
        greedy_tokens_equal=f"{same}/{n_new}",
    )  # fmt: skip
    print(f"[{dtype}] equal work on both sides: prefill with a filled decode state and last-position logits; "
          f"{steps} decode steps")  # fmt: skip
    print(
        f"decode  tok/s: JAX {decode_tps['jax']:.1f}  HF {decode_tps['hf']:.1f}  ratio {results['decode_ratio']:.2f}x"
    )
    print(
        f"prefill tok/s: JAX {prefill_tps['jax']:.0f}  HF {prefill_tps['hf']:.0f}  ratio {results['prefill_ratio']:.2f}x"
    )
    print(
        f"roofline: {step_bytes / 1e6:.0f} MB/step at {bandwidth:.1f} GB/s (median; "
        f"{min(bandwidths):.1f}-{max(bandwidths):.1f}) = {roofline_tps:.0f} tok/s; "
        f"JAX {results['jax_decode_fraction_of_roofline']:.0%} (median of {repeats} runs, each against the "
        f"bandwidth just before it: {min(fractions):.0%}-{max(fractions):.0%}), "
        f"HF {results['hf_decode_fraction_of_roofline']:.0%}"
    )
    if bandwidth_spread > BUSY_SPREAD:
        print(
            f"warning: the read bandwidth moved by {bandwidth_spread - 1:.0%} between the JAX runs (the load from other "
            "processes changed), so the fraction of the roofline is unreliable; run again on a quiet machine"
        )
    print(f"peak RSS MB: JAX {jx['peak_rss_mb']:.0f}  HF {hf['peak_rss_mb']:.0f}; JAX compile {jx['compile_s']:.1f}s; "
          f"greedy tokens equal {same}/{n_new}")  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side (speeds: the best run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp))
        results = {dtype: compare(tmp, dtype, args.prompt, args.new, args.repeats) for dtype in dtypes}
    if args.json:
        tmp_json = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_json.write_text(json.dumps(results if len(results) > 1 else results[dtypes[0]], indent=2))
        tmp_json.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
