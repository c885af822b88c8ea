"""Benchmark replay: re-generate the logged MERA Industrial replies and compare them with the logs.

The library half of ``python -m audit compare`` (the CLI loads the model and writes the report). For each
logged sample (``audit.samples``) the replay follows the recipe of ``shared/spec/audit.md`` §2.2:

1. take the logged messages ``json.loads(arguments.gen_args_0.arg_0[0])`` and render them with the chat
   template (``qwen_jax.chat.apply_chat_template``, ``add_generation_prompt=True``, plus ``enable_thinking``
   when given), then tokenize them (no special tokens added, as a vLLM server does);
2. check the logged ``prompt_hash`` (sha256 of the messages JSON string); a mismatch is a warning and a
   flag on the item, which is still replayed;
3. greedy-generate through the caller's ``generate`` for ``min(max_gen_toks, max_new_tokens)`` tokens
   (``max_gen_toks`` from the logged gen_kwargs, 256 when absent as in lm-eval's ``local-chat-completions``;
   ``max_new_tokens`` is the caller's cap, and an item the cap cut short is recorded as
   ``truncated_by_cap``);
4. cut the ids at the first stop token (``<|im_end|>``/``<|endoftext|>`` by default), decode them with
   ``skip_special_tokens=True`` (vLLM's default; ``<think>``/``</think>`` are not special and stay), and apply
   the logged ``until`` strings (only the first four: lm-eval sends ``stop: until[:4]``) with
   ``qwen_jax.replies.apply_until``; the server applies stop strings to the whole output, reasoning
   included, so this comes before step 5;
5. split off the reasoning at ``</think>`` as the selected server would (``audit.scoring.ReasoningSplit``),
   then MERA's filter (null -> ``""``, else ``lstrip``), and compare with the logged ``filtered_resps[0]``;
6. where gold exists (``doc.outputs`` non-empty) score both the logged and the replayed reply with MERA's
   rules (SQuAD EM and F1) and flag points earned only through the article-deletion quirk.

:func:`replay_submission` does the same for a MERA ``submission.zip`` after checking that its per-task
``ruTXT*.json`` outputs equal the logs' ``filtered_resps``.

Results are frozen dataclasses; :meth:`ReplayResult.to_json` gives the plain dict the report schema uses.
Malformed input raises :class:`audit.samples.SamplesError` with a one-line message naming the file (and
line): the CLI turns it into exit status 2.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from audit.batching import plan_batches
from audit.metrics import first_divergence
from audit.samples import (
    Sample,
    SamplesError,
    SamplesFile,
    check_submission_outputs,
    prompt_hash,
    read_samples,
    read_submission,
)
from audit.scoring import (
    DEFAULT_REASONING_SPLIT,
    QuirkKind,
    ReasoningSplit,
    filter_mismatches,
    mera_filter,
    mera_process_results,
    metric_mismatches,
    quirk_flag,
    replay_content,
)
from qwen_jax.chat import ChatTemplateError, render_chat
from qwen_jax.replies import apply_until

__all__ = [
    "DEFAULT_MAX_GEN_TOKS",
    "DEFAULT_STOP_TOKENS",
    "MAX_STOP_STRINGS",
    "NOT_REPRODUCED_BY_REFERENCE",
    "PORT_DIVERGENCE",
    "GenerateFn",
    "ItemReplay",
    "ReferenceReplies",
    "ReplayResult",
    "SubmissionCheck",
    "TaskReplay",
    "load_samples_files",
    "replay_samples",
    "replay_submission",
    "select_samples",
]

# lm-eval ``local-chat-completions``: ``max_tokens = gen_kwargs.pop("max_gen_toks", 256)``.
DEFAULT_MAX_GEN_TOKS = 256
# lm-eval sends ``"stop": until[:4]`` (the OpenAI API limit); later stop strings never reach the server.
MAX_STOP_STRINGS = 4
# Qwen3.6's generation_config.json EOS ids are <|im_end|> (248046) and <|endoftext|> (248044).
DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# The classes of an item whose logged reply is not reproduced (ItemReplay.classification).
NOT_REPRODUCED_BY_REFERENCE = "not reproduced by the reference either"
PORT_DIVERGENCE = "port divergence"

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
"""``generate(prompt_token_id_lists, max_new_tokens) -> generated ids per prompt`` (greedy). The ids may end
with (or run past) a stop token; the replay cuts them at the first one and at ``max_new_tokens``."""


class Tokenizer(Protocol):
    """What the replay needs of a tokenizer (``qwen_jax.tokenizer.QwenTokenizer`` fits)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


