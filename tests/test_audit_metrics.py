"""audit.metrics: the divergence measures on hand-made inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from audit import metrics


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits():
    return np.random.RandomState(0).randn(5, 40).astype(np.float32) * 3


def test_identical_logits_give_zero_divergence(logits):
    m = metrics.per_position_logit_metrics(metrics.logit_view(logits), logits)
    assert m["max_abs"].max() == 0 and m["mean_abs"].max() == 0
    assert np.abs(m["kl"]).max() < 1e-12 and np.abs(m["rel_diff"]).max() < 1e-12
    assert m["top1_agree"].all() and (m["top5_overlap"] == 1).all()


def test_full_view_kl_is_the_exact_kl(logits):
    other = logits + np.random.RandomState(1).randn(*logits.shape).astype(np.float32) * 0.3
    m = metrics.per_position_logit_metrics(metrics.logit_view(logits), other)
    p, q = softmax(logits.astype(np.float64)), softmax(other.astype(np.float64))
    np.testing.assert_allclose(m["kl"], (p * np.log(p / q)).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(m["max_abs"], np.abs(logits - other).max(-1), rtol=1e-6)


def test_top_k_view_kl_is_a_lower_bound_and_close(logits):
    other = logits + np.random.RandomState(2).randn(*logits.shape).astype(np.float32) * 0.3
    full = metrics.per_position_logit_metrics(metrics.logit_view(logits), other)["kl"]
    top = metrics.logit_view(logits, top_k=20, full_vocab_limit=10)
    assert top.ids.shape == (5, 20)
    assert (np.diff(top.values, axis=-1) <= 0).all(), "the view is sorted, largest first"
    coarse = metrics.per_position_logit_metrics(top, other)["kl"]
    assert (coarse <= full + 1e-9).all()  # coarsening never increases KL (data-processing inequality)
    assert (coarse >= 0.5 * full).all()


def test_top1_flip_and_margin():
    ref = np.array([[2.0, 1.9, 0.0, -1.0, -2.0, -3.0]])
    ours = np.array([[1.9, 2.0, 0.0, -1.0, -2.0, -3.0]])
    m = metrics.per_position_logit_metrics(metrics.logit_view(ref), ours)
    assert not m["top1_agree"][0]
    assert m["top5_overlap"][0] == 1.0
    np.testing.assert_allclose(m["ref_margin"][0], 0.1, rtol=1e-6)


def test_rel_diff_matches_its_definition():
    x, y = np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 3.5]])
    m = metrics.per_position_logit_metrics(metrics.logit_view(x), y)
    expected = 1 - 2 * (x * y).sum() / ((x**2).sum() + (y**2).sum())
    np.testing.assert_allclose(m["rel_diff"][0], expected, rtol=1e-9)


def test_layer_diffs_find_the_coordinate():
    ref = [np.zeros((3, 4, 5)), np.zeros((3, 6, 5))]
    ours = [np.zeros((3, 4, 5)), np.zeros((3, 6, 5))]
    ref[0][:] = 1.0
    ref[1][:] = 1.0
    ours[0][:] = 1.0
    ours[1][:] = 1.0
    ours[1][2, 5, 3] = 4.0
    diffs = metrics.layer_diffs(ref, ours)
    assert diffs[0].rel_diff == 0 and diffs[1].rel_diff == 0
    assert diffs[2].max_abs == 3.0 and diffs[2].max_abs_at == (1, 5, 3)
    assert diffs[2].rel_diff > 0


def test_routing_agreement_counts_near_ties():
    ids = np.array([[0, 1, 2], [3, 4, 5]])
    probs = np.array([[0.5, 0.3, 0.2999], [0.6, 0.3, 0.1]])
    ours = np.array([[0, 2], [4, 3]])  # token 0 swapped at a near-tie; token 1 the same set in another order
    agreement = metrics.routing_agreement([ids], [probs], [ours], near_tie=1e-3)
    assert agreement.tokens == 2 and agreement.flips == 1 and agreement.flips_at_near_tie == 1
    assert agreement.set_equal_rate == 0.5
    np.testing.assert_allclose(agreement.min_margin, 1e-4, rtol=1e-6)


def test_first_divergence():
    assert metrics.first_divergence(np.array([1, 2, 3]), np.array([1, 2, 3])) is None
    assert metrics.first_divergence(np.array([1, 2, 3]), np.array([1, 5, 3])) == 1
    assert metrics.first_divergence(np.array([1, 2]), np.array([1, 2, 3])) == 2


def test_judge_divergence_near_tie_and_bug():
    ref = np.array([[0.0, 5.0, 4.99, -1.0, -2.0, -3.0, -4.0, -5.0]])
    view = metrics.logit_view(ref)
    tie = metrics.judge_divergence(0, 1, 2, view, ref, at=0)
    assert tie.classification == "near-tie"
    np.testing.assert_allclose(tie.reference_logprob_gap, 0.01, rtol=1e-4)  # 4.99 rounded to float32
    bug = metrics.judge_divergence(0, 1, 7, view, ref, at=0)
    assert bug.classification == "bug" and not bug.jax_token_in_reference_top5
