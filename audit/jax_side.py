"""The JAX side: the same prompts through qwen_jax, teacher-forced on the reference's tokens, and its own greedy
decoding, batched and bucketed (:mod:`audit.batching`) in qwen_jax's batch-invariant mode, so that the results do not
depend on the batch size. Full logits are reduced to per-position metrics against the reference, and the hidden
states to their per-position summaries (:func:`audit.metrics.summarise_hidden`, as the reference's), as soon as a
batch is computed, so only one batch's [rows, T, vocab] logits and hidden states are held at a time. The full
hidden states are kept for the prompts whose reference keeps them (``--hidden-states``), and recomputed for a
diverging prompt (:func:`recompute_hidden`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

import qwen_jax
from audit import determinism, metrics
from audit.batching import (
    Batch,
    ProgramCount,
    bucket_length,
    budget_class,
    describe,
    plan_batches,
    teacher_forced_rows,
)
from audit.records import ReferenceRun, SequenceRecord, router_id_dtype, with_recomputed_hidden


@dataclasses.dataclass(frozen=True)
class JaxRun:
    # per prompt: own greedy tokens; on the reference's tokens the experts and the hidden states' summaries (the
    # full states only where the reference keeps its own, or recomputed: recompute_hidden)
    sequences: tuple[SequenceRecord, ...]
    position_metrics: tuple[dict[str, np.ndarray], ...]  # per prompt, against the reference's logits
    divergences: tuple[metrics.Divergence | None, ...]
    determinism: tuple[dict, ...]
    batch_outputs: tuple[tuple[int, ...], ...] | None
    batching: dict | None = None  # audit.batching.describe: batch size, buckets, compiled programs


def greedy_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    *,
    rows: int | None = None,
    length: int | None = None,
    max_length: int | None = None,
) -> list[np.ndarray]:
    """Greedy tokens of each prompt (stop included) from one batch-invariant ``generate`` call: the prompts right-
    padded to ``length`` (default: the bucket of the longest), and ``rows - len(prompts)`` filler copies of the
    first prompt, whose tokens are dropped; a decode state of ``max_length`` tokens (default: ``length`` plus the
    budget class of ``max_new_tokens``). Each prompt's tokens are those it gets alone at batch 1."""
    prompts = [[int(t) for t in p] for p in prompts]
    length = length or bucket_length(max(len(p) for p in prompts))
    rows = rows or len(prompts)
    out = qwen_jax.generate(
        model,
        prompts + [prompts[0]] * (rows - len(prompts)),
        max_new_tokens=max_new_tokens,
        stop_token_ids=tuple(stop_token_ids),
        max_length=max_length or length + budget_class(max_new_tokens),
        pad_to_multiple=length,
        pad_token_id=stop_token_ids[0],
        batch_invariant=True,
    )
    return [
        np.asarray(row[:n], np.int32)
        for row, n in zip(out.tokens[: len(prompts)], out.lengths[: len(prompts)], strict=True)
    ]


def greedy(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    stop_token_ids: Sequence[int],
    batch_size: int = 1,
) -> list[np.ndarray]:
    """Greedy tokens of each prompt (stop included), in bucketed batches of at most ``batch_size``
    (:func:`audit.batching.plan_batches`); ``max_new_tokens`` one budget, or one per prompt (a batch generates
    its largest: a prompt's tokens past its own budget are returned too)."""
    budgets = (
        [int(max_new_tokens)] * len(prompts)
        if np.isscalar(max_new_tokens)
        else [int(b) for b in max_new_tokens]
    )
    out: list[np.ndarray | None] = [None] * len(prompts)
    for batch in plan_batches([len(p) for p in prompts], budgets, batch_size):
        tokens = greedy_batch(
            model,
            [prompts[i] for i in batch.indices],
            batch.budget,
            stop_token_ids,
            rows=batch.rows,
            length=batch.length,
            max_length=batch.max_length,
        )
        for i, generated in zip(batch.indices, tokens, strict=True):
            out[i] = generated
    return out