# ----------------------------------------------------------------------------------------------------
# Results.


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(value: int | float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class ItemReplay:
    """One replayed sample.

    ``logged`` is the logged ``filtered_resps[0]``; ``replayed`` the same quantity from the replay
    (reasoning split, MERA filter); ``replayed_raw`` the decoded generation before the ``until`` cut and the
    reasoning split (after the cut at the stop token). Scores are ``None`` where the doc has no gold.
    ``logged_quirk``/``replayed_quirk`` are the :class:`audit.scoring.QuirkKind` of points earned only through
    SQuAD's deletion of the article "a" (``None`` when none).
    """

    task: str
    doc_id: int
    meta_id: int | None
    where: str  # "<file>:<line>" of the sample
    prompt_hash_ok: bool
    prompt_tokens: int
    generated_tokens: int
    logged: str
    replayed: str
    replayed_raw: str
    gold: str | None
    logged_em: int | float | None
    logged_f1: int | float | None
    replayed_em: int | float | None
    replayed_f1: int | float | None
    logged_quirk: QuirkKind | None
    replayed_quirk: QuirkKind | None
    stopped: bool  # generation ended at a stop token or an until string
    truncated_by_cap: bool  # ran out at the caller's cap before max_gen_toks, without stopping
    logged_reply: str = ""  # resps[0][0]: the reply as logged, before MERA's filter
    replayed_reply: str = ""  # the same quantity from the replay (audit.scoring.logged_response)
    reference_replayed: str | None = (
        None  # the final answer from the reference's greedy ids (None: no reference)
    )
    first_divergence: int | None = None  # first generated token where JAX differs from the reference
    near_tie: bool | None = (
        None  # whether the port's divergence on this prompt is a near-tie (None: none known)
    )

    @property
    def equal(self) -> bool:
        return self.replayed == self.logged

    @property
    def reproduced(self) -> bool:
        """The logged reply and its final answer are both reproduced."""
        return self.equal and self.replayed_reply == self.logged_reply

    @property
    def classification(self) -> str | None:
        """Why an item is not reproduced (``None`` when it is, or when no reference was given): the reference
        and JAX agree token for token but not with the log, or JAX differs from the reference."""
        if self.reproduced or self.reference_replayed is None:
            return None
        return NOT_REPRODUCED_BY_REFERENCE if self.first_divergence is None else PORT_DIVERGENCE

    @property
    def quirk(self) -> str | None:
        """``"logged:<kind>"`` and/or ``"replayed:<kind>"`` joined by ``";"``, or ``None``."""
        parts = [
            f"{side}:{kind.value}"
            for side, kind in (("logged", self.logged_quirk), ("replayed", self.replayed_quirk))
            if kind is not None
        ]
        return ";".join(parts) or None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "doc_id": self.doc_id,
            "meta_id": self.meta_id,
            "prompt_hash_ok": self.prompt_hash_ok,
            "prompt_tokens": self.prompt_tokens,
            "logged": self.logged,
            "replayed": self.replayed,
            "replayed_raw": self.replayed_raw,
            "equal": self.equal,
            "gold": self.gold,
            "logged_em": _num(self.logged_em),
            "logged_f1": _num(self.logged_f1),
            "replayed_em": _num(self.replayed_em),
            "replayed_f1": _num(self.replayed_f1),
            "quirk": self.quirk,
            "truncated_by_cap": self.truncated_by_cap,
            "logged_reply": self.logged_reply,
            "replayed_reply": self.replayed_reply,
            "reproduced": self.reproduced,
            "reference_replayed": self.reference_replayed,
            "classification": self.classification,
            "first_divergence": self.first_divergence,
            "near_tie": self.near_tie,
        }


