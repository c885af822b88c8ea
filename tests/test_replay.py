"""audit.replay: benchmark replay of the MERA fixture samples files through real chat rendering, tokenization,
decoding, ``until`` cuts and reasoning split, with a fake greedy ``generate`` that "answers" a chosen text.

Expected EM/F1 are worked out by hand below. MERA scores with SQuAD's ``compute_exact``/``compute_f1``:
normalise = lower() -> delete ASCII punctuation -> delete the words a/an/the -> collapse whitespace; F1 is
token overlap 2PR/(P+R) with P = shared/len(pred tokens), R = shared/len(gold tokens), and
``int(gold_toks == pred_toks)`` when either side has no tokens. Gold "A" normalises to "" (an article).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import tiny_tokenizer
from mera_fixtures import AGRO, ALL, AQUA, DST_NAMES, MED

from audit.replay import (
    NOT_REPRODUCED_BY_REFERENCE,
    PORT_DIVERGENCE,
    ReferenceReplies,
    ReplayResult,
    load_samples_files,
    replay_samples,
    replay_submission,
    select_samples,
)
from audit.samples import SamplesError, read_samples
from audit.scoring import ReasoningSplit
from qwen_jax.chat import apply_chat_template, load_default_chat_template
from qwen_jax.tokenizer import load_tokenizer

TEMPLATE = load_default_chat_template()
CAP = 48  # the max_new_tokens cap of the main replay (the logs say max_gen_toks=10000)

THINK = "\nКороткое рассуждение.\n</think>\n\n"  # a finished think block (the prompt already opened <think>)
# Generation cut off while still thinking: no </think>, longer than CAP tokens.
LONG = (
    "\nРассуждаю подробно: сначала вспомню классификацию антибиотиков, затем сравню группы препаратов, "
    "потом проверю каждый вариант ответа по очереди, учитывая механизм действия, спектр и побочные эффекты, "
    "и только после этого сформулирую окончательный ответ на вопрос."
)
# What the fake model generates for each (task, meta.id): the raw completion after the prompt's "<think>\n".
REPLIES = {
    ("med_bench", 101): THINK + "B",
    ("med_bench", 102): THINK + " C",  # leading space after </think>\n\n: the filter lstrips it
    ("med_bench", 103): LONG,  # truncated before </think>
    ("med_bench", 104): "\nВопрос простой.\n</think>\n\nD",  # the logged reply without its "<think>"
    ("med_bench", 105): THINK + "A",
    ("med_bench", 106): THINK + "Ответ: B",
    ("agro_bench", 2001): THINK + "A, C",
    ("agro_bench", 2002): THINK + "A,C",
    ("agro_bench", 2003): THINK + "B,D,E",
    ("agro_bench", 2004): THINK + "C. Чистый пар",
    ("agro_bench", 2005): THINK + "A,B,F",
    ("agro_bench", 2006): THINK + ".",
    ("agro_bench", 2007): THINK + "\n\nB,E",
    ("aqua_bench", 501): THINK + "B",
    ("aqua_bench", 502): THINK + "A, B",
    ("aqua_bench", 503): LONG,
}
TAIL = "мусор после конца"  # what the fake emits after <|im_end|>: must be ignored

# Hand-computed expectations for the default replay (reasoning split qwen3, thinking on, cap CAP).
# (meta.id, logged filtered, replayed filtered, equal, logged EM, logged F1, replayed EM, replayed F1, quirk, cut)
MED_TABLE = [
    (101, "B", "B", True, 1, 1, 1, 1, None, False),  # "b" == "b"
    (102, "C", "C", True, 1, 1, 1, 1, None, False),  # " C" lstripped on both sides
    # null content ("") vs gold "A" -> "" == "" and both token lists empty -> EM 1, F1 1 through the article
    # quirk, logged and replayed (the replay also ran into the cap of CAP tokens before </think>)
    (103, "", "", True, 1, 1, 1, 1, "logged:empty_reply;replayed:empty_reply", True),
    # logged "<think> вопрос простой think d"-like: 5 tokens "think вопрос простой think d" vs "d":
    # P = 1/5, R = 1 -> F1 = 2(1/5)/(6/5) = 1/3; the replay goes through the parser -> "D": 1, 1
    (104, "<think>\nВопрос простой.\n</think>\n\nD", "D", False, 0, 1 / 3, 1, 1, None, False),
    (105, "A", "A", True, 1, 1, 1, 1, None, False),  # a genuine "A": articles kept it is "a" == "a", no quirk
    # "ответ b" vs "b": EM 0, P = 1/2, R = 1 -> F1 = 2/3
    (106, "Ответ: B", "Ответ: B", True, 0, 2 / 3, 0, 2 / 3, None, False),
]
AGRO_TABLE = [
    # gold "A,C" -> "ac"; replay "A, C" -> "a c" -> "c" (article deleted): different tokens -> 0, 0
    (2001, "A,C", "A, C", False, 1, 1, 0, 0, None, False),
    # the reverse: logged "A, C" -> "c" vs "ac": 0, 0; the replay "A,C" -> "ac": 1, 1
    (2002, "A, C", "A,C", False, 0, 0, 1, 1, None, False),
    (2003, "B,D", "B,D,E", False, 0, 0, 1, 1, None, False),  # "bd" vs "bde": 0, 0; "bde" == "bde": 1, 1
    # "c чистый пар" vs "c": EM 0, P = 1/3, R = 1 -> F1 = (2/3)/(4/3) = 1/2
    (2004, "C", "C. Чистый пар", False, 1, 1, 0, 0.5, None, False),
    (2005, "a,b,f", "A,B,F", False, 1, 1, 1, 1, None, False),  # lower(): "abf" == "abf" on both sides
    # "." -> "" == "" (gold "A" is an article): EM 1, F1 1, earned only through the quirk, both sides
    (2006, ".", ".", True, 1, 1, 1, 1, "logged:no_answer_text;replayed:no_answer_text", False),
    (2007, "B,E", "B,E", True, 1, 1, 1, 1, None, False),  # "\n\n\n\nB,E" lstripped -> "B,E"
]
# The private test: gold "" -> no scores; agreement only.
AQUA_TABLE = [
    (501, "B", "B", True, None, None, None, None, None, False),
    (502, "A,B", "A, B", False, None, None, None, None, None, False),
    (503, "", "", True, None, None, None, None, None, True),
]


# ---------------------------------------------------------------------------------------------------
# Tokenizer and fake model.


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = [s.user_text() for path in ALL.values() for s in read_samples(path)]
    corpus += [*REPLIES.values(), TAIL]
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    directory = tiny_tokenizer.build_tokenizer_dir(tmp_path_factory.mktemp("tok"), corpus, 600, config)
    return load_tokenizer(directory)


class FakeModel:
    """``generate`` that answers each known prompt with its reply text, then ``<|im_end|>`` and junk, cut at
    ``max_new_tokens``. The prompt is recognised by its token ids, rendered and tokenized here independently
    of the replay."""

    def __init__(self, tok, files, replies=None, **template_kwargs):
        self.tok = tok
        self.replies = {**REPLIES, **(replies or {})}
        self.by_prompt = {}
        self.prompt_text = {}
        for sf in files:
            for s in sf:
                try:
                    text = apply_chat_template(
                        TEMPLATE, s.messages(), add_generation_prompt=True, **template_kwargs
                    )
                except ValueError:  # a broken sample (the replay must reject it before generating)
                    continue
                ids = tuple(tok.encode(text))
                self.by_prompt[ids] = (s.task, s.meta_id)
                self.prompt_text[(s.task, s.meta_id)] = text
        self.calls = []

    def __call__(self, prompts, max_new_tokens):
        self.calls.append((len(prompts), max_new_tokens))
        out = []
        for prompt in prompts:
            key = self.by_prompt[tuple(prompt)]
            reply = self.tok.encode(self.replies[key])
            ids = [*reply, self.tok.token_to_id("<|im_end|>"), *self.tok.encode(TAIL)]
            out.append(ids[:max_new_tokens])
        return out


def run(tok, files, *, replies=None, template_kwargs=None, **kwargs) -> tuple[ReplayResult, FakeModel]:
    template_kwargs = template_kwargs or {}
    model = FakeModel(tok, files, replies, **template_kwargs)
    kwargs.setdefault("max_new_tokens", CAP)
    if "enable_thinking" in template_kwargs:
        kwargs["enable_thinking"] = template_kwargs["enable_thinking"]
    result = replay_samples(files, tokenizer=tok, chat_template=TEMPLATE, generate=model, **kwargs)
    return result, model


def rows(result: ReplayResult, task: str):
    return [
        (
            i.meta_id,
            i.logged,
            i.replayed,
            i.equal,
            i.logged_em,
            i.logged_f1,
            i.replayed_em,
            i.replayed_f1,
            i.quirk,
            i.truncated_by_cap,
        )
        for i in result.items
        if i.task == task
    ]


def assert_rows(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[:4] == w[:4], g
        assert g[4:8] == tuple(pytest.approx(x) if x is not None else None for x in w[4:8]), g
        assert g[8:] == w[8:], g


# ---------------------------------------------------------------------------------------------------
# The main replay.


@pytest.fixture(scope="module")
def files():
    return load_samples_files([MED, AGRO, AQUA])


@pytest.fixture(scope="module")
def default_run(tok, files):
    return run(tok, files)


def test_premises(tok):
    # Russian text round-trips through the byte-level BPE, and the cap bites only on the long reasoning.
    for key, text in REPLIES.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert (len(ids) >= CAP) == (text == LONG), key


def test_item_scores_by_hand(default_run):
    result, _ = default_run
    assert_rows(rows(result, "med_bench"), MED_TABLE)
    assert_rows(rows(result, "agro_bench"), AGRO_TABLE)
    assert_rows(rows(result, "aqua_bench"), AQUA_TABLE)
    assert all(i.prompt_hash_ok for i in result.items)


def test_task_summaries_by_hand(default_run):
    result, _ = default_run
    med, agro, aqua = result.tasks
    assert (med.task, med.source, med.items) == ("med_bench", str(MED), 6)
    assert med.answer_agreement == pytest.approx(5 / 6)  # only 104 differs
    assert med.logged_em == pytest.approx(4 / 6)  # 1+1+1+0+1+0
    assert med.logged_f1 == pytest.approx(5 / 6)  # 1+1+1+1/3+1+2/3
    assert med.replayed_em == pytest.approx(5 / 6)  # 1+1+1+1+1+0
    assert med.replayed_f1 == pytest.approx((5 + 2 / 3) / 6)  # 1+1+1+1+1+2/3
    assert (med.quirk_items, med.prompt_hash_mismatches, med.truncated_by_cap) == (1, 0, 1)

    assert (agro.task, agro.items) == ("agro_bench", 7)
    assert agro.answer_agreement == pytest.approx(2 / 7)  # 2006, 2007
    assert agro.logged_em == pytest.approx(5 / 7)  # 1+0+0+1+1+1+1
    assert agro.logged_f1 == pytest.approx(5 / 7)
    assert agro.replayed_em == pytest.approx(5 / 7)  # 0+1+1+0+1+1+1
    assert agro.replayed_f1 == pytest.approx(5.5 / 7)  # 0+1+1+1/2+1+1+1
    assert (agro.quirk_items, agro.prompt_hash_mismatches, agro.truncated_by_cap) == (1, 0, 0)

    assert (aqua.task, aqua.items, aqua.answer_agreement) == ("aqua_bench", 3, pytest.approx(2 / 3))
    assert (aqua.logged_em, aqua.logged_f1, aqua.replayed_em, aqua.replayed_f1) == (None, None, None, None)
    assert (aqua.quirk_items, aqua.truncated_by_cap) == (0, 1)

    assert result.warnings == (f"2 item(s) cut short by the max_new_tokens cap of {CAP}",)


def test_raw_text_stop_token_and_prompt(tok, default_run):
    result, model = default_run
    by_key = {(i.task, i.meta_id): i for i in result.items}
    # Decoding stops at <|im_end|>: the junk after it is not in the raw text.
    assert by_key[("med_bench", 106)].replayed_raw == REPLIES[("med_bench", 106)]
    assert by_key[("med_bench", 106)].stopped
    # The capped item: CAP tokens of the reasoning, never stopped.
    capped = by_key[("med_bench", 103)]
    assert capped.generated_tokens == CAP and not capped.stopped
    assert capped.replayed_raw == tok.decode(tok.encode(LONG)[:CAP])
    # The prompt is the rendered chat (thinking on by default: ends in "<think>\n"), tokenized.
    text = model.prompt_text[("med_bench", 101)]
    assert text.startswith("<|im_start|>user\nОтветьте на вопрос по медицине")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert by_key[("med_bench", 101)].prompt_tokens == len(tok.encode(text))
    # Batch size 1 (the default): one call per item, each with min(max_gen_toks, cap) tokens.
    assert model.calls == [(1, CAP)] * 16


def test_to_json_shape(default_run):
    result, _ = default_run
    out = result.to_json()
    assert json.loads(json.dumps(out, ensure_ascii=False)) == out
    assert list(out) == [
        "reasoning_split",
        "enable_thinking",
        "max_new_tokens_cap",
        "tasks",
        "items",
        "submission",
        "warnings",
    ]
    assert (out["reasoning_split"], out["enable_thinking"], out["max_new_tokens_cap"]) == ("qwen3", None, CAP)
    assert out["submission"] is None
    assert out["tasks"][1] == {
        "task": "agro_bench",
        "source": str(AGRO),
        "items": 7,
        "answer_agreement": 2 / 7,
        # the fixture's resps[0][0] lack the "\n\n" the qwen3 split leaves after </think>: no reply reproduced
        "reproduced": 0,
        "logged_em": 5 / 7,
        "logged_f1": 5 / 7,
        "replayed_em": 5 / 7,
        "replayed_f1": 5.5 / 7,
        "quirk_items": 1,
        "prompt_hash_mismatches": 0,
        "truncated_by_cap": 0,
    }
    item = out["items"][2]
    assert item == {
        "task": "med_bench",
        "doc_id": 2,
        "meta_id": 103,
        "prompt_hash_ok": True,
        "prompt_tokens": item["prompt_tokens"],
        "logged": "",
        "replayed": "",
        "replayed_raw": item["replayed_raw"],
        "equal": True,
        "gold": "A",
        "logged_em": 1.0,
        "logged_f1": 1.0,
        "replayed_em": 1.0,
        "replayed_f1": 1.0,
        "quirk": "logged:empty_reply;replayed:empty_reply",
        "truncated_by_cap": True,
        "logged_reply": "None",
        "replayed_reply": "None",
        "reproduced": True,
        "reference_replayed": None,
        "classification": None,
        "first_divergence": None,
        "near_tie": None,
    }
    assert isinstance(item["prompt_tokens"], int) and item["prompt_tokens"] > 0
    assert out["items"][-1]["gold"] is None and out["items"][-1]["logged_em"] is None


def test_unreproduced_items_are_classified_against_the_reference(tok, files):
    """With the reference's greedy ids, an item not reproduced is classified: the reference gives JAX's reply
    (med 104: the log is not reproduced by the reference either), or JAX differs from the reference (med 101:
    JAX answers C, the reference and the log B: a port divergence, at the token where the answers part)."""
    from audit.compare import submission_verdict

    jax_replies = {("med_bench", 101): THINK + "C"}
    jax = FakeModel(tok, files[:1], jax_replies)
    reference = FakeModel(tok, files[:1])
    generated = {prompt: reference([list(prompt)], CAP)[0] for prompt in reference.by_prompt}
    diverging = next(p for p, key in reference.by_prompt.items() if key == ("med_bench", 101))
    refs = ReferenceReplies(generated=generated, near_tie={diverging: True})
    result = replay_samples(
        files[:1], tokenizer=tok, chat_template=TEMPLATE, generate=jax, max_new_tokens=CAP, reference=refs
    )
    by_meta = {i.meta_id: i for i in result.items}
    assert by_meta[101].classification == PORT_DIVERGENCE and not by_meta[101].equal
    assert by_meta[101].first_divergence == len(tok.encode(THINK)) and by_meta[101].near_tie is True
    assert by_meta[101].reference_replayed == "B"
    assert (
        by_meta[104].classification == NOT_REPRODUCED_BY_REFERENCE and by_meta[104].first_divergence is None
    )
    assert [m for m, i in by_meta.items() if not i.equal] == [101, 104]
    # the fixture's resps[0][0] lack the "\n\n" the qwen3 split leaves after </think>: only the null reply of
    # 103 is reproduced as logged; the others differ in their reply, not in their final answer
    assert [m for m, i in by_meta.items() if i.reproduced] == [103] and result.tasks[0].reproduced == 1
    assert by_meta[102].classification == NOT_REPRODUCED_BY_REFERENCE and by_meta[102].equal
    verdict = submission_verdict(result.to_json())
    assert verdict["status"] == "not_reproduced" and verdict["unreproduced_final_answers"] == 2
    assert verdict["reproduced_items"] == 1 and len(verdict["reasons"]) == 5
    first = verdict["reasons"][0]
    assert first.startswith("med_bench doc 0: logged 'B' vs replayed '\\n\\nC'; port divergence"), first
    assert "a near-tie" in first and first.endswith("final answer differs")
    assert verdict["reasons"][1].endswith(f"{NOT_REPRODUCED_BY_REFERENCE}; final answer agrees")
    assert "med_bench doc 3: logged '<think>" in verdict["reasons"][2]
    assert verdict["reasons"][2].endswith(f"{NOT_REPRODUCED_BY_REFERENCE}; final answer differs")
    # the same replay without the edited JAX reply: only the final answer of 104 is not reproduced
    faithful = replay_samples(
        files[:1],
        tokenizer=tok,
        chat_template=TEMPLATE,
        generate=reference,
        max_new_tokens=CAP,
        reference=refs,
    )
    assert [i.meta_id for i in faithful.items if not i.equal] == [104]


def test_sample_is_a_reproducible_subset_per_task(tok, files):
    """--sample N --sample-seed S: N samples per task, in file order, the same for the same seed; each task draws
    its own subset (seeded with the task name), another seed another subset; N above the file's size keeps all."""
    med, agro = files[0], files[1]
    picked = {seed: [s.doc_id for s in select_samples(agro, sample=(3, seed))] for seed in (0, 1)}
    assert all(len(ids) == 3 and ids == sorted(ids) for ids in picked.values()) and picked[0] != picked[1]
    assert picked[0] == [s.doc_id for s in select_samples(agro, sample=(3, 0))]
    assert [s.doc_id for s in select_samples(med, sample=(3, 0))] != picked[0]
    assert (
        select_samples(med, sample=(100, 0)) == med.samples
        and select_samples(med, limit=2) == med.samples[:2]
    )
    result, model = run(tok, files[:2], sample=(3, 1))
    assert [(i.task, i.doc_id) for i in result.items] == [
        (sf.task, s.doc_id) for sf in files[:2] for s in select_samples(sf, sample=(3, 1))
    ]
    assert [t.items for t in result.tasks] == [3, 3] and sum(n for n, _ in model.calls) == 6


