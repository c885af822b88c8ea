"""MERA Industrial scoring (agro_bench, aqua_bench, med_bench), reproduced exactly, plus audit helpers.

Pure Python (no JAX/torch). The chain from a model's raw generation to a logged score (audit.md §1.3, §2.3):

1. The server splits the reasoning off the generation and returns the chat ``content``, possibly null
   (:class:`ReasoningSplit`, :func:`split_reasoning`). lm-eval logs ``str(content)`` in ``resps``.
2. MERA's ``remove_whitespace_and_nones`` filter maps a falsy reply (null or ``""``) to ``""`` and
   otherwise ``lstrip()``s it; ``take_first`` keeps the first reply (:func:`mera_filter`). The result is
   ``filtered_resps[0]``, and the submission's ``outputs``.
3. ``process_results`` scores it against ``doc["outputs"]`` with
   ``transformers.data.metrics.squad_metrics.compute_exact``/``compute_f1`` (removed in transformers 5,
   re-implemented here), returning ``{"f1": 0, "em": 0}`` when ``doc["outputs"]`` is empty (the private
   test) (:func:`mera_process_results`).
4. lm-eval aggregates each metric with ``mean`` = ``sum(values) / len(values)`` over all logged docs
   (:func:`score_task`). Which of EM, F1 or their mean the leaderboard shows is not public.

No answer-letter regex is involved: leftover reasoning text or ``"Ответ: B"`` costs EM.

SQuAD's normalisation deletes the ENGLISH ARTICLE ``a`` as a word, so a gold ``"A"`` normalises to ``""``
and an empty reply (e.g. null content when generation stopped before ``</think>``) scores EM = F1 = 1 on
every item whose answer is A. :func:`quirk_flag` finds points earned that way.
"""

from __future__ import annotations

import collections
import enum
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from audit.samples import NULL_REPLY, Sample, SamplesFile

__all__ = [
    "DEFAULT_REASONING_SPLIT",
    "ItemScore",
    "QuirkFlag",
    "QuirkKind",
    "ReasoningSplit",
    "ServerReply",
    "TaskScore",
    "answer_tokens",
    "compute_exact",
    "compute_f1",
    "filter_mismatches",
    "filtered_response",
    "has_reasoning_markup",
    "logged_response",
    "mera_filter",
    "mera_process_results",
    "metric_mismatches",
    "normalize_answer",
    "quirk_flag",
    "replay_content",
    "score_item",
    "score_samples",
    "score_task",
    "split_reasoning",
]

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
_FUNCTION_OPEN = re.compile(r"<function[\s=]")

_PUNCTUATION = frozenset(string.punctuation)  # the 32 ASCII punctuation characters only
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)

Number = int | float


# ----------------------------------------------------------------------------------------------------
# SQuAD metrics (transformers.data.metrics.squad_metrics), behaviour for behaviour.


def _remove_punctuation(text: str) -> str:
    return "".join(ch for ch in text if ch not in _PUNCTUATION)


def _squash_whitespace(text: str) -> str:
    return " ".join(text.split())


def normalize_answer(text: str) -> str:
    """SQuAD ``normalize_answer``: ``lower()``; delete every ``string.punctuation`` character (deleted, not
    replaced by a space); replace each ``\\b(a|an|the)\\b`` by a space; collapse whitespace
    (``" ".join(s.split())``).

    ``"A,C"`` -> ``"ac"``; ``"A, C"`` -> ``"c"`` (the ``a`` is an article); ``"A"`` -> ``""``; ``" B. "`` ->
    ``"b"``. Non-ASCII punctuation (``«»``, ``—``, ``…``) is kept; a Cyrillic ``"А"`` is not an article.
    """
    return _squash_whitespace(_ARTICLES.sub(" ", _remove_punctuation(text.lower())))