@dataclass(frozen=True)
class ReferenceReplies:
    """The reference side of a replay, keyed by prompt ids: its greedy ids (the stop token included), and for
    the prompts where the JAX greedy output diverges from it, whether that divergence is a near-tie."""

    generated: Mapping[tuple[int, ...], Sequence[int]]
    near_tie: Mapping[tuple[int, ...], bool] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskReplay:
    """Per-task summary. EM/F1 are means over the items WITH gold (``None`` when no item has gold, as on
    the private test); with gold on every item they equal lm-eval's task means."""

    task: str
    source: str
    items: int
    answer_agreement: float  # fraction of items with replayed == logged
    reproduced: int  # items whose logged reply and final answer are both reproduced
    logged_em: float | None
    logged_f1: float | None
    replayed_em: float | None
    replayed_f1: float | None
    quirk_items: int  # items with a quirk on either side
    prompt_hash_mismatches: int
    truncated_by_cap: int

    @classmethod
    def from_items(cls, task: str, source: str, items: Sequence[ItemReplay]) -> TaskReplay:
        scored = [i for i in items if i.gold is not None]
        return cls(
            task=task,
            source=source,
            items=len(items),
            answer_agreement=sum(i.equal for i in items) / len(items),
            reproduced=sum(i.reproduced for i in items),
            logged_em=_mean([i.logged_em for i in scored]),
            logged_f1=_mean([i.logged_f1 for i in scored]),
            replayed_em=_mean([i.replayed_em for i in scored]),
            replayed_f1=_mean([i.replayed_f1 for i in scored]),
            quirk_items=sum(i.quirk is not None for i in items),
            prompt_hash_mismatches=sum(not i.prompt_hash_ok for i in items),
            truncated_by_cap=sum(i.truncated_by_cap for i in items),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "source": self.source,
            "items": self.items,
            "answer_agreement": self.answer_agreement,
            "reproduced": self.reproduced,
            "logged_em": self.logged_em,
            "logged_f1": self.logged_f1,
            "replayed_em": self.replayed_em,
            "replayed_f1": self.replayed_f1,
            "quirk_items": self.quirk_items,
            "prompt_hash_mismatches": self.prompt_hash_mismatches,
            "truncated_by_cap": self.truncated_by_cap,
        }


@dataclass(frozen=True)
class SubmissionCheck:
    """The submission zip and its outputs that differ from the logs (``OutputMismatch.describe()`` lines)."""

    path: str
    output_mismatches: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "output_mismatches": list(self.output_mismatches)}


@dataclass(frozen=True)
class ReplayResult:
    reasoning_split: ReasoningSplit
    enable_thinking: bool | None
    max_new_tokens_cap: int
    tasks: tuple[TaskReplay, ...]
    items: tuple[ItemReplay, ...]
    submission: SubmissionCheck | None = None
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "reasoning_split": self.reasoning_split.value,
            "enable_thinking": self.enable_thinking,
            "max_new_tokens_cap": self.max_new_tokens_cap,
            "tasks": [t.to_json() for t in self.tasks],
            "items": [i.to_json() for i in self.items],
            "submission": None if self.submission is None else self.submission.to_json(),
            "warnings": list(self.warnings),
        }


# ----------------------------------------------------------------------------------------------------
# Preparing one sample.


@dataclass(frozen=True)
class _Prepared:
    sample: Sample
    prompt_ids: list[int]
    hash_ok: bool
    max_gen_toks: int
    budget: int  # min(max_gen_toks, cap)
    until: tuple[str, ...]
    gold: str | None  # doc.outputs; None when empty (MERA scores 0 whatever the reply: nothing to compare)


def _max_gen_toks(sample: Sample) -> int:
    value = sample.gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SamplesError(
            f"{sample.where}: gen_kwargs max_gen_toks must be a positive integer, got {value!r}"
        )
    return value


def _until(sample: Sample, warnings: list[str]) -> tuple[str, ...]:
    value = sample.gen_kwargs.get("until")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SamplesError(f"{sample.where}: gen_kwargs until must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        warnings.append(
            f"{sample.where}: {len(value)} until strings; lm-eval sends only the first {MAX_STOP_STRINGS}"
        )
    return tuple(value[:MAX_STOP_STRINGS])