def test_batches_share_a_budget_and_give_the_same_result(tok, files, default_run):
    result, model = run(tok, files, batch_size=5)
    assert model.calls == [(5, CAP), (5, CAP), (5, CAP), (1, CAP)]
    assert result == default_run[0]
    seen = []
    run(tok, files[:1], batch_size=4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 6), (6, 6)]


def test_no_cap_truncation_when_cap_exceeds_max_gen_toks(tok, files):
    # cap above the logged max_gen_toks=10000: the budget is 10000 and the long reasoning stops at <|im_end|>.
    result, model = run(tok, files[:1], max_new_tokens=20000)
    assert {c[1] for c in model.calls} == {10000}
    assert not any(i.truncated_by_cap for i in result.items)
    assert result.items[2].replayed_raw == LONG and result.items[2].replayed == ""
    assert result.warnings == ()


def test_limit(tok, files):
    result, _ = run(tok, files, limit=2)
    assert [t.items for t in result.tasks] == [2, 2, 2]
    assert [i.meta_id for i in result.items] == [101, 102, 2001, 2002, 501, 502]


# ---------------------------------------------------------------------------------------------------
# Reasoning split modes and enable_thinking.


def test_reasoning_split_modes_differ_on_the_reply_cut_before_think_end(tok, files):
    med = files[:1]
    got = {}
    for mode in ReasoningSplit:
        result, _ = run(tok, med, reasoning_split=mode, max_new_tokens=20000)
        assert result.reasoning_split is mode and result.to_json()["reasoning_split"] == mode.value
        got[mode] = {i.meta_id: i for i in result.items}
    # 103 (gold "A"), raw = LONG, no </think> at all:
    # qwen3: everything is reasoning, content null -> "" -> EM 1, F1 1, only through the quirk.
    item = got[ReasoningSplit.QWEN3][103]
    assert (item.replayed, item.replayed_em, item.replayed_f1, item.replayed_quirk) == (
        "",
        1,
        1,
        "empty_reply",
    )
    # the others return the reasoning as content: lstripped, it normalises to many tokens vs gold "" -> 0, 0.
    for mode in (ReasoningSplit.QWEN3_LEGACY, ReasoningSplit.QWEN3_THINKING_OFF, ReasoningSplit.NONE):
        item = got[mode][103]
        assert (item.replayed, item.equal, item.replayed_em, item.replayed_f1) == (LONG.lstrip(), False, 0, 0)
        assert item.quirk == "logged:empty_reply"
    # 104: raw "\nВопрос простой.\n</think>\n\nD" has </think> but no <think> (the prompt opened it).
    # qwen3 and thinking_off split at </think> -> "D"; legacy needs both tags and none keeps it all:
    # "вопрос простой think d" (4 tokens) vs "d": EM 0, P = 1/4, R = 1 -> F1 = (1/2)/(5/4) = 2/5.
    for mode in (ReasoningSplit.QWEN3, ReasoningSplit.QWEN3_THINKING_OFF):
        assert (got[mode][104].replayed, got[mode][104].replayed_em) == ("D", 1)
    for mode in (ReasoningSplit.QWEN3_LEGACY, ReasoningSplit.NONE):
        item = got[mode][104]
        assert item.replayed == "Вопрос простой.\n</think>\n\nD"
        assert (item.replayed_em, item.replayed_f1) == (0, pytest.approx(2 / 5))
    # 101: "\nКороткое рассуждение.\n</think>\n\nB" under "none": "короткое рассуждение think b" vs "b"
    # -> EM 0, P = 1/4, R = 1 -> F1 = 2/5.
    item = got[ReasoningSplit.NONE][101]
    assert (item.replayed_em, item.replayed_f1) == (0, pytest.approx(2 / 5))


