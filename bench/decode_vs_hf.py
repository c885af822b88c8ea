"""Greedy decode and prefill speed of the JAX model against HF transformers, on this CPU, same weights.

    python bench/decode_vs_hf.py [--prompt 512] [--new 128] [--dtype both] [--rounds 3] [--repeats 3]
                                 [--agree 8] [--json OUT]

Config (issue 3): hidden 512, 8 layers (3:1 DeltaNet:attention), 32 experts top-4, vocab 32k, random weights
(transformers' init, std 0.02, seed 1234, saved in fp32; the bf16 runs load them in bf16 on both sides).

Equal work on both sides, each through its public greedy ``generate`` (batch 1, a random ``--prompt``-token prompt,
attention mask of ones, no stop token):
- **prefill** = ``generate(prompt, max_new_tokens=1)``: the prompt through the model, filling the decode state, the
  last position's logits only (HF's ``generate`` passes ``logits_to_keep=1``; so does ``qwen_jax.generate``), and
  the first greedy token. Speed: prompt tokens / seconds.
- **decode** = ``generate(prompt, max_new_tokens=--new)`` minus that prefill, in the same repeat: ``--new`` - 1
  model steps, each one token reading the KV cache / DeltaNet state. Speed: (``--new`` - 1) / seconds.
- HF: ``Qwen3_5MoeForCausalLM`` with eager attention and eager experts (the audit's reference; the DeltaNet runs
  transformers' torch fallback, the only CPU path: ``fla`` and ``causal_conv1d`` are GPU kernels), torch's default
  thread count (one per core), and ``OMP_WAIT_POLICY=PASSIVE`` unless set (``bench/paired.py``: with libgomp's
  spinning default, HF on a shared machine ran up to 10x slower, which made HF-bf16 look slow). JAX:
  ``qwen_jax.load_hf`` and ``qwen_jax.generate`` (``max_length`` = prompt + new for both calls: one compiled
  program each; the compile is in the warm-up).

Each side runs in its own subprocess (peak RSS per side), and the sides alternate ``--rounds`` times (HF, JAX, HF,
JAX, ...) so that a change in the machine's load hits both; each side warms up, then runs ``--repeats`` (prefill,
decode) pairs. The summary gives per side the median tokens/s over all repeats of all rounds with the range, the
ratio JAX / HF of the medians, and each round's ratio (the spread). ``--dtype both`` (the default) runs float32,
then bfloat16.

Greedy agreement (``--agree`` prompts, the timed one first, ``--new`` tokens each, generated once more with the
logits kept): per sequence the first divergence, judged as the audit judges one (``audit.metrics``: a near-tie when
each side's token is in the other's top 5, with both sides' log-prob gaps), and the largest |logit difference| at
the first step (same prompt on both sides). In bf16 the same is reported for HF-bf16 against HF-fp32 (when fp32 ran
in the same invocation): the reference's own bf16 error, which is the audit's yardstick (README, "Tolerances": a
port as accurate as the reference is within 2x it). With random weights the logits are nearly flat (std ~0.5 over
32k tokens), so bf16 rounding alone reorders the top tokens, on HF's side as on the project's.

Also: decode throughput as a fraction of this machine's memory-bandwidth roofline: the bytes of weights one decode
step must read (embedding row, lm_head, every non-expert weight, the top-k routed experts and the shared expert of
each layer), over a read bandwidth measured right before each JAX run; the fraction is the median over the JAX runs
of (that run's decode speed) / (the bandwidth just before it). When those bandwidths differ by more than 20%
(max/min), the load from other processes changed, and a warning says that the fraction is unreliable.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import paired
import roofline

#: The bandwidth probe's buffer (``roofline.bandwidth_probe``: one thread per core): 256 MiB, about twice the bytes
#: a decode step of the bench model reads in fp32. This machine reports a 480 MiB L3, so the probe and the model's
#: per-step weights both read partly from the cache.
PROBE_BYTES = 1 << 28

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


def prompt_ids(n: int, rows: int = 1):
    """``rows`` random prompts of ``n`` tokens (seed 0); row 0 is the timed prompt."""
    import numpy as np

    return np.random.RandomState(0).randint(0, BENCH_CONFIG["vocab_size"], (rows, n))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_hf(path: str, n_prompt: int, n_new: int, dtype: str, repeats: int, agree: int, out) -> None:
    paired.set_hf_cpu_environment()  # before torch starts its OpenMP runtime
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    model = Qwen3_5MoeForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager", experts_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None  # no early stop: exactly the tokens asked for
    prompts = torch.as_tensor(prompt_ids(n_prompt, max(agree, 1)))

    def generate(ids, n: int, keep_logits: bool = False):
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0,
                temperature=None, top_p=None, top_k=None, output_logits=keep_logits,
                return_dict_in_generate=keep_logits,
            )  # fmt: skip

    timing = paired.timed_pairs(lambda n: generate(prompts[:1], n)[0, n_prompt:].tolist(), n_new - 1, repeats)
    tokens, logits = [], []
    for row in range(agree):
        kept = generate(prompts[row : row + 1], n_new, keep_logits=True)
        tokens.append(kept.sequences[0, n_prompt:].tolist())
        logits.append(torch.stack(kept.logits)[:, 0].float().numpy())
    out.put(dict(**timing, agree_tokens=tokens, agree_logits=logits, peak_rss_mb=peak_rss_mb(),
                 settings=paired.hf_settings()))  # fmt: skip


def run_jax(path: str, n_prompt: int, n_new: int, dtype: str, repeats: int, agree: int, out) -> None:
    import jax
    import numpy as np

    import qwen_jax

    model = qwen_jax.load_hf(path, dtype)
    prompts = prompt_ids(n_prompt, max(agree, 1)).astype("int32")

    def generate(ids, n: int, keep_logits: bool = False):
        return qwen_jax.generate(
            model, ids, max_new_tokens=n, stop_token_ids=(), max_length=n_prompt + n_new, pad_to_multiple=1,
            return_logits=keep_logits,
        )  # fmt: skip

    t = time.perf_counter()
    generate(prompts[:1], 1)
    generate(prompts[:1], n_new)
    compile_s = time.perf_counter() - t
    peak_rss = peak_rss_mb()  # the model's own peak, before the bandwidth probe allocates its array
    probe = roofline.bandwidth_probe(PROBE_BYTES)
    timing = paired.timed_pairs(  # the read bandwidth (GB/s) measured right before each (prefill, decode) pair
        lambda n: generate(prompts[:1], n).tokens[0].tolist(), n_new - 1, repeats, lambda: probe() / 1e9
    )
    tokens, logits = [], []
    for row in range(agree):
        kept = generate(prompts[row : row + 1], n_new, keep_logits=True)
        tokens.append(kept.tokens[0].tolist())
        logits.append(np.asarray(kept.logits[0], np.float32))
    out.put(dict(**timing, agree_tokens=tokens, agree_logits=logits, compile_s=compile_s, peak_rss_mb=peak_rss,
                 decode_step_bytes=roofline.model_decode_step_bytes(model), devices=str(jax.devices())))  # fmt: skip


def in_subprocess(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # the side's result, or its exit code if it died without one
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"{target.__name__} exited with code {proc.exitcode} before reporting"
                ) from None
    proc.join()
    return result


def decode_roofline(jax_runs: list[dict], decode_steps: int) -> dict:
    """JAX decode speed against the memory-bandwidth roofline (``roofline.py``: the bytes a step reads): each decode
    run against the bandwidth measured just before it (median over the runs), and the bandwidths' spread."""
    step_bytes = jax_runs[0]["decode_step_bytes"]
    runs = [(d, b) for r in jax_runs for d, b in zip(r["decode_s"], r["before_each"], strict=True)]
    bandwidths = [b for _, b in runs]
    fractions = [decode_steps / d / (b * 1e9 / step_bytes) for d, b in runs]
    return dict(
        decode_step_bytes=step_bytes, read_bandwidth_gbs=statistics.median(bandwidths),
        read_bandwidth_runs_gbs=bandwidths, read_bandwidth_spread=max(bandwidths) / min(bandwidths),
        roofline_tokens_per_s=statistics.median(bandwidths) * 1e9 / step_bytes,
        jax_decode_fraction_of_roofline=statistics.median(fractions),
        jax_decode_fraction_of_roofline_runs=fractions,
    )  # fmt: skip