def _template_kwargs(tokenizer: Any, enable_thinking: bool | None) -> dict[str, Any]:
    # transformers passes the tokenizer's named special tokens to the template; the caller's choice of
    # enable_thinking is passed only when made (the template's default is thinking on).
    kwargs = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    return kwargs


def _prepare(
    sample: Sample,
    *,
    tokenizer: Tokenizer,
    chat_template: str,
    template_kwargs: Mapping[str, Any],
    cap: int,
    warnings: list[str],
) -> _Prepared:
    messages = sample.messages()  # SamplesError naming file:line when arg_0 is not a JSON chat
    try:
        text = render_chat(
            chat_template, messages, source="the chat template", add_generation_prompt=True, **template_kwargs
        )
    except (ChatTemplateError, TypeError) as err:
        raise SamplesError(f"{sample.where}: the chat template rejected the messages: {err}") from None
    hash_ok = prompt_hash(sample.prompt) == sample.prompt_hash
    if not hash_ok:
        warnings.append(
            f"{sample.where}: prompt_hash mismatch (logged {sample.prompt_hash[:12]}..., messages hash to "
            f"{prompt_hash(sample.prompt)[:12]}...); replayed anyway"
        )
    max_gen_toks = _max_gen_toks(sample)
    return _Prepared(
        sample=sample,
        prompt_ids=list(tokenizer.encode(text)),
        hash_ok=hash_ok,
        max_gen_toks=max_gen_toks,
        budget=min(max_gen_toks, cap),
        until=_until(sample, warnings),
        gold=sample.gold or None,  # SamplesError when doc.outputs is not a string: checked before generating
    )


# ----------------------------------------------------------------------------------------------------
# Finishing one sample from its generated ids.


def _score(gold: str | None, reply: str) -> tuple[Any, Any, QuirkKind | None]:
    if gold is None:
        return None, None, None
    result = mera_process_results(gold, reply)
    flag = quirk_flag(gold, reply)
    return result["em"], result["f1"], None if flag is None else flag.kind


@dataclass(frozen=True)
class _Reply:
    """One side's generated ids through the server's pipeline: cut at the budget and the first stop token,
    decoded, cut at the ``until`` strings; ``content`` is the chat content after the reasoning split."""

    ids: list[int]
    stop_at: int | None
    raw: str
    cut: str
    content: str | None

    @property
    def final(self) -> str:
        return mera_filter(self.content)


def _reply(
    prep: _Prepared,
    generated: Sequence[int],
    tokenizer: Tokenizer,
    stop_ids: frozenset[int],
    mode: ReasoningSplit,
) -> _Reply:
    ids = [int(t) for t in generated][: prep.budget]
    stop_at = next((k for k, t in enumerate(ids) if t in stop_ids), None)
    if stop_at is not None:
        ids = ids[:stop_at]
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    cut = apply_until(raw, prep.until)
    return _Reply(ids, stop_at, raw, cut, replay_content(cut, mode))