def test_enable_thinking_false_renders_an_empty_think_block(tok, files):
    replies = {("med_bench", 103): "A"}  # thinking off: the model answers directly
    result, model = run(
        tok,
        files[:1],
        replies=replies,
        template_kwargs={"enable_thinking": False},
        reasoning_split=ReasoningSplit.QWEN3_THINKING_OFF,
    )
    assert model.prompt_text[("med_bench", 103)].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert result.to_json()["enable_thinking"] is False
    item = result.items[2]
    # "A" vs gold "A": a genuine answer, not the quirk ("a" == "a" with articles kept); logged "" is the quirk.
    assert (item.replayed, item.replayed_em, item.quirk) == ("A", 1, "logged:empty_reply")
    assert result.warnings == ()
    # The qwen3 split (thinking on) with enable_thinking=False is flagged as inconsistent.
    result, _ = run(tok, files[:1], replies=replies, template_kwargs={"enable_thinking": False})
    assert "enable_thinking=False" in result.warnings[0]


# ---------------------------------------------------------------------------------------------------
# gen_kwargs: until strings and max_gen_toks; prompt_hash.


def edited_file(tmp_path: Path, source: Path, edits) -> Path:
    """A copy of a fixture samples file (same name) with ``edits[line_index](record)`` applied."""
    lines = source.read_text(encoding="utf-8").split("\n")
    for index, edit in edits.items():
        record = json.loads(lines[index])
        edit(record)
        lines[index] = json.dumps(record, ensure_ascii=False)
    path = tmp_path / source.name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def set_gen_kwargs(**kwargs):
    def edit(record):
        record["arguments"]["gen_args_0"]["arg_1"].update(kwargs)

    return edit