def _normalize_keeping_articles(text: str) -> str:
    """:func:`normalize_answer` without the article deletion: the counterfactual :func:`quirk_flag` uses."""
    return _squash_whitespace(_remove_punctuation(text.lower()))


def answer_tokens(text: str) -> list[str]:
    """SQuAD ``get_tokens``: ``[]`` for an empty string, else the whitespace tokens of the normalised text."""
    if not text:
        return []
    return normalize_answer(text).split()


def compute_exact(gold: str, prediction: str) -> int:
    """SQuAD ``compute_exact``: ``int(normalize_answer(gold) == normalize_answer(prediction))``."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def _f1_from_tokens(gold_toks: list[str], pred_toks: list[str]) -> Number:
    if not gold_toks or not pred_toks:
        # Either side has no tokens: 1 when both have none, else 0 (an int, as in SQuAD).
        return int(gold_toks == pred_toks)
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def compute_f1(gold: str, prediction: str) -> Number:
    """SQuAD ``compute_f1``: bag-of-tokens F1 over :func:`answer_tokens`.

    Returns the int ``int(gold_toks == pred_toks)`` when either side has no tokens, the int ``0`` when no
    token is shared, else the float ``2PR / (P + R)`` with P = shared / len(pred), R = shared / len(gold)
    (shared counted with multiplicity).
    """
    return _f1_from_tokens(answer_tokens(gold), answer_tokens(prediction))


# ----------------------------------------------------------------------------------------------------
# MERA's filter and process_results.


def mera_filter(reply: str | None) -> str:
    """MERA's ``remove_whitespace_and_nones`` for one reply: ``""`` if the reply is falsy (``None`` or
    ``""``), else ``reply.lstrip()``. Only LEADING whitespace goes; a trailing ``"\\n"`` stays (and is then
    removed by the SQuAD normalisation anyway)."""
    if not reply:
        return ""
    return reply.lstrip()


def mera_process_results(gold: str, prediction: str) -> dict[str, Number]:
    """MERA's ``process_results(doc, [prediction])`` with ``gold = doc["outputs"]`` (NOT stripped; the
    normalisation makes that moot): ``{"f1": compute_f1, "em": compute_exact}`` when ``len(gold) > 0``,
    else ``{"f1": 0, "em": 0}``. Note: an empty gold does not score 1 against an empty reply."""
    if len(gold) > 0:
        return {"f1": compute_f1(gold, prediction), "em": compute_exact(gold, prediction)}
    return {"f1": 0, "em": 0}


# ----------------------------------------------------------------------------------------------------
# The normalisation quirk.


class QuirkKind(enum.StrEnum):
    EMPTY_REPLY = "empty_reply"
    """The scored reply is ``""``: null content (generation cut before ``</think>``), or an empty reply."""
    NO_ANSWER_TEXT = "no_answer_text"
    """A non-empty reply that normalises to ``""``: only punctuation and/or articles (``"."``, ``"The"``)."""
    ARTICLE_DELETED = "article_deleted"
    """A reply with content that matches only because a letter ``A`` was deleted (``"C"`` vs ``"A, C"``)."""


@dataclass(frozen=True)
class QuirkFlag:
    """Points an item earned only because SQuAD normalisation deletes the article ``a``.

    ``em_points``/``f1_points`` are MERA's EM/F1 minus the EM/F1 of the same comparison with articles kept
    (everything else in the normalisation unchanged), when that difference is positive.
    """

    kind: QuirkKind
    em_points: Number
    f1_points: float


def quirk_flag(gold: str, prediction: str) -> QuirkFlag | None:
    """Flag an item whose EM or F1 is higher than it would be if the normalisation kept articles.

    ``prediction`` is the scored reply (``filtered_resps[0]``). Returns ``None`` for an item that earned
    nothing through the quirk, including items without gold (MERA scores those 0). A correct ``"A"`` or
    ``"a"`` against gold ``"A"`` is NOT flagged (articles kept, both sides are ``"a"``); ``""``, ``"."`` and
    ``"The"`` are.
    """
    if len(gold) == 0:
        return None
    em = compute_exact(gold, prediction)
    f1 = compute_f1(gold, prediction)
    gold_kept = _normalize_keeping_articles(gold)
    pred_kept = _normalize_keeping_articles(prediction)
    em_kept = int(gold_kept == pred_kept)
    f1_kept = _f1_from_tokens(gold_kept.split() if gold else [], pred_kept.split() if prediction else [])
    em_points = max(em - em_kept, 0)
    f1_points = max(float(f1) - float(f1_kept), 0.0)
    if em_points == 0 and f1_points == 0.0:
        return None
    if prediction == "":
        kind = QuirkKind.EMPTY_REPLY
    elif normalize_answer(prediction) == "":
        kind = QuirkKind.NO_ANSWER_TEXT
    else:
        kind = QuirkKind.ARTICLE_DELETED
    return QuirkFlag(kind=kind, em_points=em_points, f1_points=f1_points)


# ----------------------------------------------------------------------------------------------------
# Reasoning split: how the server turned a raw generation into chat content.


class ReasoningSplit(enum.StrEnum):
    """How the OpenAI-compatible server that answered lm-eval separated reasoning from ``content``.

    The submission does not say which server, version or parser it used (audit.md §2.1, §2.3), so the audit
    takes this as an option and records it in its manifest. The raw generation is the decoded completion
    up to (not including) the stop string / EOS ``<|im_end|>``; with the Qwen3.5/3.6 template the prompt
    already ends in ``<think>\\n`` so the completion normally starts inside the reasoning.
    """

    QWEN3 = "qwen3"
    """Current vLLM ``--reasoning-parser qwen3`` (the Qwen3.5-aware ``Qwen3ReasoningParser``), thinking on.

    * everything up to and including the first ``<think>`` is dropped, if the completion contains one;
    * with ``</think>``: content = the text after its first occurrence, ``None`` when that is empty;
    * without ``</think>``: a ``<tool_call>`` followed (after whitespace) by ``<function=`` or
      ``<function`` + whitespace ends the reasoning implicitly and content starts at ``<tool_call>``;
      otherwise generation stopped inside the reasoning (e.g. at ``max_gen_toks``) and content is ``None``
      -> filtered ``""`` -> EM = F1 = 1 when the gold is ``"A"``.

    This is the default (:data:`DEFAULT_REASONING_SPLIT`): it is the only behaviour consistent with the
    high published score, which needs clean answers (audit.md §2.1, an inference).
    """

    QWEN3_THINKING_OFF = "qwen3_thinking_off"
    """Current vLLM ``qwen3`` parser with ``chat_template_kwargs={"enable_thinking": false}``.

    Same as :attr:`QWEN3` when ``</think>`` occurs (the template puts ``<think>\\n\\n</think>\\n\\n`` in the
    prompt, so it normally does not); without it the whole completion (after any ``<think>``) is content.
    """

    QWEN3_LEGACY = "qwen3_legacy"
    """vLLM ``qwen3`` parser before the Qwen3.5 rewrite (v0.10-0.11 era): needs BOTH tags in the completion.

    If ``<think>`` or ``</think>`` is missing, the whole completion is content, so with the Qwen3.5/3.6
    template (``<think>`` in the prompt) the reasoning and the ``</think>`` leak into the scored reply
    (EM = 0). With both present: drop through the first ``<think>``, content = text after the first
    ``</think>`` or ``None`` when empty (and, if ``</think>`` only occurred before ``<think>``, the rest).
    """

    NONE = "none"
    """No reasoning parser: content is the raw completion, verbatim (``""`` stays ``""``, never null)."""


DEFAULT_REASONING_SPLIT = ReasoningSplit.QWEN3


@dataclass(frozen=True)
class ServerReply:
    """The server's ``(reasoning_content, content)`` for one completion; either may be null."""

    reasoning: str | None
    content: str | None