def _finish(
    prep: _Prepared,
    generated: Sequence[int],
    *,
    tokenizer: Tokenizer,
    stop_ids: frozenset[int],
    mode: ReasoningSplit,
    cap: int,
    reference: ReferenceReplies | None = None,
) -> ItemReplay:
    sample = prep.sample
    ours = _reply(prep, generated, tokenizer, stop_ids, mode)
    stopped = ours.stop_at is not None or ours.cut != ours.raw
    truncated = not stopped and len(ours.ids) >= prep.budget and cap < prep.max_gen_toks
    replayed = ours.final
    gold = prep.gold
    logged_em, logged_f1, logged_quirk = _score(gold, sample.filtered_response)
    replayed_em, replayed_f1, replayed_quirk = _score(gold, replayed)
    key = tuple(prep.prompt_ids)
    reference_replayed = first = near_tie = None
    if reference is not None and key in reference.generated:
        theirs = _reply(prep, reference.generated[key], tokenizer, stop_ids, mode)
        reference_replayed = theirs.final
        # the ids up to and including the stop token: a stop on one side only is a divergence
        first = first_divergence(
            [int(t) for t in generated][: len(ours.ids) + 1],
            [int(t) for t in reference.generated[key]][: len(theirs.ids) + 1],
        )
        if first is not None and first >= prep.budget:
            first = None
        near_tie = reference.near_tie.get(key) if first is not None else None
    return ItemReplay(
        task=sample.task,
        doc_id=sample.doc_id,
        meta_id=sample.meta_id,
        where=sample.where,
        prompt_hash_ok=prep.hash_ok,
        prompt_tokens=len(prep.prompt_ids),
        generated_tokens=len(ours.ids) + (ours.stop_at is not None),
        logged=sample.filtered_response,
        replayed=replayed,
        replayed_raw=ours.raw,
        gold=gold,
        logged_em=logged_em,
        logged_f1=logged_f1,
        replayed_em=replayed_em,
        replayed_f1=replayed_f1,
        logged_quirk=logged_quirk,
        replayed_quirk=replayed_quirk,
        stopped=stopped,
        truncated_by_cap=truncated,
        logged_reply=sample.response,
        replayed_reply=str(ours.content),
        reference_replayed=reference_replayed,
        first_divergence=first,
        near_tie=near_tie,
    )


def _stop_ids(tokenizer: Tokenizer, stop_token_ids: Collection[int] | None) -> frozenset[int]:
    if stop_token_ids is not None:
        return frozenset(int(t) for t in stop_token_ids)
    ids = {tokenizer.token_to_id(t) for t in DEFAULT_STOP_TOKENS}
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    return frozenset(t for t in ids if t is not None)


# ----------------------------------------------------------------------------------------------------
# Public entry points.


def load_samples_files(paths: Iterable[str | Path]) -> list[SamplesFile]:
    """Read ``samples_<task>_<date>.jsonl`` files (:func:`audit.samples.read_samples`); two files of the same
    task are an error (the replay summarises per task)."""
    files = [read_samples(p) for p in paths]
    seen: dict[str, str] = {}
    for sf in files:
        if sf.task in seen:
            raise SamplesError(
                f"{sf.source}: a second samples file for task {sf.task} (first: {seen[sf.task]})"
            )
        seen[sf.task] = sf.source
    return files


def select_samples(
    sf: SamplesFile, limit: int | None = None, sample: tuple[int, int] | None = None
) -> tuple[Sample, ...]:
    """The samples of ``sf`` an audit replays: the first ``limit``, or with ``sample = (n, seed)`` a random
    subset of ``n`` (all when fewer), the same for the same seed, task and file, kept in file order. The random
    generator is seeded with the seed and the task name, so each task draws its own subset."""
    if sample is not None:
        n, seed = sample
        picked = random.Random(f"{seed}:{sf.task}").sample(range(len(sf.samples)), min(n, len(sf.samples)))
        return tuple(sf.samples[k] for k in sorted(picked))
    return sf.samples[:limit] if limit is not None else sf.samples