def test_until_strings_cut_before_the_reasoning_split(tok, tmp_path):
    path = edited_file(
        tmp_path,
        MED,
        {
            0: set_gen_kwargs(until=["\n\n"]),  # lm-eval's default until
            1: set_gen_kwargs(until="Пояснение"),  # a single string is one stop string
            4: set_gen_kwargs(until=["x", "y", "z", "w", "Пояснение"]),  # only until[:4] reaches the server
        },
    )
    replies = {
        # cut at the first "\n\n", which is INSIDE the reasoning: no </think> left -> null content -> ""
        ("med_bench", 101): "\nДумаю.\n\nЕщё думаю.\n</think>\n\nB",
        ("med_bench", 102): THINK + "C\nПояснение: альфа-амилаза слюны.",  # -> "C\n" (lstrip only)
        ("med_bench", 105): THINK + "A\nПояснение: микобактерия.",  # the 5th until string is not applied
    }
    result, _ = run(tok, load_samples_files([path]), replies=replies, max_new_tokens=20000)
    one, two, _, _, five, _ = result.items
    assert one.replayed_raw == replies[("med_bench", 101)]
    assert (one.replayed, one.stopped, one.equal) == ("", True, False)
    # "" vs gold "B": EM 0, F1 int([] == ["b"]) = 0
    assert (one.replayed_em, one.replayed_f1, one.replayed_quirk) == (0, 0, None)
    assert (two.replayed, two.stopped, two.replayed_em, two.replayed_f1) == ("C\n", True, 1, 1)
    assert not two.equal  # "C\n" != "C", though it scores the same
    # "a пояснение микобактерия" -> articles deleted -> "пояснение микобактерия" vs gold "" -> 0, 0
    assert (five.replayed, five.replayed_em, five.replayed_f1) == ("A\nПояснение: микобактерия.", 0, 0)
    assert result.warnings == (f"{path}:5: 5 until strings; lm-eval sends only the first 4",)