def teacher_forced_batch(model, sequences: Sequence[np.ndarray], rows: int, length: int):
    """One batch-invariant forward over ``sequences`` right-padded to ``length`` (``rows - len(sequences)`` filler
    copies of the first): per sequence (logits [T, V] float32, hidden [n_states, T, H] float32, experts
    [n_layers, T, k]), each bitwise what the sequence gets alone."""
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    filled = [*sequences, *[sequences[0]] * (rows - len(sequences))]
    for row, tokens in enumerate(filled):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    out = qwen_jax.forward(model, ids, mask, return_hidden_states=True, batch_invariant=True)
    logits = np.asarray(out.logits, np.float32)
    hidden = [np.asarray(h, np.float32) for h in out.hidden_states]
    experts = [np.asarray(r.experts).reshape(rows, length, -1) for r in out.routing]  # [B*L, k] -> [B, L, k]
    return [
        (
            logits[row, :n],
            np.stack([h[row, :n] for h in hidden]),
            np.stack([e[row, :n] for e in experts]),
        )
        for row, n in enumerate(len(t) for t in sequences)
    ]


def teacher_forced(model, tokens: np.ndarray):
    """(logits [T, V] float32, hidden [n_states, T, H] float32, experts [n_layers, T, k]) of one sequence."""
    tokens = np.asarray(tokens, np.int32)
    return teacher_forced_batch(model, [tokens], 1, bucket_length(len(tokens)))[0]


def _divergence(ref: SequenceRecord, generated: np.ndarray, logits: np.ndarray) -> metrics.Divergence | None:
    d = metrics.first_divergence(ref.generated, generated)
    if d is None or d >= len(ref.generated) or d >= len(generated):
        return None
    at = ref.prompt_len + d - 1  # the teacher-forced position that predicts generated token d
    return metrics.judge_divergence(d, int(ref.generated[d]), int(generated[d]), ref.logits, logits, at)


def prompt_result(
    ref: SequenceRecord, generated: np.ndarray, forced: tuple, again_logits: np.ndarray, num_experts: int
) -> dict:
    """What the JAX side keeps of one prompt (and journals): its greedy tokens, its top-k experts (ids in the
    smallest unsigned type), the summaries of its hidden states (:func:`audit.metrics.summarise_hidden`), the full
    states only where the reference keeps its own (``ref.hidden``: the ``--hidden-states`` prompts), its logit
    metrics against the reference, the greedy divergence and the run-to-run check. ``forced``: (logits, hidden,
    experts) of :func:`teacher_forced_batch`."""
    logits, hidden, experts = forced
    norms, sketch = metrics.summarise_hidden(hidden)
    return {
        "generated": np.asarray(generated, np.int32),
        "hidden": hidden if ref.hidden is not None else None,
        "norms": norms,
        "sketch": sketch,
        "experts": np.asarray(experts, router_id_dtype(num_experts)),
        "metrics": metrics.per_position_logit_metrics(ref.logits, logits),
        "divergence": _divergence(ref, generated, logits),
        "bitwise": determinism.run_pair(logits, again_logits),
    }


def _from_journal(entry: dict) -> dict:
    divergence = entry["divergence"]
    return {
        **entry,
        "divergence": None if divergence is None else metrics.Divergence(**divergence),
        "bitwise": tuple(entry["bitwise"]),
    }


def _journal_entry(result: dict) -> dict:
    divergence = result["divergence"]
    return {**result, "divergence": None if divergence is None else dataclasses.asdict(divergence)}


def _record(ref: SequenceRecord, result: dict) -> SequenceRecord:
    return SequenceRecord(
        ref.prompt_len,
        ref.tokens,
        result["generated"],
        result["hidden"],
        result["experts"],
        norms=result["norms"],
        sketch=result["sketch"],
    )


def recompute_hidden(model, reference: ReferenceRun, jax_run: JaxRun, indices: Sequence[int]):
    """``jax_run`` with the full hidden states of prompts ``indices`` recomputed (the teacher-forced forward of
    :func:`run_jax`, alone: the batch-invariant mode gives the same bits), and a warning for each prompt whose
    recomputed states do not give its recorded summaries bitwise."""
    sequences, warnings = with_recomputed_hidden(
        jax_run.sequences,
        indices,
        lambda i: teacher_forced(model, reference.sequences[i].tokens)[1],
        "JAX side",
    )
    return dataclasses.replace(jax_run, sequences=sequences), warnings