def _drop_through_think_start(text: str) -> str:
    _, start, after = text.partition(THINK_START)
    return after if start else text


def split_reasoning(raw: str, mode: ReasoningSplit = DEFAULT_REASONING_SPLIT) -> ServerReply:
    """Split a raw generation as the server in ``mode`` would (no whitespace is stripped; see
    :class:`ReasoningSplit` for each mode's rules)."""
    mode = ReasoningSplit(mode)
    if mode is ReasoningSplit.NONE:
        return ServerReply(None, raw)
    if mode is ReasoningSplit.QWEN3_LEGACY:
        if THINK_START not in raw or THINK_END not in raw:
            return ServerReply(None, raw)
        text = _drop_through_think_start(raw)
        if THINK_END not in text:
            return ServerReply(None, text)
        reasoning, _, content = text.partition(THINK_END)
        return ServerReply(reasoning, content or None)
    text = _drop_through_think_start(raw)
    if THINK_END in text:
        reasoning, _, content = text.partition(THINK_END)
        return ServerReply(reasoning, content or None)
    if mode is ReasoningSplit.QWEN3_THINKING_OFF:
        return ServerReply(None, text)
    index = text.find(TOOL_CALL_START)
    if index != -1 and _FUNCTION_OPEN.match(text[index + len(TOOL_CALL_START) :].lstrip()):
        return ServerReply(text[:index] or None, text[index:] or None)
    return ServerReply(text, None)


