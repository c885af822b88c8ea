"""Divergence metrics between the reference and the JAX side: pure numpy, no framework.

The reference's logits are kept as a :class:`LogitView`: the full vocabulary for small models, or the top-K entries
plus the log-normaliser for large ones (a bundle cannot hold [positions, 248320] floats per prompt). Every metric is
computed on the reference's support, so live runs and bundles go through the same code:

- ``max_abs``/``mean_abs``: |ref - jax| of the raw logits on the support;
- ``rel_diff``: 1 - 2<x,y>/(|x|^2+|y|^2) of the logits on the support (SGLang's / DeepGEMM's metric);
- ``kl``: KL(ref || jax) in float64 of the distributions coarsened to the support plus one "rest" bucket (exact
  when the support is the whole vocabulary, a lower bound otherwise);
- ``top1_agree``, ``top5_overlap``: the JAX argmax equals the reference's, and |top5 ∩ top5| / 5;
- ``ref_margin``: the reference's top-1 minus top-2 log-probability, to tell flips at near-ties from bugs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Above this vocabulary size only the top ``TOP_K`` reference logits per position are kept.
FULL_VOCAB_LIMIT = 4096
TOP_K = 64
LOGIT_METRICS = ("max_abs", "mean_abs", "rel_diff", "kl", "top1_agree", "top5_overlap", "ref_margin")


@dataclasses.dataclass(frozen=True)
class LogitView:
    """The reference logits of one sequence on its support: ``ids`` [T, K], ``values`` [T, K] (descending),
    ``lse`` [T] the log-sum-exp over the whole vocabulary."""

    ids: np.ndarray
    values: np.ndarray
    lse: np.ndarray

    def logprobs(self) -> np.ndarray:
        return self.values.astype(np.float64) - self.lse[:, None]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    top = x.max(-1)
    return top + np.log(np.exp(x - top[..., None]).sum(-1))


def logit_view(logits: np.ndarray, top_k: int = TOP_K, full_vocab_limit: int = FULL_VOCAB_LIMIT) -> LogitView:
    """The view kept of [T, V] logits, largest first: all of them when V <= ``full_vocab_limit``, else the top
    ``top_k``."""
    logits = np.asarray(logits, np.float32)
    lse = logsumexp(logits).astype(np.float64)
    if logits.shape[1] <= full_vocab_limit:
        ids = np.broadcast_to(np.arange(logits.shape[1]), logits.shape)
    else:
        ids = np.argpartition(-logits, top_k, axis=-1)[:, :top_k]
    values = np.take_along_axis(logits, ids, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return LogitView(
        np.take_along_axis(ids, order, -1).astype(np.int32), np.take_along_axis(values, order, -1), lse
    )


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, largest first (ties: lower index first)."""
    return np.argsort(-x, axis=-1, kind="stable")[:, :k]


