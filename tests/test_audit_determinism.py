"""audit.determinism: the reference's greedy checks run on a bounded, reproducible subset of the prompts (the first
ones, bounded in count and in the positions of their left-padded batch), each again at batch 1, and the manifest
says which."""

from __future__ import annotations

import numpy as np
import pytest
from test_records import one_torch_thread  # noqa: F401  (a fixture: torch on one thread)

from audit import determinism
from audit.determinism import CHECK_PROMPTS, CHECK_TOKENS, check_subset


def test_the_subset_is_the_first_prompts_bounded_in_count_and_positions():
    assert check_subset([10] * 5000, 256) == list(range(CHECK_PROMPTS))
    assert check_subset([10], 256) == [0]
    # rows x (longest + budget) <= CHECK_TOKENS: two rows of 10,000 + 6,000 fit in 32,768, three do not
    assert check_subset([10_000, 9_000, 8_000, 5], 6_000) == [0, 1]
    # a longer prompt later raises the longest row: it stops the subset there
    assert check_subset([100, 100, 20_000, 100], 0, max_tokens=40_000) == [0, 1]
    # prompt 0 always, even alone over the bound
    assert check_subset([CHECK_TOKENS * 2, 5], 10) == [0]
    assert check_subset([7, 8, 9], 3, max_prompts=2) == [0, 1]


def test_rerun_check_names_the_prompts_and_needs_every_one_equal():
    a, b = np.array([1, 2, 3]), np.array([4, 5])
    check = determinism.greedy_rerun_check("reference", [a, b], [a.copy(), b.copy()], [0, 1])
    assert check["passed"] and check["kind"] == "bitwise" and "prompts 0, 1" in check["name"]
    assert check["detail"].startswith("2/2 ")
    failed = determinism.greedy_rerun_check("reference", [a, b], [a, b[:1]], [0, 1])
    assert not failed["passed"] and failed["detail"].startswith("1/2 ")
    assert "greedy tokens of prompt 0" in determinism.greedy_rerun_check("jax", [a], [a])["name"]


@pytest.mark.usefixtures("one_torch_thread")
def test_the_reference_checks_only_the_subset_at_batch_1_and_says_so(tiny_checkpoints, monkeypatch):
    """Three prompts, a subset bound of 2: the reference generates each prompt once (the run), the two checked ones
    again alone at batch 1, and those two once together; never all three in one batch."""
    pytest.importorskip("torch")
    from audit import reference
    from audit.records import Prompt

    monkeypatch.setattr(determinism, "CHECK_PROMPTS", 2)
    calls = []
    greedy = reference.greedy

    def counting(model, prompts, *args):
        calls.append(len(prompts))
        return greedy(model, prompts, *args)

    monkeypatch.setattr(reference, "greedy", counting)
    prompts = [Prompt(f"p{k}", "", tuple(range(3, 8 + k))) for k in range(3)]
    run = reference.record_reference(
        tiny_checkpoints("hv2hk_top2of8"),
        prompts,
        dtype="float32",
        max_new_tokens=2,
        seed=0,
        stop_token_ids=(1,),
        manifest={},
        progress=False,
        hidden_states=0,
    )
    assert calls == [1] * 3 + [1, 1, 2]
    assert run.manifest["determinism_check"]["prompts"] == [0, 1]
    assert "at batch 1" in run.manifest["determinism_check"]["rule"]
    names = [check["name"] for check in run.determinism]
    assert "reference run-to-run: greedy tokens of prompts 0, 1" in names
    assert "reference batch 1 vs batch 2: greedy tokens" in names
    assert len(run.batch_outputs) == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_the_jax_side_checks_batch_invariance_on_the_same_bounded_subset(tiny_checkpoints, monkeypatch):
    """Three prompts, a subset bound of 2: the JAX side's batch check generates prompts 0 and 1 together (the
    reference's subset), never all three in one batch, and its tokens are the run's."""
    pytest.importorskip("torch")
    import qwen_jax
    from audit import jax_side, reference
    from audit.records import Prompt

    monkeypatch.setattr(determinism, "CHECK_PROMPTS", 2)
    checkpoint = tiny_checkpoints("hv2hk_top2of8")
    prompts = [Prompt(f"p{k}", "", tuple(range(3, 8 + k))) for k in range(3)]
    ref = reference.record_reference(
        checkpoint, prompts, dtype="float32", max_new_tokens=2, seed=0, stop_token_ids=(1,), manifest={},
        progress=False, hidden_states=0,
    )  # fmt: skip
    calls = []
    greedy_batch = jax_side.greedy_batch

    def counting(model, batch_prompts, *args, **kwargs):
        calls.append(len(batch_prompts))
        return greedy_batch(model, batch_prompts, *args, **kwargs)

    monkeypatch.setattr(jax_side, "greedy_batch", counting)
    model = qwen_jax.load_hf(checkpoint, dtype="float32")
    run = jax_side.run_jax(model, ref, max_new_tokens=2, stop_token_ids=(1,), progress=False)
    assert calls == [1] * 3 + [1, 2]  # the run at batch 1, prompt 0 again, then the subset together
    assert [len(b) for b in run.batch_outputs] == [len(run.sequences[i].generated) for i in (0, 1)]
    check = next(c for c in run.determinism if "batch invariance" in c["name"])
    assert check["passed"] and "the first 2 prompts" in check["name"]