def compare(path: str, dtype: str, args, reference_fp32: dict | None) -> dict:
    """One dtype: the sides alternate ``args.rounds`` times, each in its own subprocess; speeds, ratios, roofline
    and greedy agreement, printed and returned. ``reference_fp32``: HF-fp32's agreement run, to calibrate bf16."""
    n_prompt, n_new, steps = args.prompt, args.new, args.new - 1
    rounds = []
    for i in range(args.rounds):
        sides = {}
        for side, target in (("hf", run_hf), ("jax", run_jax)):
            print(f"[{dtype}] round {i + 1}/{args.rounds}: {side} ...", flush=True)
            agree = args.agree if i == 0 else 0  # the agreement runs once, in the first round
            sides[side] = in_subprocess(target, path, n_prompt, n_new, dtype, args.repeats, agree)
        rounds.append(sides)
    hf, jx = rounds[0]["hf"], rounds[0]["jax"]
    speed = paired.summarise_speeds(rounds, n_prompt, steps)
    roof = decode_roofline([r["jax"] for r in rounds], steps)
    hf_roof = speed["decode_tokens_per_s"]["hf"] / roof["roofline_tokens_per_s"]
    results = dict(
        config=BENCH_CONFIG, dtype=dtype, prompt=n_prompt, new_tokens=n_new, rounds=args.rounds, repeats=args.repeats,
        work="equal, through each side's public greedy generate: prefill = generate(prompt, 1 token) (filled decode "
        "state, last-position logits, first token); decode = generate(prompt, new) - prefill = new - 1 model steps",
        **speed, **roof, hf_decode_fraction_of_roofline=hf_roof,
        peak_rss_mb={"hf": max(r["hf"]["peak_rss_mb"] for r in rounds),
                     "jax": max(r["jax"]["peak_rss_mb"] for r in rounds)},
        jax_compile_s=statistics.median(r["jax"]["compile_s"] for r in rounds), hf_settings=hf["settings"],
        timed_tokens_equal=hf["tokens"] == jx["tokens"],
    )  # fmt: skip
    if args.agree:
        results["greedy_agreement"] = paired.greedy_agreement(
            hf["agree_tokens"], hf["agree_logits"], jx["agree_tokens"], jx["agree_logits"]
        )
    if args.agree and dtype != "float32" and reference_fp32 is not None:
        reference = paired.greedy_agreement(
            reference_fp32["agree_tokens"],
            reference_fp32["agree_logits"],
            hf["agree_tokens"],
            hf["agree_logits"],
        )
        results["reference_bf16_vs_fp32_agreement"] = reference
        results["first_step_logit_diff_over_reference_bf16_error"] = (
            results["greedy_agreement"]["first_step_max_abs_logit_diff"]
            / reference["first_step_max_abs_logit_diff"]
        )
    print_summary(results)
    results["agreement_run"] = {"hf": hf, "jax": jx} if dtype == "float32" and args.agree else None
    return results