def _forced_batches(batch: Batch, indices: Sequence[int], reference: ReferenceRun, cfg, budget_bytes):
    """The teacher-forced batches of one greedy batch: its items' reference sequences, bucketed by the longest,
    in the greedy batch's row count (or fewer rows when ``budget_bytes`` caps the outputs)."""
    length = bucket_length(max(len(reference.sequences[i].tokens) for i in indices))
    rows = batch.rows if budget_bytes is None else teacher_forced_rows(cfg, batch.rows, length, budget_bytes)
    return [Batch(tuple(indices[k : k + rows]), rows, length, 0, None) for k in range(0, len(indices), rows)]


def run_jax(
    model,
    reference: ReferenceRun,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    batch_size: int = 1,
    teacher_forced_bytes: int | None = None,
    progress: bool = True,
    journal=None,
) -> JaxRun:
    """The JAX side on every prompt, in batches of at most ``batch_size`` (:mod:`audit.batching`); the results do
    not depend on it. ``teacher_forced_bytes`` caps the outputs of one teacher-forced batch (None: no cap). With
    an :class:`audit.journal.Journal`, each prompt's results are journaled as its batch finishes and the prompts
    already journaled are not run again."""
    n = len(reference.prompts)
    done = {} if journal is None else journal.done("jax")
    results = {index: _from_journal(entry) for index, entry in done.items()}
    pending = [i for i in range(n) if i not in results]
    plan = plan_batches(
        [len(reference.prompts[i].ids) for i in pending], [max_new_tokens] * len(pending), batch_size
    )
    forced_plan = []
    bar = tqdm(total=n, initial=n - len(pending), desc="jax", disable=not progress, leave=False)
    with ProgramCount() as programs:
        for batch in plan:
            indices = [pending[k] for k in batch.indices]
            generated = greedy_batch(
                model,
                [reference.prompts[i].ids for i in indices],
                batch.budget,
                stop_token_ids,
                rows=batch.rows,
                length=batch.length,
                max_length=batch.max_length,
            )
            generated = dict(zip(indices, generated, strict=True))
            for forced in _forced_batches(batch, indices, reference, model.cfg, teacher_forced_bytes):
                forced_plan.append(forced)
                tokens = [reference.sequences[i].tokens for i in forced.indices]
                first = teacher_forced_batch(model, tokens, forced.rows, forced.length)
                second = teacher_forced_batch(model, tokens, forced.rows, forced.length)
                for i, forced_out, again in zip(forced.indices, first, second, strict=True):
                    ref = reference.sequences[i]
                    results[i] = prompt_result(ref, generated[i], forced_out, again[0], model.cfg.num_experts)
                    if journal is not None:
                        journal.append("jax", i, _journal_entry(results[i]))
                    bar.update(1)
        bar.close()
        sequences = [_record(ref, results[i]) for i, ref in enumerate(reference.sequences)]
        checks = [determinism.logits_check("jax", [results[i]["bitwise"] for i in range(n)])]
        again = greedy_batch(model, [reference.prompts[0].ids], max_new_tokens, stop_token_ids)[0]
        checks.append(determinism.greedy_rerun_check("jax", [again], [sequences[0].generated]))
        batch_outputs = None
        subset = determinism.check_subset([len(p.ids) for p in reference.prompts], max_new_tokens)
        if len(subset) > 1:
            batch_outputs = greedy_batch(
                model, [reference.prompts[i].ids for i in subset], max_new_tokens, stop_token_ids
            )
            checks.append(
                determinism.batch_invariance_check(
                    "jax", batch_outputs, [sequences[i].generated for i in subset]
                )
            )
    return JaxRun(
        sequences=tuple(sequences),
        position_metrics=tuple(results[i]["metrics"] for i in range(n)),
        divergences=tuple(results[i]["divergence"] for i in range(n)),
        determinism=tuple(checks),
        batch_outputs=None
        if batch_outputs is None
        else tuple(tuple(int(t) for t in b) for b in batch_outputs),
        batching=describe(batch_size, plan, forced_plan, programs),
    )