def test_max_gen_toks_per_item_and_default(tok, tmp_path):
    def drop_max_gen_toks(record):
        del record["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"]

    path = edited_file(tmp_path, MED, {0: set_gen_kwargs(max_gen_toks=4), 1: drop_max_gen_toks})
    result, model = run(tok, load_samples_files([path]), max_new_tokens=200, batch_size=8)
    # Budgets: 4 (logged), 200 (missing -> lm-eval's 256, capped at 200), then 200 for the rest (10000 capped).
    assert model.calls == [(1, 4), (5, 200)]
    first, second, third = result.items[:3]
    # THINK + "B" (7 tokens) is cut before </think> by max_gen_toks itself, not by the cap.
    assert (first.generated_tokens, first.stopped, first.truncated_by_cap) == (4, False, False)
    assert first.replayed == ""  # cut inside the reasoning: null content
    assert second.stopped and not second.truncated_by_cap
    assert third.stopped and not third.truncated_by_cap  # LONG is shorter than 200 tokens


def test_prompt_hash_mismatch_is_flagged_and_replayed(tok, tmp_path):
    path = edited_file(tmp_path, MED, {3: lambda r: r.update(prompt_hash="0" * 64)})
    result, _ = run(tok, load_samples_files([path]))
    item = result.items[3]
    assert item.meta_id == 104 and not item.prompt_hash_ok
    assert item.replayed == "D"  # still replayed
    assert [i.prompt_hash_ok for i in result.items] == [True, True, True, False, True, True]
    assert result.tasks[0].prompt_hash_mismatches == 1
    assert result.to_json()["items"][3]["prompt_hash_ok"] is False
    (warning,) = [w for w in result.warnings if "prompt_hash" in w]
    assert warning.startswith(f"{path}:4: prompt_hash mismatch (logged 000000000000...")


