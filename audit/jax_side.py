"""The JAX side: the same prompts through qwen_jax, teacher-forced on the reference's tokens, and its own greedy
decoding. Full logits are reduced to per-position metrics against the reference as soon as they are computed, so
only one prompt's [T, vocab] logits are held at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

import qwen_jax
from audit import determinism, metrics
from audit.records import ReferenceRun, SequenceRecord


@dataclasses.dataclass(frozen=True)
class JaxRun:
    sequences: tuple[
        SequenceRecord, ...
    ]  # hidden states and experts on the reference's tokens, own greedy tokens
    position_metrics: tuple[dict[str, np.ndarray], ...]  # per prompt, against the reference's logits
    divergences: tuple[metrics.Divergence | None, ...]
    determinism: tuple[dict, ...]
    batch_outputs: tuple[tuple[int, ...], ...] | None


def greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_token_ids: Sequence[int]):
    """Greedy tokens of each prompt (stop included), prefilled exactly as given (no bucketing: HF does none)."""
    out = qwen_jax.generate(
        model,
        [list(p) for p in prompts],
        max_new_tokens=max_new_tokens,
        stop_token_ids=tuple(stop_token_ids),
        pad_to_multiple=1,
        pad_token_id=stop_token_ids[0],
    )
    return [np.asarray(row[:n], np.int32) for row, n in zip(out.tokens, out.lengths, strict=True)]


def teacher_forced(model, tokens: np.ndarray):
    """(logits [T, V] float32, hidden [n_states, T, H] float32, experts [n_layers, T, k])."""
    out = qwen_jax.forward(model, np.asarray(tokens, np.int32)[None], return_hidden_states=True)
    hidden = np.stack([np.asarray(h[0], np.float32) for h in out.hidden_states])
    experts = np.stack([np.asarray(r.experts) for r in out.routing])
    return np.asarray(out.logits[0], np.float32), hidden, experts


def _divergence(ref: SequenceRecord, generated: np.ndarray, logits: np.ndarray) -> metrics.Divergence | None:
    d = metrics.first_divergence(ref.generated, generated)
    if d is None or d >= len(ref.generated) or d >= len(generated):
        return None
    at = ref.prompt_len + d - 1  # the teacher-forced position that predicts generated token d
    return metrics.judge_divergence(d, int(ref.generated[d]), int(generated[d]), ref.logits, logits, at)


def run_jax(
    model,
    reference: ReferenceRun,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    progress: bool = True,
    journal=None,
) -> JaxRun:
    """The JAX side on every prompt. With an :class:`audit.journal.Journal`, each prompt's results are journaled
    as it finishes and the prompts already journaled are not run again."""
    sequences, position_metrics, divergences, bitwise = [], [], [], []
    done = {} if journal is None else journal.done("jax")
    for index, (prompt, ref) in enumerate(
        tqdm(
            list(zip(reference.prompts, reference.sequences, strict=True)),
            desc="jax",
            disable=not progress,
            leave=False,
        )
    ):
        if index in done:
            entry = done[index]
            generated, hidden, experts = entry["generated"], entry["hidden"], entry["experts"]
            position_metrics.append(entry["metrics"])
            divergences.append(
                None if entry["divergence"] is None else metrics.Divergence(**entry["divergence"])
            )
            bitwise.append(tuple(entry["bitwise"]))
        else:
            generated = greedy(model, [prompt.ids], max_new_tokens, stop_token_ids)[0]
            logits, hidden, experts = teacher_forced(model, ref.tokens)
            bitwise.append(determinism.run_pair(logits, teacher_forced(model, ref.tokens)[0]))
            position_metrics.append(metrics.per_position_logit_metrics(ref.logits, logits))
            divergences.append(_divergence(ref, generated, logits))
            if journal is not None:
                journal.append(
                    "jax",
                    index,
                    {
                        "generated": generated,
                        "hidden": hidden,
                        "experts": experts,
                        "metrics": position_metrics[-1],
                        "divergence": None
                        if divergences[-1] is None
                        else dataclasses.asdict(divergences[-1]),
                        "bitwise": bitwise[-1],
                    },
                )
        sequences.append(SequenceRecord(ref.prompt_len, ref.tokens, generated, hidden, experts))
    checks = [determinism.logits_check("jax", bitwise)]
    again = greedy(model, [reference.prompts[0].ids], max_new_tokens, stop_token_ids)[0]
    checks.append(determinism.greedy_rerun_check("jax", again, sequences[0].generated))
    batch = None
    if len(reference.prompts) > 1:
        batch = greedy(model, [p.ids for p in reference.prompts], max_new_tokens, stop_token_ids)
        checks.append(determinism.batch_check("jax", batch, [s.generated for s in sequences]))
    return JaxRun(
        sequences=tuple(sequences),
        position_metrics=tuple(position_metrics),
        divergences=tuple(divergences),
        determinism=tuple(checks),
        batch_outputs=None if batch is None else tuple(tuple(int(t) for t in b) for b in batch),
    )