def replay_samples(
    samples_files: Sequence[SamplesFile],
    *,
    tokenizer: Tokenizer,
    chat_template: str,
    generate: GenerateFn,
    max_new_tokens: int,
    reasoning_split: ReasoningSplit | str = DEFAULT_REASONING_SPLIT,
    enable_thinking: bool | None = None,
    batch_size: int = 1,
    bucket: Callable[[int], int] | None = None,
    limit: int | None = None,
    stop_token_ids: Collection[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    reference: ReferenceReplies | None = None,
    sample: tuple[int, int] | None = None,
) -> ReplayResult:
    """Replay every sample of ``samples_files`` and compare with the logs.

    Args:
        tokenizer: ``encode``/``decode``/``token_to_id`` (``qwen_jax.tokenizer.QwenTokenizer``).
        chat_template: the Jinja chat template to render the logged messages with.
        generate: ``generate(prompt_token_id_lists, max_new_tokens) -> generated ids per prompt``, greedy.
            It is called with batches of at most ``batch_size`` prompts that share one token budget.
        max_new_tokens: the cap on each item's ``max_gen_toks`` (record ``truncated_by_cap`` where it bites).
        reasoning_split: how the server split reasoning from content (recorded in the result).
        enable_thinking: passed to the chat template when not ``None`` (recorded in the result).
        batch_size: prompts per ``generate`` call.
        bucket: ``None``: each call's prompts share one budget (in file order). Else the padded length of a
            prompt (:func:`audit.batching.bucket_length`): each call's prompts share a bucket and have similar
            budgets (the call asks for the largest; each item is cut at its own), and every call of a bucket has
            the same number of prompts, filled with copies of the first (:func:`audit.batching.plan_batches`).
        limit: replay only the first ``limit`` samples of each file.
        sample: ``(n, seed)``: replay a random subset of ``n`` samples of each file (:func:`select_samples`).
        stop_token_ids: ids that end a generation (default: ``<|im_end|>``, ``<|endoftext|>`` and the
            tokenizer's ``eos_token_id``).
        progress: called as ``progress(done, total)`` after each ``generate`` call.
        reference: the reference side's greedy ids per prompt: each item not reproduced is then classified
            (``ItemReplay.classification``) as not reproduced by the reference either, or a port divergence.

    Raises:
        SamplesError: malformed gen_kwargs or messages, an empty samples file (one-line message naming the
            file and line).
        ValueError: ``max_new_tokens``, ``batch_size`` or ``limit`` below 1, or an unknown
            ``reasoning_split``.
    """
    return _replay(
        samples_files,
        tokenizer=tokenizer,
        chat_template=chat_template,
        generate=generate,
        max_new_tokens=max_new_tokens,
        reasoning_split=reasoning_split,
        enable_thinking=enable_thinking,
        batch_size=batch_size,
        bucket=bucket,
        limit=limit,
        stop_token_ids=stop_token_ids,
        progress=progress,
        reference=reference,
        sample=sample,
    )


def _replay(
    samples_files: Sequence[SamplesFile],
    *,
    tokenizer: Tokenizer,
    chat_template: str,
    generate: GenerateFn,
    max_new_tokens: int,
    reasoning_split: ReasoningSplit | str = DEFAULT_REASONING_SPLIT,
    enable_thinking: bool | None = None,
    batch_size: int = 1,
    bucket: Callable[[int], int] | None = None,
    limit: int | None = None,
    stop_token_ids: Collection[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_warnings: Sequence[str] = (),
    submission_check: SubmissionCheck | None = None,
    reference: ReferenceReplies | None = None,
    sample: tuple[int, int] | None = None,
) -> ReplayResult:
    mode = ReasoningSplit(reasoning_split)
    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError("max_new_tokens, batch_size and limit must be at least 1")
    if sample is not None and sample[0] < 1:
        raise ValueError("the sample size must be at least 1")
    warnings: list[str] = list(extra_warnings)
    if enable_thinking is False and mode is ReasoningSplit.QWEN3:
        warnings.append(
            "reasoning split 'qwen3' models thinking ON but enable_thinking=False: a reply without </think> "
            "becomes null content; 'qwen3_thinking_off' is the matching split"
        )
    if enable_thinking is True and mode is ReasoningSplit.QWEN3_THINKING_OFF:
        warnings.append("reasoning split 'qwen3_thinking_off' chosen with enable_thinking=True")
    template_kwargs = _template_kwargs(tokenizer, enable_thinking)
    stop_ids = _stop_ids(tokenizer, stop_token_ids)

    per_file: list[tuple[SamplesFile, list[_Prepared]]] = []
    for sf in samples_files:
        samples = select_samples(sf, limit, sample)
        if not samples:
            raise SamplesError(f"{sf.source}: no samples to replay")
        for s in filter_mismatches(samples):
            warnings.append(
                f"{s.where}: logged filtered_resps[0] {s.filtered_response!r} is not MERA's filter of "
                f"resps[0][0] {s.response!r}"
            )
        for s, recomputed in metric_mismatches(samples):
            logged = {k: s.metric_values[k] for k in ("em", "f1") if k in s.metric_values}
            warnings.append(f"{s.where}: logged metrics {logged} != recomputed {recomputed}")
        prepared = [
            _prepare(
                s,
                tokenizer=tokenizer,
                chat_template=chat_template,
                template_kwargs=template_kwargs,
                cap=max_new_tokens,
                warnings=warnings,
            )
            for s in samples
        ]
        per_file.append((sf, prepared))

    # Generate in batches (audit.batching.plan_batches): without a bucket, batches of prompts that share a token
    # budget; with one, of prompts that share a length bucket, sorted by budget, filled to one row count per
    # bucket with copies of their first prompt (their outputs dropped).
    queue = [p for _, prepared in per_file for p in prepared]
    outputs: dict[int, list[int]] = {}
    done = 0
    for batch in plan_batches(
        [len(p.prompt_ids) for p in queue], [p.budget for p in queue], batch_size, bucket
    ):
        prompts = [list(queue[i].prompt_ids) for i in batch.indices]
        prompts += [prompts[0]] * (batch.rows - len(prompts))
        generated = generate(prompts, batch.budget)
        if len(generated) != len(prompts):
            raise ValueError(f"generate returned {len(generated)} results for {len(prompts)} prompts")
        for i, ids in zip(batch.indices, generated, strict=False):
            outputs[i] = list(ids)
        done += len(batch.indices)
        if progress is not None:
            progress(done, len(queue))

    tasks: list[TaskReplay] = []
    items: list[ItemReplay] = []
    index = 0
    for sf, prepared in per_file:
        file_items = []
        for prep in prepared:
            file_items.append(
                _finish(
                    prep,
                    outputs[index],
                    tokenizer=tokenizer,
                    stop_ids=stop_ids,
                    mode=mode,
                    cap=max_new_tokens,
                    reference=reference,
                )
            )
            index += 1
        tasks.append(TaskReplay.from_items(sf.task, sf.source, file_items))
        items.extend(file_items)
    truncated = sum(t.truncated_by_cap for t in tasks)
    if truncated:
        warnings.append(f"{truncated} item(s) cut short by the max_new_tokens cap of {max_new_tokens}")
    return ReplayResult(
        reasoning_split=mode,
        enable_thinking=enable_thinking,
        max_new_tokens_cap=max_new_tokens,
        tasks=tuple(tasks),
        items=tuple(items),
        submission=submission_check,
        warnings=tuple(warnings),
    )


def replay_submission(
    path: str | Path,
    *,
    tokenizer: Tokenizer,
    chat_template: str,
    generate: GenerateFn,
    max_new_tokens: int,
    **kwargs: Any,
) -> ReplayResult:
    """Check a MERA ``submission.zip`` and replay the samples files in its ``logs_public.zip``.

    The per-task ``ruTXT*.json`` outputs are compared with the logs' ``filtered_resps[0]``
    (:func:`audit.samples.check_submission_outputs`); mismatches go to ``result.submission`` and, counted,
    to the warnings. The samples replayed are those MERA's ``log_to_submission.py`` used (the newest per
    task); older ones are named in the warnings. ``kwargs`` are those of :func:`replay_samples`.

    Raises:
        SamplesError: the zip or anything inside it is unreadable or malformed.
    """
    submission = read_submission(path)
    mismatches = tuple(m.describe() for m in check_submission_outputs(submission))
    warnings = []
    if mismatches:
        warnings.append(f"{path}: {len(mismatches)} submission output(s) differ from the logs")
    for task, names in submission.logs.superseded.items():
        if names:
            warnings.append(
                f"{task}: older samples files in the logs not used by the submission: {list(names)}"
            )
    files = [submission.logs.samples[task] for task in sorted(submission.logs.samples)]
    if not files:
        raise SamplesError(f"{submission.logs.source}: no samples_*.jsonl files inside")
    return _replay(
        files,
        extra_warnings=warnings,
        submission_check=SubmissionCheck(path=str(path), output_mismatches=mismatches),
        tokenizer=tokenizer,
        chat_template=chat_template,
        generate=generate,
        max_new_tokens=max_new_tokens,
        **kwargs,
    )