def replay_content(raw: str, mode: ReasoningSplit = DEFAULT_REASONING_SPLIT) -> str | None:
    """The chat ``content`` the server would return for ``raw`` (``None`` = null)."""
    return split_reasoning(raw, mode).content


def logged_response(raw: str, mode: ReasoningSplit = DEFAULT_REASONING_SPLIT) -> str:
    """What lm-eval would log in ``resps[0][0]`` for ``raw``: ``str(content)``, so null is ``"None"``."""
    return str(replay_content(raw, mode))


def filtered_response(raw: str, mode: ReasoningSplit = DEFAULT_REASONING_SPLIT) -> str:
    """What lands in ``filtered_resps[0]`` (and the submission's ``outputs``) for ``raw``: split at
    ``</think>`` per ``mode``, then :func:`mera_filter` (null/empty -> ``""``, else ``lstrip``)."""
    return mera_filter(replay_content(raw, mode))


def has_reasoning_markup(reply: str) -> bool:
    """True when a (filtered) reply still contains ``<think>`` or ``</think>``: leftover reasoning."""
    return THINK_START in reply or THINK_END in reply


# ----------------------------------------------------------------------------------------------------
# Per item and per task.


@dataclass(frozen=True)
class ItemScore:
    gold: str  # doc["outputs"]
    prediction: str  # the scored (filtered) reply
    em: Number
    f1: Number
    quirk: QuirkFlag | None
    doc_id: int | None = None
    meta_id: int | None = None

    @property
    def has_gold(self) -> bool:
        return len(self.gold) > 0


def score_item(
    gold: str, prediction: str, *, doc_id: int | None = None, meta_id: int | None = None
) -> ItemScore:
    """Score one filtered reply as MERA does, with its :func:`quirk_flag`."""
    result = mera_process_results(gold, prediction)
    return ItemScore(
        gold=gold,
        prediction=prediction,
        em=result["em"],
        f1=result["f1"],
        quirk=quirk_flag(gold, prediction),
        doc_id=doc_id,
        meta_id=meta_id,
    )


def _mean(values: list[Number]) -> float:
    # lm_eval.api.metrics.mean
    return sum(values) / len(values)