def test_logged_filter_and_metric_inconsistencies_are_warned(tok, tmp_path):
    def tamper(record):
        record["filtered_resps"] = ["B"]  # resps says "Ответ: B"
        record["em"] = 1

    path = edited_file(tmp_path, MED, {5: tamper})
    result, _ = run(tok, load_samples_files([path]), max_new_tokens=20000)
    assert result.warnings == (
        f"{path}:6: logged filtered_resps[0] 'B' is not MERA's filter of resps[0][0] 'Ответ: B'",
        f"{path}:6: logged metrics {{'em': 1, 'f1': 0.6666666666666666}} != recomputed "
        "{'f1': 1.0, 'em': 1}",
    )


# ---------------------------------------------------------------------------------------------------
# Submission zips (MERA's log_to_submission.py format).


def build_submission(tmp_path: Path, edit=None) -> Path:
    """``submission.zip``: one ``ruTXT*.json`` per task ({"data": {"test": [{"outputs", "meta": {"id"}}]}})
    and ``logs_public.zip`` with the samples files, as MERA's log_to_submission.py writes them."""
    dst = tmp_path / "submission"
    (dst / "logs_public").mkdir(parents=True)
    for task, path in ALL.items():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        test = [{"outputs": r["filtered_resps"][0], "meta": {"id": r["doc"]["meta"]["id"]}} for r in records]
        if edit is not None:
            edit(task, test)
        with open(dst / f"{DST_NAMES[task]}.json", "w", encoding="utf-8") as f:
            json.dump({"data": {"test": test}}, f, ensure_ascii=False, indent=4)
        shutil.copy(path, dst / "logs_public" / path.name)
    shutil.make_archive(str(dst / "logs_public"), "zip", str(dst / "logs_public"))
    shutil.rmtree(dst / "logs_public")
    return Path(shutil.make_archive(str(tmp_path / "submission"), "zip", str(dst)))


