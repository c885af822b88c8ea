"""The determinism self-checks both sides run: the same computation twice (must be bitwise equal), and batch 1
against a batch: reported for the reference (left padding is not expected to be bitwise), bitwise for the JAX side
(its batch-invariant mode)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def greedy_rerun_check(side: str, again: np.ndarray, first: np.ndarray) -> dict:
    return {
        "name": f"{side} run-to-run: greedy tokens of prompt 0",
        "kind": "bitwise",
        "passed": bool(np.array_equal(again, first)),
        "max_abs": None,
        "detail": "generated twice at batch 1",
    }


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
