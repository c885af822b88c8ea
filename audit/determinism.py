"""The determinism self-checks both sides run: the same computation twice (must be bitwise equal), and batch 1
against a batch: reported for the reference (left padding is not expected to be bitwise), bitwise for the JAX side
(its batch-invariant mode).

The reference's greedy checks run on a bounded subset (:func:`check_subset`: the first prompts, at most
:data:`CHECK_PROMPTS` of them and :data:`CHECK_TOKENS` positions in one left-padded batch), not on every prompt: each
is generated again at batch 1, as the audited submission ran (bitwise), and the subset once in one batch (reported).
Its manifest says which prompts (``determinism_check``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The reference's greedy checks: at most this many prompts (the first ones) ...
CHECK_PROMPTS = 4
#: ... whose left-padded batch holds at most this many positions (rows x (longest prompt + budget)).
CHECK_TOKENS = 32768


def check_subset(
    lengths: Sequence[int], budget: int, max_prompts: int | None = None, max_tokens: int | None = None
) -> list[int]:
    """The prompts (by index) of the reference's greedy checks: the first ones, in order, while there are at most
    ``max_prompts`` and their left-padded batch, rows x (longest prompt + ``budget``), holds at most ``max_tokens``
    positions (default :data:`CHECK_PROMPTS`, :data:`CHECK_TOKENS`); prompt 0 always (a lone prompt over the bound is
    still generated twice at batch 1)."""
    max_prompts = CHECK_PROMPTS if max_prompts is None else max_prompts
    max_tokens = CHECK_TOKENS if max_tokens is None else max_tokens
    chosen, longest = [], 0
    for index, length in enumerate(lengths[:max_prompts]):
        longest = max(longest, length)
        if chosen and (len(chosen) + 1) * (longest + budget) > max_tokens:
            break
        chosen.append(index)
    return chosen


def check_description(chosen: Sequence[int], budget: int) -> dict:
    """What the manifest says of the reference's greedy checks (``determinism_check``)."""
    return {
        "prompts": list(chosen),
        "rule": (
            f"the first prompts, at most {CHECK_PROMPTS}, whose left-padded batch holds at most {CHECK_TOKENS} "
            f"positions (rows x (longest prompt + {budget} new tokens)); each generated again at batch 1 (bitwise), "
            "and together in one batch (reported)"
        ),
    }


def run_pair(first: np.ndarray, second: np.ndarray) -> tuple[bool, float]:
    """(bitwise equal, max |difference|) of two runs of the same computation."""
    worst = float(np.abs(first.astype(np.float64) - second).max()) if first.size else 0.0
    return bool(np.array_equal(first, second)), worst


def logits_check(side: str, pairs: Sequence[tuple[bool, float]]) -> dict:
    """Every prompt's teacher-forced logits computed twice (one :func:`run_pair` per prompt)."""
    return {
        "name": f"{side} run-to-run: teacher-forced logits",
        "kind": "bitwise",
        "passed": all(equal for equal, _ in pairs),
        "max_abs": max(worst for _, worst in pairs),
        "detail": "two runs, same process",
    }


def greedy_rerun_check(
    side: str, again: Sequence[np.ndarray], first: Sequence[np.ndarray], prompts: Sequence[int] = (0,)
) -> dict:
    """The greedy tokens of ``prompts`` generated again at batch 1 (``again``) against the run's (``first``)."""
    label = f"prompt {prompts[0]}" if len(prompts) == 1 else "prompts " + ", ".join(map(str, prompts))
    return _tokens_check(
        f"{side} run-to-run: greedy tokens of {label}",
        "bitwise",
        again,
        first,
        "prompts' greedy tokens identical, generated twice at batch 1",
    )


def _tokens_check(
    name: str, kind: str, batch: Sequence[np.ndarray], single: Sequence[np.ndarray], detail: str
):
    same = sum(np.array_equal(a, b) for a, b in zip(batch, single, strict=True))
    return {
        "name": name,
        "kind": kind,
        "passed": same == len(batch),
        "max_abs": None,
        "detail": f"{same}/{len(batch)} {detail}",
    }


def batch_check(side: str, batch: Sequence[np.ndarray], single: Sequence[np.ndarray]) -> dict:
    return _tokens_check(
        f"{side} batch 1 vs batch {len(batch)}: greedy tokens",
        "tolerance",
        batch,
        single,
        "prompts identical (left padding; not expected to be bitwise)",
    )


def batch_invariance_check(side: str, batch: Sequence[np.ndarray], single: Sequence[np.ndarray]) -> dict:
    """The first prompts generated together in one batch, against their tokens from the run (batch-invariant mode:
    must be bitwise equal, whatever batch size the run used)."""
    return _tokens_check(
        f"{side} batch invariance: the first {len(batch)} prompts in one batch",
        "bitwise",
        batch,
        single,
        "prompts' greedy tokens identical to the run's",
    )