def print_summary(r: dict) -> None:
    def spread(ratios: list[float]) -> str:
        return f"per round {min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "no complete round"

    d, p = r["decode_tokens_per_s"], r["prefill_tokens_per_s"]
    print(f"[{r['dtype']}] equal work (public generate on both sides); medians over {r['rounds']} alternating rounds "
          f"x {r['repeats']} repeats; HF {r['hf_settings']}")  # fmt: skip
    print(f"decode  tok/s: JAX {d['jax']:.1f} ({d['jax_range'][0]:.1f}-{d['jax_range'][1]:.1f})  HF {d['hf']:.1f} "
          f"({d['hf_range'][0]:.1f}-{d['hf_range'][1]:.1f})  ratio {r['decode_ratio_jax_over_hf']:.2f}x "
          f"({spread(r['decode_ratio_per_round'])})")  # fmt: skip
    print(f"prefill tok/s: JAX {p['jax']:.0f} ({p['jax_range'][0]:.0f}-{p['jax_range'][1]:.0f})  HF {p['hf']:.0f} "
          f"({p['hf_range'][0]:.0f}-{p['hf_range'][1]:.0f})  ratio {r['prefill_ratio_jax_over_hf']:.2f}x "
          f"({spread(r['prefill_ratio_per_round'])})")  # fmt: skip
    fractions, bandwidths = r["jax_decode_fraction_of_roofline_runs"], r["read_bandwidth_runs_gbs"]
    print(f"roofline: {r['decode_step_bytes'] / 1e6:.0f} MB/step at {r['read_bandwidth_gbs']:.1f} GB/s (median; "
          f"{min(bandwidths):.1f}-{max(bandwidths):.1f}) = {r['roofline_tokens_per_s']:.0f} tok/s; JAX "
          f"{r['jax_decode_fraction_of_roofline']:.0%} ({min(fractions):.0%}-{max(fractions):.0%}), "
          f"HF {r['hf_decode_fraction_of_roofline']:.0%}")  # fmt: skip
    if r["read_bandwidth_spread"] > BUSY_SPREAD:
        print(
            f"warning: the read bandwidth moved by {r['read_bandwidth_spread'] - 1:.0%} between the JAX runs (the load "
            "from other processes changed), so the fraction of the roofline is unreliable; run again on a quiet machine"
        )
    print(f"peak RSS MB: JAX {r['peak_rss_mb']['jax']:.0f}  HF {r['peak_rss_mb']['hf']:.0f}; JAX compile "
          f"{r['jax_compile_s']:.1f}s")  # fmt: skip
    if "greedy_agreement" in r:
        a = r["greedy_agreement"]
        print(f"greedy, JAX against HF: {a['summary']}; first-step max |logit diff| "
              f"{a['first_step_max_abs_logit_diff']:.3g}")  # fmt: skip
    if "reference_bf16_vs_fp32_agreement" in r:
        a = r["reference_bf16_vs_fp32_agreement"]
        print(f"greedy, HF-{r['dtype']} against HF-float32 (the reference's own rounding error): {a['summary']}; "
              f"first-step max |logit diff| {a['first_step_max_abs_logit_diff']:.3g}; JAX's distance to HF is "
              f"{r['first_step_logit_diff_over_reference_bf16_error']:.2f}x that (the audit allows 2x)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3, help="HF/JAX alternations per dtype (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="(prefill, decode) pairs per side and round")
    parser.add_argument("--agree", type=int, default=8, help="prompts for the greedy agreement (0: none)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.new < 2 or args.rounds < 1 or args.repeats < 1 or args.agree < 0:
        parser.error("--new must be >= 2, --rounds and --repeats >= 1, --agree >= 0")
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    paired.set_hf_cpu_environment()  # inherited by the sides' subprocesses
    results, reference_fp32 = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp))
        for dtype in dtypes:
            results[dtype] = compare(tmp, dtype, args, reference_fp32)
            if dtype == "float32" and results[dtype]["agreement_run"]:
                reference_fp32 = results[dtype]["agreement_run"]["hf"]
            results[dtype].pop("agreement_run")
    if args.json:
        tmp_json = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_json.write_text(json.dumps(results if len(results) > 1 else results[dtypes[0]], indent=2))
        tmp_json.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