def submission_run(tok, files, path, **kwargs):
    model = FakeModel(tok, files)
    return replay_submission(
        path, tokenizer=tok, chat_template=TEMPLATE, generate=model, max_new_tokens=CAP, **kwargs
    )


def test_submission_replay_matches_the_samples_replay(tok, files, default_run, tmp_path):
    path = build_submission(tmp_path)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == [
            "logs_public.zip",
            "ruTXTAgroBench.json",
            "ruTXTAquaBench.json",
            "ruTXTMedQFundamental.json",
        ]
    result = submission_run(tok, files, path)
    assert result.submission.to_json() == {"path": str(path), "output_mismatches": []}
    assert result.to_json()["submission"] == {"path": str(path), "output_mismatches": []}
    # Tasks in name order; the same items and scores as replaying the files themselves.
    assert [t.task for t in result.tasks] == ["agro_bench", "aqua_bench", "med_bench"]
    assert result.tasks[2].source.endswith("!logs_public.zip!" + MED.name)
    assert_rows(rows(result, "med_bench"), MED_TABLE)
    assert_rows(rows(result, "agro_bench"), AGRO_TABLE)
    assert_rows(rows(result, "aqua_bench"), AQUA_TABLE)


def test_submission_with_a_tampered_output(tok, files, tmp_path):
    def edit(task, test):
        if task == "med_bench":
            assert test[5] == {"outputs": "Ответ: B", "meta": {"id": 106}}
            test[5]["outputs"] = "B"  # "cleaned" after the run: EM 0 -> 1 on the server

    path = build_submission(tmp_path, edit)
    result = submission_run(tok, files, path, limit=1)
    assert result.submission.output_mismatches == (
        "med_bench meta.id=106: submission outputs 'B' != logged filtered_resps[0] 'Ответ: B'",
    )
    assert f"{path}: 1 submission output(s) differ from the logs" in result.warnings


