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
import functools
import hashlib
from collections.abc import Sequence

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


#: Per-layer summaries of a hidden state, kept per token where the full states are not: its L2 norm, and a sketch,
#: its projection to ``SKETCH_DIM`` dims by a fixed Gaussian matrix (entries N(0, 1/SKETCH_DIM), seeded), the matrix
#: of position t being number t % SKETCH_POOL of a seeded pool (so that departures that point the same way at every
#: position still average out). ||sketch(x) - sketch(y)||^2 is an unbiased estimate of ||x - y||^2.
SKETCH_DIM = 16
SKETCH_POOL = 64
SKETCH_SEED = 20260514


@functools.cache
def sketch_matrices(hidden: int) -> np.ndarray:
    """[SKETCH_POOL, hidden, SKETCH_DIM] float64: the projections of :func:`summarise_hidden` for width ``hidden``."""
    rng = np.random.default_rng(SKETCH_SEED)
    matrices = rng.standard_normal((SKETCH_POOL, hidden, SKETCH_DIM)) / np.sqrt(SKETCH_DIM)
    matrices.flags.writeable = False
    return matrices


def sketch_spec(hidden: int) -> dict:
    """What a bundle records of its sketches, so that a reader can check it projects the same way."""
    digest = hashlib.sha256(sketch_matrices(hidden).tobytes()).hexdigest()
    return {
        "dim": SKETCH_DIM,
        "pool": SKETCH_POOL,
        "seed": SKETCH_SEED,
        "hidden_size": hidden,
        "sha256": digest,
    }


@dataclasses.dataclass(frozen=True)
class HiddenStates:
    """One side's hidden states of one prompt: ``full`` [n_states, T, H] float32 where kept (else None), and its
    summaries ``norms`` [n_states, T] and ``sketch`` [n_states, T, SKETCH_DIM] (float32; computed from ``full`` when
    not given)."""

    full: np.ndarray | None
    norms: np.ndarray | None = None
    sketch: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.full is None and (self.norms is None or self.sketch is None):
            raise ValueError("hidden states need the full array or both summaries")

    def summaries(self) -> tuple[np.ndarray, np.ndarray]:
        """(norms, sketch), computed from the full states when not kept."""
        if self.norms is not None and self.sketch is not None:
            return self.norms, self.sketch
        return summarise_hidden(self.full)

    def finite_probe(self) -> np.ndarray:
        """What shows where NaN or inf are: the full states [n_states, T, H], else the norms [n_states, T]."""
        return self.full if self.full is not None else self.norms

    @property
    def n_states(self) -> int:
        return (self.full if self.full is not None else self.norms).shape[0]