def per_position_logit_metrics(ref: LogitView, logits: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of :data:`LOGIT_METRICS` per position, reference ``ref`` against full ``logits`` [T, V]."""
    logits = np.asarray(logits, np.float64)
    ours = np.take_along_axis(logits, ref.ids, -1)
    theirs = ref.values.astype(np.float64)
    diff = np.abs(ours - theirs)
    dot = (ours * theirs).sum(-1)
    norms = (ours**2).sum(-1) + (theirs**2).sum(-1)
    rel_diff = np.where(norms > 0, 1.0 - 2.0 * dot / np.where(norms > 0, norms, 1.0), 0.0)

    ref_lp = ref.logprobs()
    our_lp = ours - logsumexp(logits)[:, None]
    p = np.exp(ref_lp)
    kl = (p * (ref_lp - our_lp)).sum(-1)
    ref_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    our_rest = np.clip(1.0 - np.exp(our_lp).sum(-1), 1e-300, 1.0)
    kl = kl + np.where(
        ref_rest > 1e-12, ref_rest * (np.log(np.maximum(ref_rest, 1e-300)) - np.log(our_rest)), 0.0
    )

    our_top5 = _top(logits, 5)
    ref_top5 = ref.ids[:, :5]
    overlap = np.array([len(set(a) & set(b)) / 5.0 for a, b in zip(our_top5, ref_top5, strict=True)])
    return {
        "max_abs": diff.max(-1),
        "mean_abs": diff.mean(-1),
        "rel_diff": rel_diff,
        "kl": np.maximum(kl, 0.0),
        "top1_agree": our_top5[:, 0] == ref.ids[:, 0],
        "top5_overlap": overlap,
        "ref_margin": ref_lp[:, 0] - ref_lp[:, 1] if ref_lp.shape[1] > 1 else np.full(len(ref_lp), np.inf),
    }


def summarise(values: np.ndarray) -> dict[str, float]:
    """mean, p99 and max of a metric over positions (as llama.cpp's KL report)."""
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        return {"mean": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"mean": float(x.mean()), "p99": float(np.percentile(x, 99)), "max": float(x.max())}


def summarise_positions(per_prompt: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Each metric summarised over the positions of all prompts."""
    return {
        name: summarise(np.concatenate([np.asarray(m[name], np.float64) for m in per_prompt]))
        for name in LOGIT_METRICS
    }


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """One hidden state's divergence over all prompts and positions."""

    rel_diff: float
    max_abs: float
    max_abs_at: tuple[int, int, int]  # (prompt, position, dim)


def layer_diffs(ref: list[np.ndarray], ours: list[np.ndarray]) -> list[LayerDiff]:
    """Per hidden-state index: rel_diff over all prompts and positions, and the max |diff| with its coordinate.

    ``ref`` and ``ours`` hold one [n_states, T, H] array per prompt.
    A hidden state holding NaN or inf on either side has rel_diff and max_abs NaN (never a reassuring 0), and
    ``max_abs_at`` is its first non-finite coordinate."""
    n_states = ref[0].shape[0]
    out = []
    for layer in range(n_states):
        dot = norms = 0.0
        best, where = -1.0, (0, 0, 0)
        non_finite = None
        for prompt, (r, o) in enumerate(zip(ref, ours, strict=True)):
            x, y = np.asarray(r[layer], np.float64), np.asarray(o[layer], np.float64)
            d = np.abs(x - y)
            if non_finite is None and not np.isfinite(d).all():
                at = np.argwhere(~np.isfinite(d))[0]
                non_finite = (prompt, int(at[0]), int(at[1]))
            if non_finite is not None:
                continue
            dot += float((x * y).sum())
            norms += float((x**2).sum() + (y**2).sum())
            at = np.unravel_index(int(d.argmax()), d.shape)
            if d[at] > best:
                best, where = float(d[at]), (prompt, int(at[0]), int(at[1]))
        if non_finite is not None:
            out.append(LayerDiff(float("nan"), float("nan"), non_finite))
        else:
            out.append(LayerDiff(1.0 - 2.0 * dot / norms if norms > 0 else 0.0, best, where))
    return out


def first_non_finite(arrays: list[np.ndarray]) -> tuple[int, int, int] | None:
    """(index, prompt, position) of the first NaN or inf in per-prompt arrays [n, T, ...] (hidden states
    [n_states, T, H]: the lowest hidden-state index first, then the lowest prompt and position), or None."""
    if not arrays:
        return None
    for index in range(arrays[0].shape[0]):
        for prompt, a in enumerate(arrays):
            bad = ~np.isfinite(np.asarray(a[index]))
            if bad.any():
                return index, prompt, int(np.argwhere(bad)[0][0])
    return None


@dataclasses.dataclass(frozen=True)
class RoutingAgreement:
    """Per MoE layer: how often the JAX top-k expert set equals the reference's, and where it does not, the
    reference's margin between its k-th and (k+1)-th router probability."""

    tokens: int
    set_equal_rate: float
    flips: int
    flips_at_near_tie: int
    min_margin: float


def routing_agreement(
    ref_ids: list[np.ndarray], ref_probs: list[np.ndarray], ours: list[np.ndarray], near_tie: float
) -> RoutingAgreement:
    """``ref_ids``/``ref_probs`` [T, k+1] (the reference's top k+1 experts and probabilities, descending),
    ``ours`` [T, k] (the JAX top-k experts), one array per prompt."""
    tokens = flips = near = 0
    min_margin = float("inf")
    for ids, probs, mine in zip(ref_ids, ref_probs, ours, strict=True):
        k = mine.shape[-1]
        equal = (np.sort(ids[:, :k], -1) == np.sort(mine, -1)).all(-1)
        margin = probs[:, k - 1].astype(np.float64) - probs[:, k]
        tokens += len(equal)
        flips += int((~equal).sum())
        near += int((~equal & (margin < near_tie)).sum())
        if len(margin):
            min_margin = min(min_margin, float(margin.min()))
    return RoutingAgreement(tokens, 1.0 - flips / max(tokens, 1), flips, near, min_margin)


@dataclasses.dataclass(frozen=True)
class Divergence:
    """The first generated position where the two greedy outputs differ, judged as vLLM's check_logprobs_close
    does: a near-tie when each side's token is in the other's top 5."""

    position: int
    reference_token: int
    jax_token: int
    jax_token_in_reference_top5: bool
    reference_token_in_jax_top5: bool
    reference_logprob_gap: (
        float | None
    )  # ref logprob of its token minus of the JAX token (None: not in support)
    jax_logprob_gap: float  # JAX logprob of its token minus of the reference token

    @property
    def classification(self) -> str:
        return "near-tie" if self.jax_token_in_reference_top5 and self.reference_token_in_jax_top5 else "bug"


def first_divergence(reference: np.ndarray, ours: np.ndarray) -> int | None:
    """Index of the first differing generated token (a length difference counts at the shorter end)."""
    n = min(len(reference), len(ours))
    differ = np.nonzero(np.asarray(reference[:n]) != np.asarray(ours[:n]))[0]
    if len(differ):
        return int(differ[0])
    return None if len(reference) == len(ours) else n


def judge_divergence(
    position: int, reference_token: int, jax_token: int, ref: LogitView, logits: np.ndarray, at: int
) -> Divergence:
    """Both sides' views of the divergence at teacher-forced position ``at`` (which predicts generated token
    ``position``), from the reference's view and the JAX logits [T, V] on the same (reference) prefix."""
    ref_lp = ref.logprobs()[at]
    ref_ids = list(ref.ids[at])
    our_lp = log_softmax(np.asarray(logits)[at])
    our_top5 = set(_top(our_lp[None], 5)[0].tolist())
    ref_gap = (
        float(ref_lp[ref_ids.index(reference_token)] - ref_lp[ref_ids.index(jax_token)])
        if reference_token in ref_ids and jax_token in ref_ids
        else None
    )
    return Divergence(
        position=position,
        reference_token=int(reference_token),
        jax_token=int(jax_token),
        jax_token_in_reference_top5=jax_token in ref_ids[:5],
        reference_token_in_jax_top5=reference_token in our_top5,
        reference_logprob_gap=ref_gap,
        jax_logprob_gap=float(our_lp[jax_token] - our_lp[reference_token]),
    )