# ---------------------------------------------------------------------------------------------------
# Bad inputs: SamplesError with a one-line message naming the file (and line).


def test_malformed_samples_line(tmp_path):
    lines = MED.read_text(encoding="utf-8").split("\n")
    lines[1] = lines[1][:50]
    path = tmp_path / MED.name
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(SamplesError, match=r"^.*samples_med_bench_.*\.jsonl:2: invalid JSON: ") as err:
        load_samples_files([path])
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_missing_file_and_duplicate_task(tmp_path):
    with pytest.raises(SamplesError, match="cannot read"):
        load_samples_files([tmp_path / MED.name])
    with pytest.raises(SamplesError, match=r"a second samples file for task med_bench \(first: "):
        load_samples_files([MED, MED])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_gen_kwargs(max_gen_toks=0), "gen_kwargs max_gen_toks must be a positive integer, got 0"),
        (set_gen_kwargs(max_gen_toks="10"), "gen_kwargs max_gen_toks must be a positive integer, got '10'"),
        (set_gen_kwargs(until=[1]), "gen_kwargs until must be a string or a list of strings"),
        (
            lambda r: r["arguments"]["gen_args_0"].update(arg_0=["not json"]),
            "arg_0 is not a JSON chat: Expecting value",
        ),
        (
            lambda r: r["arguments"]["gen_args_0"].update(arg_0=['[{"role": "assistant", "content": "x"}]']),
            "the chat template rejected the messages: No user query found in messages.",
        ),
    ],
)
def test_bad_gen_kwargs_and_messages(tok, tmp_path, edit, message):
    path = edited_file(tmp_path, MED, {2: edit})
    with pytest.raises(SamplesError) as err:
        run(tok, load_samples_files([path]))
    assert str(err.value) == f"{path}:3: {message}"


def test_empty_samples_file(tok, tmp_path):
    path = tmp_path / MED.name
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(SamplesError, match=r"no samples to replay"):
        run(tok, load_samples_files([path]))


def test_bad_submission_zips(tok, files, tmp_path):
    bad = tmp_path / "submission.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SamplesError, match=r"submission\.zip: not a readable zip file"):
        submission_run(tok, files, bad)
    no_logs = tmp_path / "no_logs.zip"
    with zipfile.ZipFile(no_logs, "w") as zf:
        zf.writestr("ruTXTMedQFundamental.json", '{"data": {"test": []}}')
    with pytest.raises(SamplesError, match=r"no_logs\.zip: no logs_public\.zip inside"):
        submission_run(tok, files, no_logs)


def test_bad_arguments(tok, files):
    with pytest.raises(ValueError, match="at least 1"):
        run(tok, files, max_new_tokens=0)
    with pytest.raises(ValueError, match="not a valid ReasoningSplit"):
        run(tok, files, reasoning_split="vllm-0.9")


def test_bad_gold_is_rejected_before_generating(tok, tmp_path):
    path = edited_file(tmp_path, MED, {5: lambda r: r["doc"].update(outputs=None)})
    files = load_samples_files([path])
    model = FakeModel(tok, files)
    with pytest.raises(SamplesError, match=r":6: doc\.outputs is NoneType, not a string$"):
        replay_samples(files, tokenizer=tok, chat_template=TEMPLATE, generate=model, max_new_tokens=CAP)
    assert model.calls == []
