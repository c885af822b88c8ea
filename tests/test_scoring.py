"""Tests for audit.scoring: MERA's filter, SQuAD EM/F1, the article quirk and the reasoning split.

Every expected value is worked out by hand in the comments: N(x) is SQuAD's normalisation (lower-case,
delete ASCII punctuation, delete the words a/an/the, collapse whitespace), tokens are N(x).split(), and
F1 = 2PR/(P+R) with P = shared/len(pred tokens), R = shared/len(gold tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mera_fixtures import AGRO, AQUA, MED

from audit.samples import read_samples
from audit.scoring import (
    DEFAULT_REASONING_SPLIT,
    QuirkKind,
    ReasoningSplit,
    ServerReply,
    answer_tokens,
    compute_exact,
    compute_f1,
    filter_mismatches,
    filtered_response,
    has_reasoning_markup,
    logged_response,
    mera_filter,
    mera_process_results,
    metric_mismatches,
    normalize_answer,
    quirk_flag,
    replay_content,
    score_item,
    score_samples,
    score_task,
    split_reasoning,
)

# ---------------------------------------------------------------------------------------------------
# SQuAD normalisation and metrics.


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("A,C", "ac"),  # the comma is deleted, not replaced: one token "ac"
        ("A, C", "c"),  # "a c": "a" is an English article and goes
        ("A", ""),  # the letter A alone is the article a
        ("a", ""),
        ("An", ""),
        ("The", ""),
        (".", ""),
        ("", ""),
        (" B. ", "b"),
        ("B\n", "b"),
        ("Ответ: B", "ответ b"),
        ("A) Пенициллины", "пенициллины"),  # ")" deleted, then "a" deleted
        ("C,D,E", "cde"),
        ("А", "а"),  # CYRILLIC А is not an article (and so does not match a Latin gold "A")
        ("«B» — верно…", "«b» — верно…"),  # non-ASCII punctuation is kept
        ("<think>\nX\n</think>\n\nD", "think x think d"),
        ("a.b", "ab"),  # "a.b" -> "ab": no word boundary left around the a
        ("Total", "total"),  # "a" inside a word is kept
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_answer_tokens():
    assert answer_tokens("") == []
    assert answer_tokens("A, B") == ["b"]
    assert answer_tokens("B, D") == ["b", "d"]


@pytest.mark.parametrize(
    ("gold", "pred", "em", "f1"),
    [
        ("B", "B", 1, 1.0),  # "b" == "b"; P = R = 1/1 -> F1 = 2*1*1/2 = 1.0
        ("B", "b", 1, 1.0),
        ("B", "B.", 1, 1.0),
        ("B", "C", 0, 0),  # no shared token -> the int 0
        ("A,C", "A,C", 1, 1.0),  # "ac" == "ac"
        ("A,C", "A, C", 0, 0),  # "ac" vs "c": no shared token
        ("A, C", "A,C", 0, 0),  # "c" vs "ac"
        ("A, C", "C", 1, 1.0),  # "c" == "c": the A vanished from the gold
        ("B,D,E", "B,D", 0, 0),  # "bde" vs "bd"
        ("B", "Ответ: B", 0, 2 / 3),  # pred [ответ, b]: P = 1/2, R = 1/1, F1 = 2*(1/2)*1/(3/2) = 2/3
        ("B, D", "B", 0, 2 / 3),  # gold [b, d], pred [b]: P = 1, R = 1/2, F1 = 2*1*(1/2)/(3/2) = 2/3
        ("B C", "B B", 0, 0.5),  # shared = min(1,1) for b = 1: P = 1/2, R = 1/2, F1 = 1/2
        ("A", "", 1, 1),  # "" == ""; F1: both token lists empty -> int(True) = 1
        ("A", "A", 1, 1),  # gold and pred normalise to "" -> 1, 1
        ("A", ".", 1, 1),  # "." -> "" : same as empty
        ("B", "", 0, 0),  # pred empty, gold ["b"] -> int([b] == []) = 0
        ("A", "А", 0, 0),  # Cyrillic reply: "" vs "а" -> EM 0; gold [] vs pred [а] -> 0
        # no reasoning parser: tokens [think, вопрос, простой, think, d] (5); shared 1 -> P = 1/5, R = 1,
        # F1 = 2*(1/5)*1/(6/5) = 1/3
        ("D", "<think>\nВопрос простой.\n</think>\n\nD", 0, 1 / 3),
    ],
)
def test_compute_exact_and_f1(gold, pred, em, f1):
    assert compute_exact(gold, pred) == em
    assert compute_f1(gold, pred) == pytest.approx(f1, abs=1e-12)


def test_metric_types_follow_squad():
    # SQuAD returns ints for the early exits and a float otherwise; lm-eval logs them as such (1 vs 1.0).
    assert type(compute_exact("B", "B")) is int
    assert type(compute_f1("A", "")) is int  # empty token list branch
    assert type(compute_f1("B", "C")) is int  # no shared token
    assert type(compute_f1("B", "B")) is float


# ---------------------------------------------------------------------------------------------------
# MERA's filter and process_results.


@pytest.mark.parametrize(
    ("reply", "filtered"),
    [
        (None, ""),  # null content
        ("", ""),
        (" C", "C"),  # a leading space goes
        ("\n\nB,E", "B,E"),
        ("B \n", "B \n"),  # trailing whitespace stays (lstrip only)
        ("   ", ""),  # whitespace only: truthy, lstrip() -> ""
        ("None", "None"),  # a literal "None" reply is kept
    ],
)
def test_mera_filter(reply, filtered):
    assert mera_filter(reply) == filtered


def test_process_results_without_gold_is_zero():
    # The private test has outputs == "": MERA returns 0/0 without comparing, even for an empty reply
    # (SQuAD alone would give EM = 1 for "" vs "").
    assert mera_process_results("", "") == {"f1": 0, "em": 0}
    assert mera_process_results("", "B") == {"f1": 0, "em": 0}
    # gold is doc["outputs"], not stripped; normalisation makes the padding irrelevant.
    assert mera_process_results(" B\n", "B") == {"f1": 1.0, "em": 1}


@pytest.mark.parametrize(
    ("gold", "content", "em", "f1"),
    [
        ("A,C", "A, C", 0, 0),  # "ac" vs "c"
        ("C", " C", 1, 1.0),  # filter -> "C"
        ("A", None, 1, 1),  # null -> "" ; "" == "" (the quirk)
        ("B", None, 0, 0),  # null -> "" vs "b"
        ("D", "<think>\nВопрос простой.\n</think>\n\nD", 0, 1 / 3),  # leftover reasoning, see above
    ],
)
def test_edge_cases_through_filter_and_process_results(gold, content, em, f1):
    result = mera_process_results(gold, mera_filter(content))
    assert result["em"] == em
    assert result["f1"] == pytest.approx(f1, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# The article quirk.


def test_quirk_flags():
    # Empty reply vs gold "A": EM 1 / F1 1 with SQuAD; with articles kept "" vs "a" -> EM 0, F1 0.
    flag = quirk_flag("A", "")
    assert (flag.kind, flag.em_points, flag.f1_points) == (QuirkKind.EMPTY_REPLY, 1, 1.0)
    # "." and "The" normalise to "" as well; kept: "" vs "a" and "the" vs "a" -> 0.
    assert quirk_flag("A", ".").kind is QuirkKind.NO_ANSWER_TEXT
    assert quirk_flag("A", "The").kind is QuirkKind.NO_ANSWER_TEXT
    # A real A is not flagged: kept, "a" == "a".
    assert quirk_flag("A", "A") is None
    assert quirk_flag("A", "a") is None
    assert quirk_flag("A", "A.") is None
    # Nothing earned, nothing flagged.
    assert quirk_flag("B", "") is None
    assert quirk_flag("A,C", "A, C") is None  # "ac" vs "c": 0 either way
    assert quirk_flag("", "") is None  # no gold: MERA scores 0


def test_quirk_article_deleted_from_a_multi_answer_gold():
    # gold "A, C" vs "C": SQuAD "c" == "c" -> EM 1, F1 1.
    # Kept: gold [a, c], pred [c]: EM 0; shared 1, P = 1/1, R = 1/2, F1 = 2*1*(1/2)/(3/2) = 2/3.
    flag = quirk_flag("A, C", "C")
    assert flag.kind is QuirkKind.ARTICLE_DELETED
    assert flag.em_points == 1
    assert flag.f1_points == pytest.approx(1 - 2 / 3)
    # gold "A, B, D" vs "B, D": SQuAD [b, d] == [b, d] -> EM 1, F1 1.
    # Kept: gold [a, b, d], pred [b, d]: shared 2, P = 2/2, R = 2/3, F1 = 2*1*(2/3)/(5/3) = 4/5.
    flag = quirk_flag("A, B, D", "B, D")
    assert (flag.em_points, flag.f1_points) == (1, pytest.approx(0.2))
    # F1 only: gold "A, B" vs "B, C": SQuAD gold [b], pred [b, c]: EM 0; P = 1/2, R = 1, F1 = 2/3.
    # Kept: gold [a, b], pred [b, c]: P = 1/2, R = 1/2, F1 = 1/2. F1 points = 2/3 - 1/2 = 1/6.
    flag = quirk_flag("A, B", "B, C")
    assert (flag.kind, flag.em_points, flag.f1_points) == (QuirkKind.ARTICLE_DELETED, 0, pytest.approx(1 / 6))


def test_score_item_carries_the_flag():
    item = score_item("A", "", doc_id=3, meta_id=103)
    assert (item.em, item.f1, item.has_gold, item.doc_id, item.meta_id) == (1, 1, True, 3, 103)
    assert item.quirk.kind is QuirkKind.EMPTY_REPLY
    assert score_item("", "").has_gold is False


# ---------------------------------------------------------------------------------------------------
# Reasoning split.

QWEN35 = "\nНужно выбрать вариант.\n</think>\n\nB"  # <think>\n is in the prompt; the model closes it
TRUNCATED = "\nДумаю: A или C"  # cut by max_gen_toks before </think>
OWN_THINK = "<think>\nСчитаю.\n</think>\n\nA,C"  # old-template style: the model opened <think> itself
EMPTY_AFTER = "Рассуждение.</think>"  # nothing after </think>
TOOL_CALL = "Ищу.\n<tool_call>\n<function=search>"
TOOL_MENTION = "Можно вызвать <tool_call> позже"


@pytest.mark.parametrize(
    ("raw", "mode", "reasoning", "content"),
    [
        # Current vLLM qwen3 parser: split at the first </think>; content "" -> None; no </think> -> None.
        (QWEN35, ReasoningSplit.QWEN3, "\nНужно выбрать вариант.\n", "\n\nB"),
        (TRUNCATED, ReasoningSplit.QWEN3, TRUNCATED, None),
        (OWN_THINK, ReasoningSplit.QWEN3, "\nСчитаю.\n", "\n\nA,C"),
        (EMPTY_AFTER, ReasoningSplit.QWEN3, "Рассуждение.", None),
        (TOOL_CALL, ReasoningSplit.QWEN3, "Ищу.\n", "<tool_call>\n<function=search>"),
        (TOOL_MENTION, ReasoningSplit.QWEN3, TOOL_MENTION, None),  # no <function= after it
        ("", ReasoningSplit.QWEN3, "", None),
        # Thinking off: same split when </think> occurs, else all content.
        (QWEN35, ReasoningSplit.QWEN3_THINKING_OFF, "\nНужно выбрать вариант.\n", "\n\nB"),
        (TRUNCATED, ReasoningSplit.QWEN3_THINKING_OFF, None, TRUNCATED),
        # Legacy parser: both tags needed, otherwise all content (the reasoning leaks).
        (QWEN35, ReasoningSplit.QWEN3_LEGACY, None, QWEN35),
        (TRUNCATED, ReasoningSplit.QWEN3_LEGACY, None, TRUNCATED),
        (OWN_THINK, ReasoningSplit.QWEN3_LEGACY, "\nСчитаю.\n", "\n\nA,C"),
        ("x</think>y<think>z", ReasoningSplit.QWEN3_LEGACY, None, "z"),  # only "z" follows the <think>
        # No parser: verbatim.
        (QWEN35, ReasoningSplit.NONE, None, QWEN35),
        (OWN_THINK, ReasoningSplit.NONE, None, OWN_THINK),
        ("", ReasoningSplit.NONE, None, ""),
    ],
)
def test_split_reasoning(raw, mode, reasoning, content):
    assert split_reasoning(raw, mode) == ServerReply(reasoning, content)
    assert replay_content(raw, mode) == content


def test_default_mode_is_current_qwen3_and_modes_parse_from_strings():
    assert DEFAULT_REASONING_SPLIT is ReasoningSplit.QWEN3
    assert split_reasoning(QWEN35) == split_reasoning(QWEN35, "qwen3")
    assert [m.value for m in ReasoningSplit] == ["qwen3", "qwen3_thinking_off", "qwen3_legacy", "none"]
    with pytest.raises(ValueError):
        split_reasoning(QWEN35, "vllm")


@pytest.mark.parametrize(
    ("raw", "mode", "logged", "filtered", "gold", "em", "f1"),
    [
        # content "\n\nB" -> lstrip -> "B" vs "B": 1, 1
        (QWEN35, ReasoningSplit.QWEN3, "\n\nB", "B", "B", 1, 1.0),
        # truncated before </think>: null -> logged "None", filtered "" -> gold "A" scores 1/1 (quirk) ...
        (TRUNCATED, ReasoningSplit.QWEN3, "None", "", "A", 1, 1),
        # ... and gold "C" scores 0/0 ("" vs "c")
        (TRUNCATED, ReasoningSplit.QWEN3, "None", "", "C", 0, 0),
        # legacy: "Нужно выбрать вариант.\n</think>\n\nB" -> tokens [нужно, выбрать, вариант, think, b] (5):
        # P = 1/5, R = 1, F1 = 1/3
        (QWEN35, ReasoningSplit.QWEN3_LEGACY, QWEN35, QWEN35.lstrip(), "B", 0, 1 / 3),
        # thinking off, truncated: "Думаю: A или C" -> tokens [думаю, или, c] (the A is an article!):
        # gold "C": P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 1/2
        (TRUNCATED, ReasoningSplit.QWEN3_THINKING_OFF, TRUNCATED, "Думаю: A или C", "C", 0, 0.5),
        # no parser, own <think>: tokens [think, считаю, think, ac]: gold "A,C" -> "ac": P = 1/4, R = 1,
        # F1 = 2*(1/4)/(5/4) = 2/5
        (OWN_THINK, ReasoningSplit.NONE, OWN_THINK, OWN_THINK, "A,C", 0, 0.4),
        # nothing after </think>: null -> "" -> gold "A" 1/1
        (EMPTY_AFTER, ReasoningSplit.QWEN3, "None", "", "A", 1, 1),
    ],
)
def test_raw_generation_to_score(raw, mode, logged, filtered, gold, em, f1):
    assert logged_response(raw, mode) == logged
    assert filtered_response(raw, mode) == filtered
    item = score_item(gold, filtered_response(raw, mode))
    assert item.em == em
    assert item.f1 == pytest.approx(f1, abs=1e-12)


def test_has_reasoning_markup():
    assert has_reasoning_markup(filtered_response(OWN_THINK, ReasoningSplit.NONE))
    assert has_reasoning_markup(filtered_response(QWEN35, ReasoningSplit.QWEN3_LEGACY))
    assert not has_reasoning_markup(filtered_response(QWEN35, ReasoningSplit.QWEN3))


# ---------------------------------------------------------------------------------------------------
# Per task, on the fixtures.


def test_med_bench_fixture_scores():
    score = score_samples(read_samples(MED))
    # items (meta.id: gold / filtered reply -> EM, F1):
    #   101: B / "B" -> 1, 1        102: C / "C" -> 1, 1          103: A / "" -> 1, 1 (quirk)
    #   104: D / "<think>..D" -> 0, 1/3                           105: A / "A" -> 1, 1
    #   106: B / "Ответ: B" -> 0, 2/3
    assert [(i.meta_id, i.em) for i in score.items] == [
        (101, 1),
        (102, 1),
        (103, 1),
        (104, 0),
        (105, 1),
        (106, 0),
    ]
    assert (score.task, score.n_items, score.n_with_gold) == ("med_bench", 6, 6)
    assert score.em == pytest.approx(4 / 6)  # (1+1+1+0+1+0)/6
    assert score.f1 == pytest.approx(5 / 6)  # (1+1+1+1/3+1+2/3)/6 = 5/6
    assert score.mean_em_f1 == pytest.approx((4 / 6 + 5 / 6) / 2)
    assert score.n_quirk == 1 and [i.meta_id for i in score.quirk_items] == [103]
    assert score.quirk_items[0].quirk.kind is QuirkKind.EMPTY_REPLY
    assert score.em_without_quirk == pytest.approx(3 / 6)  # 103 loses its EM point
    assert score.f1_without_quirk == pytest.approx(4 / 6)  # (1+1+0+1/3+1+2/3)/6


def test_agro_bench_fixture_scores():
    score = score_samples(read_samples(AGRO))
    # 2001 "A,C"/"A,C" 1,1 | 2002 "A,C"/"A, C" 0,0 | 2003 "B,D,E"/"B,D" 0,0 | 2004 "C"/"C" 1,1
    # 2005 "A,B,F"/"a,b,f" 1,1 | 2006 "A"/"." 1,1 (quirk) | 2007 "B,E"/"B,E" 1,1
    assert [i.em for i in score.items] == [1, 0, 0, 1, 1, 1, 1]
    assert score.em == pytest.approx(5 / 7)
    assert score.f1 == pytest.approx(5 / 7)
    assert [(i.meta_id, i.quirk.kind) for i in score.quirk_items] == [(2006, QuirkKind.NO_ANSWER_TEXT)]
    assert score.em_without_quirk == pytest.approx(4 / 7)
    assert score.f1_without_quirk == pytest.approx(4 / 7)


def test_private_test_fixture_scores_zero():
    score = score_samples(read_samples(AQUA))
    assert (score.n_items, score.n_with_gold, score.em, score.f1, score.n_quirk) == (3, 0, 0.0, 0.0, 0)


def test_replayed_predictions_replace_logged_replies():
    sf = read_samples(MED)
    # Replaying doc 3 through a reasoning parser cleans "<think>...</think>\n\nD" to "D": EM 0 -> 1.
    replay = {3: filtered_response("\nВопрос простой.\n</think>\n\nD", ReasoningSplit.QWEN3)}
    assert replay == {3: "D"}
    score = score_samples(sf, replay)
    assert score.em == pytest.approx(5 / 6)  # (1+1+1+1+1+0)/6
    assert score.f1 == pytest.approx((5 + 2 / 3) / 6)  # (1+1+1+1+1+2/3)/6
    with pytest.raises(ValueError, match="not in the file"):
        score_samples(sf, {42: "A"})


def test_score_task_requires_items():
    with pytest.raises(ValueError, match="no items"):
        score_task("med_bench", [])


@pytest.mark.parametrize("path", [MED, AGRO, AQUA])
def test_logged_metrics_and_filter_are_reproduced(path):
    sf = read_samples(path)
    assert metric_mismatches(sf) == ()
    assert filter_mismatches(sf) == ()


def _rewrite(tmp_path: Path, line_index: int, fn) -> Path:
    lines = MED.read_text(encoding="utf-8").split("\n")[:-1]
    record = json.loads(lines[line_index])
    fn(record)
    lines[line_index] = json.dumps(record, ensure_ascii=False)
    out = tmp_path / MED.name
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


def test_tampered_logged_metric_is_found(tmp_path):
    # doc 5 ("Ответ: B" vs "B") logged EM 0 / F1 2/3; claim EM 1 instead.
    sf = read_samples(_rewrite(tmp_path, 5, lambda r: r.update(em=1)))
    ((sample, recomputed),) = metric_mismatches(sf)
    assert sample.doc_id == 5
    assert recomputed["em"] == 0 and recomputed["f1"] == pytest.approx(2 / 3)


def test_tampered_filtered_reply_is_found(tmp_path):
    # doc 3's logged reply has a think block; a filtered "D" cannot come from it through MERA's filter.
    sf = read_samples(_rewrite(tmp_path, 3, lambda r: r.update(filtered_resps=["D"])))
    assert [s.doc_id for s in filter_mismatches(sf)] == [3]
