"""What the paired JAX-against-HF benches (``decode_vs_hf.py``, ``real_width.py``) share: HF's CPU settings, the
timing protocol (equal work through each side's public greedy ``generate``), the summary over alternating rounds,
and the greedy agreement judged as the audit judges it (``audit.metrics``)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: torch's CPU threads are OpenMP threads, and libgomp's default wait policy spins: on a machine shared with other
#: processes a spinning thread holds a core that the thread it waits for needs, and every parallel region (some 400
#: a decode step) waits for the scheduler. Measured on the shared 2-core machine (bench config, bf16, 2 threads):
#: decode step 370-550 ms median with the default, 38-58 ms with PASSIVE, 47 ms with 1 thread. PASSIVE is set for
#: the HF side (and inherited by the JAX side, which does not use OpenMP) unless the caller set OMP_WAIT_POLICY.
OMP_WAIT_POLICY = "PASSIVE"


def set_hf_cpu_environment() -> dict:
    """Sets ``OMP_WAIT_POLICY`` (unless already set) before torch is imported; returns the settings to record."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    return {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}


def hf_settings() -> dict:
    """HF's CPU path as it runs (call after importing torch), for the results."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def timed_pairs(
    generate_tokens: Callable[[int], list[int]], steps: int, repeats: int, before_each: Callable | None = None
) -> dict:
    """Warm-up, then ``repeats`` x (prefill = generate 1 token; decode = generate ``steps`` + 1 tokens minus that
    prefill, i.e. ``steps`` model steps). ``generate_tokens(n)`` returns the n greedy tokens. ``before_each()``, if
    given, runs (untimed) before each pair; its values are returned as ``before_each``."""
    generate_tokens(1)
    generate_tokens(steps + 1)
    prefill, decode, before = [], [], []
    for _ in range(repeats):
        if before_each is not None:
            before.append(before_each())
        t = time.perf_counter()
        generate_tokens(1)
        one = time.perf_counter() - t
        t = time.perf_counter()
        tokens = generate_tokens(steps + 1)
        prefill.append(one)
        decode.append(time.perf_counter() - t - one)
    timing = {"prefill_s": prefill, "decode_s": decode, "tokens": [int(x) for x in tokens]}
    return {**timing, "before_each": before} if before_each is not None else timing


def summarise_speeds(rounds: list[dict], prompt_tokens: int, decode_steps: int) -> dict:
    """``rounds``: [{"hf": side, "jax": side}], a side holding ``prefill_s``/``decode_s`` lists (or ``error``).
    Per phase: each side's median tokens/s over every repeat of every round, with its range, the ratio JAX / HF of
    the medians, and each round's ratio of its own medians (the spread)."""

    def speeds(side: str, phase: str, tokens: int, runs: list[dict]) -> list[float]:
        return [tokens / s for r in runs if "error" not in r[side] for s in r[side][f"{phase}_s"]]

    out: dict = {}
    both = [r for r in rounds if "error" not in r["hf"] and "error" not in r["jax"]]
    for phase, tokens in (("prefill", prompt_tokens), ("decode", decode_steps)):
        hf, jx = speeds("hf", phase, tokens, rounds), speeds("jax", phase, tokens, rounds)
        if not hf or not jx:
            continue
        out[f"{phase}_tokens_per_s"] = {
            "hf": statistics.median(hf),
            "jax": statistics.median(jx),
            "hf_range": [min(hf), max(hf)],
            "jax_range": [min(jx), max(jx)],
        }
        out[f"{phase}_ratio_jax_over_hf"] = statistics.median(jx) / statistics.median(hf)
        out[f"{phase}_ratio_per_round"] = [
            statistics.median(speeds("jax", phase, tokens, [r]))
            / statistics.median(speeds("hf", phase, tokens, [r]))
            for r in both
        ]
    return out


def greedy_agreement(ref_tokens, ref_logits, our_tokens, our_logits) -> dict:
    """Greedy agreement of sequences generated from the same prompts: ``*_tokens`` [S][T] and ``*_logits`` [S][T, V]
    (the logits each token was chosen from). Per sequence, the first divergence (``audit.metrics``), judged there as
    the audit does (vLLM's rule: a near-tie when each side's token is in the other's top 5; both sides' log-prob
    gaps; the tokens before it are equal, so both sides' logits there come from the same prefix), and the
    reference's own top-1 minus top-2 logit there. Also the largest |logit difference| at the first step (same
    prompt on both sides: a teacher-forced comparison)."""
    import numpy as np

    from audit.metrics import first_divergence, judge_divergence, logit_view

    divergences = []
    identical = 0
    first_step = []
    for row, (ref_t, ref_l, our_t, our_l) in enumerate(
        zip(ref_tokens, ref_logits, our_tokens, our_logits, strict=True)
    ):
        ref_l, our_l = np.asarray(ref_l, np.float32), np.asarray(our_l, np.float32)
        first_step.append(float(np.abs(ref_l[0] - our_l[0]).max()))
        at = first_divergence(np.asarray(ref_t), np.asarray(our_t))
        if at is None:
            identical += 1
            continue
        judged = judge_divergence(at, ref_t[at], our_t[at], logit_view(ref_l), our_l, at)
        top2 = np.sort(ref_l[at])[-2:]
        divergences.append(
            {
                "sequence": row,
                "position": at,
                "reference_token": judged.reference_token,
                "our_token": judged.jax_token,
                "classification": judged.classification,
                "reference_logprob_gap": judged.reference_logprob_gap,
                "our_logprob_gap": judged.jax_logprob_gap,
                "reference_top1_margin": float(top2[1] - top2[0]),
            }
        )
    near = sum(d["classification"] == "near-tie" for d in divergences)
    return {
        "sequences": len(ref_tokens),
        "identical": identical,
        "first_divergences": len(divergences),
        "near_ties": near,
        "summary": f"{identical}/{len(ref_tokens)} sequences identical; {len(divergences)} first divergences, "
        f"{near} of them near-ties (vLLM's top-5 rule)",
        "first_step_max_abs_logit_diff": max(first_step),
        "divergences": divergences,
    }