@dataclass(frozen=True)
class TaskScore:
    """Aggregates over one task's items.

    ``em``/``f1`` are what lm-eval reports: the mean over ALL items, items without gold counting 0.
    ``em_without_quirk``/``f1_without_quirk`` subtract the points :func:`quirk_flag` attributes to the
    article deletion. ``n_with_gold`` counts items with a non-empty gold (0 on the private test).
    """

    task: str
    n_items: int
    n_with_gold: int
    em: float
    f1: float
    n_quirk: int
    em_without_quirk: float
    f1_without_quirk: float
    items: tuple[ItemScore, ...]

    @property
    def mean_em_f1(self) -> float:
        """``(em + f1) / 2``, one candidate for the leaderboard number (the metric shown is not public)."""
        return (self.em + self.f1) / 2

    @property
    def quirk_items(self) -> tuple[ItemScore, ...]:
        return tuple(item for item in self.items if item.quirk is not None)


def score_task(task: str, items: Iterable[ItemScore]) -> TaskScore:
    """Aggregate item scores with lm-eval's ``mean``. Raises ``ValueError`` for no items (lm-eval would
    divide by zero)."""
    items = tuple(items)
    if not items:
        raise ValueError(f"{task}: no items to aggregate")
    return TaskScore(
        task=task,
        n_items=len(items),
        n_with_gold=sum(1 for i in items if i.has_gold),
        em=_mean([i.em for i in items]),
        f1=_mean([i.f1 for i in items]),
        n_quirk=sum(1 for i in items if i.quirk is not None),
        em_without_quirk=_mean([i.em - (i.quirk.em_points if i.quirk else 0) for i in items]),
        f1_without_quirk=_mean([i.f1 - (i.quirk.f1_points if i.quirk else 0.0) for i in items]),
        items=items,
    )


def score_samples(samples: SamplesFile, predictions: Mapping[int, str] | None = None) -> TaskScore:
    """Score a samples file: each doc's logged ``filtered_resps[0]``, or, for the doc ids in
    ``predictions``, that already-filtered reply instead (a replay; use :func:`filtered_response` to get it
    from a raw generation). Gold is ``doc["outputs"]``; a prediction for an unknown doc id is an error."""
    predictions = dict(predictions or {})
    unknown = sorted(set(predictions) - {s.doc_id for s in samples})
    if unknown:
        raise ValueError(f"{samples.source}: predictions for doc ids not in the file: {unknown[:10]}")
    items = [
        score_item(s.gold, predictions.get(s.doc_id, s.filtered_response), doc_id=s.doc_id, meta_id=s.meta_id)
        for s in samples
    ]
    return score_task(samples.task, items)


def filter_mismatches(samples: Iterable[Sample]) -> tuple[Sample, ...]:
    """Samples whose logged ``filtered_resps[0]`` is not :func:`mera_filter` of the logged ``resps[0][0]``
    (reading the logged ``"None"`` as null). Empty for an untampered MERA log."""
    bad = []
    for s in samples:
        reply = None if s.response == NULL_REPLY else s.response
        expected = mera_filter(reply)
        if s.response == NULL_REPLY and s.filtered_response == NULL_REPLY:
            expected = NULL_REPLY  # a model that literally answered "None"
        if s.filtered_response != expected:
            bad.append(s)
    return tuple(bad)


def metric_mismatches(samples: Iterable[Sample]) -> tuple[tuple[Sample, dict[str, Number]], ...]:
    """Samples whose logged per-doc ``em``/``f1`` differ from a recomputation on the logged
    ``filtered_resps[0]``, each with the recomputed values. Samples logged under ``--predict_only``
    (``metrics == ["bypass"]``) carry no values and are skipped. Comparison is exact: the recomputation
    does the same float arithmetic, and JSON round-trips floats exactly."""
    bad = []
    for s in samples:
        logged = {k: s.metric_values[k] for k in ("em", "f1") if k in s.metric_values}
        if not logged:
            continue
        recomputed = mera_process_results(s.gold, s.filtered_response)
        if any(logged[k] != recomputed[k] for k in logged):
            bad.append((s, recomputed))
    return tuple(bad)