def summarise_hidden(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(norms [n_states, T], sketch [n_states, T, SKETCH_DIM]) of hidden states [n_states, T, H], both float32,
    computed in float64 (a non-finite state gives non-finite summaries)."""
    hidden = np.asarray(hidden)
    n_states, length, width = hidden.shape
    matrices = sketch_matrices(width)
    norms = np.empty((n_states, length), np.float32)
    sketch = np.empty((n_states, length, SKETCH_DIM), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for r in range(min(SKETCH_POOL, length)):
            x = np.asarray(hidden[:, r::SKETCH_POOL], np.float64)
            norms[:, r::SKETCH_POOL] = np.sqrt((x * x).sum(-1))
            sketch[:, r::SKETCH_POOL] = x @ matrices[r]
    return norms, sketch


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """One hidden state's divergence over all prompts and positions.

    ``rel_diff`` = sum ||x - y||^2 / sum (||x||^2 + ||y||^2) over prompts and positions (= 1 - 2<x,y>/(|x|^2+|y|^2));
    exact for prompts whose full states both sides hold, estimated from the sketches for the others
    (``estimated``). ``max_abs``/``max_abs_at`` (prompt, position, dim) come from the full states only (None when no
    prompt has them). ``departs_most_at`` (prompt, position): the position of the largest ||x - y|| (estimated where
    only sketches exist)."""

    rel_diff: float
    max_abs: float | None
    max_abs_at: tuple[int, int, int] | None  # (prompt, position, dim)
    estimated: bool = False
    departs_most_at: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class PromptLayerTerms:
    """One prompt's per-state terms of :class:`LayerDiff`: ``squared`` sum ||x - y||^2, ``energy`` sum ||x||^2 +
    ||y||^2, ``per_token`` ||x - y||^2 [n_states, T]; from the full states (``exact``: also ``max_abs`` [n_states]
    and its ``max_abs_at`` (position, dim) per state) or from the summaries; ``non_finite`` per state: the first
    (position, dim) holding NaN or inf (dim 0 from summaries), or None."""

    exact: bool
    squared: np.ndarray
    energy: np.ndarray
    per_token: np.ndarray
    max_abs: np.ndarray | None
    max_abs_at: list[tuple[int, int]] | None
    non_finite: list[tuple[int, int] | None]

    def rel_diff(self) -> np.ndarray:
        """Per state: this prompt's rel_diff (NaN where non-finite)."""
        out = np.where(self.energy > 0, self.squared / np.where(self.energy > 0, self.energy, 1.0), 0.0)
        return np.where([nf is None for nf in self.non_finite], out, np.nan)


def _as_states(x: np.ndarray | HiddenStates) -> HiddenStates:
    return x if isinstance(x, HiddenStates) else HiddenStates(np.asarray(x))


def prompt_layer_terms(ref: np.ndarray | HiddenStates, ours: np.ndarray | HiddenStates) -> PromptLayerTerms:
    """The per-state terms of one prompt: exact when both sides hold the full states, else from the summaries."""
    ref, ours = _as_states(ref), _as_states(ours)
    with np.errstate(invalid="ignore", over="ignore"):
        if ref.full is not None and ours.full is not None:
            return _exact_terms(ref.full, ours.full)
        (ref_norms, ref_sketch), (our_norms, our_sketch) = ref.summaries(), ours.summaries()
        d = np.asarray(ref_sketch, np.float64) - np.asarray(our_sketch, np.float64)
        per_token = (d * d).sum(-1)
        energy = (np.asarray(ref_norms, np.float64) ** 2 + np.asarray(our_norms, np.float64) ** 2).sum(-1)
        bad = ~(np.isfinite(per_token) & np.isfinite(ref_norms) & np.isfinite(our_norms))
    non_finite = [(int(np.argwhere(row)[0][0]), 0) if row.any() else None for row in bad]
    return PromptLayerTerms(False, per_token.sum(-1), energy, per_token, None, None, non_finite)


def _exact_terms(x_all: np.ndarray, y_all: np.ndarray) -> PromptLayerTerms:
    n_states, length = x_all.shape[:2]
    squared, energy = np.zeros(n_states), np.zeros(n_states)
    per_token, max_abs = np.zeros((n_states, length)), np.full(n_states, -1.0)
    max_abs_at, non_finite = [], []
    for layer in range(n_states):
        x, y = np.asarray(x_all[layer], np.float64), np.asarray(y_all[layer], np.float64)
        d = np.abs(x - y)
        finite = np.isfinite(d)
        if not finite.all():
            at = np.argwhere(~finite)[0]
            non_finite.append((int(at[0]), int(at[1])))
            max_abs_at.append(non_finite[-1])
            continue
        non_finite.append(None)
        per_token[layer] = (d * d).sum(-1)
        squared[layer] = per_token[layer].sum()
        energy[layer] = float((x**2).sum() + (y**2).sum())
        at = np.unravel_index(int(d.argmax()), d.shape) if d.size else (0, 0)
        max_abs[layer] = float(d[at]) if d.size else 0.0
        max_abs_at.append((int(at[0]), int(at[1])))
    return PromptLayerTerms(True, squared, energy, per_token, max_abs, max_abs_at, non_finite)


def layer_diffs(
    ref: Sequence[np.ndarray | HiddenStates], ours: Sequence[np.ndarray | HiddenStates]
) -> list[LayerDiff]:
    """Per hidden-state index: :class:`LayerDiff` over all prompts and positions.

    ``ref`` and ``ours`` hold one entry per prompt: a [n_states, T, H] array or :class:`HiddenStates`.
    A hidden state holding NaN or inf on either side has rel_diff and max_abs NaN (never a reassuring 0), and
    ``max_abs_at`` is its first non-finite coordinate (prompt, position, dim; dim 0 when only summaries show it)."""
    return combine_layer_terms([prompt_layer_terms(r, o) for r, o in zip(ref, ours, strict=True)])


def combine_layer_terms(terms: Sequence[PromptLayerTerms]) -> list[LayerDiff]:
    """The :class:`LayerDiff` of each state from the prompts' terms (see :func:`layer_diffs`)."""
    n_states = len(terms[0].squared)
    estimated = not all(t.exact for t in terms)
    out = []
    for layer in range(n_states):
        bad = next(((p, t.non_finite[layer]) for p, t in enumerate(terms) if t.non_finite[layer]), None)
        if bad is not None:
            prompt, (position, dim) = bad
            out.append(
                LayerDiff(float("nan"), float("nan"), (prompt, position, dim), estimated, (prompt, position))
            )
            continue
        squared = sum(float(t.squared[layer]) for t in terms)
        energy = sum(float(t.energy[layer]) for t in terms)
        exact = [(float(t.max_abs[layer]), p, t.max_abs_at[layer]) for p, t in enumerate(terms) if t.exact]
        best = max(exact, key=lambda e: e[0], default=None)  # the first prompt on ties
        departs = [
            (float(t.per_token[layer].max()), p, int(t.per_token[layer].argmax()))
            for p, t in enumerate(terms)
            if t.per_token.shape[1]
        ]
        most = max(departs, key=lambda e: e[0], default=None)
        out.append(
            LayerDiff(
                squared / energy if energy > 0 else 0.0,
                None if best is None else best[0],
                None if best is None else (best[1], *best[2]),
                estimated,
                None if most is None else (most[1], most[2]),
            )
        )
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
