"""bench/paired.py: the paired benches' timing protocol, speed summary and greedy agreement (pure Python/numpy)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import paired


def test_timed_pairs_splits_prefill_and_decode_and_calls_before_each():
    calls, before = [], []

    def generate_tokens(n):
        calls.append(n)
        return list(range(n))

    out = paired.timed_pairs(generate_tokens, steps=4, repeats=2, before_each=lambda: before.append(1) or 7.0)
    assert calls == [1, 5, 1, 5, 1, 5]  # warm-up pair, then one pair per repeat
    assert len(out["prefill_s"]) == len(out["decode_s"]) == 2
    assert out["tokens"] == [0, 1, 2, 3, 4] and out["before_each"] == [7.0, 7.0] and len(before) == 2


def test_summarise_speeds_medians_ratios_and_rounds():
    def side(prefill, decode):
        return {"prefill_s": prefill, "decode_s": decode}

    rounds = [
        {"hf": side([2.0, 4.0], [10.0, 10.0]), "jax": side([1.0, 1.0], [5.0, 2.5])},
        {"hf": side([4.0], [20.0]), "jax": {"error": "died"}},
    ]
    out = paired.summarise_speeds(rounds, prompt_tokens=512, decode_steps=10)
    assert out["prefill_tokens_per_s"]["hf"] == pytest.approx(128.0)  # median of 256, 128, 128
    assert out["prefill_tokens_per_s"]["jax"] == pytest.approx(512.0)
    assert out["prefill_ratio_jax_over_hf"] == pytest.approx(4.0)
    assert out["decode_tokens_per_s"]["jax_range"] == pytest.approx([2.0, 4.0])
    assert out["decode_ratio_per_round"] == pytest.approx([3.0 / 1.0])  # the round with an error is left out


def test_greedy_agreement_counts_identical_near_ties_and_bugs():
    vocab, steps = 16, 3
    rng = np.random.RandomState(0)
    ref_logits = rng.normal(size=(3, steps, vocab)).astype(np.float32)
    ref_tokens = ref_logits.argmax(-1)
    ours_logits = ref_logits.copy()
    # sequence 1: at step 1 the runner-up overtakes by a hair (both tokens in each other's top 5): a near-tie
    second = np.argsort(-ref_logits[1, 1])[1]
    ours_logits[1, 1, second] = ref_logits[1, 1].max() + 1e-3
    # sequence 2: at step 0 the reference's last token wins on our side: a bug
    last = ref_logits[2, 0].argmin()
    ours_logits[2, 0, last] = ref_logits[2, 0].max() + 5.0
    ours_tokens = ours_logits.argmax(-1)
    out = paired.greedy_agreement(ref_tokens, ref_logits, ours_tokens, ours_logits)
    assert (out["sequences"], out["identical"], out["first_divergences"], out["near_ties"]) == (3, 1, 2, 1)
    near, bug = out["divergences"]
    assert (near["sequence"], near["position"], near["classification"]) == (1, 1, "near-tie")
    assert (bug["sequence"], bug["position"], bug["classification"]) == (2, 0, "bug")
    assert out["first_step_max_abs_logit_diff"] == pytest.approx(
        float(ours_logits[2, 0, last] - ref_logits[2, 0, last])
    )


def test_profile_scopes_leave_out_loops_and_conditionals():
    """bench/profile_by_scope.py: a conditional (named ``cond.N`` by jax) contains its branches' thunks, so it is not
    counted itself; the fusion inside takes its own scope, and the while loop is left out too."""
    from profile_by_scope import instruction_scopes

    hlo = "\n".join(
        [
            "%branch (p: u16[8]) -> (u16[8]) {",
            '  %ynn_fusion.1 = f32[8]{0} fusion(%p), kind=kCustom, calls=%f, metadata={op_name="jit(f)/layer_0/moe/dot"}',
            "}",
            "ENTRY %main (x: u16[8]) -> u16[8] {",
            "  %cond.1.clone = (u16[8]{0}) conditional(%c, %t, %t), branch_computations={%branch, %branch}",
            "  %while.3 = (s32[], /*index=1*/u16[8]{0}) while(%tuple), condition=%c, body=%branch",
            '  %add.2 = f32[8]{0} add(%a, %b), metadata={op_name="jit(f)/layer_1/full_attention/add"}',
            "}",
        ]
    )
    scopes = instruction_scopes(hlo)
    assert scopes == {"ynn_fusion.1": "moe", "add.2": "full_attention"}
